"""Session tickets: after one munge exchange with a daemon, a client signs its next requests
to that daemon with the key the exchange set up, instead of encoding a munge credential each.

Strategy (stateless on the daemon, like TLS session tickets, RFC 5077).  A request whose
munge credential carried a reply key K (scheme 3) is answered with a *ticket* as well: K and
the uid munged vouched for, sealed with a secret only this daemon instance knows (random at
start, shared by its serving processes through the replay table, daemon.replay).  The client
sends the ticket with its next requests (scheme 4), each HMAC-signed with K; the daemon
unseals K from the ticket, checks the HMAC and signs its answer with K.  Nothing is kept per
client, so every serving process takes every ticket; a restart voids them all, and the
client, refused with the daemon's munge signature, asks again with munge (daemon.client).

A ticket proves what its credential proved -- that uid, on a host of the munge realm -- for
`lifetime` seconds: K is readable only by ReplyUser on the client (munge's uid restriction)
and by the daemon.  Ticketed requests carry fresh nonces and timestamps, which the daemon's
nonce cache checks as for every scheme (a replayed request is refused).

Ticket layout (92 bytes; integers big-endian)::

    nonce 16 | expiry u64 (ms since the epoch, daemon clock) | uid u32 | K xor pad 32 | tag 32

    pad = HMAC-SHA256(Kpad, nonce), tag = HMAC-SHA256(Ktag, the 60 bytes before it),
    Kpad / Ktag = HMAC-SHA256(secret, label): the pad is a PRF output, used once per nonce.

Pure: no I/O (the caller gives the time and the secret).
"""
from __future__ import annotations

import os
import struct
from _operator import _compare_digest as compare_digest

from . import protocol as P
from .auth import AuthError, _HmacSha256

SECRET_SIZE = 32
_HEAD = struct.Struct(">16sQI")
_TAG = 32
TICKET_SIZE = _HEAD.size + P.REPLY_KEY_SIZE + _TAG      # 92
_PAD_LABEL = b"slurm-callerid ticket pad v1\0"
_TAG_LABEL = b"slurm-callerid ticket tag v1\0"


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b[:len(a)], "big")).to_bytes(len(a), "big")


def expiry_ms(ticket: bytes) -> int:
    """When a ticket stops being taken (daemon clock), as the client reads it."""
    return _HEAD.unpack_from(ticket)[1] if len(ticket) == TICKET_SIZE else 0


class Tickets:
    """Issues and opens one daemon instance's tickets."""

    def __init__(self, secret: bytes, lifetime: float):
        if len(secret) < SECRET_SIZE:
            raise ValueError("ticket secret too short")
        master = _HmacSha256(secret).mac
        self._pad = _HmacSha256(master(_PAD_LABEL)).mac
        self._tag = _HmacSha256(master(_TAG_LABEL)).mac
        self.lifetime_ms = int(lifetime * 1000)

    def issue(self, key: bytes, uid: int, now_ms: int) -> bytes:
        """A ticket for reply key `key` of `uid`, taken until now + lifetime."""
        nonce = os.urandom(16)
        body = _HEAD.pack(nonce, now_ms + self.lifetime_ms, uid) + _xor(key, self._pad(nonce))
        return body + self._tag(body)

    def open(self, ticket: bytes, now_ms: int) -> tuple[bytes, int]:
        """-> (reply key, uid).  Raises AuthError: "bad-ticket" (not sealed by this instance:
        another daemon's, from before a restart, or altered) or "expired-ticket"."""
        if len(ticket) != TICKET_SIZE:
            raise AuthError("bad-ticket", f"{len(ticket)} bytes, want {TICKET_SIZE}")
        body = ticket[:-_TAG]
        if not compare_digest(self._tag(body), ticket[-_TAG:]):
            raise AuthError("bad-ticket", "not sealed by this daemon (restarted?) or altered")
        nonce, expiry, uid = _HEAD.unpack_from(body)
        if now_ms > expiry:
            raise AuthError("expired-ticket", f"expired {now_ms - expiry} ms ago")
        return _xor(body[_HEAD.size:], self._pad(nonce)), uid
