"""Sans-IO wire protocol of the caller-ID daemon.

No sockets here: bytes in, typed messages out (and back).  Everything is bounded: a frame
can never be larger than MAX_FRAME bytes, and the streaming decoder never buffers more.

Frame layout (all integers big-endian)::

    offset size field
    0      4    magic  b"CLID"
    4      1    version (1)
    5      1    type: 1 = request, 2 = reply, 3 = requests, 4 = replies
    6      1    auth scheme: 1 = munge, 2 = hmac-sha256, 3 = munge with a reply key,
                4 = munge session (a ticket from an earlier scheme-3 answer)
    7      1    reserved, must be 0
    8      2    body length   (<= MAX_BODY)
    10     2    auth length   (<= MAX_AUTH)
    12     .    body
    12+b   .    auth blob (munge credential or HMAC tag)

The *signed bytes* of a frame are bytes 0..9 (header without the auth length) followed by the
body.  The auth blob authenticates exactly these bytes (munge: they are the credential payload;
hmac: HMAC-SHA256 over a direction label and them).  Scheme 3: a request's credential payload
is the signed bytes followed by a fresh 32-byte reply key (the credential encrypted and
decodable only by the daemon's uid); its answer is authenticated like hmac, with that key,
and may carry a session ticket (auth blob = HMAC tag over the signed bytes and the ticket,
then the ticket; daemon.session).  Scheme 4: a request's auth blob is such a ticket followed
by the HMAC tag with the key it seals; the answer is authenticated with that key.

Request body (62 bytes)::

    family u8 (4|6), proto u8 (6 tcp|17 udp), src_port u16, dst_port u16,
    src_addr 16 bytes, dst_addr 16 bytes (IPv4: 4 address bytes then 12 zero bytes),
    nonce 16 bytes, timestamp u64 (milliseconds since the epoch)

Reply body (35 + n bytes, n <= 64)::

    status u8 (1 found, 2 unknown, 3 refused, 4 error, 5 busy), reserved u8 (0),
    job_id u32 (0 = none), job_uid u32 (0xFFFFFFFF = none),
    nonce 16 bytes (the request's), timestamp u64 (ms, daemon clock),
    node name length u8, node name (printable ASCII)

Requests / replies body (a client's questions to one daemon that waited while its previous
request was answered, sent together; the answers come back together)::

    count u8 (1..MAX_BATCH), then count request bodies (62 bytes each) / reply bodies (each
    35 + its node name length).  Every entry keeps its own nonce: the client matches answers
    to questions by nonce, and the daemon checks each nonce for replay.
"""
from __future__ import annotations

import os
import struct
import time

# Login path: the PAM hook imports this module at every ssh login, so no dataclasses, enum,
# ipaddress or socket here at import time (ipaddress is imported where addresses are parsed
# into objects; the client packs its request with pack_request(), which needs none of them).

MAGIC = b"CLID"
VERSION = 1

TYPE_REQUEST = 1
TYPE_REPLY = 2
TYPE_REQUESTS = 3
TYPE_REPLIES = 4
TYPES = (TYPE_REQUEST, TYPE_REPLY, TYPE_REQUESTS, TYPE_REPLIES)
REQUEST_TYPES = (TYPE_REQUEST, TYPE_REQUESTS)
MAX_BATCH = 16

AUTH_MUNGE = 1
AUTH_HMAC = 2
AUTH_MUNGE_KEY = 3
AUTH_MUNGE_SESSION = 4
AUTH_NAMES = {AUTH_MUNGE: "munge", AUTH_HMAC: "hmac", AUTH_MUNGE_KEY: "munge-key",
              AUTH_MUNGE_SESSION: "munge-session"}
REPLY_KEY_SIZE = 32

PROTO_TCP = 6
PROTO_UDP = 17
PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp"}

STATUS_FOUND = 1
STATUS_UNKNOWN = 2
STATUS_REFUSED = 3
STATUS_ERROR = 4
STATUS_BUSY = 5            # the asker's uid is over the daemon's rate limit: ask again later
STATUS_NAMES = {STATUS_FOUND: "found", STATUS_UNKNOWN: "unknown",
                STATUS_REFUSED: "refused", STATUS_ERROR: "error", STATUS_BUSY: "busy"}

NO_JOB = 0
NO_UID = 0xFFFFFFFF

HEADER = struct.Struct(">4sBBBBHH")
HEADER_SIZE = HEADER.size  # 12
SIGNED_HEADER_SIZE = 10
REQUEST_BODY = struct.Struct(">BBHH16s16s16sQ")
REQUEST_SIZE = REQUEST_BODY.size  # 62
REPLY_FIXED = struct.Struct(">BBII16sQB")
MAX_NODE_NAME = 64
NONCE_SIZE = 16

MAX_BODY = 1600             # >= 1 + MAX_BATCH * (35 + MAX_NODE_NAME): the largest replies
MAX_AUTH = 1024
MAX_FRAME = HEADER_SIZE + MAX_BODY + MAX_AUTH


class ProtocolError(Exception):
    """Input that is not a valid frame/message.  `reason` is a short stable token."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class _Frozen:
    """Plain immutable record: __init__ sets ``__slots__`` (the fields, in order) once;
    equality, hash and repr over them, like a frozen dataclass."""

    __slots__ = ()

    def _values(self):
        return tuple(getattr(self, n) for n in self.__slots__)

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"cannot delete field {name!r}")

    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self):
        return hash(self._values())

    def __reduce__(self):           # copy / pickle
        return type(self), self._values()

    def __repr__(self):
        return "%s(%s)" % (type(self).__qualname__,
                           ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__))


_set = object.__setattr__


class Frame(_Frozen):
    __slots__ = ("type", "auth", "body", "auth_blob", "version")

    def __init__(self, type: int, auth: int, body: bytes, auth_blob: bytes,
                 version: int = VERSION):
        _set(self, "type", type)
        _set(self, "auth", auth)
        _set(self, "body", body)
        _set(self, "auth_blob", auth_blob)
        _set(self, "version", version)

    @property
    def signed_bytes(self) -> bytes:
        return signed_bytes(self.type, self.auth, self.body, self.version)


def signed_bytes(ftype: int, auth: int, body: bytes, version: int = VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, ftype, auth, 0, len(body), 0)[:SIGNED_HEADER_SIZE] + body


def encode_frame(ftype: int, auth: int, body: bytes, auth_blob: bytes) -> bytes:
    if ftype not in TYPES:
        raise ValueError("bad frame type")
    if auth not in AUTH_NAMES:
        raise ValueError("bad auth scheme")
    if len(body) > MAX_BODY:
        raise ValueError("body too large")
    if len(auth_blob) > MAX_AUTH:
        raise ValueError("auth blob too large")
    return HEADER.pack(MAGIC, VERSION, ftype, auth, 0, len(body), len(auth_blob)) + body + auth_blob


def _check_header(buf: bytes) -> tuple[int, int, int, int]:
    magic, version, ftype, auth, reserved, blen, alen = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError("bad-magic", repr(bytes(magic)))
    if version != VERSION:
        raise ProtocolError("unknown-version", str(version))
    if ftype not in TYPES:
        raise ProtocolError("bad-type", str(ftype))
    if auth not in AUTH_NAMES:
        raise ProtocolError("bad-auth-scheme", str(auth))
    if reserved != 0:
        raise ProtocolError("bad-reserved", str(reserved))
    if blen > MAX_BODY:
        raise ProtocolError("oversized", f"body {blen} > {MAX_BODY}")
    if alen > MAX_AUTH:
        raise ProtocolError("oversized", f"auth {alen} > {MAX_AUTH}")
    if alen == 0:
        raise ProtocolError("missing-auth")
    return ftype, auth, blen, alen


def decode_frame(data: bytes) -> Frame:
    """Decode exactly one complete frame (no trailing bytes)."""
    if len(data) > MAX_FRAME:
        raise ProtocolError("oversized", f"{len(data)} > {MAX_FRAME}")
    if len(data) < HEADER_SIZE:
        raise ProtocolError("truncated", f"{len(data)} < header")
    ftype, auth, blen, alen = _check_header(data)
    need = HEADER_SIZE + blen + alen
    if len(data) < need:
        raise ProtocolError("truncated", f"{len(data)} < {need}")
    if len(data) > need:
        raise ProtocolError("trailing-bytes", f"{len(data) - need}")
    body = bytes(data[HEADER_SIZE:HEADER_SIZE + blen])
    return Frame(ftype, auth, body, bytes(data[HEADER_SIZE + blen:need]))


class FrameDecoder:
    """Streaming decoder: feed() bytes, get complete frames.  Buffers at most MAX_FRAME bytes.

    After an error the decoder is poisoned (every later feed raises the same error): the
    caller must close the connection.  `eof()` raises "truncated" if a partial frame is pending.
    """

    def __init__(self, max_frames: int = 1):
        self._buf = bytearray()
        self._need: int | None = None
        self._error: ProtocolError | None = None
        self._max_frames = max_frames
        self.frames_seen = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except ProtocolError as e:
            self._error = e
            self._buf.clear()
            raise

    def _feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        pos = 0
        n = len(data)
        while pos < n or (self._need is not None and len(self._buf) >= self._need):
            if self._need is None:
                take = min(HEADER_SIZE - len(self._buf), n - pos)
                self._buf += data[pos:pos + take]
                pos += take
                if len(self._buf) < HEADER_SIZE:
                    break
                _, _, blen, alen = _check_header(bytes(self._buf))
                self._need = HEADER_SIZE + blen + alen
            take = min(self._need - len(self._buf), n - pos)
            self._buf += data[pos:pos + take]
            pos += take
            if len(self._buf) < self._need:
                break
            frame = decode_frame(bytes(self._buf))
            self._buf.clear()
            self._need = None
            self.frames_seen += 1
            if self.frames_seen > self._max_frames:
                raise ProtocolError("too-many-frames", str(self.frames_seen))
            out.append(frame)
        return out

    def eof(self) -> None:
        if self._error is None and self._buf:
            self._error = ProtocolError("truncated", f"{len(self._buf)} bytes pending at EOF")
            raise self._error


# ---------------------------------------------------------------------------------------------
# Addresses


def normalise_addr(addr) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an address; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes plain IPv4."""
    import ipaddress
    if isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = addr
    else:
        s = str(addr).strip()
        if s.startswith("[") and s.endswith("]"):
            s = s[1:-1]
        if "%" in s:
            raise ValueError(f"scoped IPv6 address not supported: {addr!r}")
        ip = ipaddress.ip_address(s)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_V4_MAPPED = bytes(10) + b"\xff\xff"


def pack_addr_text(addr) -> tuple[int, bytes]:
    """Like normalise_addr() followed by packing, without ipaddress: a textual address ->
    (family 4|6, 16 wire bytes: IPv4 = 4 address bytes then 12 zero bytes).  Accepts and
    rejects the same strings as normalise_addr() (same ValueError messages)."""
    from _socket import AF_INET, AF_INET6, inet_pton
    s = str(addr).strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    if "%" in s:
        raise ValueError(f"scoped IPv6 address not supported: {addr!r}")
    try:
        if ":" in s:
            raw = inet_pton(AF_INET6, s)
            if raw[:12] == _V4_MAPPED:
                return 4, raw[12:] + bytes(12)
            return 6, raw
        return 4, inet_pton(AF_INET, s) + bytes(12)
    except (OSError, ValueError):   # OSError: not an address; ValueError: NUL in the string
        pass
    raise ValueError(f"{s!r} does not appear to be an IPv4 or IPv6 address")


def _pack_addr(ip) -> bytes:
    return ip.packed if ip.version == 6 else ip.packed + bytes(12)


def _unpack_addr(family: int, raw: bytes):
    import ipaddress
    if family == 4:
        if any(raw[4:]):
            raise ProtocolError("bad-address", "IPv4 address padding not zero")
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


# ---------------------------------------------------------------------------------------------
# Messages


def _new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def _now_ms() -> int:
    return int(time.time() * 1000)


_DEFAULT = object()


def _check_request_args(src_port, dst_port, proto) -> int:
    """Request.make's checks of ports and protocol; the protocol number."""
    if isinstance(proto, str):
        proto = {"tcp": PROTO_TCP, "udp": PROTO_UDP}[proto.lower()]
    for p in (src_port, dst_port):
        if not (0 < int(p) < 65536):
            raise ValueError(f"bad port {p}")
    return int(proto)


class Request(_Frozen):
    """src/dst: ipaddress.IPv4Address | IPv6Address (the same family)."""

    __slots__ = ("src", "src_port", "dst", "dst_port", "proto", "nonce", "timestamp_ms")

    def __init__(self, src, src_port: int, dst, dst_port: int, proto: int = PROTO_TCP,
                 nonce: bytes = _DEFAULT, timestamp_ms: int = _DEFAULT):
        _set(self, "src", src)
        _set(self, "src_port", src_port)
        _set(self, "dst", dst)
        _set(self, "dst_port", dst_port)
        _set(self, "proto", proto)
        _set(self, "nonce", _new_nonce() if nonce is _DEFAULT else nonce)
        _set(self, "timestamp_ms", _now_ms() if timestamp_ms is _DEFAULT else timestamp_ms)

    @property
    def family(self) -> int:
        return self.src.version

    @classmethod
    def make(cls, src, src_port: int, dst, dst_port: int, proto: int | str = PROTO_TCP,
             nonce: bytes | None = None, timestamp_ms: int | None = None) -> "Request":
        s = normalise_addr(src)
        d = normalise_addr(dst)
        if s.version != d.version:
            raise ValueError("source and destination address families differ")
        proto = _check_request_args(src_port, dst_port, proto)
        kw = {}
        if nonce is not None:
            kw["nonce"] = nonce
        if timestamp_ms is not None:
            kw["timestamp_ms"] = timestamp_ms
        r = cls(s, int(src_port), d, int(dst_port), proto, **kw)
        r.validate()
        return r

    def validate(self) -> None:
        if self.proto not in PROTO_NAMES:
            raise ValueError("bad protocol")
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError("bad nonce")
        if self.src.version != self.dst.version:
            raise ValueError("family mismatch")

    def encode_body(self) -> bytes:
        return REQUEST_BODY.pack(self.family, self.proto, self.src_port, self.dst_port,
                                 _pack_addr(self.src), _pack_addr(self.dst), self.nonce,
                                 self.timestamp_ms)

    @classmethod
    def decode_body(cls, body: bytes) -> "Request":
        if len(body) != REQUEST_SIZE:
            raise ProtocolError("bad-request", f"body length {len(body)} != {REQUEST_SIZE}")
        fam, proto, sp, dp, sa, da, nonce, ts = REQUEST_BODY.unpack(body)
        if fam not in (4, 6):
            raise ProtocolError("bad-request", f"family {fam}")
        if proto not in PROTO_NAMES:
            raise ProtocolError("bad-request", f"protocol {proto}")
        if sp == 0 or dp == 0:
            raise ProtocolError("bad-request", "port 0")
        src = _unpack_addr(fam, sa)
        dst = _unpack_addr(fam, da)
        return cls(src, sp, dst, dp, proto, nonce, ts)

    def describe(self) -> str:
        def ep(a, p):
            return f"[{a}]:{p}" if a.version == 6 else f"{a}:{p}"
        return f"{PROTO_NAMES[self.proto]} {ep(self.src, self.src_port)} -> {ep(self.dst, self.dst_port)}"


class PackedRequest:
    """What the client sends: a request already in wire form (see pack_request); has the
    ``nonce``, ``timestamp_ms``, ``encode_body()`` and ``describe()`` of a Request, built
    without ipaddress.  ``Request.decode_body(p.encode_body())`` gives the full Request."""

    __slots__ = ("family", "proto", "src_port", "dst_port", "src_packed", "dst_packed",
                 "nonce", "timestamp_ms")

    def __init__(self, family, proto, src_port, dst_port, src_packed, dst_packed, nonce,
                 timestamp_ms):
        self.family, self.proto = family, proto
        self.src_port, self.dst_port = src_port, dst_port
        self.src_packed, self.dst_packed = src_packed, dst_packed
        self.nonce, self.timestamp_ms = nonce, timestamp_ms

    def encode_body(self) -> bytes:
        return REQUEST_BODY.pack(self.family, self.proto, self.src_port, self.dst_port,
                                 self.src_packed, self.dst_packed, self.nonce,
                                 self.timestamp_ms)

    def describe(self) -> str:
        return Request.decode_body(self.encode_body()).describe()

    def __repr__(self):
        return "PackedRequest(%s)" % self.describe()


def pack_request(src, src_port: int, dst, dst_port: int, proto: int | str = PROTO_TCP,
                 nonce: bytes | None = None, timestamp_ms: int | None = None) -> PackedRequest:
    """Request.make() for textual addresses, without ipaddress (the login path): same checks,
    same errors, same body bytes."""
    fs, s = pack_addr_text(src)
    fd, d = pack_addr_text(dst)
    if fs != fd:
        raise ValueError("source and destination address families differ")
    proto = _check_request_args(src_port, dst_port, proto)
    r = PackedRequest(fs, proto, int(src_port), int(dst_port), s, d,
                      _new_nonce() if nonce is None else nonce,
                      _now_ms() if timestamp_ms is None else timestamp_ms)
    if r.proto not in PROTO_NAMES:
        raise ValueError("bad protocol")
    if len(r.nonce) != NONCE_SIZE:
        raise ValueError("bad nonce")
    return r


class Reply(_Frozen):
    __slots__ = ("status", "nonce", "job_id", "job_uid", "node", "timestamp_ms")

    def __init__(self, status: int, nonce: bytes, job_id: int = NO_JOB, job_uid: int = NO_UID,
                 node: str = "", timestamp_ms: int = _DEFAULT):
        _set(self, "status", status)
        _set(self, "nonce", nonce)
        _set(self, "job_id", job_id)
        _set(self, "job_uid", job_uid)
        _set(self, "node", node)
        _set(self, "timestamp_ms", _now_ms() if timestamp_ms is _DEFAULT else timestamp_ms)

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))

    def encode_body(self) -> bytes:
        name = self.node.encode("ascii", "replace")[:MAX_NODE_NAME]
        return REPLY_FIXED.pack(self.status, 0, self.job_id, self.job_uid, self.nonce,
                                self.timestamp_ms, len(name)) + name

    @classmethod
    def decode_body(cls, body: bytes) -> "Reply":
        reply, end = cls._decode_at(body, 0)
        if end != len(body):
            raise ProtocolError("bad-reply", "node name length")
        return reply

    @classmethod
    def _decode_at(cls, body: bytes, off: int) -> tuple["Reply", int]:
        """The reply body starting at `off` -> (reply, offset after it)."""
        if len(body) - off < REPLY_FIXED.size:
            raise ProtocolError("bad-reply", f"body length {len(body) - off}")
        status, rsv, job, uid, nonce, ts, nlen = REPLY_FIXED.unpack_from(body, off)
        if status not in STATUS_NAMES:
            raise ProtocolError("bad-reply", f"status {status}")
        if rsv != 0:
            raise ProtocolError("bad-reply", "reserved byte")
        start = off + REPLY_FIXED.size
        if nlen > MAX_NODE_NAME or len(body) < start + nlen:
            raise ProtocolError("bad-reply", "node name length")
        raw = body[start:start + nlen]
        if not all(0x21 <= b < 0x7F for b in raw):
            raise ProtocolError("bad-reply", "node name not printable ASCII")
        if status == STATUS_FOUND and job == NO_JOB:
            raise ProtocolError("bad-reply", "found without job id")
        return cls(status, nonce, job, uid, raw.decode("ascii"), ts), start + nlen


# ---------------------------------------------------------------------------------------------
# Several requests / replies in one frame


def encode_batch(entries) -> bytes:
    """Requests or replies (anything with encode_body) -> a requests/replies body."""
    if not 0 < len(entries) <= MAX_BATCH:
        raise ValueError(f"{len(entries)} entries: 1 to {MAX_BATCH} in one frame")
    return bytes([len(entries)]) + b"".join(e.encode_body() for e in entries)


def _count(body: bytes, what: str) -> int:
    if not body or not 0 < body[0] <= MAX_BATCH:
        raise ProtocolError(f"bad-{what}", f"count {body[0] if body else 'missing'}")
    return body[0]


def decode_requests(body: bytes) -> list[Request]:
    n = _count(body, "request")
    if len(body) != 1 + n * REQUEST_SIZE:
        raise ProtocolError("bad-request", f"body length {len(body)} for {n} requests")
    return [Request.decode_body(body[1 + i * REQUEST_SIZE:1 + (i + 1) * REQUEST_SIZE])
            for i in range(n)]


def decode_replies(body: bytes) -> list[Reply]:
    n = _count(body, "reply")
    out, off = [], 1
    for _ in range(n):
        reply, off = Reply._decode_at(body, off)
        out.append(reply)
    if off != len(body):
        raise ProtocolError("bad-reply", f"{len(body) - off} trailing bytes")
    return out
