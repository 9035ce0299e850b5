"""Connection -> socket inode -> process -> Slurm job, in the daemon's network namespace.

Perspective: the request names the connection as seen by the *remote* node (its source is our
local end).  So we look for a local socket whose local end is the request's source and whose
remote end is the request's destination.

1. socket: NETLINK_SOCK_DIAG exact-tuple lookup (no dump; the kernel hashes straight to the
   socket), falling back to parsing /proc/net/{tcp,udp}{,6}.  IPv4 tuples are also tried as
   IPv4-mapped IPv6 (a dual-stack AF_INET6 socket talking IPv4).
2. the socket's cgroup: the kernel's answer in step 1 carries the cgroup v2 id of the
   process that made the socket (INET_DIAG_CGROUP_ID).  `JobCgroups` indexes the ids of the
   job directories on cgroup2 file systems: a socket made inside a job (an `ssh` started in
   a job step, as launchers do) is that job's, with no per-process work at all.  The job's
   owner is then the socket's uid (the uid of the process that made it).
3. otherwise the pid holding the inode: `JobSockets`, an index socket inode -> (pid, fd) over
   the processes of Slurm jobs only (a socket made outside a job and handed to a job
   process; cgroup v1 layouts, whose ids the socket does not carry).  A socket held by no
   process of a job is not in a job: "unknown" costs one pass over the job processes' fds,
   never a scan of every process.  The index is rebuilt only on a miss, and one rebuild
   serves every question waiting for it (concurrent misses wait for the same pass and look
   in its index first).  Processes vanishing mid-scan are skipped.  pid -> job through
   daemon.jobs (cgroups/ package).

`LogUnknownHolder=yes` adds, for the log only and after the reply, a search of the holder
of an "unknown" socket among every process, bounded in time and frequency (HolderScan).
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import threading
import time
import weakref
from dataclasses import dataclass

from . import protocol as P

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
TCPF_ALL = 0xFFF
TCP_LISTEN = 10
TCP_TIME_WAIT = 6
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
INET_DIAG_CGROUP_ID = 21      # u64 attribute of every answer since Linux 5.9 (linux/inet_diag.h)
INET_DIAG_MSG_SIZE = 72       # struct inet_diag_msg; the attributes follow it

_NLH = struct.Struct("=IHHII")
_REQ_HEAD = struct.Struct("=BBBBI")
_ID_PORTS = struct.Struct(">HH")
_ID_TAIL = struct.Struct("=III")
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")  # expires rqueue wqueue uid inode
_ATTR = struct.Struct("=HH")          # struct rtattr: length (header included), type
_U64 = struct.Struct("=Q")


@dataclass(frozen=True)
class SockInfo:
    inode: int
    uid: int
    family: int  # 4 or 6 (the socket's own family)
    via: str     # "sockdiag", "pyroute2" or "procnet"
    cgroup_id: int = 0   # cgroup v2 id of the process that made the socket (0: not known)


def _v6(ip) -> bytes:
    """16-byte form: IPv4 as IPv4-mapped IPv6."""
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def _candidates(src, dst):
    """(socket family, local bytes16, remote bytes16) to try, in order."""
    if src.version == 4:
        yield 4, src.packed + bytes(12), dst.packed + bytes(12)
        yield 6, _v6(src), _v6(dst)
    else:
        yield 6, src.packed, dst.packed


def _af(fam: int) -> int:
    return socket.AF_INET if fam == 4 else socket.AF_INET6


# ---------------------------------------------------------------------------------------------
# sock_diag


class SockDiag:
    """Exact-tuple NETLINK_SOCK_DIAG lookups (thread-safe): one netlink socket per thread,
    so concurrent lookups neither share a lock nor match each other's answers.

    The kernel answers an inet_diag request inside the send() (netlink_unicast runs the
    handler in the sender's context), so the reply is read without waiting; a poll of at
    most RECV_TIMEOUT covers a kernel that would queue it later."""

    via = "sockdiag"
    RECV_TIMEOUT = 1.0

    def __init__(self):
        self._local = threading.local()
        self._all = weakref.WeakSet()      # for close(); a thread's socket dies with it
        self._all_lock = threading.Lock()
        self._closed = False
        self._sock()              # fails here (OSError) where netlink sock_diag is unavailable

    def _sock(self) -> socket.socket:
        s = getattr(self._local, "sock", None)
        if s is None:
            if self._closed:
                raise OSError(errno.EBADF, "sock_diag lookup closed")
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                              NETLINK_SOCK_DIAG)
            s.bind((0, 0))
            self._local.sock, self._local.seq = s, 0
            with self._all_lock:
                self._all.add(s)
        return s

    def close(self):
        with self._all_lock:
            self._closed = True
            for s in list(self._all):
                s.close()

    def _recv(self, s: socket.socket) -> bytes:
        try:
            return s.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if not select.select([s], [], [], self.RECV_TIMEOUT)[0]:
                raise OSError(errno.ETIMEDOUT, "no sock_diag answer") from None
            return s.recv(65536, socket.MSG_DONTWAIT)

    def _query(self, fam, proto, lbytes, lport, rbytes, rport):
        s = self._sock()
        local = self._local
        local.seq = seq = (local.seq + 1) & 0xFFFFFFFF
        body = (_REQ_HEAD.pack(_af(fam), proto, 0, 0, TCPF_ALL)
                + _ID_PORTS.pack(lport, rport) + lbytes + rbytes
                + _ID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
        s.send(_NLH.pack(_NLH.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body)
        while True:
            data = self._recv(s)
            if len(data) < _NLH.size:
                return None
            ln, typ, flags, rseq, _ = _NLH.unpack_from(data, 0)
            if rseq == seq:
                break             # (else: a stale answer of an earlier, timed-out query)
        if typ == NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, _NLH.size)[0]
            if err in (0, errno.ENOENT):
                return None
            raise OSError(err, os.strerror(err))
        if typ != SOCK_DIAG_BY_FAMILY or ln < _NLH.size + INET_DIAG_MSG_SIZE:
            return None
        off = _NLH.size
        rfam, state, _, _ = _MSG_HEAD.unpack_from(data, off)
        sport, dport = _ID_PORTS.unpack_from(data, off + 4)
        src = data[off + 8:off + 24]
        dst = data[off + 24:off + 40]
        _, _, _, uid, inode = _MSG_TAIL.unpack_from(data, off + 52)
        cgroup_id = _cgroup_id(data, off + INET_DIAG_MSG_SIZE, min(ln, len(data)))
        return state, sport, dport, src, dst, uid, inode, cgroup_id

    def find(self, proto: int, src, sport: int, dst, dport: int) -> SockInfo | None:
        for fam, lb, rb in _candidates(src, dst):
            try:
                if proto == P.PROTO_UDP:
                    # udp_diag's exact lookup is a receive-path lookup: its "src" is the remote
                    # end (measured on Linux 6.x); the answer is in socket perspective.
                    r = self._query(fam, proto, rb, dport, lb, sport)
                else:
                    r = self._query(fam, proto, lb, sport, rb, dport)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT, errno.EAFNOSUPPORT):
                    continue
                raise
            if r is None:
                continue
            state, rs, rd, rsrc, rdst, uid, inode, cgroup_id = r
            n = 4 if fam == 4 else 16
            if inode == 0 or (proto == P.PROTO_TCP and state in (TCP_LISTEN, TCP_TIME_WAIT)):
                continue
            if rs != sport or rsrc[:n] != lb[:n]:
                if not (proto == P.PROTO_UDP and rs == sport and not any(rsrc[:n])):
                    continue
            if rd != dport or rdst[:n] != rb[:n]:
                if not (proto == P.PROTO_UDP and rd == 0 and not any(rdst[:n])):
                    continue
            return SockInfo(inode, uid, fam, self.via, cgroup_id)
        return None


def _cgroup_id(data: bytes, off: int, end: int) -> int:
    """The INET_DIAG_CGROUP_ID attribute among those in data[off:end], or 0."""
    while off + _ATTR.size <= end:
        alen, atype = _ATTR.unpack_from(data, off)
        if alen < _ATTR.size or off + alen > end:
            return 0
        if atype == INET_DIAG_CGROUP_ID and alen >= _ATTR.size + _U64.size:
            return _U64.unpack_from(data, off + _ATTR.size)[0]
        off += (alen + 3) & ~3
    return 0


class Pyroute2Diag:
    """Same exact lookup through pyroute2's message classes (slower: ~0.35 ms per query)."""

    via = "pyroute2"

    def __init__(self):
        from pyroute2 import DiagSocket
        self._ds = DiagSocket()
        self._ds.bind()
        self._lock = threading.Lock()

    def close(self):
        self._ds.close()

    def find(self, proto: int, src, sport: int, dst, dport: int) -> SockInfo | None:
        from pyroute2.netlink.diag import inet_diag_req
        for fam, lb, rb in _candidates(src, dst):
            req = inet_diag_req()
            req["sdiag_family"] = _af(fam)
            req["sdiag_protocol"] = proto
            req["idiag_states"] = TCPF_ALL
            if proto == P.PROTO_UDP:  # receive-path lookup, see SockDiag.find
                lb_, rb_, sp_, dp_ = rb, lb, dport, sport
            else:
                lb_, rb_, sp_, dp_ = lb, rb, sport, dport
            req["idiag_sport"] = sp_
            req["idiag_dport"] = dp_
            req["idiag_src"] = struct.unpack(">4I", lb_)
            req["idiag_dst"] = struct.unpack(">4I", rb_)
            req["idiag_if"] = 0
            req["idiag_cookie"] = 0xFFFFFFFFFFFFFFFF
            try:
                with self._lock:
                    msgs = tuple(self._ds.nlm_request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST))
            except Exception:
                continue
            for m in msgs:
                inode = m.get("idiag_inode", 0)
                state = m.get("idiag_state")
                if not inode or (proto == P.PROTO_TCP and state in (TCP_LISTEN, TCP_TIME_WAIT)):
                    continue
                lip = P.normalise_addr(m["idiag_src"])
                rip = P.normalise_addr(m["idiag_dst"])
                if m["idiag_sport"] != sport or (lip != src and not (proto == P.PROTO_UDP and lip.is_unspecified)):
                    continue
                if (m["idiag_dport"], rip) != (dport, dst) and not (
                        proto == P.PROTO_UDP and m["idiag_dport"] == 0):
                    continue
                return SockInfo(inode, m.get("idiag_uid", -1), fam, self.via)
        return None


# ---------------------------------------------------------------------------------------------
# /proc/net fallback

_LITTLE = sys.byteorder == "little"


def _hex_addr(b: bytes) -> str:
    """Kernel's /proc/net/* address text: each 32-bit word printed as a host-order %08X."""
    out = []
    for i in range(0, len(b), 4):
        w = b[i:i + 4]
        out.append((w[::-1] if _LITTLE else w).hex().upper())
    return "".join(out)


def procnet_find(proto: int, src, sport: int, dst, dport: int, root: str = "/proc/self/net") -> SockInfo | None:
    name = "tcp" if proto == P.PROTO_TCP else "udp"
    for fam, lb, rb in _candidates(src, dst):
        n = 4 if fam == 4 else 16
        path = f"{root}/{name}" + ("6" if fam == 6 else "")
        try:
            with open(path, "rb") as f:
                text = f.read().decode("ascii", "replace")
        except OSError:
            continue
        local = f"{_hex_addr(lb[:n])}:{sport:04X}"
        remote = f"{_hex_addr(rb[:n])}:{dport:04X}"
        pats = [f" {local} {remote} "]
        if proto == P.PROTO_UDP:
            any_local = f"{'0' * (2 * n)}:{sport:04X}"
            any_remote = f"{'0' * (2 * n)}:0000"
            pats += [f" {local} {any_remote} ", f" {any_local} {remote} ", f" {any_local} {any_remote} "]
        for pat in pats:
            start = 0
            while True:
                i = text.find(pat, start)
                if i < 0:
                    break
                j = text.find("\n", i)
                fields = text[i:j if j >= 0 else len(text)].split()
                start = i + 1
                try:
                    state = int(fields[2], 16)
                    uid = int(fields[6])
                    inode = int(fields[8])
                except (IndexError, ValueError):
                    continue
                if inode == 0 or (proto == P.PROTO_TCP and state in (TCP_LISTEN, TCP_TIME_WAIT)):
                    continue
                return SockInfo(inode, uid, fam, "procnet")
    return None


# ---------------------------------------------------------------------------------------------
# inode -> pid


def _fd_target(proc: str, pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"{proc}/{pid}/fd/{fd}")
    except OSError:
        return None


def socket_fds(pid: int, proc: str = "/proc"):
    """(inode, fd) of every socket the process holds; nothing if it vanished."""
    fdd = f"{proc}/{pid}/fd"
    try:
        names = os.listdir(fdd)
    except OSError:
        return
    for name in names:
        try:
            link = os.readlink(f"{fdd}/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            yield int(link[8:-1]), int(name)


class _PassIndex:
    """A map built by passes over the node's jobs, one pass at a time.

    A miss is authoritative when the map was built by a pass that *started after the
    question arrived*: the connection existed before the peer asked, so what the pass looks
    for (the job process holding its socket, the job cgroup it was made in) would have been
    seen.  Otherwise a question waits for the pass running and looks in its map; only if
    that pass started before the question arrived and missed it is a new pass made, which
    then serves every question waiting.  (A fan-out's thousand questions arriving during
    the first pass are all answered from it.)  Subclasses: `_scan()` -> the new map,
    `_check(key)` -> the answer from the current map or None."""

    def __init__(self, jobs, clock=time.monotonic):
        self.jobs = jobs
        self.clock = clock
        self._map: dict = {}
        self._built_from = float("-inf")     # start time of the pass that built _map
        self._running: float | None = None    # start time of the pass in progress
        self._cond = threading.Condition()
        self.passes = 0

    def _find(self, key, arrived: float):
        """The answer for `key` in a map built after `arrived`, or by then, or None."""
        while True:
            found = self._check(key)
            if found is not None or self._built_from >= arrived:
                return found
            self._next_pass()

    def _next_pass(self):
        """Make a pass, or wait for the one running to end (its map may hold the answer
        even though it started before the question arrived: _find checks it first)."""
        with self._cond:
            if self._running is not None:
                self._cond.wait()
                return
            self._running = start = self.clock()
        m = None
        try:
            m = self._scan()
        finally:                   # a failed pass wakes the waiters; one of them tries again
            with self._cond:
                if m is not None:
                    self._map, self._built_from = m, start
                    self.passes += 1
                    self._installed()
                self._running = None
                self._cond.notify_all()

    def _installed(self):
        """Called (under the lock) when a pass's map replaced the previous one."""


class JobSockets(_PassIndex):
    """Index socket inode -> (pid, fd) over every process of a Slurm job.

    A hit is re-checked (one readlink of /proc/PID/fd/FD, then the pid's job, kept for
    JOB_TTL seconds per pid); a miss follows _PassIndex's rule."""

    JOB_TTL = 1.0
    JOB_CACHE_MAX = 65536

    def __init__(self, jobs, proc: str = "/proc", clock=time.monotonic):
        super().__init__(jobs, clock)
        self.proc = proc
        self._jobs: dict[int, tuple[tuple[int, int], float]] = {}   # pid -> (job, when)

    def _check(self, inode: int):
        hit = self._map.get(inode)
        if hit is None:
            return None
        pid, fd = hit
        if _fd_target(self.proc, pid, fd) != f"socket:[{inode}]":
            return None
        return self._job_of(pid)

    def _job_of(self, pid: int):
        """(pid, (job_id, job_uid)) or None.  The job of a pid is kept for JOB_TTL seconds:
        a launcher's process holds many of the connections asked about at once (a fan-out),
        and Slurm moves processes into a job, never from one job to another.  The pid still
        holds the socket (checked just before), so it is the same process."""
        now = self.clock()
        kept = self._jobs.get(pid)
        if kept is not None and now - kept[1] < self.JOB_TTL:
            return pid, kept[0]
        job = self.jobs.job_of_pid(pid)
        if job is None:
            self._jobs.pop(pid, None)
            return None
        if len(self._jobs) >= self.JOB_CACHE_MAX:
            self._jobs.clear()
        self._jobs[pid] = (job, now)
        return pid, job

    def _scan(self) -> dict:
        m = {}
        for pid in self.jobs.job_pids():
            for inode, fd in socket_fds(pid, self.proc):
                m.setdefault(inode, (pid, fd))
        return m

    def _installed(self):
        self._jobs.clear()

    def holder(self, inode: int, arrived: float):
        """(pid, (job_id, job_uid)) of the job process holding the socket, or None."""
        return self._find(inode, arrived)


class JobCgroups(_PassIndex):
    """Index cgroup v2 id -> job id over the job directories (jobs.job_cgroup_ids()).

    A pass stats the job directories, not the processes.  A miss follows _PassIndex's rule;
    an id missed by a pass that started after the question arrived is remembered as no
    job's: a job's directories are always made new, so a cgroup that was not a job's never
    becomes one."""

    NOT_JOB_MAX = 65536

    def __init__(self, jobs, clock=time.monotonic):
        super().__init__(jobs, clock)
        self._not_job: set[int] = set()

    def _check(self, cgroup_id: int):
        return self._map.get(cgroup_id)

    def _scan(self) -> dict:
        return self.jobs.job_cgroup_ids()

    def job_of(self, cgroup_id: int, arrived: float) -> int | None:
        """The job whose cgroup (or a cgroup below it) has this id, or None."""
        if cgroup_id in self._not_job:
            return None
        job = self._find(cgroup_id, arrived)
        if job is None:
            if len(self._not_job) >= self.NOT_JOB_MAX:
                self._not_job.clear()
            self._not_job.add(cgroup_id)
        return job


class HolderScan:
    """For the log: which process holds a socket no job process holds.  Scans every
    process, at most `budget` seconds per search and one search per `every` seconds."""

    def __init__(self, proc: str = "/proc", budget: float = 0.05, every: float = 1.0,
                 clock=time.monotonic):
        self.proc = proc
        self.budget = budget
        self.every = every
        self.clock = clock
        self._next = float("-inf")
        self._lock = threading.Lock()

    def find(self, inode: int):
        """-> (pid, uid, comm) | "busy" (searched recently) | "timeout" | None (not found)."""
        now = self.clock()
        with self._lock:
            if now < self._next:
                return "busy"
            self._next = now + self.every
        end = now + self.budget
        try:
            names = os.listdir(self.proc)
        except OSError:
            return None
        for name in names:
            if not name.isdigit():
                continue
            if self.clock() > end:
                return "timeout"
            pid = int(name)
            if any(i == inode for i, _ in socket_fds(pid, self.proc)):
                try:
                    uid = os.stat(f"{self.proc}/{pid}").st_uid
                    with open(f"{self.proc}/{pid}/comm", "rb") as f:
                        comm = f.read().strip().decode("utf-8", "replace")
                except OSError:
                    return None
                return pid, uid, comm
        return None


@dataclass
class LookupResult:
    status: int                # protocol STATUS_FOUND / STATUS_UNKNOWN
    job_id: int = P.NO_JOB
    job_uid: int = P.NO_UID
    pid: int | None = None     # the job process holding the socket, when `by` is "holder"
    sock: SockInfo | None = None
    why: str = ""              # for unknown: "no-socket" or "not-in-job" (no process in a job holds it)
    by: str = ""               # for found: "cgroup" (made in the job) or "holder" (a job process holds it)
    elapsed_ms: float = 0.0


class Lookup:
    """The whole lookup; thread-safe, meant to run in worker threads."""

    def __init__(self, jobs, *, sockdiag: str = "netlink", proc: str = "/proc"):
        self.jobs = jobs
        self.proc = proc
        self.cgroups = JobCgroups(jobs)
        self.index = JobSockets(jobs, proc)
        self._diag = None
        if sockdiag == "netlink":
            try:
                self._diag = SockDiag()
            except OSError:
                self._diag = None
        elif sockdiag == "pyroute2":
            try:
                self._diag = Pyroute2Diag()
            except Exception:
                self._diag = None

    @property
    def sock_backend(self) -> str:
        return self._diag.via if self._diag else "procnet"

    def close(self):
        if self._diag:
            self._diag.close()

    def find_socket(self, proto, src, sport, dst, dport) -> SockInfo | None:
        src = P.normalise_addr(src)
        dst = P.normalise_addr(dst)
        if self._diag is not None:
            try:
                info = self._diag.find(proto, src, sport, dst, dport)
                if info is not None or proto == P.PROTO_TCP:
                    # the kernel's exact TCP lookup is authoritative: no need to walk
                    # /proc/net/tcp{,6}, which costs ~2 ms per pass on a large-memory node
                    # (it iterates the whole connection hash table) however few sockets exist
                    return info
            except OSError:
                pass
        return procnet_find(proto, src, sport, dst, dport, root=f"{self.proc}/self/net")

    def lookup(self, req: P.Request, arrived: float | None = None) -> LookupResult:
        """`arrived`: time.monotonic() when the question reached us (default: now)."""
        t0 = time.perf_counter()
        if arrived is None:
            arrived = time.monotonic()
        info = self.find_socket(req.proto, req.src, req.src_port, req.dst, req.dst_port)
        if info is None:
            return LookupResult(P.STATUS_UNKNOWN, why="no-socket",
                                elapsed_ms=(time.perf_counter() - t0) * 1e3)
        job_id = self.cgroups.job_of(info.cgroup_id, arrived) if info.cgroup_id else None
        if job_id is not None:
            return LookupResult(P.STATUS_FOUND, job_id, info.uid, sock=info, by="cgroup",
                                elapsed_ms=(time.perf_counter() - t0) * 1e3)
        found = self.index.holder(info.inode, arrived)
        el = (time.perf_counter() - t0) * 1e3
        if found is None:
            return LookupResult(P.STATUS_UNKNOWN, sock=info, why="not-in-job", elapsed_ms=el)
        pid, (job_id, job_uid) = found
        return LookupResult(P.STATUS_FOUND, job_id, job_uid, pid, info, by="holder", elapsed_ms=el)
