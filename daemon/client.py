"""Caller-ID client.  Used by the PAM module on every ssh login: minimal imports (the C
modules _socket and _struct; no socket, enum, dataclasses or ipaddress; cffi/libmunge only
when a MungeAuth is built), one total wall-clock deadline, and no exception for network
trouble: every outcome is a typed `Answer`.

`Answer.cacheable` says whether a failure may be negative-cached as "no daemon there": True
only when the connection could not be made for a reason that says so -- refused (nothing
listens), no route / host unreachable, or the connect timed out.  Once connected, nothing
is cacheable: a reset or a close from a running daemon, a "busy" (rate-limited) answer, a
timeout waiting for the reply, a rejected reply.

With munge, the answer to a first request carries a session ticket that the auth object
keeps for that daemon (host, port); the next requests to it send the ticket instead of a new
credential (daemon.session).  A daemon that does not take it (restarted, expired) is asked
once more, with munge, within the same deadline.

Run as root (and `reserved_port`, config ReservedSourcePort), the client connects from a
reserved source port (600-1023): only root on this host can, and the daemon serves such
connections first (daemon.admission).  If no such port is free it uses an ordinary one.

    from daemon.client import query, auth_from_config
    ans = query("10.0.0.5", 6820, ("10.0.0.5", 40022), ("10.0.0.7", 22),
                auth=auth_from_config(cfg), timeout=2.0)
    if ans.outcome == FOUND: ans.job_id, ans.job_uid, ans.node
"""
from __future__ import annotations

import time

import _socket
import errno as _errno
import posix as _posix

from . import protocol as P

FOUND = "found"
UNKNOWN = "unknown"
REFUSED = "refused"
ERROR = "error"              # the daemon answered "error" (its lookup failed)
BUSY = "busy"                # the daemon rate-limits our uid (never for root): ask later
UNREACHABLE = "unreachable"  # no connection, timeout, or closed without a reply
INVALID = "invalid"          # a reply came but was rejected (forged, wrong nonce, malformed)
LOCAL_ERROR = "local-error"  # we could not build a request (bad arguments, munged down here)

OUTCOMES = (FOUND, UNKNOWN, REFUSED, ERROR, BUSY, UNREACHABLE, INVALID, LOCAL_ERROR)
_STATUS_OUTCOME = {P.STATUS_FOUND: FOUND, P.STATUS_UNKNOWN: UNKNOWN,
                   P.STATUS_REFUSED: REFUSED, P.STATUS_ERROR: ERROR, P.STATUS_BUSY: BUSY}

# connect() errors that say "no daemon there" (negative-cacheable); a timeout of connect too
_NO_DAEMON = {_errno.ECONNREFUSED: "connection refused", _errno.EHOSTUNREACH: "host unreachable",
              _errno.ENETUNREACH: "no route to network"}
RESERVED_FIRST, RESERVED_LAST = 600, 1023     # as glibc's bindresvport(3)
_RESERVED_TRIES = 8


class Answer(P._Frozen):
    """Immutable; equality, hash and repr over the fields (like a frozen dataclass).
    `cacheable`: the failure says no daemon is there (see the module docstring)."""

    __slots__ = ("outcome", "job_id", "job_uid", "node", "detail", "elapsed_ms", "cacheable")

    def __init__(self, outcome: str, job_id: int | None = None, job_uid: int | None = None,
                 node: str | None = None, detail: str = "", elapsed_ms: float = 0.0,
                 cacheable: bool = False):
        _set = P._set
        _set(self, "outcome", outcome)
        _set(self, "job_id", job_id)
        _set(self, "job_uid", job_uid)
        _set(self, "node", node)
        _set(self, "detail", detail)
        _set(self, "elapsed_ms", elapsed_ms)
        _set(self, "cacheable", cacheable)

    @property
    def found(self) -> bool:
        return self.outcome == FOUND


def parse_endpoint(s) -> tuple[str, int]:
    """"1.2.3.4:22", "[fd00::1]:22" or ("1.2.3.4", 22) -> (addr, port)."""
    if isinstance(s, tuple):
        return str(s[0]), int(s[1])
    s = s.strip()
    if s.startswith("["):
        addr, _, rest = s[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"bad endpoint {s!r}: expected [ADDR]:PORT")
        return addr, int(rest[1:])
    addr, sep, port = s.rpartition(":")
    if not sep or ":" in addr:
        raise ValueError(f"bad endpoint {s!r}: expected ADDR:PORT (IPv6 as [ADDR]:PORT)")
    return addr, int(port)


def auth_from_config(cfg):
    """Build the Authenticator the config asks for (may raise auth.AuthError)."""
    from .auth import make_auth
    return make_auth(cfg.auth_type, key_file=cfg.key_file, munge_socket=cfg.munge_socket,
                     munge_ttl=cfg.munge_ttl,
                     munge_reply_uid=cfg.reply_uid() if cfg.munge_reply_key else None)


def query(host: str, port: int, src, dst, *, auth, timeout: float = 2.0, proto: str = "tcp",
          trusted_uids=frozenset({0}), request: P.Request | None = None,
          reserved_port: bool = True, source: str | None = None) -> Answer:
    """Ask the caller-ID daemon on `host` which job owns its end (src) of the connection
    src -> dst.  Never raises for network trouble; never takes longer than `timeout` seconds
    (plus one munge round trip to the local munged for signing/verifying).  `source`: the
    local address to connect from (default: the kernel's choice)."""
    if request is not None:
        return _ask(host, port, lambda: [request], auth, timeout, trusted_uids,
                    reserved_port, source)[0]
    return query_many(host, port, [(src, dst)], auth=auth, timeout=timeout, proto=proto,
                      trusted_uids=trusted_uids, reserved_port=reserved_port, source=source)[0]


def query_many(host: str, port: int, conns, *, auth, timeout: float = 2.0, proto: str = "tcp",
               trusted_uids=frozenset({0}), reserved_port: bool = True,
               source: str | None = None) -> list[Answer]:
    """query() for several connections [(src, dst)] (at most P.MAX_BATCH) in one exchange
    and one credential: their Answers, in order (one failure of the exchange is each one's).
    daemon.coalesce sends a daemon's waiting questions this way."""
    def requests():
        out = []
        for src, dst in conns:
            sa, sp = parse_endpoint(src)
            da, dp = parse_endpoint(dst)
            out.append(P.pack_request(sa, sp, da, dp, proto))  # = Request.make, no ipaddress
        return out
    return _ask(host, port, requests, auth, timeout, trusted_uids, reserved_port, source,
                len(conns))


def _ask(host, port, requests, auth, timeout, trusted_uids, reserved_port, source, n=1):
    t0 = time.monotonic()
    peer = (host, port)
    for _ in range(2):
        try:
            reqs = requests()
            frame, reply_auth = _seal(reqs, auth, peer)
        except (ValueError, KeyError) as e:
            return [_answer(t0, LOCAL_ERROR, f"bad request: {e}")] * n
        except Exception as e:  # AuthError / AuthUnavailable (munged unreachable here)
            return [_answer(t0, LOCAL_ERROR, f"cannot sign request: {e}")] * n
        answers = _send(host, port, reqs, frame, reply_auth, t0, t0 + timeout, trusted_uids,
                        reserved_port, source)
        if not _session_declined(reply_auth, answers) or time.monotonic() >= t0 + timeout:
            return answers            # (after a timeout the ticket is kept: a slow daemon)
        auth.forget_session(peer)     # restarted, expired, or not ours: once more, with munge
    return answers


def _session_declined(reply_auth, answers) -> bool:
    """A request sent with a session ticket got no answer signed with it from a daemon that
    is there (it refused the ticket with its munge signature, or reset)."""
    return (reply_auth.scheme == P.AUTH_MUNGE_SESSION and not reply_auth.answered
            and not answers[0].cacheable)


def _answer(t0, outcome, detail="", reply: P.Reply | None = None, cacheable=False) -> Answer:
    el = (time.monotonic() - t0) * 1e3
    if reply is None:
        return Answer(outcome, detail=detail, elapsed_ms=el, cacheable=cacheable)
    found = reply.status == P.STATUS_FOUND
    return Answer(outcome, reply.job_id if found else None, reply.job_uid if found else None,
                  reply.node or None, detail, el)


def query_sealed(host: str, port: int, request, frame: bytes, *, reply_auth,
                 timeout: float = 2.0, trusted_uids=frozenset({0}), reserved_port: bool = True,
                 source: str | None = None) -> Answer:
    """query() for a request already sealed (`frame, reply_auth = wire.seal_request(request,
    auth)`): the exchange alone, for callers that sign ahead of time."""
    t0 = time.monotonic()
    return _send(host, port, [request], frame, reply_auth, t0, t0 + timeout, trusted_uids,
                 reserved_port, source)[0]


def _send(host, port, reqs, frame, reply_auth, t0, deadline, trusted_uids, reserved_port,
          source) -> list[Answer]:
    def done(outcome, detail="", cacheable=False):
        return [_answer(t0, outcome, detail, None, cacheable)] * len(reqs)

    try:
        infos = _socket.getaddrinfo(_host_arg(host), port, 0, _socket.SOCK_STREAM, 0,
                                    _socket.AI_NUMERICSERV)
    except (OSError, UnicodeError) as e:
        return done(UNREACHABLE, f"resolve {host}: {e}")
    reserved = reserved_port and _posix.geteuid() == 0
    last, no_daemon = "no address", True
    for fam, st, pr, _, addr in infos:
        s, why, cacheable = _connect(fam, st, pr, addr, deadline, reserved, source)
        if s is None:
            last = why
            no_daemon = no_daemon and cacheable
            continue
        try:
            got = _exchange(s, frame, deadline)
        finally:
            s.close()
        if isinstance(got, tuple):
            return done(*got)
        return _open(got, reqs, reply_auth, trusted_uids, t0)
    return done(UNREACHABLE, last, cacheable=no_daemon)


def _connect(fam, st, pr, addr, deadline, reserved, source):
    """-> (connected socket, "", _) or (None, why, cacheable)."""
    where = f"connect {addr[0]}:{addr[1]}"
    tries = _RESERVED_TRIES if reserved else 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:                    # spent before connecting: says nothing
            return None, f"{where}: no time left", False
        try:
            s = _socket.socket(fam, st | _socket.SOCK_CLOEXEC, pr)
        except OSError as e:
            return None, f"socket: {e}", False
        try:
            bound = False
            if tries:
                tries -= 1
                bound = _bind_reserved(s, fam, source)
                if not bound:
                    tries = 0
            if not bound and source is not None:
                s.bind((source, 0))
            s.settimeout(remaining)
            s.connect(addr)
            return s, "", False
        except TimeoutError:
            s.close()
            return None, f"{where}: timeout", True
        except OSError as e:
            s.close()
            if e.errno == _errno.EADDRNOTAVAIL and tries:
                continue          # this reserved port is taken towards that daemon: another
            if e.errno in _NO_DAEMON:
                return None, f"{where}: {_NO_DAEMON[e.errno]}", True
            return None, f"{where}: {e.strerror or e}", False


def _bind_reserved(s, fam, source=None) -> bool:
    """Bind a random free port in RESERVED_FIRST..RESERVED_LAST; False when none was free
    (or we may not): the socket then connects from an ordinary port."""
    any_addr = source or ("::" if fam == _socket.AF_INET6 else "0.0.0.0")
    span = RESERVED_LAST - RESERVED_FIRST + 1
    s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    for _ in range(_RESERVED_TRIES):
        port = RESERVED_FIRST + int.from_bytes(_posix.urandom(2), "little") % span
        try:
            s.bind((any_addr, port))
            return True
        except OSError as e:
            if e.errno != _errno.EADDRINUSE:
                return False
    return False


def _host_arg(host):
    """An IP literal goes to getaddrinfo as bytes: a str is IDNA-encoded there, which imports
    encodings.idna (re, stringprep, unicodedata: ~5 ms at every login), and for an IP literal
    that encoding is the identity.  Names stay str (IDNA as before)."""
    if isinstance(host, str) and host.isascii():
        for fam in (_socket.AF_INET, _socket.AF_INET6):
            try:
                _socket.inet_pton(fam, host)
            except (OSError, ValueError):
                continue
            return host.encode("ascii")
    return host


def _seal(reqs, auth, peer=None):
    from .wire import seal_requests
    return seal_requests(reqs, auth, peer)


def _exchange(s, frame, deadline):
    """Send the frame, read one frame back -> the Frame, or (outcome, detail) on failure."""
    try:
        s.sendall(frame)
    except OSError as e:
        return UNREACHABLE, f"send: {e.strerror or e}"
    dec = P.FrameDecoder(max_frames=1)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return UNREACHABLE, "timeout waiting for reply"
        s.settimeout(remaining)
        try:
            data = s.recv(P.MAX_FRAME)
        except TimeoutError:                 # = socket.timeout
            return UNREACHABLE, "timeout waiting for reply"
        except OSError as e:
            return UNREACHABLE, f"recv: {e.strerror or e}"
        try:
            if not data:
                dec.eof()
                return UNREACHABLE, "connection closed without a reply"
            frames = dec.feed(data)
        except P.ProtocolError as e:
            return INVALID, f"malformed reply: {e}"
        if frames:
            return frames[0]


def _open(frame, reqs, reply_auth, trusted_uids, t0) -> list[Answer]:
    """The reply frame to our requests -> their Answers (every one rejected together)."""
    from .wire import ReplyRejected, open_replies
    try:
        replies = open_replies(frame, reply_auth, [r.nonce for r in reqs], trusted_uids)
    except ReplyRejected as e:
        return [_answer(t0, INVALID, str(e))] * len(reqs)
    except Exception as e:  # munged unavailable while verifying
        return [_answer(t0, LOCAL_ERROR, f"cannot verify reply: {e}")] * len(reqs)
    return [_answer(t0, _STATUS_OUTCOME[r.status], "", r) for r in replies]
