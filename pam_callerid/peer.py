"""The process at the other end of the PAM socket, and the process a login adopts.

The pid to adopt never comes from the request: it is the connecting process as the kernel
saw it at ``connect()`` (``SO_PEERCRED``), held with a pidfd so that a recycled pid is never
adopted. ``SO_PEERPIDFD`` (Linux >= 6.5) gives that pidfd atomically; on older kernels
``pidfd_open(pid)`` right after ``accept()`` plus a start-time check (the process must have
started before the connection was accepted) does the same. Before and after the adoption
the pidfd tells whether the process still lives: a pid written while its process lived
cannot have been recycled (a pid is not reused before its process is reaped).

With keyboard-interactive or password authentication, OpenSSH runs PAM's account phase in a
forked ``[pam]`` child that exits after login; the session's processes descend from its parent,
``sshd: USER [priv]``. :func:`session_holder` returns that parent when the peer is a fork of it
(the same executable, no exec) and the parent runs as root and holds the same TCP connection
(socket inode), so the module placed in account only still adopts the session. (Not the
program's name: sshd is ``sshd-session`` from OpenSSH 9.8 on, or a symlink's name.)
"""
from __future__ import annotations

import os
import select
import struct
from dataclasses import dataclass

from cgroups.jobs import read_small, real_uid

SO_PEERPIDFD = 77                  # <asm-generic/socket.h>, Linux >= 6.5
_UCRED = struct.Struct("3i")       # struct ucred: pid, uid, gid


class PeerError(Exception):
    """The peer cannot be used (not root, gone, pid recycled); the text says why."""


def _hz():
    return os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Stat:
    """What we use of /proc/PID/stat: comm, ppid (field 4), threads (field 20), start
    (field 22: clock ticks since boot)."""
    comm: str
    ppid: int
    threads: int
    start: int


def proc_stat(pid):
    """:class:`Stat` of ``pid``, or None."""
    raw = read_small(f"/proc/{pid}/stat", 4096)
    if not raw:
        return None
    data = raw.decode("utf-8", "replace")
    comm = data[data.find("(") + 1:data.rfind(")")]
    rest = data[data.rfind(")") + 2:].split()           # rest[0] is field 3
    try:
        return Stat(comm, int(rest[1]), int(rest[17]), int(rest[19]))
    except (IndexError, ValueError):
        return None


def proc_exe(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def pidfd_alive(pidfd):
    """A pidfd polls readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)


def holds_socket(pid, inode):
    """Whether ``pid`` has ``socket:[inode]`` among its open fds."""
    target = f"socket:[{inode}]"
    d = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(d)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"{d}/{fd}") == target:
                return True
        except OSError:
            pass
    return False


class Process:
    """A process held by a pidfd. ``how``: why this process (``peer`` or ``[priv] parent``)."""

    __slots__ = ("pid", "pidfd", "how")

    def __init__(self, pid, pidfd, how):
        self.pid, self.pidfd, self.how = pid, pidfd, how

    def alive(self):
        return pidfd_alive(self.pidfd)

    def close(self):
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _open_checked(pid, accepted_ticks):
    """pidfd_open(pid) for a pid taken from SO_PEERCRED before the pidfd existed: refused when
    the process started after the connection was accepted (then the pid was recycled)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        raise PeerError(f"peer pid {pid} is gone ({e.strerror})") from None
    st = proc_stat(pid)
    if st is None or st.start > accepted_ticks:
        os.close(pidfd)
        raise PeerError(f"peer pid {pid} was recycled (started after the connection)")
    return pidfd


def peer_of(sock, accepted_boottime, use_peerpidfd=True):
    """The connecting process of an accepted unix socket as a :class:`Process`; PeerError
    when it is not root or already gone. ``accepted_boottime``: CLOCK_BOOTTIME at accept()."""
    from _socket import SO_PEERCRED, SOL_SOCKET
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(SOL_SOCKET, SO_PEERCRED, _UCRED.size))
    if uid != 0:
        raise PeerError(f"peer pid {pid} runs as uid {uid}, not root")
    if pid <= 0:
        raise PeerError("peer has no pid (from another pid namespace?)")
    pidfd = None
    if use_peerpidfd:
        try:
            pidfd = struct.unpack("i", sock.getsockopt(SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        except OSError:
            pidfd = None                           # kernel < 6.5: pidfd_open below
    if pidfd is None:
        pidfd = _open_checked(pid, int(accepted_boottime * _hz()) + 1)
    return Process(pid, pidfd, "peer")


def session_holder(peer, conn_inode):
    """The process to adopt for ``peer``: its parent when the peer is a fork of it (same
    executable) and the parent runs as root and holds the same TCP connection
    (``conn_inode``) -- the peer is then sshd's ``[pam]`` child of a keyboard-interactive
    login, the parent ``[priv]`` -- else the peer itself. The parent is returned as a new
    :class:`Process` (the caller closes it)."""
    if conn_inode is None:
        return peer
    st = proc_stat(peer.pid)
    if st is None:
        return peer
    ppid = st.ppid
    exe = proc_exe(peer.pid)
    if ppid <= 1 or exe is None or proc_exe(ppid) != exe or real_uid(ppid) != 0 \
            or not holds_socket(ppid, conn_inode):
        return peer
    try:
        pidfd = os.pidfd_open(ppid)
    except OSError:
        return peer
    # the pidfd is the real parent if the child still lives and still names it as parent
    again = proc_stat(peer.pid)
    if not peer.alive() or again is None or again.ppid != ppid:
        os.close(pidfd)
        return peer
    return Process(ppid, pidfd, "[priv] parent")
