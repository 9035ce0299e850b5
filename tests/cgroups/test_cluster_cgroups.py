"""cgroups against the real Slurm 22.05 test bed (testbed/, fixture `cluster`): listing,
pid -> job, adoption through the job's real extern slurmstepd (REQUEST_ADD_EXTERN_PID) and
the fallback when that stepd cannot be used; its X11 and namespace answers; its refusals."""
import os
import subprocess
import sys
import time

import pytest

import cgroups
from cgroups import stepd
from cgroups.conf import Conf
from cgroups.errors import StepdRefused

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.cluster, pytest.mark.root]


def node_layout(cluster, node):
    return cgroups.discover(Conf(), Conf(), nodename=node, spool_dir=str(cluster.spool(node)),
                            plugin="cgroup/v1", use_env=False)


def procs(L, uid, job, step):
    try:
        with open(f"{L.v1_step_dir('freezer', uid, job, step)}/cgroup.procs") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:  # the step's cgroup is made a moment after the job starts
        return []


def test_list_pid_to_job_and_adopt_then_scancel(p1):
    c = p1
    node = c.node_names[1]
    alice, bob = c.user("alice"), c.user("bob")
    job = c.sbatch("alice", nodes=[node])
    L = node_layout(c, node)
    assert L.v1_prefix == f"/slurm_{node}"
    mine = cgroups.user_jobs(L, alice.uid)
    assert [j.job_id for j in mine] == [job] and mine[0].uid == alice.uid
    assert cgroups.user_jobs(L, bob.uid) == []
    # pid -> job for the batch task and the extern step's placeholder
    deadline = time.monotonic() + 20
    while not procs(L, alice.uid, job, "batch") and time.monotonic() < deadline:
        time.sleep(0.1)
    task = procs(L, alice.uid, job, "batch")[0]
    ref = cgroups.job_of_pid(task)
    assert (ref.job_id, ref.step, ref.uid, ref.node) == (job, "batch", alice.uid, node)
    ext = procs(L, alice.uid, job, "extern")[0]
    assert cgroups.job_of_pid(ext).step == "extern"
    assert task in set(cgroups.iter_job_pids(L))
    # adopt a foreign process through the job's extern stepd, then scancel must kill it
    p = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        a = cgroups.adopt(L, p.pid, mine[0])
        assert (a.how, a.reason, a.stepd_version) == ("stepd", None, 38 << 8), a
        assert cgroups.job_of_pid(p.pid).job_id == job
        got = c.cgroup_of(node, p.pid)
        rel = L.v1_rel_step(alice.uid, job)
        # Slurm put it in every controller where it made the step (freezer: proctrack,
        # cpuset/devices: task/cgroup); never memory (not configured here)
        assert got["freezer"] == got["cpuset"] == got["devices"] == rel
        assert len(a.dirs) == 3 and not got["memory"].startswith(L.v1_prefix)
        assert f"_handle_add_extern_pid_internal: for StepId={job}.extern, pid {p.pid}" in \
            c._tail(f"slurmd-{node}.log", 200000)
        c.scancel("alice", str(job))
        p.wait(timeout=60)
        c.wait_job_gone(job)
        assert cgroups.user_jobs(L, alice.uid) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _sleep():
    return subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)


def test_stepd_unusable_gives_the_fallback_with_its_reason(p1, monkeypatch):
    c = p1
    node = c.node_names[0]
    alice = c.user("alice")
    job = c.sbatch("alice", nodes=[node])
    L = node_layout(c, node)
    sock = L.extern_socket(job)
    away = sock + ".cia-away"
    procs_ = []
    try:
        # 1. the socket is gone (renamed away for a moment, restored below)
        os.rename(sock, away)
        try:
            p = _sleep()
            procs_.append(p)
            a = cgroups.adopt(L, p.pid, cgroups.Job(job, alice.uid, 0, node))
        finally:
            os.rename(away, sock)
        assert a.how == "cgroup" and "does not exist" in a.reason, a
        assert c.cgroup_of(node, p.pid)["freezer"] == L.v1_rel_step(alice.uid, job)
        # 2. a protocol version the stepd refuses (below 22.05's minimum 20.11 = 9216)
        monkeypatch.setattr(stepd, "CLIENT_PROTOCOL_VERSION", 35 << 8)
        q = _sleep()
        procs_.append(q)
        a = cgroups.adopt(L, q.pid, cgroups.Job(job, alice.uid, 0, node))
        assert a.how == "cgroup" and "refused protocol version 8960" in a.reason, a
        assert "Invalid Protocol Version 8960" in c._tail(f"slurmd-{node}.log", 200000)
        monkeypatch.undo()
        # the restored socket works again, and scancel kills both fallback-adopted sleeps
        assert stepd.step_uid(sock) == alice.uid
        c.scancel("alice", str(job))
        for x in procs_:
            x.wait(timeout=60)
    finally:
        if os.path.exists(away) and not os.path.exists(sock):
            os.rename(away, sock)
        for x in procs_:
            if x.poll() is None:
                x.kill()
                x.wait()


def test_real_stepd_x11_namespace_and_refusals(p1):
    c = p1
    node = c.node_names[1]
    job = c.sbatch("alice", nodes=[node])
    L = node_layout(c, node)
    sock = L.extern_socket(job)
    with stepd.connect(sock) as s:
        assert s.version == 38 << 8 and s.protocol.release == "22.05"
        assert s.x11_display() is None                    # display 0, xauthority length 0
        assert s.namespace_fd() is None                   # no job container plugin: 0
        assert s.step_uid() == c.user("alice").uid        # still in step on one connection
    assert cgroups.x11_display(L, cgroups.Job(job, None, 0, node)) is None
    # the handshake refusal, reported as such
    with pytest.raises(StepdRefused, match="refused protocol version 9215"):
        stepd.connect(sock, protocol_version=9215)
    # REQUEST_ADD_EXTERN_PID from a non-root caller: the stepd answers rc -1 (root/SlurmUser only)
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from cgroups import stepd\n"
            "from cgroups.errors import StepdRequestFailed\n"
            "with stepd.connect(sys.argv[2]) as s:\n"
            "    try:\n        s.add_extern_pid(os.getpid())\n    except StepdRequestFailed as e:\n"
            "        print('rc', e.rc)\n")
    r = subprocess.run([sys.executable, "-c", code, REPO, sock], user=c.user("alice").uid,
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.stdout.strip() == "rc -1", r.stderr
    assert f"uid {c.user('alice').uid} attempt to add pid" in c._tail(f"slurmd-{node}.log", 200000)
