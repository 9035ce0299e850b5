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
    signed = P.signed_bytes(ftype, auth.scheme, body)
    return P.encode_frame(ftype, auth.scheme, body, auth.sign(ftype, signed))


def seal_request(req: P.Request, auth) -> bytes:
    return seal(P.TYPE_REQUEST, req.encode_body(), auth)


def seal_reply(reply: P.Reply, auth) -> bytes:
    return seal(P.TYPE_REPLY, reply.encode_body(), auth)


def open_request(frame: P.Frame, auth) -> tuple[P.Request, int]:
    """Decode and authenticate a request frame -> (request, sender uid).

    Raises ProtocolError (malformed) or AuthError (bad/replayed credential, wrong scheme)."""
    if frame.type != P.TYPE_REQUEST:
        raise P.ProtocolError("unexpected-type", "expected a request")
    req = P.Request.decode_body(frame.body)
    if frame.auth != auth.scheme:
        raise AuthError("wrong-auth-scheme",
                        f"got {P.AUTH_NAMES.get(frame.auth)}, want {auth.name}")
    uid = auth.verify(P.TYPE_REQUEST, frame.signed_bytes, frame.auth_blob)
    return req, uid


def open_reply(frame: P.Frame, auth, nonce: bytes, trusted_uids=frozenset({0})) -> P.Reply:
    """Decode, authenticate and bind a reply to our request's nonce.  Raises ReplyRejected."""
    try:
        if frame.type != P.TYPE_REPLY:
            raise ReplyRejected("unexpected-type", "expected a reply")
        if frame.auth != auth.scheme:
            raise ReplyRejected("wrong-auth-scheme",
                                f"got {P.AUTH_NAMES.get(frame.auth)}, want {auth.name}")
        reply = P.Reply.decode_body(frame.body)
        uid = auth.verify(P.TYPE_REPLY, frame.signed_bytes, frame.auth_blob)
    except P.ProtocolError as e:
        raise ReplyRejected("malformed", str(e)) from None
    except AuthError as e:
        raise ReplyRejected("bad-auth", str(e)) from None
    if uid not in trusted_uids:
        raise ReplyRejected("untrusted-sender", f"reply signed by uid {uid}")
    if not compare_digest(reply.nonce, nonce):
        raise ReplyRejected("wrong-nonce", "reply is not for this request")
    return reply
