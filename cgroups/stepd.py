"""Ask a slurmstepd, over its unix socket, for the uid that owns its step (REQUEST_STEP_UID).

This is the local owner source pam_slurm_adopt uses. We use it on cgroup v2, where the cgroup
tree carries no uid, and optionally on v1 to cross-check the ``uid_<U>`` directory.

Protocol (facts read in Slurm's src/common/stepd_api.c, src/common/stepd_api.h and
src/slurmd/slurmstepd/req.c; 22.05 is what the test bed runs, Debian 22.05.8; the code below
is ours, written from those facts):

* Socket: ``<SlurmdSpoolDir>/<NodeName>_<job>.<step>`` (extern step = 4294967292), a
  SOCK_STREAM unix socket created and listened on by slurmstepd, chmod 0777 (anyone may
  connect). Each accepted connection is served by its own stepd thread.
* Every integer is a native-endian C ``int`` (4 bytes), ``uid_t`` is 4 bytes on Linux.
* Handshake (19.05 and later; 22.05 accepts nothing else): the client writes its protocol
  version as an ``int``; the stepd accepts it if it is >= its own SLURM_MIN_PROTOCOL_VERSION
  (22.05: 20.11 = 36<<8), reads the peer's credentials with SO_PEERCRED, and answers an ``int``:
  its own SLURM_PROTOCOL_VERSION (22.05: 38<<8 = 9728) on success, SLURM_ERROR (-1) followed
  by close on refusal. Before 19.05 the first int was REQUEST_CONNECT (0) followed by a munge
  credential; 19.05..21.08 still accept that form, 22.05 refuses it (-1). The client version
  is otherwise only logged (22.05 through 26.x), so any version >= the stepd's minimum works.
* Then requests on the same connection until EOF: the client writes the request number as an
  ``int``; REQUEST_STEP_UID is 20 (position in ``step_msg_t``, unchanged from 16.x through
  24.x; newer releases dispatch through a table but keep the number for mixed-version
  operation). The stepd answers exactly ``sizeof(uid_t)`` = 4 bytes: the ``uid`` field of its
  own step record. No return code precedes it. The request needs no privilege (no uid check
  in 22.05's dispatcher; in 26.x's table it is flagged neither from_slurmd nor from_job_owner).
  An unknown request makes the stepd close the connection (we see EOF).
* Slurm's own client returns ``(uid_t)-1`` on error, so 4294967295 never is a real answer.

Why the answer is reliable:

* Only root (slurmd/slurmstepd) can create entries in SlurmdSpoolDir (root-owned, 0755), so a
  socket at that name was bound by a process running as root. We also ask the kernel who is
  listening (SO_PEERCRED on the connected socket gives the credentials the listener had when
  it called listen()) and refuse any answer from a peer whose uid is not in ``trusted_uids``
  (default: root only, which is what slurmstepd runs as).
* The uid comes from the stepd's own job record, which slurmstepd filled from the launch
  request whose credential slurmd verified (signed by slurmctld); it is the same value Slurm
  uses to setuid() the job's tasks.

Bounds (this runs inside sshd's PAM stack: it must never hang):

* One deadline, ``timeout`` seconds (default 0.5 s) from the start of the call, covers
  connect, the single write and every read; each blocking step gets only what remains.
* connect() to a unix socket nobody listens on fails at once (ECONNREFUSED); a missing file
  fails at once (ENOENT); a full listen backlog fails at once (EAGAIN on a non-blocking
  unix connect) instead of waiting.
* Exactly 8 bytes are read (handshake reply + uid); the write is 8 bytes (version + request,
  pipelined: the stepd reads them one after the other), so one round trip.
* The socket is closed on every path; no signal handlers, no threads.
"""
import errno as _errno
import os
import select
import socket
import stat as _stat
import struct
import time

from .errors import StepdError, StepdProtocolError, StepdTimeout, StepdUnavailable

REQUEST_STEP_UID = 20                 # step_msg_t position (stepd_api.h)
SLURM_22_05_PROTOCOL_VERSION = 38 << 8  # 9728
DEFAULT_PROTOCOL_VERSION = SLURM_22_05_PROTOCOL_VERSION
DEFAULT_TIMEOUT = 0.5
INVALID_UID = 0xFFFFFFFF              # (uid_t)-1: Slurm's client-side error value

_REQ = struct.Struct("=ii")           # protocol version, request number
_REPLY = struct.Struct("=iI")         # handshake rc (int), uid (uid_t = uint32)
_UCRED = struct.Struct("=iII")        # struct ucred: pid, uid, gid


class StepReply:
    """What one REQUEST_STEP_UID exchange returned: ``uid``, the stepd's ``protocol_version``
    and the listener's ``peer_pid`` / ``peer_uid`` (SO_PEERCRED)."""

    __slots__ = ("uid", "protocol_version", "peer_pid", "peer_uid")

    def __init__(self, uid, protocol_version, peer_pid, peer_uid):
        self.uid = uid
        self.protocol_version = protocol_version
        self.peer_pid = peer_pid
        self.peer_uid = peer_uid

    def __repr__(self):
        return (f"StepReply(uid={self.uid}, protocol_version={self.protocol_version}, "
                f"peer_pid={self.peer_pid}, peer_uid={self.peer_uid})")


def query_step_uid(socket_path, timeout=DEFAULT_TIMEOUT, *,
                   protocol_version=DEFAULT_PROTOCOL_VERSION, trusted_uids=(0,)):
    """One bounded REQUEST_STEP_UID exchange with the stepd at ``socket_path``.

    Returns a :class:`StepReply`. Raises :class:`StepdUnavailable` (no such socket, nobody
    listening, backlog full), :class:`StepdTimeout` (no complete answer within ``timeout``
    seconds, all steps included), :class:`StepdProtocolError` (refused handshake, connection
    closed early, impossible uid, listener not in ``trusted_uids``; ``trusted_uids=None``
    skips that check). All are :class:`StepdError` (a CgroupError).
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
            raise StepdUnavailable(f"stepd socket {path}: connect failed: "
                                   f"{e.strerror or e}", path) from None
        pid, puid, _ = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
        if trusted_uids is not None and puid not in trusted_uids:
            raise StepdProtocolError(
                f"stepd socket {path}: listener pid {pid} runs as uid {puid}, not as "
                f"{'/'.join(map(str, trusted_uids))}: not a slurmstepd, answer not trusted", path)
        _send_all(s, _REQ.pack(protocol_version, REQUEST_STEP_UID), deadline, path)
        data = _recv_exact(s, _REPLY.size, deadline, path)
    finally:
        s.close()
    rc, uid = _REPLY.unpack(data)
    if rc < 0:
        raise StepdProtocolError(f"stepd socket {path}: handshake refused (rc {rc}; protocol "
                                 f"version {protocol_version} too old for this slurmstepd?)", path)
    if uid == INVALID_UID:
        raise StepdProtocolError(f"stepd socket {path}: answered uid {uid} ((uid_t)-1)", path)
    return StepReply(uid, rc, pid, puid)


def step_uid(socket_path, timeout=DEFAULT_TIMEOUT, **kw):
    """The uid owning the step whose stepd listens at ``socket_path`` (see module docstring).
    Raises a :class:`StepdError` subclass on failure, within ``timeout`` seconds."""
    return query_step_uid(socket_path, timeout, **kw).uid


def _remaining(deadline, path, what):
    left = deadline - time.monotonic()
    if left <= 0:
        raise StepdTimeout(f"stepd socket {path}: no answer within the deadline ({what})", path)
    return left


def _send_all(s, data, deadline, path):
    view = memoryview(data)
    while view:
        try:
            n = s.send(view)
        except BlockingIOError:
            _wait(s, False, _remaining(deadline, path, "sending the request"), path)
            continue
        except (BrokenPipeError, ConnectionResetError):
            raise StepdProtocolError(f"stepd socket {path}: connection closed by the stepd "
                                     f"while sending", path) from None
        view = view[n:]


def _recv_exact(s, n, deadline, path):
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf))
        except BlockingIOError:
            _wait(s, True, _remaining(deadline, path, f"{len(buf)} of {n} bytes read"), path)
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise StepdProtocolError(
                f"stepd socket {path}: connection closed after {len(buf)} of {n} bytes "
                f"(handshake refused or request unknown to this slurmstepd)", path)
        buf += chunk
    return bytes(buf)


def _wait(s, readable, left, path):
    p = select.poll()
    p.register(s, (select.POLLIN if readable else select.POLLOUT) | select.POLLERR | select.POLLHUP)
    if not p.poll(max(1, int(left * 1000 + 0.999))):     # ms, rounded up: never 0 = no wait
        raise StepdTimeout(f"stepd socket {path}: no answer within the deadline", path)


def is_socket_file(path):
    """True if ``path`` is a unix socket file (lstat, no connect)."""
    try:
        return _stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


__all__ = ["step_uid", "query_step_uid", "StepReply", "StepdError", "StepdTimeout",
           "StepdUnavailable", "StepdProtocolError", "REQUEST_STEP_UID",
           "DEFAULT_PROTOCOL_VERSION", "DEFAULT_TIMEOUT"]
