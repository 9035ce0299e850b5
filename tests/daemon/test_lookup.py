"""Lookup on loopback in the test's own namespace: every socket backend agrees, IPv4-mapped
and UDP cases, inode -> pid stages, vanishing pids, job parsing."""
import os
import socket

import pytest

from daemon import protocol as P
from cgroups.jobs import real_uid
from daemon.jobs import CgroupJobs
from daemon.lookup import Lookup, Pyroute2Diag, SockDiag, procnet_find, pid_has_inode

BACKENDS = ["sockdiag", "pyroute2", "procnet"]


def _find(backend, proto, src, sport, dst, dport):
    s, d = P.normalise_addr(src), P.normalise_addr(dst)
    if backend == "procnet":
        return procnet_find(proto, s, sport, d, dport)
    diag = SockDiag() if backend == "sockdiag" else Pyroute2Diag()
    try:
        return diag.find(proto, s, sport, d, dport)
    finally:
        diag.close()


@pytest.fixture
def tcp_pair():
    made = []

    def make(family, host, client_host=None, v6only=True):
        lst = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        lst.bind((host, 0))
        lst.listen(4)
        cfam = socket.AF_INET6 if ":" in (client_host or host) else socket.AF_INET
        cli = socket.socket(cfam, socket.SOCK_STREAM)
        if cfam == socket.AF_INET6:
            cli.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        cli.connect((client_host or host, lst.getsockname()[1]))
        srv, _ = lst.accept()
        made.extend([lst, cli, srv])
        return cli, srv
    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tcp_v4_v6_and_mapped(backend, tcp_pair):
    cli, srv = tcp_pair(socket.AF_INET, "127.0.0.1")
    (ca, cp), (sa, sp) = cli.getsockname(), cli.getpeername()
    info = _find(backend, 6, ca, cp, sa, sp)
    assert info and info.inode == os.fstat(cli.fileno()).st_ino and info.uid == os.getuid()
    # the other direction is the server's accepted socket
    info = _find(backend, 6, sa, sp, ca, cp)
    assert info and info.inode == os.fstat(srv.fileno()).st_ino
    # asked in IPv4-mapped form
    info = _find(backend, 6, "::ffff:" + ca, cp, "::ffff:" + sa, sp)
    assert info and info.inode == os.fstat(cli.fileno()).st_ino

    cli6, _ = tcp_pair(socket.AF_INET6, "::1")
    a, p = cli6.getsockname()[:2], cli6.getpeername()[:2]
    info = _find(backend, 6, a[0], a[1], p[0], p[1])
    assert info and info.inode == os.fstat(cli6.fileno()).st_ino and info.family == 6

    # dual-stack AF_INET6 client talking IPv4: lives in tcp6 as ::ffff:127.0.0.1
    climap, _ = tcp_pair(socket.AF_INET, "127.0.0.1", client_host="::ffff:127.0.0.1")
    a, p = climap.getsockname()[:2], climap.getpeername()[:2]
    assert a[0].startswith("::ffff:")
    info = _find(backend, 6, "127.0.0.1", a[1], "127.0.0.1", p[1])
    assert info and info.inode == os.fstat(climap.fileno()).st_ino


@pytest.mark.parametrize("backend", BACKENDS)
def test_listener_and_absent_tuple_not_matched(backend, tcp_pair):
    cli, srv = tcp_pair(socket.AF_INET, "127.0.0.1")
    sa, sp = cli.getpeername()
    # a tuple that would hit the listener in a kernel lookup must not return the listener
    assert _find(backend, 6, sa, sp, "127.0.0.1", 1) is None
    assert _find(backend, 6, "127.0.0.1", 1, "127.0.0.1", 2) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_udp_connected_and_unconnected(backend):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    dst = rx.getsockname()
    con = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    con.connect(dst)
    unc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unc.bind(("0.0.0.0", 0))
    unc.sendto(b"x", dst)
    try:
        a = con.getsockname()
        info = _find(backend, 17, a[0], a[1], dst[0], dst[1])
        assert info and info.inode == os.fstat(con.fileno()).st_ino
        info = _find(backend, 17, "127.0.0.1", unc.getsockname()[1], dst[0], dst[1])
        assert info and info.inode == os.fstat(unc.fileno()).st_ino
    finally:
        for s in (rx, con, unc):
            s.close()


class FakeJobs:
    def __init__(self, pids, mapping):
        self.pids, self.mapping = pids, mapping

    def job_pids(self):
        return iter(self.pids)

    def job_of_pid(self, pid):
        return self.mapping.get(pid)


def test_lookup_stages_and_vanished_pids(tcp_pair):
    cli, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    (ca, cp), (sa, sp) = cli.getsockname(), cli.getpeername()
    req = P.Request.make(ca, cp, sa, sp)
    gone = 2 ** 22 + 12345  # above pid_max on this machine: never exists
    lk = Lookup(FakeJobs([gone, os.getpid()], {os.getpid(): (77, 1000)}))
    r = lk.lookup(req)
    assert (r.status, r.job_id, r.job_uid, r.pid, r.stage) == (P.STATUS_FOUND, 77, 1000, os.getpid(), "job")
    lk = Lookup(FakeJobs([gone], {os.getpid(): (77, 1000)}))
    r = lk.lookup(req)
    assert r.status == P.STATUS_FOUND and r.stage == "uid"
    lk = Lookup(FakeJobs([], {}))
    r = lk.lookup(req)
    assert r.status == P.STATUS_UNKNOWN and r.why == "not-in-job" and r.pid is None
    r = lk.lookup(P.Request.make(ca, 1, sa, sp))
    assert r.status == P.STATUS_UNKNOWN and r.why == "no-socket"
    assert not pid_has_inode(gone, "socket:[1]")


def test_lookup_without_scan_all_uses_uid_only(tcp_pair):
    cli, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    (ca, cp), (sa, sp) = cli.getsockname(), cli.getpeername()
    lk = Lookup(FakeJobs([], {os.getpid(): (5, 0)}), scan_all=False, sockdiag="no")
    assert lk.sock_backend == "procnet"
    r = lk.lookup(P.Request.make(ca, cp, sa, sp))
    assert r.pid == os.getpid() and r.sock.via == "procnet" and r.stage == "uid"


def test_scan_all_stage_for_other_owner(tcp_pair):
    cli, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    (ca, cp), (sa, sp) = cli.getsockname(), cli.getpeername()
    jobs = FakeJobs([], {os.getpid(): (5, 0)})
    lk = Lookup(jobs, scan_all=True)
    # pretend the socket belongs to another uid: only the "all" stage can find it
    r = lk.find_pid(os.fstat(cli.fileno()).st_ino, 54321)
    assert r == (os.getpid(), "all", (5, 0))
    assert Lookup(jobs, scan_all=False).find_pid(os.fstat(cli.fileno()).st_ino, 54321)[0] is None


def test_cgroup_jobs_pid_to_job_for_ordinary_process():
    j = CgroupJobs(["/nonexistent"])
    assert j.job_of_pid(os.getpid()) is None
    assert j.job_of_pid(2 ** 22 + 12345) is None
    assert list(j.job_pids()) == []
    assert real_uid(os.getpid()) == os.getuid()
