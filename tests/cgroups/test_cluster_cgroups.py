"""cgroups against the real Slurm 22.05 test bed (testbed/, fixture `cluster`)."""
import subprocess
import time

import pytest

import cgroups
from cgroups.conf import Conf

pytestmark = [pytest.mark.cluster, pytest.mark.root]


def node_layout(cluster, node):
    return cgroups.discover(None, Conf(), nodename=node, spool_dir=str(cluster.spool(node)),
                            plugin="cgroup/v1", use_env=False)


def procs(L, uid, job, step):
    try:
        with open(f"{L.v1_step_dir('freezer', uid, job, step)}/cgroup.procs") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:  # the step's cgroup is made a moment after the job starts
        return []


def test_list_pid_to_job_and_adopt_then_scancel(fresh):
    c = fresh
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
    # adopt a foreign process, then scancel must kill it
    p = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        cgroups.adopt(L, p.pid, mine[0])
        assert cgroups.job_of_pid(p.pid).job_id == job
        assert c.cgroup_of(node, p.pid)["freezer"] == L.v1_rel_step(alice.uid, job)
        c.scancel("alice", str(job))
        p.wait(timeout=60)
        c.wait_job_gone(job)
        assert cgroups.user_jobs(L, alice.uid) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
