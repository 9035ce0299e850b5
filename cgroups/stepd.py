"""Talk to a job's slurmstepd over its unix socket, the way pam_slurm_adopt does.

Requests used: REQUEST_STEP_UID (the job owner), REQUEST_ADD_EXTERN_PID (adoption: the stepd
adds the pid to every cgroup of the step, its process tracking, accounting and
``LaunchParameters=ulimit_pam_adopt``), REQUEST_X11_DISPLAY (the job's X11 forwarding) and
REQUEST_GET_NS_FD / REQUEST_GET_NS_FDS (the job container's mount namespace, as an fd).

Facts (read in Slurm's source at the tags named in :data:`PROTOCOLS`; files
src/common/slurm_protocol_common.h, src/common/stepd_api.[ch], src/common/fd.c,
src/slurmd/slurmstepd/req.c, contribs/pam_slurm_adopt/pam_slurm_adopt.c; the code is ours):

* Socket ``<SlurmdSpoolDir>/<NodeName>_<job>.<step>`` (extern step 4294967292), SOCK_STREAM,
  served by one stepd thread per connection. Integers are native C ``int`` (4 bytes);
  ``uid_t`` and ``pid_t`` are 4 bytes on Linux.
* Handshake, every release 22.05..25.11 (req.c ``_handle_accept``): the client writes its
  protocol version; the stepd accepts it iff it is >= its own SLURM_MIN_PROTOCOL_VERSION (no
  upper bound; the value is then only logged, never used to choose a layout), reads the peer's
  SO_PEERCRED, and answers its own SLURM_PROTOCOL_VERSION. A refusal is the int -1
  (SLURM_ERROR) followed by close. We therefore send one version every supported stepd
  accepts (:data:`CLIENT_PROTOCOL_VERSION`), read the 4-byte answer before anything else, and
  choose the request layouts from the version the stepd answered (:func:`protocol_for`).
* Requests follow on the same connection until EOF; an unknown request, a request the stepd
  rejects for the caller's uid (25.11+) or a failing handler makes it close the connection
  without an answer.
* Request numbers are positions in ``step_msg_t`` (stepd_api.h) and identical in every
  release: STEP_UID 20, ADD_EXTERN_PID 22, X11_DISPLAY 23, GET_NS_FD 26; 25.11 adds
  GET_NS_FDS 28 (and SLUID 1, GET_BPF_TOKEN 29).
* STEP_UID: reply ``uid_t`` (4 bytes), no return code. Slurm's client treats (uid_t)-1 as
  an error.
* ADD_EXTERN_PID: request ``pid_t``; reply ``int`` rc, 0 = added (SLURM_SUCCESS), -1 =
  failed (caller not root/SlurmUser before 25.11, step not extern, or a proctrack, task or
  jobacct_gather plugin refused the pid). 25.05+: no reply (close) when the step is ending;
  25.11+: no reply (close) when the caller is not root/SlurmUser.
* X11_DISPLAY: reply ``int display`` (0 = no X11 forwarding), ``int len``, then ``len`` bytes
  of the xauthority path including its NUL (len 0: none). The stepd always sends ``len``;
  Slurm's own client reads it only if the stepd's version >= the *client's* minimum.
  pam_slurm_adopt then sets ``DISPLAY=localhost:<display>.0`` and ``XAUTHORITY=<path>``.
* GET_NS_FD (22.05..25.05): reply ``int`` = the stepd's own fd number for the namespace:
  > 0 = one more byte follows carrying the fd as SCM_RIGHTS (fd.c send_fd_over_pipe /
  send_fd_over_socket, same wire), 0 = no job container, < 0 = the container's ``.ns`` could
  not be opened. The stepd opens ``<BasePath>/<job>/.ns`` itself (job_container/tmpfs
  ``container_p_join_external``). 25.11 writes nothing at all for GET_NS_FD when the job has no
  mount namespace (the client would wait forever), so for 25.11+ we use GET_NS_FDS: ``int
  count``, then per namespace ``int type`` (CLONE_NEW* flag) + one byte with the fd.

Why the answers are trusted: only root can create entries in SlurmdSpoolDir, and we check the
listener's credentials (SO_PEERCRED on the connected socket) against ``trusted_uids``
(default root only, what slurmstepd runs as).

Bounds (this runs on the login path): one deadline for the whole exchange (connect,
handshake, every request and reply); each blocking step gets only what remains; a missing
socket, a dead listener or a full backlog fail at once. Sockets are closed on every path.
"""
from dataclasses import dataclass
import errno as _errno
import os
import select
import socket
import struct
import time

from .errors import (StepdProtocolError, StepdRefused, StepdRequestFailed, StepdTimeout,
                     StepdUnavailable)

DEFAULT_TIMEOUT = 0.5
INVALID_UID = 0xFFFFFFFF              # (uid_t)-1: Slurm's client-side error value
CLONE_NEWNS = 0x00020000              # <sched.h>: the mount namespace type

# step_msg_t positions (src/common/stepd_api.h, identical 22.05 .. 25.11)
REQUEST_STEP_UID = 20
REQUEST_ADD_EXTERN_PID = 22
REQUEST_X11_DISPLAY = 23
REQUEST_GET_NS_FD = 26
REQUEST_GET_NS_FDS = 28               # 25.11+

MAX_XAUTHORITY = 4096 + 1             # PATH_MAX plus the NUL the stepd sends
MAX_NAMESPACES = 16                   # GET_NS_FDS count we accept (Linux has 8 ns types)


def _ver(major):
    return major << 8                 # MAKE_SLURM_VER(r) = (r << 8) | 0


@dataclass(frozen=True, slots=True)
class Protocol:
    """What one Slurm release's slurmstepd speaks (see the module docstring and
    :data:`PROTOCOLS`). Pure data."""

    release: str          # "24.11"
    version: int          # SLURM_PROTOCOL_VERSION the stepd answers
    min_client: int       # SLURM_MIN_PROTOCOL_VERSION it accepts
    ns_request: int       # REQUEST_GET_NS_FD or REQUEST_GET_NS_FDS
    owner_checks: bool    # 25.11+: dispatch table with from_slurmd/owner flags
    tag: str              # the source tag the facts come from


# One row per release: version and minimum from src/common/slurm_protocol_common.h at the tag;
# request layouts from req.c / stepd_api.c at the same tag.
PROTOCOLS = (
    Protocol("22.05", _ver(38), _ver(36), REQUEST_GET_NS_FD, False, "slurm-22-05-8-1"),
    Protocol("23.02", _ver(39), _ver(37), REQUEST_GET_NS_FD, False, "slurm-23-02-7-1"),
    Protocol("23.11", _ver(40), _ver(38), REQUEST_GET_NS_FD, False, "slurm-23-11-10-1"),
    Protocol("24.05", _ver(41), _ver(39), REQUEST_GET_NS_FD, False, "slurm-24-05-8-1"),
    Protocol("24.11", _ver(42), _ver(39), REQUEST_GET_NS_FD, False, "slurm-24-11-5-1"),
    Protocol("25.05", _ver(43), _ver(40), REQUEST_GET_NS_FD, False, "slurm-25-05-3-1"),
    Protocol("25.11", _ver(44), _ver(41), REQUEST_GET_NS_FDS, True, "slurm-25-11-7-1"),
)

# The version we send: the newest we know the layouts of. Every stepd above accepts it (each
# minimum is <= it, there is no upper bound), and so would the next three releases, whose
# minimum is at most 25.11 (DEC_SLURM_VER(SLURM_PROTOCOL_VERSION, 3) since 25.11).
CLIENT_PROTOCOL_VERSION = PROTOCOLS[-1].version      # 11264


def protocol_for(version):
    """Pure: the :class:`Protocol` for a stepd that answered ``version``: the newest release
    whose version is <= it (a newer stepd is read with the newest layouts we know; an older
    one than 22.05 with 22.05's)."""
    best = PROTOCOLS[0]
    for p in PROTOCOLS:
        if p.version <= version:
            best = p
    return best


def check_handshake(rc, sent, path):
    """Pure: the stepd's protocol version from its handshake answer ``rc``; raises
    :class:`StepdRefused` for -1 (or any negative) and :class:`StepdProtocolError` for 0."""
    if rc < 0:
        raise StepdRefused(f"stepd socket {path}: refused protocol version {sent} (answered "
                           f"{rc}): this slurmstepd requires a newer client version", path, sent)
    if rc == 0:
        raise StepdProtocolError(f"stepd socket {path}: answered protocol version 0", path)
    return rc


def check_uid(uid, path):
    """Pure: a STEP_UID answer, or :class:`StepdProtocolError` for (uid_t)-1."""
    if uid == INVALID_UID:
        raise StepdProtocolError(f"stepd socket {path}: answered uid {uid} ((uid_t)-1)", path)
    return uid


def check_add_pid_rc(rc, pid, path):
    """Pure: None for rc 0, else :class:`StepdRequestFailed` explaining what -1 means."""
    if rc != 0:
        raise StepdRequestFailed(
            f"stepd socket {path}: REQUEST_ADD_EXTERN_PID for pid {pid} answered rc {rc} "
            f"(caller not root/SlurmUser, not an extern step, or a proctrack/task/"
            f"jobacct_gather plugin refused the pid; see the slurmd log)", path, rc)


def check_x11_header(display, length, path):
    """Pure: validate REQUEST_X11_DISPLAY's two ints; raises :class:`StepdProtocolError`."""
    if display < 0:
        raise StepdProtocolError(f"stepd socket {path}: X11 display {display} < 0", path)
    if not 0 <= length <= MAX_XAUTHORITY:
        raise StepdProtocolError(f"stepd socket {path}: X11 xauthority length {length} out of "
                                 f"range 0..{MAX_XAUTHORITY}", path)


def decode_xauthority(data, path):
    """Pure: the xauthority path from its ``len`` bytes (NUL-terminated, no inner NUL)."""
    if not data.endswith(b"\0") or b"\0" in data[:-1] or len(data) < 2:
        raise StepdProtocolError(f"stepd socket {path}: X11 xauthority is not one "
                                 f"NUL-terminated path: {data[:60]!r}", path)
    return os.fsdecode(data[:-1])


def check_ns_count(count, path):
    """Pure: a GET_NS_FDS count (0..MAX_NAMESPACES)."""
    if not 0 <= count <= MAX_NAMESPACES:
        raise StepdProtocolError(f"stepd socket {path}: namespace count {count} out of range "
                                 f"0..{MAX_NAMESPACES}", path)
    return count


@dataclass(frozen=True, slots=True)
class StepReply:
    """What one REQUEST_STEP_UID exchange returned: ``uid``, the stepd's ``protocol_version``
    and the listener's ``peer_pid`` / ``peer_uid`` (SO_PEERCRED)."""

    uid: int
    protocol_version: int
    peer_pid: int
    peer_uid: int


_INT = struct.Struct("=i")
_UCRED = struct.Struct("=iII")        # struct ucred: pid, uid, gid


class Connection:
    """One bounded conversation with a slurmstepd: connected, peer checked, handshake done.

    ``version`` is what the stepd answered, ``protocol`` its :class:`Protocol` row,
    ``peer_pid`` / ``peer_uid`` the listener's credentials. Every method shares the deadline
    given to :func:`connect`. Use as a context manager (or call :meth:`close`).
    """

    __slots__ = ("sock", "path", "deadline", "version", "protocol", "peer_pid", "peer_uid")

    def __init__(self, sock, path, deadline, peer_pid, peer_uid):
        self.sock = sock
        self.path = path
        self.deadline = deadline
        self.peer_pid = peer_pid
        self.peer_uid = peer_uid
        self.version = None
        self.protocol = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    # -- requests -----------------------------------------------------------------------
    def step_uid(self):
        """REQUEST_STEP_UID: the uid owning the step."""
        self._send_ints(REQUEST_STEP_UID)
        return check_uid(self._recv_uint(), self.path)

    def add_extern_pid(self, pid):
        """REQUEST_ADD_EXTERN_PID: the stepd adopts ``pid``. Raises StepdRequestFailed for
        a non-zero rc, StepdProtocolError if the stepd closes instead of answering."""
        self._send_ints(REQUEST_ADD_EXTERN_PID, pid)
        rc = self._recv_int("the answer to REQUEST_ADD_EXTERN_PID (a 25.05+ stepd closes "
                            "without one while its step is ending)")
        check_add_pid_rc(rc, pid, self.path)

    def x11_display(self):
        """REQUEST_X11_DISPLAY: ``(display, xauthority or None)``, or None when the job has
        no X11 forwarding (display 0)."""
        self._send_ints(REQUEST_X11_DISPLAY)
        display = self._recv_int("the X11 display")
        length = self._recv_int("the X11 xauthority length")
        check_x11_header(display, length, self.path)
        xauth = decode_xauthority(self._recv_exact(length), self.path) if length else None
        return (display, xauth) if display else None

    def namespace_fd(self):
        """The job container's mount namespace as a new O_CLOEXEC fd (the caller owns it),
        or None when the job has none. Uses the request of the stepd's release."""
        if self.protocol.ns_request == REQUEST_GET_NS_FDS:
            return self._namespace_fds()
        self._send_ints(REQUEST_GET_NS_FD)
        theirs = self._recv_int("the namespace fd number")
        if theirs == 0:
            return None
        if theirs < 0:
            raise StepdRequestFailed(f"stepd socket {self.path}: REQUEST_GET_NS_FD answered "
                                     f"{theirs}: the job container's .ns could not be opened "
                                     f"(see the slurmd log)", self.path, theirs)
        return self._recv_fd()

    def _namespace_fds(self):
        self._send_ints(REQUEST_GET_NS_FDS)
        count = check_ns_count(self._recv_int("the namespace count (no answer: the stepd "
                                              "failed to open the job's namespaces)"),
                               self.path)
        mnt = None
        try:
            for _ in range(count):
                kind = self._recv_int("a namespace type")
                fd = self._recv_fd()
                if kind == CLONE_NEWNS and mnt is None:
                    mnt = fd
                else:
                    os.close(fd)          # only the mount namespace is asked for
        except BaseException:
            if mnt is not None:
                os.close(mnt)
            raise
        return mnt

    # -- wire ---------------------------------------------------------------------------
    def handshake(self, sent):
        self._send_ints(sent)
        rc = self._recv_int("the handshake answer")
        self.version = check_handshake(rc, sent, self.path)
        self.protocol = protocol_for(self.version)

    def _left(self, what):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StepdTimeout(f"stepd socket {self.path}: no answer within the deadline "
                               f"({what})", self.path)
        return left

    def _wait(self, readable, what):
        p = select.poll()
        p.register(self.sock, (select.POLLIN if readable else select.POLLOUT)
                   | select.POLLERR | select.POLLHUP)
        # ms, rounded up: never 0 (= no wait)
        if not p.poll(max(1, int(self._left(what) * 1000 + 0.999))):
            raise StepdTimeout(f"stepd socket {self.path}: no answer within the deadline "
                               f"({what})", self.path)

    def _send_ints(self, *values):
        view = memoryview(b"".join(_INT.pack(v) for v in values))
        while view:
            try:
                n = self.sock.send(view, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                self._wait(False, "sending the request")
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise StepdProtocolError(f"stepd socket {self.path}: connection closed by the "
                                         f"stepd while sending", self.path) from None
            view = view[n:]

    def _recv_exact(self, n, what="the answer"):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except BlockingIOError:
                self._wait(True, f"{len(buf)} of {n} bytes of {what}")
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise StepdProtocolError(
                    f"stepd socket {self.path}: connection closed after {len(buf)} of {n} "
                    f"bytes of {what} (request refused or unknown to this slurmstepd)",
                    self.path)
            buf += chunk
        return bytes(buf)

    def _recv_int(self, what="the answer"):
        return _INT.unpack(self._recv_exact(4, what))[0]

    def _recv_uint(self):
        return struct.unpack("=I", self._recv_exact(4, "the uid"))[0]

    def _recv_fd(self):
        """One byte carrying one fd as SCM_RIGHTS; the fd arrives with O_CLOEXEC set."""
        space = socket.CMSG_SPACE(4 * 4)          # room for a few: extra ones are closed
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(1, space, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                self._wait(True, "the namespace fd")
                continue
            except ConnectionResetError:
                data, anc, flags = b"", [], 0
            break
        fds = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(struct.unpack(f"={usable // 4}i", payload[:usable]))
        for extra in fds[1:]:
            os.close(extra)
        if not data:
            if fds:
                os.close(fds[0])
            raise StepdProtocolError(f"stepd socket {self.path}: connection closed before "
                                     f"the namespace fd arrived", self.path)
        if not fds or flags & socket.MSG_CTRUNC:
            if fds:
                os.close(fds[0])
            raise StepdProtocolError(f"stepd socket {self.path}: expected one fd "
                                     f"(SCM_RIGHTS), got {len(fds)}", self.path)
        return fds[0]


def connect(socket_path, timeout=DEFAULT_TIMEOUT, *, protocol_version=None, trusted_uids=(0,)):
    """Connect to the stepd at ``socket_path``, check the listener runs as one of
    ``trusted_uids`` (None: no check) and do the handshake with ``protocol_version`` (default
    :data:`CLIENT_PROTOCOL_VERSION`); returns a :class:`Connection` whose requests share the
    deadline ``timeout`` seconds from now.

    Raises :class:`StepdUnavailable` (no socket, nobody listening, backlog full),
    :class:`StepdRefused` (version refused), :class:`StepdTimeout`,
    :class:`StepdProtocolError` (untrusted listener, closed early); all are StepdError.
    """
    deadline = time.monotonic() + timeout
    path = os.fspath(socket_path)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as e:
        raise StepdUnavailable(f"stepd socket {path}: cannot create a client socket: {e}",
                               path) from None
    try:
        s.setblocking(False)
        _connect(s, path)
        pid, puid, _ = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
        if trusted_uids is not None and puid not in trusted_uids:
            raise StepdProtocolError(
                f"stepd socket {path}: listener pid {pid} runs as uid {puid}, not as "
                f"{'/'.join(map(str, trusted_uids))}: not a slurmstepd, answer not trusted", path)
        conn = Connection(s, path, deadline, pid, puid)
        conn.handshake(CLIENT_PROTOCOL_VERSION if protocol_version is None else protocol_version)
        return conn
    except BaseException:
        s.close()
        raise


def _connect(s, path):
    try:
        s.connect(path)
    except (FileNotFoundError, NotADirectoryError):
        raise StepdUnavailable(f"stepd socket {path} does not exist (step ended)",
                               path) from None
    except ConnectionRefusedError:
        raise StepdUnavailable(f"stepd socket {path}: nobody listening (stale socket of a "
                               f"dead slurmstepd)", path) from None
    except BlockingIOError as e:
        # unix sockets: EAGAIN = listen backlog full; EINPROGRESS does not happen
        raise StepdUnavailable(f"stepd socket {path}: listen backlog full ({e.strerror})",
                               path) from None
    except OSError as e:
        what = "not a socket" if e.errno == _errno.ENOTSOCK else (e.strerror or str(e))
        raise StepdUnavailable(f"stepd socket {path}: connect failed: {what}", path) from None


def query_step_uid(socket_path, timeout=DEFAULT_TIMEOUT, *, protocol_version=None,
                   trusted_uids=(0,)):
    """One bounded REQUEST_STEP_UID exchange; returns a :class:`StepReply` (see
    :func:`connect` for the errors)."""
    with connect(socket_path, timeout, protocol_version=protocol_version,
                 trusted_uids=trusted_uids) as c:
        return StepReply(c.step_uid(), c.version, c.peer_pid, c.peer_uid)


def step_uid(socket_path, timeout=DEFAULT_TIMEOUT, **kw):
    """The uid owning the step whose stepd listens at ``socket_path``. Raises a StepdError
    subclass on failure, within ``timeout`` seconds."""
    return query_step_uid(socket_path, timeout, **kw).uid


def x11_display(layout, job, *, timeout=DEFAULT_TIMEOUT):
    """The X11 forwarding of ``job`` (its extern stepd): ``(display, xauthority or None)``
    for ``DISPLAY=localhost:<display>.0`` / ``XAUTHORITY``, or None without X11 forwarding.
    Raises a StepdError subclass when the stepd cannot tell (within ``timeout``)."""
    with connect(layout.extern_socket(job.job_id), timeout) as c:
        return c.x11_display()


__all__ = ["connect", "Connection", "Protocol", "PROTOCOLS", "protocol_for", "step_uid",
           "query_step_uid", "x11_display", "StepReply", "CLIENT_PROTOCOL_VERSION",
           "DEFAULT_TIMEOUT", "REQUEST_STEP_UID",
           "REQUEST_ADD_EXTERN_PID", "REQUEST_X11_DISPLAY", "REQUEST_GET_NS_FD",
           "REQUEST_GET_NS_FDS"]
