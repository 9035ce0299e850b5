"""Authentication of caller-ID frames: MUNGE (default) or HMAC-SHA256 with a shared key file.

Both schemes authenticate the frame's *signed bytes* (protocol.signed_bytes: header without the
auth length, plus the body) and yield the sender's uid:

* munge: the credential's payload is exactly the signed bytes; munged gives the encoder's uid
  and refuses to decode the same credential twice (replay) or after its TTL.
* hmac: HMAC-SHA256(key, label || signed bytes) where label separates requests from replies.
  The key file is root-only, so whoever holds the key is root: the sender uid is 0.  Replays
  are caught by the server's nonce cache and timestamp window (see server.ReplayCache).
* munge with a reply key (the client's default with AuthType=munge, MungeReplyKey=yes): the
  request's credential payload is the signed bytes and a fresh random key, AES-encrypted and
  decodable only by the daemon's uid (MUNGE_OPT_UID_RESTRICTION; root is not exempt, measured
  with munge 0.5.15); the answer is HMAC-signed with that key (`ReplyKey`).  Whoever could
  read the key is that uid on a host of the munge realm: what a munge-signed answer proves,
  for one munged round trip less on each side.
* munge session (scheme 4): the answer to a scheme-3 request may carry a session ticket
  (daemon.session) that seals its key; the client's next requests to that daemon send the
  ticket and are HMAC-signed with the key (`SessionKey`), and so is their answer: no munged
  round trip on either side until the ticket expires (MungeSessionLifetime).

A request is sealed by `sealer(peer)`'s `sign_request` (-> the blob and what authenticates
its answer) and opened with `verify_request` (-> the sender's uid and what signs the
answer); answers use `sign`, and `accepts(scheme)` gives the verifier of an answer of that
scheme.

libmunge is loaded lazily (cffi ABI mode) on first use, so importing this module is cheap:
the PAM hook imports it at every login, so no hashlib/hmac (they load OpenSSL, ~4 ms) and no
threading here.  HMAC-SHA256 is computed with the built-in _sha256 (RFC 2104; checked against
the stdlib hmac module by the tests) and compared with _operator._compare_digest, which is
what hmac.compare_digest falls back to (constant time).
"""
from __future__ import annotations

import os
import stat
from time import time as _time
from _operator import _compare_digest as compare_digest
from _sha256 import sha256 as _sha256
from _thread import _local as _thread_local, allocate_lock as _allocate_lock

from . import protocol as P

LABEL_REQUEST = b"slurm-callerid request v1\0"
LABEL_REPLY = b"slurm-callerid reply v1\0"

DEFAULT_MUNGE_LIB = "libmunge.so.2"
MIN_KEY_BYTES = 32


class AuthError(Exception):
    """Authentication failed.  `reason` is a short stable token (e.g. "replayed")."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class AuthUnavailable(AuthError):
    """The authentication service itself failed (munged down, library missing)."""


def _label(ftype: int) -> bytes:
    return LABEL_REQUEST if ftype in P.REQUEST_TYPES else LABEL_REPLY


def _wrong_scheme(scheme: int, auth) -> AuthError:
    return AuthError("wrong-auth-scheme", f"got {P.AUTH_NAMES.get(scheme, scheme)}, want {auth.name}")


class _Scheme:
    """A scheme that signs requests and answers alike (`scheme`, `sign`, `verify`)."""

    def sealer(self, peer=None):
        """What signs the next request to `peer` (an opaque key, e.g. (host, port))."""
        return self

    def sign_request(self, ftype: int, signed: bytes, peer=None):
        """-> (auth blob, what authenticates the answer)."""
        return self.sign(ftype, signed), self

    def verify_request(self, scheme: int, ftype: int, signed: bytes, blob: bytes):
        """-> (sender uid, what signs the answer).  Raises AuthError."""
        if scheme != self.scheme:
            raise _wrong_scheme(scheme, self)
        return self.verify(ftype, signed, blob), self

    def accepts(self, scheme: int):
        """The verifier of an answer signed with `scheme`, or None."""
        return self if scheme == self.scheme else None

    @property
    def request_scheme(self) -> int:
        return self.scheme


# ---------------------------------------------------------------------------------------------
# HMAC


def load_key(path: str, *, require_root_owner: bool = True) -> bytes:
    """Read a key file written by `callerid keygen`; refuse anything not private to root."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise AuthError("bad-key-file", f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuthError("bad-key-file", f"{path}: not a regular file")
        if require_root_owner and st.st_uid != 0:
            raise AuthError("bad-key-file", f"{path}: owned by uid {st.st_uid}, must be root")
        if st.st_mode & 0o077:
            raise AuthError("bad-key-file",
                            f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, must be 0600 or stricter")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    text = data.decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise AuthError("bad-key-file", f"{path}: not a hex key (use `callerid keygen`)") from None
    if len(key) < MIN_KEY_BYTES:
        raise AuthError("bad-key-file", f"{path}: key has {len(key)} bytes, need >= {MIN_KEY_BYTES}")
    return key


def write_key(path: str, nbytes: int = 32, *, force: bool = False) -> None:
    """Create a new random key file, mode 0600 (refuses to overwrite unless force)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    flags |= os.O_TRUNC if force else os.O_EXCL
    old = os.umask(0o077)
    try:
        fd = os.open(path, flags, 0o600)
    finally:
        os.umask(old)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (os.urandom(nbytes).hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


_BLOCK = 64                                        # SHA-256 block size
_TAG_SIZE = 32                                     # its digest size
_TRANS_5C = bytes(x ^ 0x5C for x in range(256))
_TRANS_36 = bytes(x ^ 0x36 for x in range(256))


class _HmacSha256:
    """HMAC-SHA256 (RFC 2104) keyed once: mac(msg) == hmac.new(key, msg, sha256).digest()."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes):
        if len(key) > _BLOCK:
            key = _sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = _sha256(key.translate(_TRANS_36))
        self._outer = _sha256(key.translate(_TRANS_5C))

    def mac(self, msg: bytes) -> bytes:
        h = self._inner.copy()
        h.update(msg)
        o = self._outer.copy()
        o.update(h.digest())
        return o.digest()


class HmacAuth(_Scheme):
    scheme = P.AUTH_HMAC
    name = "hmac"

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise AuthError("bad-key", "key too short")
        self._key = key
        self._mac = _HmacSha256(key).mac

    @classmethod
    def from_file(cls, path: str, **kw) -> "HmacAuth":
        return cls(load_key(path, **kw))

    def sign(self, ftype: int, signed: bytes) -> bytes:
        return self._mac(_label(ftype) + signed)

    def verify(self, ftype: int, signed: bytes, blob: bytes) -> int:
        want = self._mac(_label(ftype) + signed)
        if not compare_digest(want, blob):
            raise AuthError("bad-mac")
        return 0


class _KeyedAnswer(HmacAuth):
    """An answer HMAC-signed with a key that only `uid` could have read (from a munge
    credential, or from the ticket it set up).  Client side, an answer signed with plain
    munge is accepted too (`fallback`): a daemon that could not open the request refuses
    with its own munge signature."""

    def __init__(self, key: bytes, uid: int, fallback=None):
        super().__init__(key)
        self.key = key
        self.uid = uid
        self.fallback = fallback

    def verify(self, ftype: int, signed: bytes, blob: bytes) -> int:
        super().verify(ftype, signed, blob)
        return self.uid

    def accepts(self, scheme: int):
        if scheme == self.scheme:
            return self
        return self.fallback.accepts(scheme) if self.fallback is not None else None


class ReplyKey(_KeyedAnswer):
    """The answer to a request whose munge credential carried this key (scheme 3).  It may
    carry a session ticket (daemon.session): daemon side `ticket` is appended, covered by the
    HMAC; client side `on_ticket(ticket)` receives it once the answer verified."""

    scheme = P.AUTH_MUNGE_KEY
    name = "munge-key"

    def __init__(self, key: bytes, uid: int, fallback=None, *, ticket: bytes = b"",
                 on_ticket=None):
        super().__init__(key, uid, fallback)
        self.ticket = ticket
        self.on_ticket = on_ticket

    def sign(self, ftype: int, signed: bytes) -> bytes:
        return super().sign(ftype, signed + self.ticket) + self.ticket

    def verify(self, ftype: int, signed: bytes, blob: bytes) -> int:
        tag, ticket = blob[:_TAG_SIZE], blob[_TAG_SIZE:]
        uid = super().verify(ftype, signed + ticket, tag)
        if ticket and self.on_ticket is not None:
            self.on_ticket(ticket)
        return uid


class SessionKey(_KeyedAnswer):
    """A request sent with a session ticket (scheme 4) and its answer, both HMAC-signed with
    the key the ticket seals.  Client side, `answered` turns true when an answer signed with
    it verified: otherwise the daemon did not take the ticket (daemon.client asks again with
    munge)."""

    scheme = P.AUTH_MUNGE_SESSION
    name = "munge-session"

    def __init__(self, key: bytes, uid: int, ticket: bytes = b"", fallback=None):
        super().__init__(key, uid, fallback)
        self.ticket = ticket
        self.answered = False

    def sign_request(self, ftype: int, signed: bytes, peer=None):
        return self.ticket + self.sign(ftype, signed), self

    def verify(self, ftype: int, signed: bytes, blob: bytes) -> int:
        uid = super().verify(ftype, signed, blob)
        self.answered = True
        return uid


# ---------------------------------------------------------------------------------------------
# MUNGE via cffi (ABI mode)

_CDEF = """
typedef struct munge_ctx *munge_ctx_t;
typedef unsigned int uid_t;
typedef unsigned int gid_t;
munge_ctx_t munge_ctx_create(void);
void munge_ctx_destroy(munge_ctx_t ctx);
int munge_ctx_set(munge_ctx_t ctx, int opt, ...);
const char *munge_ctx_strerror(munge_ctx_t ctx);
int munge_encode(char **cred, munge_ctx_t ctx, const void *buf, int len);
int munge_decode(const char *cred, munge_ctx_t ctx, void **buf, int *len, uid_t *uid, gid_t *gid);
const char *munge_strerror(int e);
void free(void *ptr);
"""

MUNGE_OPT_CIPHER_TYPE = 0      # option and value numbers: munge.h (munge 0.5)
MUNGE_OPT_TTL = 4
MUNGE_OPT_SOCKET = 8
MUNGE_OPT_UID_RESTRICTION = 9
MUNGE_CIPHER_AES128 = 4
EMUNGE_SUCCESS = 0
EMUNGE_SOCKET = 6
_MUNGE_REASONS = {
    3: "bad-length", 6: "munge-unavailable", 7: "munge-unavailable", 8: "bad-credential",
    9: "bad-credential", 10: "bad-credential", 11: "bad-credential", 12: "bad-credential",
    13: "bad-realm", 14: "bad-credential", 15: "expired", 16: "rewound", 17: "replayed",
    18: "unauthorized",
}

def _munge_ffi():
    """The cffi FFI describing libmunge. From the pre-generated out-of-line ABI module
    (daemon/_munge_cffi.py, made by generate_abi_module()) when it loads: parsing _CDEF with
    pycparser at run time costs ~50 ms, paid by every ssh login on the caller-ID path."""
    try:
        from ._munge_cffi import ffi
        return ffi
    except Exception:  # missing or made by another cffi version: parse the declarations
        import cffi
        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        return ffi


def generate_abi_module(outdir: str) -> str:
    """Write _munge_cffi.py (out-of-line ABI mode: no C compiler, no pycparser at run time)."""
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    ffi.set_source("_munge_cffi", None)
    return ffi.compile(tmpdir=outdir)


_lib_lock = _allocate_lock()          # = threading.Lock()
_lib = None


def _munge_lib(libname: str = DEFAULT_MUNGE_LIB):
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                try:
                    ffi = _munge_ffi()
                    # RTLD_NODELETE: contexts freed by ffi.gc during interpreter shutdown may
                    # outlive the library object; the code must stay mapped (else: segfault).
                    lib = ffi.dlopen(libname, ffi.RTLD_NOW | ffi.RTLD_NODELETE)
                    libc = ffi.dlopen(None)
                except (ImportError, OSError) as e:
                    raise AuthUnavailable("munge-unavailable", f"cannot load {libname}: {e}") from None
                _lib = (ffi, lib, libc)
    return _lib


class MungeAuth(_Scheme):
    """munge credentials.  `reply_uid` (client side): requests carry a reply key that only
    this uid can read (scheme 3), and the session ticket a daemon answers with is kept for
    the next requests to it (scheme 4, daemon.session), else they are plain munge (scheme 1).
    Daemon side all are opened; tickets are issued and taken when `tickets` (a
    session.Tickets) is set."""

    scheme = P.AUTH_MUNGE
    name = "munge"
    tickets = None
    MAX_SESSIONS = 4096               # daemons this client keeps a ticket for
    SESSION_MARGIN_MS = 5000          # a ticket is not used in its last seconds

    def __init__(self, socket_path: str | None = None, ttl: int | None = None,
                 reply_uid: int | None = None):
        self.socket_path = socket_path
        self.ttl = ttl
        self.reply_uid = reply_uid
        self._local = _thread_local()     # = threading.local()
        self._sessions = {}               # peer -> (ticket, key, use until: ms, daemon clock)
        self._sessions_lock = _allocate_lock()
        _munge_lib()  # fail early and clearly if libmunge is missing

    def sealer(self, peer=None):
        held = self._sessions.get(peer) if peer is not None else None
        if held is not None and _now_ms() < held[2]:
            return SessionKey(held[1], self.reply_uid, held[0], fallback=self)
        return self

    def forget_session(self, peer) -> None:
        """The daemon at `peer` did not take our ticket: ask it with munge again."""
        with self._sessions_lock:           # (_keep_session iterates the table)
            self._sessions.pop(peer, None)

    def _keep_session(self, peer, key: bytes, ticket: bytes) -> None:
        from .session import expiry_ms
        with self._sessions_lock:
            if peer not in self._sessions and len(self._sessions) >= self.MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]       # the oldest
            self._sessions[peer] = (ticket, key, expiry_ms(ticket) - self.SESSION_MARGIN_MS)

    @property
    def request_scheme(self) -> int:
        return P.AUTH_MUNGE if self.reply_uid is None else P.AUTH_MUNGE_KEY

    def _ctx(self, keyed: bool = False):
        """This thread's context: plain, or for credentials only reply_uid can decode."""
        name = "kctx" if keyed else "ctx"
        ctx = getattr(self._local, name, None)
        if ctx is None:
            ffi, lib, _ = _munge_lib()
            raw = lib.munge_ctx_create()
            if raw == ffi.NULL:
                raise AuthUnavailable("munge-unavailable", "munge_ctx_create failed")
            ctx = ffi.gc(raw, lib.munge_ctx_destroy)
            opts = []
            if self.socket_path:
                keep = ffi.new("char[]", self.socket_path.encode())
                setattr(self._local, f"{name}_keep", keep)
                opts.append((MUNGE_OPT_SOCKET, ffi.cast("char *", keep)))
            if self.ttl:
                opts.append((MUNGE_OPT_TTL, ffi.cast("int", int(self.ttl))))
            if keyed:
                opts.append((MUNGE_OPT_UID_RESTRICTION, ffi.cast("uid_t", self.reply_uid)))
                opts.append((MUNGE_OPT_CIPHER_TYPE, ffi.cast("int", MUNGE_CIPHER_AES128)))
            for opt, value in opts:
                e = lib.munge_ctx_set(ctx, opt, value)
                if e != EMUNGE_SUCCESS:
                    raise AuthUnavailable("munge-unavailable", self._err(ctx, e))
            setattr(self._local, name, ctx)
        return ctx

    @staticmethod
    def _err(ctx, e: int) -> str:
        ffi, lib, _ = _munge_lib()
        msg = lib.munge_ctx_strerror(ctx)
        if msg == ffi.NULL:
            msg = lib.munge_strerror(e)
        return ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else f"munge error {e}"

    def _encode(self, payload: bytes, keyed: bool = False) -> bytes:
        ffi, lib, libc = _munge_lib()
        ctx = self._ctx(keyed)
        out = ffi.new("char **")
        e = lib.munge_encode(out, ctx, payload, len(payload))
        if e != EMUNGE_SUCCESS:
            if out[0] != ffi.NULL:
                libc.free(out[0])
            raise AuthUnavailable("munge-unavailable", f"munge_encode: {self._err(ctx, e)}")
        try:
            cred = ffi.string(out[0])
        finally:
            libc.free(out[0])
        if len(cred) > P.MAX_AUTH:
            raise AuthError("oversized", f"munge credential {len(cred)} bytes")
        return cred

    def _decode(self, blob: bytes) -> tuple[bytes, int]:
        """-> (payload, encoder's uid).  Raises AuthError / AuthUnavailable."""
        if b"\0" in blob:
            raise AuthError("bad-credential", "NUL in credential")
        ffi, lib, libc = _munge_lib()
        ctx = self._ctx()
        buf = ffi.new("void **")
        ln = ffi.new("int *")
        uid = ffi.new("uid_t *")
        gid = ffi.new("gid_t *")
        e = lib.munge_decode(blob, ctx, buf, ln, uid, gid)
        try:
            payload = ffi.buffer(buf[0], ln[0])[:] if buf[0] != ffi.NULL else b""
        finally:
            if buf[0] != ffi.NULL:
                libc.free(buf[0])
        if e != EMUNGE_SUCCESS:
            reason = _MUNGE_REASONS.get(e, "bad-credential")
            cls = AuthUnavailable if reason == "munge-unavailable" else AuthError
            raise cls(reason, self._err(ctx, e))
        return payload, int(uid[0])

    def sign(self, ftype: int, signed: bytes) -> bytes:
        return self._encode(signed)

    def verify(self, ftype: int, signed: bytes, blob: bytes) -> int:
        payload, uid = self._decode(blob)
        if not compare_digest(payload, signed):
            raise AuthError("payload-mismatch", "credential does not cover this frame")
        return uid

    def sign_request(self, ftype: int, signed: bytes, peer=None):
        if self.reply_uid is None:
            return super().sign_request(ftype, signed)
        key = os.urandom(P.REPLY_KEY_SIZE)
        keep = None if peer is None else (lambda ticket: self._keep_session(peer, key, ticket))
        return (self._encode(signed + key, keyed=True),
                ReplyKey(key, self.reply_uid, self, on_ticket=keep))

    def verify_request(self, scheme: int, ftype: int, signed: bytes, blob: bytes):
        if scheme == P.AUTH_MUNGE:
            return self.verify(ftype, signed, blob), self
        if scheme == P.AUTH_MUNGE_SESSION and self.tickets is not None:
            key, uid = self.tickets.open(blob[:-_TAG_SIZE], _now_ms())
            answer = SessionKey(key, uid)
            return answer.verify(ftype, signed, blob[-_TAG_SIZE:]), answer
        if scheme != P.AUTH_MUNGE_KEY:
            raise _wrong_scheme(scheme, self)
        payload, uid = self._decode(blob)
        n = len(signed)
        if len(payload) != n + P.REPLY_KEY_SIZE or not compare_digest(payload[:n], signed):
            raise AuthError("payload-mismatch", "credential does not cover this frame")
        key = payload[n:]
        ticket = b"" if self.tickets is None else self.tickets.issue(key, uid, _now_ms())
        return uid, ReplyKey(key, uid, ticket=ticket)


def _now_ms() -> int:
    return int(_time() * 1000)


def make_auth(scheme: str, *, key_file: str | None = None, munge_socket: str | None = None,
              munge_ttl: int | None = None, munge_reply_uid: int | None = None,
              key_owner_check: bool = True):
    scheme = scheme.lower()
    if scheme == "munge":
        return MungeAuth(munge_socket, munge_ttl, munge_reply_uid)
    if scheme == "hmac":
        if not key_file:
            raise AuthError("bad-key-file", "AuthType=hmac needs KeyFile")
        return HmacAuth.from_file(key_file, require_root_owner=key_owner_check)
    raise AuthError("bad-auth-type", f"unknown AuthType {scheme!r} (munge or hmac)")
