"""Authenticated messages: protocol frames + auth (still no sockets)."""
from __future__ import annotations

from _operator import _compare_digest as compare_digest   # = hmac.compare_digest, no hashlib

from . import protocol as P
from .auth import AuthError


class ReplyRejected(Exception):
    """A reply that the client must not trust.  `reason`: short stable token."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def seal(ftype: int, body: bytes, auth) -> bytes:
    """An answer frame (replies are signed by what opened their request)."""
    signed = P.signed_bytes(ftype, auth.scheme, body)
    return P.encode_frame(ftype, auth.scheme, body, auth.sign(ftype, signed))


def seal_requests(reqs, auth, peer=None):
    """Requests in one frame (one credential for all; a single one goes alone as a request
    frame) -> (frame bytes, what authenticates the answer: `auth`, or the reply key that
    the credential carries, or the session key of the ticket `auth` keeps for `peer`)."""
    if len(reqs) == 1:
        ftype, body = P.TYPE_REQUEST, reqs[0].encode_body()
    else:
        ftype, body = P.TYPE_REQUESTS, P.encode_batch(reqs)
    sealer = auth.sealer(peer)
    scheme = sealer.request_scheme
    blob, reply_auth = sealer.sign_request(ftype, P.signed_bytes(ftype, scheme, body), peer)
    return P.encode_frame(ftype, scheme, body, blob), reply_auth


def seal_request(req, auth, peer=None):
    """seal_requests of one request."""
    return seal_requests([req], auth, peer)


def seal_reply(reply: P.Reply, auth) -> bytes:
    return seal(P.TYPE_REPLY, reply.encode_body(), auth)


def seal_replies(replies, auth) -> bytes:
    """The replies to a requests frame, in one frame."""
    return seal(P.TYPE_REPLIES, P.encode_batch(replies), auth)


def requests_of(frame: P.Frame) -> list[P.Request]:
    """The request(s) of a request or requests frame, not authenticated (ProtocolError)."""
    if frame.type == P.TYPE_REQUEST:
        return [P.Request.decode_body(frame.body)]
    if frame.type == P.TYPE_REQUESTS:
        return P.decode_requests(frame.body)
    raise P.ProtocolError("unexpected-type", "expected a request")


def open_requests(frame: P.Frame, auth):
    """Decode and authenticate a request or requests frame -> (requests, sender uid, what
    signs the answer).

    Raises ProtocolError (malformed) or AuthError (bad/replayed credential, wrong scheme)."""
    reqs = requests_of(frame)
    uid, reply_auth = auth.verify_request(frame.auth, frame.type, frame.signed_bytes,
                                          frame.auth_blob)
    return reqs, uid, reply_auth


def open_replies(frame: P.Frame, reply_auth, nonces, trusted_uids=frozenset({0})) -> list[P.Reply]:
    """Decode, authenticate (`reply_auth`: from seal_requests) and bind the reply (or
    replies) to our requests' nonces, in their order: every nonce answered once, nothing
    else.  Raises ReplyRejected."""
    want = P.TYPE_REPLY if len(nonces) == 1 else P.TYPE_REPLIES
    try:
        if frame.type != want:
            raise ReplyRejected("unexpected-type", f"expected frame type {want}")
        verifier = reply_auth.accepts(frame.auth)
        if verifier is None:
            raise ReplyRejected("wrong-auth-scheme",
                                f"got {P.AUTH_NAMES.get(frame.auth)}, want {reply_auth.name}")
        replies = ([P.Reply.decode_body(frame.body)] if want == P.TYPE_REPLY
                   else P.decode_replies(frame.body))
        uid = verifier.verify(frame.type, frame.signed_bytes, frame.auth_blob)
    except P.ProtocolError as e:
        raise ReplyRejected("malformed", str(e)) from None
    except AuthError as e:
        raise ReplyRejected("bad-auth", str(e)) from None
    if uid not in trusted_uids:
        raise ReplyRejected("untrusted-sender", f"reply signed by uid {uid}")
    if len(replies) != len(nonces) or not all(
            compare_digest(r.nonce, n) for r, n in zip(replies, nonces)):
        raise ReplyRejected("wrong-nonce", "reply is not for this request")
    return replies


def open_request(frame: P.Frame, auth):
    """open_requests for a frame that must hold exactly one request -> (request, uid, what
    signs the answer)."""
    if frame.type != P.TYPE_REQUEST:
        raise P.ProtocolError("unexpected-type", "expected a request")
    reqs, uid, reply_auth = open_requests(frame, auth)
    return reqs[0], uid, reply_auth


def open_reply(frame: P.Frame, reply_auth, nonce: bytes, trusted_uids=frozenset({0})) -> P.Reply:
    """Decode, authenticate and bind a reply to our request's nonce.  Raises ReplyRejected."""
    return open_replies(frame, reply_auth, [nonce], trusted_uids)[0]
