"""Lookup on loopback in the test's own namespace: every socket backend agrees, IPv4-mapped
and UDP cases, inode -> pid stages, vanishing pids, job parsing."""
import gc
import ipaddress
import os
import socket
import struct
import threading
import time

import pytest

from daemon import protocol as P
from cgroups.jobs import real_uid
from daemon.jobs import CgroupJobs
from daemon.lookup import (HolderScan, JobSockets, Lookup, Pyroute2Diag, SockDiag, procnet_find,
                           socket_fds)

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
    """job_pids() lists `pids` (counting the passes); job_of_pid from `mapping`; no job
    cgroups (every socket is looked up through the process holding it), unless `cgroups`."""

    def __init__(self, pids, mapping, cgroups=None):
        self.pids, self.mapping, self.cgroups = pids, mapping, cgroups or {}
        self.listed = self.cgroup_passes = 0

    def job_pids(self):
        self.listed += 1
        return iter(list(self.pids))

    def job_of_pid(self, pid):
        return self.mapping.get(pid)

    def job_cgroup_ids(self):
        self.cgroup_passes += 1
        return dict(self.cgroups)


GONE = 2 ** 22 + 12345  # above pid_max on this machine: never exists


def test_lookup_found_unknown_and_vanished_pids(tcp_pair):
    cli, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    (ca, cp), (sa, sp) = cli.getsockname(), cli.getpeername()
    req = P.Request.make(ca, cp, sa, sp)
    lk = Lookup(FakeJobs([GONE, os.getpid()], {os.getpid(): (77, 1000)}))
    r = lk.lookup(req)
    assert (r.status, r.job_id, r.job_uid, r.pid) == (P.STATUS_FOUND, 77, 1000, os.getpid())
    # held by a process that is in no job: unknown, without looking at any other process
    jobs = FakeJobs([GONE], {os.getpid(): (77, 1000)})
    lk = Lookup(jobs)
    r = lk.lookup(req)
    assert r.status == P.STATUS_UNKNOWN and r.why == "not-in-job" and r.pid is None
    assert jobs.listed == 1
    r = lk.lookup(P.Request.make(ca, 1, sa, sp))
    assert r.status == P.STATUS_UNKNOWN and r.why == "no-socket"
    assert list(socket_fds(GONE)) == []


def test_procnet_backend(tcp_pair):
    cli, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    (ca, cp), (sa, sp) = cli.getsockname(), cli.getpeername()
    lk = Lookup(FakeJobs([os.getpid()], {os.getpid(): (5, 0)}), sockdiag="no")
    assert lk.sock_backend == "procnet"
    r = lk.lookup(P.Request.make(ca, cp, sa, sp))
    assert r.pid == os.getpid() and r.sock.via == "procnet" and r.job_id == 5


def test_index_pass_only_on_miss_and_fresh_pass_is_authoritative(tcp_pair):
    """One pass over the job processes serves every question that arrived before it began;
    a miss is trusted only from a pass that began after the question arrived."""
    a, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    ia = os.fstat(a.fileno()).st_ino
    jobs = FakeJobs([os.getpid()], {os.getpid(): (5, 0)})
    idx = JobSockets(jobs)
    t = time.monotonic()
    assert idx.holder(ia, t) == (os.getpid(), (5, 0)) and idx.passes == 1
    assert idx.holder(ia, time.monotonic()) == (os.getpid(), (5, 0)) and idx.passes == 1  # hit
    b, _ = tcp_pair(socket.AF_INET, "127.0.0.1")      # a socket newer than the index
    ib = os.fstat(b.fileno()).st_ino
    assert idx.holder(ib, time.monotonic()) == (os.getpid(), (5, 0)) and idx.passes == 2
    # asked about before the last pass began: the miss is authoritative, no new pass
    assert idx.holder(123456789, t) is None and idx.passes == 2
    # asked about now: a new pass
    assert idx.holder(123456789, time.monotonic()) is None and idx.passes == 3
    # a job that started a moment ago (the lister now reports a new pid) is seen
    jobs.pids = []
    b.close()


def test_index_coalesces_concurrent_misses(tcp_pair):
    """Many questions arriving together while a pass runs share the next pass."""
    socks = [tcp_pair(socket.AF_INET, "127.0.0.1")[0] for _ in range(20)]
    inodes = [os.fstat(s.fileno()).st_ino for s in socks]

    class SlowJobs(FakeJobs):
        def job_pids(self):
            time.sleep(0.05)
            return super().job_pids()
    jobs = SlowJobs([os.getpid()], {os.getpid(): (9, 0)})
    idx = JobSockets(jobs)
    arrived = time.monotonic()
    out = []
    ts = [threading.Thread(target=lambda i=i: out.append(idx.holder(i, arrived))) for i in inodes]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    assert out == [(os.getpid(), (9, 0))] * 20 and jobs.listed == 1


def test_index_questions_arriving_during_a_pass_use_its_index(tcp_pair):
    """A fan-out: questions keep arriving while the first pass runs; the sockets existed
    before it began, so its index answers them all (no second pass)."""
    socks = [tcp_pair(socket.AF_INET, "127.0.0.1")[0] for _ in range(10)]
    inodes = [os.fstat(s.fileno()).st_ino for s in socks]
    started = threading.Event()

    class SlowJobs(FakeJobs):
        def job_pids(self):
            started.set()
            time.sleep(0.1)
            return super().job_pids()
    jobs = SlowJobs([os.getpid()], {os.getpid(): (9, 0)})
    idx = JobSockets(jobs)
    out = []
    first = threading.Thread(target=lambda: out.append(idx.holder(inodes[0], time.monotonic())))
    first.start()
    started.wait(5)
    late = [threading.Thread(target=lambda i=i: out.append(idx.holder(i, time.monotonic())))
            for i in inodes[1:]]
    for th in late:
        th.start()
    for th in [first, *late]:
        th.join()
    assert out == [(os.getpid(), (9, 0))] * 10 and jobs.listed == 1 and idx.passes == 1


def test_index_keeps_a_pids_job_for_job_ttl(tcp_pair):
    """Many connections of one process asked about together: its job is read once per
    JOB_TTL, and afresh after it (and after every new pass)."""
    socks = [tcp_pair(socket.AF_INET, "127.0.0.1")[0] for _ in range(3)]
    inodes = [os.fstat(s.fileno()).st_ino for s in socks]
    clock = [1000.0]

    class CountingJobs(FakeJobs):
        asked = 0

        def job_of_pid(self, pid):
            self.asked += 1
            return super().job_of_pid(pid)
    jobs = CountingJobs([os.getpid()], {os.getpid(): (9, 0)})
    idx = JobSockets(jobs, clock=lambda: clock[0])
    for i in inodes:
        assert idx.holder(i, clock[0] - 1) == (os.getpid(), (9, 0))
    assert jobs.asked == 1
    clock[0] += JobSockets.JOB_TTL
    jobs.mapping = {os.getpid(): (10, 0)}
    assert idx.holder(inodes[0], clock[0] - 1) == (os.getpid(), (10, 0)) and jobs.asked == 2
    jobs.mapping = {}                     # left every job: not answered from the cache
    clock[0] += JobSockets.JOB_TTL
    assert idx.holder(inodes[1], clock[0] - 1) is None


def test_sockdiag_socket_per_thread_dies_with_its_thread(tcp_pair):
    """Each thread asks on its own netlink socket; a thread that ends takes its socket with it
    (a pool that replaces threads leaks nothing); close() closes the ones still in use."""
    cli, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    (ca, cp), (sa, sp) = cli.getsockname(), cli.getpeername()
    diag = SockDiag()
    before = len(os.listdir("/proc/self/fd"))
    found = []
    for _ in range(20):
        t = threading.Thread(target=lambda: found.append(
            diag.find(P.PROTO_TCP, ipaddress.ip_address(ca), cp, ipaddress.ip_address(sa), sp)))
        t.start()
        t.join()
    gc.collect()
    assert [f.inode for f in found] == [os.fstat(cli.fileno()).st_ino] * 20
    assert len(os.listdir("/proc/self/fd")) <= before
    diag.close()
    assert len(os.listdir("/proc/self/fd")) < before      # the first thread's (this one's)


def test_holder_scan_bounded_and_rate_limited(tcp_pair):
    cli, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    ino = os.fstat(cli.fileno()).st_ino
    clock = [100.0]
    hs = HolderScan(every=1.0, clock=lambda: clock[0])
    pid, uid, comm = hs.find(ino)
    assert pid == os.getpid() and uid == os.getuid() and comm
    assert hs.find(ino) == "busy"
    clock[0] += 1.5
    hs.budget = -1.0                    # no time at all: gives up instead of scanning
    assert hs.find(ino) == "timeout"


def test_cgroup_jobs_pid_to_job_for_ordinary_process():
    j = CgroupJobs(["/nonexistent"])
    assert j.job_of_pid(os.getpid()) is None
    assert j.job_of_pid(2 ** 22 + 12345) is None
    assert list(j.job_pids()) == []
    assert real_uid(os.getpid()) == os.getuid()


@pytest.mark.root
def test_job_with_a_thousand_processes_is_listed_whole(jobcg):
    """cgroupfs hands out cgroup.procs one page (~680 pids) per read: every pid of a job with
    1,000 processes must still be listed, and a socket held by the last one found."""
    cg = jobcg.make(6161)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    kids = []
    try:
        for i in range(1000):
            c = None
            if i == 999:
                c = socket.create_connection(lst.getsockname())
                os.set_inheritable(c.fileno(), True)
            pid = os.fork()
            if pid == 0:
                os.execv("/bin/sleep", ["sleep", "1000"])
            kids.append(pid)
            jobcg.add(cg, pid)
            if c is not None:
                ends = c.getsockname(), c.getpeername()
                c.close()
        jobs = CgroupJobs([str(jobcg.root)])
        assert set(kids) <= set(jobs.job_pids())
        (ca, cp), (sa, sp) = ends
        r = Lookup(jobs).lookup(P.Request.make(ca, cp, sa, sp))
        assert r.status == P.STATUS_FOUND and r.job_id == 6161 and r.pid == kids[-1]
        assert r.by == "holder"           # made outside the job, handed to its process
    finally:
        for pid in kids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        lst.close()


def _connect_from(cg, jobcg, listener) -> tuple[int, tuple, tuple]:
    """A child process moved into cgroup `cg` *before* it makes a connection to `listener`
    (as an ssh started in a job step does) and holds it: (pid, its end, the listener's end)."""
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.read(go_r, 1)
            c = socket.create_connection(listener.getsockname())
            c.send(b"x")
            time.sleep(1000)
        finally:
            os._exit(0)
    os.close(go_r)
    jobcg.add(cg, pid)
    os.write(go_w, b"g")
    os.close(go_w)
    srv, peer = listener.accept()
    srv.recv(1)
    srv.close()
    return pid, peer, listener.getsockname()


@pytest.mark.root
def test_socket_made_in_a_job_is_found_by_its_cgroup_without_a_process_pass(jobcg):
    """The kernel reports the cgroup a socket was made in: a connection made inside a job is
    that job's without listing a single job process; a job started after the cgroup index
    was built is seen (one new pass over the job directories, not the processes)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    kids = []
    try:
        jobs = CgroupJobs([str(jobcg.root)])
        lk = Lookup(jobs)
        first = jobcg.make(7171, "step_0")
        pid, (ca, cp), (sa, sp) = _connect_from(first, jobcg, lst)
        kids.append(pid)
        r = lk.lookup(P.Request.make(ca, cp, sa, sp))
        assert (r.status, r.job_id, r.job_uid, r.by, r.pid) == (P.STATUS_FOUND, 7171, 0, "cgroup", None)
        assert r.sock.cgroup_id == os.stat(first).st_ino
        assert (lk.cgroups.passes, lk.index.passes) == (1, 0)
        later = jobcg.make(7272, "step_0")
        pid, (ca, cp), (sa, sp) = _connect_from(later, jobcg, lst)
        kids.append(pid)
        r = lk.lookup(P.Request.make(ca, cp, sa, sp))
        assert (r.status, r.job_id, r.by) == (P.STATUS_FOUND, 7272, "cgroup")
        assert (lk.cgroups.passes, lk.index.passes) == (2, 0)
    finally:
        for pid in kids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        lst.close()


def test_socket_made_outside_a_job_is_looked_up_by_holder_and_its_cgroup_remembered(tcp_pair):
    """A socket made in no job's cgroup (here: by this test) falls back to the process that
    holds it; that cgroup is remembered as no job's, so the next such question makes no
    new pass over the job directories (a job's directories are always made new)."""
    a, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    b, _ = tcp_pair(socket.AF_INET, "127.0.0.1")
    jobs = FakeJobs([os.getpid()], {os.getpid(): (5, 0)}, cgroups={2 ** 40: 99})
    lk = Lookup(jobs)
    for s in (a, b):
        r = lk.lookup(P.Request.make(*s.getsockname(), *s.getpeername()))
        assert (r.status, r.job_id, r.by, r.pid) == (P.STATUS_FOUND, 5, "holder", os.getpid())
        assert r.sock.cgroup_id != 0
    assert jobs.cgroup_passes == 1


def test_job_cgroup_ids_only_from_cgroup2(jobcg, tmp_path):
    """Only directories on a cgroup2 file system give cgroup ids: a Slurm job tree elsewhere
    (a cgroup v1 hierarchy, here a plain directory) has inode numbers of another space."""
    leaf = jobcg.make(8181, "step_0")
    (tmp_path / "system.slice" / "cidt_slurmstepd.scope" / "job_8282" / "step_0").mkdir(parents=True)
    ids = CgroupJobs([str(tmp_path), str(jobcg.root)]).job_cgroup_ids()
    assert ids[os.stat(leaf).st_ino] == 8181
    assert 8282 not in ids.values()


def test_cgroup_id_attribute_parse():
    from daemon.lookup import INET_DIAG_CGROUP_ID, _cgroup_id
    attr = lambda t, v: struct.pack("=HH", 4 + len(v), t) + v + bytes(-len(v) % 4)  # noqa: E731
    data = attr(8, b"\0") + attr(INET_DIAG_CGROUP_ID, struct.pack("=Q", 4242))
    assert _cgroup_id(data, 0, len(data)) == 4242
    assert _cgroup_id(attr(8, b"\0"), 0, 8) == 0                   # absent (older kernel)
    assert _cgroup_id(struct.pack("=HH", 200, 21) + bytes(8), 0, 12) == 0   # overruns: ignored
    assert _cgroup_id(struct.pack("=HH", 0, 21), 0, 4) == 0        # zero length: no loop
