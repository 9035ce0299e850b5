"""cgroups.stepd (REQUEST_STEP_UID) against the real slurmstepd of the Slurm 22.05 test bed,
its bounds against sockets that are not stepds, and the v2 listing whose owner comes from a
stepd (a pure-protocol fake here: the real stepd is covered by the cluster tests)."""
import os
import socket
import struct
import threading
import time

import pytest

import cgroups
from cgroups import stepd
from cgroups.conf import Conf
from cgroups.errors import (CgroupError, StepdError, StepdProtocolError, StepdTimeout,
                            StepdUnavailable)

pytestmark = pytest.mark.root
EXTERN = 4294967292
NODE = "nodeA"


def extern_socket(c, node, job):
    return str(c.spool(node) / f"{node}_{job}.{EXTERN}")


def v1_layout(c, node):
    return cgroups.discover(None, Conf(), nodename=node, spool_dir=str(c.spool(node)),
                            plugin="cgroup/v1", use_env=False)


# ---------------------------------------------------------------- the real slurmstepd

@pytest.mark.cluster
def test_real_extern_stepd_answers_alice_and_bob(fresh):
    c = fresh
    node = c.node_names[1]
    alice, bob = c.user("alice"), c.user("bob")
    ja = c.sbatch("alice", nodes=[node])
    jb = c.sbatch("bob", nodes=[node])
    sa, sb = extern_socket(c, node, ja), extern_socket(c, node, jb)
    t0 = time.monotonic()
    ra = stepd.query_step_uid(sa)
    took = time.monotonic() - t0
    assert ra.uid == alice.uid
    assert ra.protocol_version == 38 << 8          # Debian's Slurm 22.05 answers its version
    assert ra.peer_uid == 0                        # slurmstepd listens as root
    assert took < stepd.DEFAULT_TIMEOUT
    assert cgroups.step_uid(sb) == bob.uid
    # repeated calls: no leak of connections or threads in the stepd, stable answer
    assert {cgroups.step_uid(sa) for _ in range(20)} == {alice.uid}
    # v1 cross-check with the stepds: both jobs kept, each for its owner
    L = v1_layout(c, node)
    mine = cgroups.user_jobs(L, alice.uid, verify_owner=True)
    assert [j.job_id for j in mine] == [ja] and not mine.problems
    theirs = cgroups.user_jobs(L, bob.uid, verify_owner=True)
    assert [j.job_id for j in theirs] == [jb]
    everyone = cgroups.list_jobs(L, verify_owner=True)
    assert sorted((j.job_id, j.uid) for j in everyone) == sorted([(ja, alice.uid),
                                                                   (jb, bob.uid)])
    # after scancel the socket is gone (or stale): a typed error, at once
    c.scancel("alice", str(ja))
    c.wait_job_gone(ja)
    t0 = time.monotonic()
    with pytest.raises(StepdUnavailable):
        stepd.step_uid(sa)
    assert time.monotonic() - t0 < 0.1


# ---------------------------------------------------------------- bounds (no cluster needed)

def test_listening_socket_that_never_answers_times_out_within_bound(tmp_path):
    path = str(tmp_path / f"n_1.{EXTERN}")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        srv.listen(4)                              # connect() succeeds, nobody ever accepts
        for timeout in (0.2, 0.5):
            t0 = time.monotonic()
            with pytest.raises(StepdTimeout) as ei:
                stepd.step_uid(path, timeout=timeout)
            took = time.monotonic() - t0
            assert timeout - 0.01 <= took < timeout + 0.15, took
            assert isinstance(ei.value, CgroupError) and ei.value.socket == path
            assert isinstance(ei.value, TimeoutError)
    finally:
        srv.close()


def test_stale_socket_file_fails_fast(tmp_path):
    path = str(tmp_path / f"n_2.{EXTERN}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                                      # the file stays, nobody listens
    t0 = time.monotonic()
    with pytest.raises(StepdUnavailable, match="nobody listening"):
        stepd.step_uid(path, timeout=5)
    assert time.monotonic() - t0 < 0.05
    with pytest.raises(StepdUnavailable, match="does not exist"):
        stepd.step_uid(str(tmp_path / "missing"), timeout=5)


class FakeStepd:
    """A tiny unix-socket server that speaks the stepd side of the handshake and
    REQUEST_STEP_UID (native ints, uid_t = 4 bytes) in a thread. ``mode``: "ok", "refuse"
    (answers -1 and closes, as a stepd does for a too-old version), "hang" (accepts, reads,
    never answers), "short" (answers the handshake, closes before the uid)."""

    def __init__(self, path, uid, mode="ok"):
        self.path, self.uid, self.mode = path, uid, mode
        self.requests = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(16)
        self.srv.settimeout(0.05)
        self.stop = threading.Event()
        self.conns = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _recv(self, c, n):
        buf = b""
        while len(buf) < n:
            chunk = c.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def _run(self):
        while not self.stop.is_set():
            try:
                c, _ = self.srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(c)
            c.settimeout(2)
            try:
                hello = self._recv(c, 4)
                if hello is None:
                    continue
                version, = struct.unpack("=i", hello)
                if self.mode == "hang":
                    continue
                if self.mode == "refuse":
                    c.sendall(struct.pack("=i", -1))
                    c.close()
                    continue
                c.sendall(struct.pack("=i", 38 << 8))
                while True:
                    req = self._recv(c, 4)
                    if req is None:
                        break
                    self.requests.append((version, struct.unpack("=i", req)[0]))
                    if self.mode == "short" or self.requests[-1][1] != stepd.REQUEST_STEP_UID:
                        break
                    c.sendall(struct.pack("=I", self.uid))
                c.close()
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.srv.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def fakes():
    made = []

    def make(path, uid, mode="ok"):
        f = FakeStepd(str(path), uid, mode)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


def test_fake_protocol_edges(tmp_path, fakes):
    ok = fakes(tmp_path / "ok", 2001)
    r = stepd.query_step_uid(str(tmp_path / "ok"))
    assert (r.uid, r.protocol_version, r.peer_uid, r.peer_pid) == (2001, 38 << 8, 0, os.getpid())
    assert ok.requests == [(stepd.DEFAULT_PROTOCOL_VERSION, 20)]
    assert stepd.step_uid(str(tmp_path / "ok"), protocol_version=41 << 8) == 2001
    # a listener not running as a trusted uid is not believed
    with pytest.raises(StepdProtocolError, match="not trusted"):
        stepd.step_uid(str(tmp_path / "ok"), trusted_uids=(12345,))
    fakes(tmp_path / "refuse", 2001, "refuse")
    with pytest.raises(StepdProtocolError, match="handshake refused"):
        stepd.step_uid(str(tmp_path / "refuse"))
    fakes(tmp_path / "short", 2001, "short")
    with pytest.raises(StepdProtocolError, match="closed after 4 of 8"):
        stepd.step_uid(str(tmp_path / "short"))
    fakes(tmp_path / "bad", 0xFFFFFFFF)
    with pytest.raises(StepdProtocolError, match=r"uid_t\)-1"):
        stepd.step_uid(str(tmp_path / "bad"))
    fakes(tmp_path / "hang", 2001, "hang")
    t0 = time.monotonic()
    with pytest.raises(StepdTimeout):
        stepd.step_uid(str(tmp_path / "hang"), timeout=0.2)
    assert time.monotonic() - t0 < 0.35
    assert all(issubclass(e, StepdError) for e in (StepdTimeout, StepdUnavailable,
                                                    StepdProtocolError))


# ---------------------------------------------------------------- v2 listing, owner from a stepd

def test_v2_extern_only_job_owner_from_stepd(tree, fakes):
    tree.v2_job(NODE, 5)                           # extern step only: salloc + ssh
    tree.v2_job(NODE, 6)                           # another user's, extern only
    tree.v2_job(NODE, 7)                           # stepd hangs: owner unknown, bounded
    tree.v2_job(NODE, 8, steps=("extern", "0"))    # has a task: owner from its process
    fakes(f"{tree.spool}/{NODE}_5.{EXTERN}", 2001)
    f6 = fakes(f"{tree.spool}/{NODE}_6.{EXTERN}", 2002)
    fakes(f"{tree.spool}/{NODE}_7.{EXTERN}", 2001, "hang")
    f8 = fakes(f"{tree.spool}/{NODE}_8.{EXTERN}", 2001)
    p = tree.spawn(user=2001)
    task = tree.mk("unified", f"system.slice/{NODE}_slurmstepd.scope/job_8/step_0/user/task_0")
    with open(f"{task}/cgroup.procs", "w") as fh:
        fh.write(str(p.pid))
    L = cgroups.discover(None, Conf(), nodename=NODE, spool_dir=tree.spool,
                         cgroup_root=tree.root, plugin="cgroup/v2", use_env=False)
    assert L.version == 2
    t0 = time.monotonic()
    mine = cgroups.user_jobs(L, 2001, stepd_timeout=0.2)
    took = time.monotonic() - t0
    assert sorted(j.job_id for j in mine) == [5, 8]
    assert all(j.uid == 2001 for j in mine)
    assert any("job 7" in m and "deadline" in m for m in mine.problems), mine.problems
    assert took < 0.2 + 0.25, took                 # one hanging stepd costs one timeout
    assert f8.requests == []                       # fallback: the task told the owner
    assert [j.job_id for j in cgroups.user_jobs(L, 2002, stepd_timeout=0.2)] == [6]
    assert f6.requests                             # asked its stepd
    everyone = cgroups.list_jobs(L, stepd_timeout=0.2)
    assert {(j.job_id, j.uid) for j in everyone} == {(5, 2001), (6, 2002), (7, None), (8, 2001)}
    # stepd="never": the old behaviour, extern-only jobs have no owner
    assert [j.job_id for j in cgroups.user_jobs(L, 2001, stepd="never")] == [8]
    # stepd="always": job 8's owner comes from its stepd as well
    n = len(f8.requests)
    assert sorted(j.job_id for j in cgroups.user_jobs(L, 2001, stepd="always",
                                                      stepd_timeout=0.2)) == [5, 8]
    assert len(f8.requests) == n + 1
    # the budget bounds the whole listing even with several hanging stepds
    t0 = time.monotonic()
    cgroups.list_jobs(L, stepd="always", stepd_timeout=0.3, stepd_budget=0.1)
    assert time.monotonic() - t0 < 0.25
    with pytest.raises(ValueError):
        cgroups.list_jobs(L, stepd="sometimes")


def test_v1_verify_owner_drops_a_disagreeing_job(tree, fakes):
    tree.v1_job(NODE, 2001, 5)
    tree.v1_job(NODE, 2001, 6)
    fakes(f"{tree.spool}/{NODE}_5.{EXTERN}", 2001)
    fakes(f"{tree.spool}/{NODE}_6.{EXTERN}", 2002)   # the stepd disagrees with uid_2001
    L = cgroups.discover(None, Conf(), nodename=NODE, spool_dir=tree.spool,
                         cgroup_root=tree.root, plugin="cgroup/v1", use_env=False)
    assert sorted(j.job_id for j in cgroups.user_jobs(L, 2001)) == [5, 6]
    checked = cgroups.user_jobs(L, 2001, verify_owner=True)
    assert [j.job_id for j in checked] == [5]
    assert any("job 6" in m and "says 2002" in m for m in checked.problems)
