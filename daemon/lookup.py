"""Connection -> socket inode -> process -> Slurm job, in the daemon's network namespace.

Perspective: the request names the connection as seen by the *remote* node (its source is our
local end).  So we look for a local socket whose local end is the request's source and whose
remote end is the request's destination.

1. socket: NETLINK_SOCK_DIAG exact-tuple lookup (no dump; the kernel hashes straight to the
   socket), falling back to parsing /proc/net/{tcp,udp}{,6}.  IPv4 tuples are also tried as
   IPv4-mapped IPv6 (a dual-stack AF_INET6 socket talking IPv4).
2. pid holding the inode: pids in Slurm job cgroups first, then every process of the socket's
   owner uid (a holder found there outside any job ends the search: "unknown"), then (if
   configured) every process, where only processes in a job get their fds scanned.
   Processes vanishing mid-scan are skipped.
3. pid -> job through daemon.jobs (cgroups/ package).
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
import threading
import time
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

_NLH = struct.Struct("=IHHII")
_REQ_HEAD = struct.Struct("=BBBBI")
_ID_PORTS = struct.Struct(">HH")
_ID_TAIL = struct.Struct("=III")
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")  # expires rqueue wqueue uid inode


@dataclass(frozen=True)
class SockInfo:
    inode: int
    uid: int
    family: int  # 4 or 6 (the socket's own family)
    via: str     # "sockdiag", "pyroute2" or "procnet"


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
    """Exact-tuple NETLINK_SOCK_DIAG lookups over one raw netlink socket (thread-safe)."""

    via = "sockdiag"

    def __init__(self):
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_SOCK_DIAG)
        self._sock.bind((0, 0))
        self._sock.settimeout(1.0)
        self._lock = threading.Lock()
        self._seq = 0

    def close(self):
        self._sock.close()

    def _query(self, fam, proto, lbytes, lport, rbytes, rport):
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            seq = self._seq
            body = (_REQ_HEAD.pack(_af(fam), proto, 0, 0, TCPF_ALL)
                    + _ID_PORTS.pack(lport, rport) + lbytes + rbytes
                    + _ID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
            msg = _NLH.pack(_NLH.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body
            self._sock.send(msg)
            while True:
                data = self._sock.recv(65536)
                if len(data) < _NLH.size:
                    return None
                ln, typ, flags, rseq, _ = _NLH.unpack_from(data, 0)
                if rseq != seq:
                    continue  # stale answer of an earlier, timed-out query
                break
        if typ == NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, _NLH.size)[0]
            if err in (0, errno.ENOENT):
                return None
            raise OSError(err, os.strerror(err))
        if typ != SOCK_DIAG_BY_FAMILY or ln < _NLH.size + 72:
            return None
        off = _NLH.size
        rfam, state, _, _ = _MSG_HEAD.unpack_from(data, off)
        sport, dport = _ID_PORTS.unpack_from(data, off + 4)
        src = data[off + 8:off + 24]
        dst = data[off + 24:off + 40]
        _, _, _, uid, inode = _MSG_TAIL.unpack_from(data, off + 52)
        return state, sport, dport, src, dst, uid, inode

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
            state, rs, rd, rsrc, rdst, uid, inode = r
            n = 4 if fam == 4 else 16
            if inode == 0 or (proto == P.PROTO_TCP and state in (TCP_LISTEN, TCP_TIME_WAIT)):
                continue
            if rs != sport or rsrc[:n] != lb[:n]:
                if not (proto == P.PROTO_UDP and rs == sport and not any(rsrc[:n])):
                    continue
            if rd != dport or rdst[:n] != rb[:n]:
                if not (proto == P.PROTO_UDP and rd == 0 and not any(rdst[:n])):
                    continue
            return SockInfo(inode, uid, fam, self.via)
        return None


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
                lip = normal(m["idiag_src"])
                rip = normal(m["idiag_dst"])
                if m["idiag_sport"] != sport or (lip != src and not (proto == P.PROTO_UDP and lip.is_unspecified)):
                    continue
                if (m["idiag_dport"], rip) != (dport, dst) and not (
                        proto == P.PROTO_UDP and m["idiag_dport"] == 0):
                    continue
                return SockInfo(inode, m.get("idiag_uid", -1), fam, self.via)
        return None


def normal(a):
    return P.normalise_addr(a)


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


def pid_has_inode(pid: int, target: str, proc: str = "/proc") -> bool:
    fdd = f"{proc}/{pid}/fd"
    try:
        fds = os.listdir(fdd)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fdd}/{fd}") == target:
                return True
        except OSError:
            pass
    return False


def pids_of_uid(uid: int, proc: str = "/proc"):
    try:
        it = os.scandir(proc)
    except OSError:
        return
    with it:
        for e in it:
            name = e.name
            if not name.isdigit():
                continue
            try:
                if e.stat(follow_symlinks=False).st_uid == uid:
                    yield int(name)
            except OSError:
                pass


def all_pids(proc: str = "/proc"):
    try:
        names = os.listdir(proc)
    except OSError:
        return
    for n in names:
        if n.isdigit():
            yield int(n)


@dataclass
class LookupResult:
    status: int                # protocol STATUS_FOUND / STATUS_UNKNOWN
    job_id: int = P.NO_JOB
    job_uid: int = P.NO_UID
    pid: int | None = None
    sock: SockInfo | None = None
    stage: str = ""            # where the pid was found: "job", "uid", "all"
    why: str = ""              # for unknown: "no-socket" or "not-in-job" (no process in a job holds it)
    elapsed_ms: float = 0.0


class Lookup:
    """The whole lookup; thread-safe, meant to run in a worker thread."""

    def __init__(self, jobs, *, sockdiag: str = "netlink", scan_all: bool = True, proc: str = "/proc"):
        self.jobs = jobs
        self.scan_all = scan_all
        self.proc = proc
        self._diag = None
        if sockdiag in ("netlink", "yes", "raw"):
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

    def find_pid(self, inode: int, uid: int):
        """-> (pid, stage, job) where job = (job_id, job_uid); (None, "", None) if no process
        in a Slurm job holds the inode.

        Stage "job": pids listed in the job cgroups.  Stage "uid": every process of the
        socket's owner has its fds scanned; the holder found there answers (its job, or
        "unknown" when it is in none -- the usual ssh client on a login node).  Stage "all"
        (ScanAllProcesses) catches job processes the listing missed (a job that appeared
        after the cached directory scan, an unexpected layout): there a pid's cgroup is
        checked *before* its fds, so processes outside jobs cost one small read."""
        target = f"socket:[{inode}]"
        seen = set()
        for pid in self.jobs.job_pids():
            if pid in seen:
                continue
            seen.add(pid)
            if pid_has_inode(pid, target, self.proc):
                job = self.jobs.job_of_pid(pid)
                if job is not None:
                    return pid, "job", job
        if uid >= 0:
            # The socket owner's own processes: scan their fds whether in a job or not. Finding
            # the holder outside any job is a definitive "unknown" (typically an ssh client on
            # a login node), so the full /proc pass below is not paid for it.
            for pid in pids_of_uid(uid, self.proc):
                if pid in seen:
                    continue
                seen.add(pid)
                if pid_has_inode(pid, target, self.proc):
                    job = self.jobs.job_of_pid(pid)
                    if job is not None:
                        return pid, "uid", job
                    return None, "uid-not-in-job", None
        if self.scan_all:
            for pid in all_pids(self.proc):
                if pid in seen:
                    continue
                seen.add(pid)
                job = self.jobs.job_of_pid(pid)
                if job is not None and pid_has_inode(pid, target, self.proc):
                    return pid, "all", job
        return None, "", None

    def lookup(self, req: P.Request) -> LookupResult:
        t0 = time.perf_counter()
        info = self.find_socket(req.proto, req.src, req.src_port, req.dst, req.dst_port)
        if info is None:
            return LookupResult(P.STATUS_UNKNOWN, why="no-socket",
                                elapsed_ms=(time.perf_counter() - t0) * 1e3)
        pid, stage, job = self.find_pid(info.inode, info.uid)
        el = (time.perf_counter() - t0) * 1e3
        if pid is None:
            return LookupResult(P.STATUS_UNKNOWN, sock=info, why="not-in-job", elapsed_ms=el)
        job_id, job_uid = job
        return LookupResult(P.STATUS_FOUND, job_id, job_uid, pid, info, stage, elapsed_ms=el)
