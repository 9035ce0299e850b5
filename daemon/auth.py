"""Authentication of caller-ID frames: MUNGE (default) or HMAC-SHA256 with a shared key file.

Both schemes authenticate the frame's *signed bytes* (protocol.signed_bytes: header without the
auth length, plus the body) and yield the sender's uid:

* munge: the credential's payload is exactly the signed bytes; munged gives the encoder's uid
  and refuses to decode the same credential twice (replay) or after its TTL.
* hmac: HMAC-SHA256(key, label || signed bytes) where label separates requests from replies.
  The key file is root-only, so whoever holds the key is root: the sender uid is 0.  Replays
  are caught by the server's nonce cache and timestamp window (see server.ReplayCache).

libmunge is loaded lazily (cffi ABI mode) on first use, so importing this module is cheap:
the PAM hook imports it at every login, so no hashlib/hmac (they load OpenSSL, ~4 ms) and no
threading here.  HMAC-SHA256 is computed with the built-in _sha256 (RFC 2104; checked against
the stdlib hmac module by the tests) and compared with _operator._compare_digest, which is
what hmac.compare_digest falls back to (constant time).
"""
from __future__ import annotations

import os
import stat
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


class HmacAuth:
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

MUNGE_OPT_TTL = 4
MUNGE_OPT_SOCKET = 8
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


class MungeAuth:
    scheme = P.AUTH_MUNGE
    name = "munge"

    def __init__(self, socket_path: str | None = None, ttl: int | None = None):
        self.socket_path = socket_path
        self.ttl = ttl
        self._local = _thread_local()     # = threading.local()
        _munge_lib()  # fail early and clearly if libmunge is missing

    def _ctx(self):
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ffi, lib, _ = _munge_lib()
            raw = lib.munge_ctx_create()
            if raw == ffi.NULL:
                raise AuthUnavailable("munge-unavailable", "munge_ctx_create failed")
            ctx = ffi.gc(raw, lib.munge_ctx_destroy)
            if self.socket_path:
                self._local.keep = ffi.new("char[]", self.socket_path.encode())
                e = lib.munge_ctx_set(ctx, MUNGE_OPT_SOCKET, ffi.cast("char *", self._local.keep))
                if e != EMUNGE_SUCCESS:
                    raise AuthUnavailable("munge-unavailable", self._err(ctx, e))
            if self.ttl:
                e = lib.munge_ctx_set(ctx, MUNGE_OPT_TTL, ffi.cast("int", int(self.ttl)))
                if e != EMUNGE_SUCCESS:
                    raise AuthUnavailable("munge-unavailable", self._err(ctx, e))
            self._local.ctx = ctx
        return ctx

    @staticmethod
    def _err(ctx, e: int) -> str:
        ffi, lib, _ = _munge_lib()
        msg = lib.munge_ctx_strerror(ctx)
        if msg == ffi.NULL:
            msg = lib.munge_strerror(e)
        return ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else f"munge error {e}"

    def sign(self, ftype: int, signed: bytes) -> bytes:
        ffi, lib, libc = _munge_lib()
        ctx = self._ctx()
        out = ffi.new("char **")
        e = lib.munge_encode(out, ctx, signed, len(signed))
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

    def verify(self, ftype: int, signed: bytes, blob: bytes) -> int:
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
        if not compare_digest(payload, signed):
            raise AuthError("payload-mismatch", "credential does not cover this frame")
        return int(uid[0])


def make_auth(scheme: str, *, key_file: str | None = None, munge_socket: str | None = None,
              munge_ttl: int | None = None, key_owner_check: bool = True):
    scheme = scheme.lower()
    if scheme == "munge":
        return MungeAuth(munge_socket, munge_ttl)
    if scheme == "hmac":
        if not key_file:
            raise AuthError("bad-key-file", "AuthType=hmac needs KeyFile")
        return HmacAuth.from_file(key_file, require_root_owner=key_owner_check)
    raise AuthError("bad-auth-type", f"unknown AuthType {scheme!r} (munge or hmac)")
