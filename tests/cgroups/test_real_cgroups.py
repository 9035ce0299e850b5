"""Real-kernel tests: synthetic Slurm trees under unique test roots in cgroup v1
(freezer/cpuset/devices/pids) and v2 (/sys/fs/cgroup/unified), real unix sockets as stepd
sockets, real child processes moved and checked through /proc/PID/cgroup."""
import os
import subprocess
import sys
import threading
import time

import pytest

import cgroups
from cgroups import adoption
from cgroups.conf import Conf
from cgroups.errors import (CgroupError, JobGone, LayoutNotFound, PermissionDenied, PidGone)

pytestmark = pytest.mark.root
NODE = "nodeA"


def layout(tree, version, **kw):
    return cgroups.discover(Conf(), Conf(), nodename=NODE, spool_dir=tree.spool,
                            cgroup_root=tree.root, plugin=f"cgroup/v{version}", use_env=False,
                            **kw)


def proc_cgroup(pid):
    with open(f"/proc/{pid}/cgroup") as f:
        return {c: p for _, c, p in (l.rstrip("\n").split(":", 2) for l in f)}


# ---------------------------------------------------------------- v1

def test_v1_discover_list_newest(tree):
    tree.v1_job(NODE, 1000, 5)
    tree.v1_job(NODE, 1000, 6, steps=("extern", "batch"))
    tree.v1_job(NODE, 2000, 7)
    tree.v1_job("nodeB", 1000, 8)                  # another slurmd on the same kernel
    for j in (5, 7, 6):
        tree.sock(NODE, j)
        time.sleep(0.01)
    tree.sock(NODE, 6, 4294967291)                 # batch step socket: not an extern step
    tree.sock("nodeB", 8)
    tree.sock(NODE, 99)                            # stale socket: no cgroup
    open(f"{tree.spool}/{NODE}_55.4294967292", "w").close()   # a plain file, not a socket
    L = layout(tree, 1)
    assert L.version == 1 and L.v1_prefix == f"{tree.root}/slurm_{NODE}"
    assert "memory" in L.v1_mounts and L.track == "freezer"     # listed, never the tracker
    assert not any(c.startswith("name=") for c in L.v1_mounts)
    mine = cgroups.user_jobs(L, 1000)
    assert [j.job_id for j in mine] == [6, 5]      # newest first
    assert all(j.uid == 1000 and j.node == NODE for j in mine)
    assert cgroups.newest(mine).job_id == 6
    assert mine[0].extern_cgroups["freezer"] == \
        f"/sys/fs/cgroup/freezer{tree.root}/slurm_{NODE}/uid_1000/job_6/step_extern"
    assert mine[0].socket.endswith(f"/{NODE}_6.4294967292")
    everyone = cgroups.list_jobs(L)
    assert sorted((j.job_id, j.uid) for j in everyone) == [(5, 1000), (6, 1000), (7, 2000)]
    assert any("job 99" in p for p in everyone.problems)
    assert cgroups.user_jobs(L, 3000) == []
    # the prefix is probed: with slurm_<node> absent, /slurm is used
    tree.v1_job("x", 1, 1)
    os.rename(f"/sys/fs/cgroup/freezer{tree.root}/slurm_x", f"/sys/fs/cgroup/freezer{tree.root}/slurm")
    L2 = cgroups.discover(Conf(), Conf(), nodename="nodeC", spool_dir=tree.spool,
                          cgroup_root=tree.root, plugin="cgroup/v1", use_env=False)
    assert L2.v1_prefix == f"{tree.root}/slurm"
    assert layout(tree, 1, multiple_slurmd=True).v1_prefix == f"{tree.root}/slurm_{NODE}"
    assert layout(tree, 1, prefix="/slurm_%n").v1_prefix == f"{tree.root}/slurm_{NODE}"


def test_v1_adopt_job_of_pid_idempotent(tree):
    tree.v1_job(NODE, 1000, 5, steps=("extern", "0"))
    tree.sock(NODE, 5)
    L = layout(tree, 1)
    job, = cgroups.user_jobs(L, 1000)
    p = tree.spawn()
    before = proc_cgroup(p.pid)
    assert cgroups.job_of_pid(p.pid) is None
    a = cgroups.adopt(L, p.pid, job)
    # the socket file exists but nobody listens: the stepd way fails, the cgroup writes follow
    assert (a.how, a.job_id, a.pid, a.stepd_version) == ("cgroup", 5, p.pid, None)
    assert "nobody listening" in a.reason
    dirs = a.dirs
    assert len(dirs) == 4                           # the 4 controllers where step_extern exists
    after = proc_cgroup(p.pid)
    rel = f"{tree.root}/slurm_{NODE}/uid_1000/job_5/step_extern"
    for c in ("freezer", "cpuset", "devices", "pids"):
        assert after[c] == rel
    assert after["memory"] == before["memory"]      # memory hierarchy untouched
    assert proc_cgroup(os.getpid())["freezer"] == before["freezer"]   # pytest not moved
    ref = cgroups.job_of_pid(p.pid)
    assert (ref.job_id, ref.step, ref.uid, ref.node, ref.version) == (5, "extern", 1000, NODE, 1)
    assert cgroups.job_of_pid(p.pid, node="nodeZ") is None
    assert cgroups.adopt(L, p.pid, job).dirs == dirs     # idempotent
    assert proc_cgroup(p.pid)["freezer"] == rel
    # a task in a numbered step, and the stepd level
    q = tree.spawn()
    tree.move("freezer", f"slurm_{NODE}/uid_1000/job_5/step_0", q.pid)
    r = tree.spawn()
    tree.move("freezer", f"slurm_{NODE}/uid_1000/job_5", r.pid)
    assert cgroups.job_of_pid(q.pid).step == "0"
    assert cgroups.job_of_pid(r.pid).step is None and cgroups.job_of_pid(r.pid).job_id == 5
    assert set(cgroups.iter_job_pids(L)) == {p.pid, q.pid, r.pid}


def test_v1_adopt_user_fallback(tree):
    tree.v1_job(NODE, 1000, 5)
    L = layout(tree, 1)
    p = tree.spawn()
    cgroups.adopt_user(L, p.pid, 1000)
    assert proc_cgroup(p.pid)["freezer"] == f"{tree.root}/slurm_{NODE}/uid_1000"
    assert cgroups.job_of_pid(p.pid) is None
    with pytest.raises(JobGone, match="uid_4242"):
        cgroups.adopt_user(L, p.pid, 4242)


# ---------------------------------------------------------------- v2

def test_v2_list_owner_adopt(tree):
    tree.v2_job(NODE, 7, steps=("extern", "batch"))
    tree.v2_job(NODE, 8)                            # extern only: owner unknown
    tree.mk("unified", f"system.slice/{NODE}_slurmstepd.scope/system")
    tree.mk("unified", f"system.slice/{NODE}_slurmstepd.scope/job_7/step_batch/user/task_0")
    for j in (7, 8):
        tree.sock(NODE, j)
    L = layout(tree, 2)
    assert L.v2_mount == "/sys/fs/cgroup/unified"
    assert L.v2_scope == f"{tree.root}/system.slice/{NODE}_slurmstepd.scope"
    task = tree.spawn(user=65534)                   # the job's batch task runs as its owner
    tree.move("unified", f"system.slice/{NODE}_slurmstepd.scope/job_7/step_batch/user/task_0",
              task.pid)
    stepd = tree.spawn()
    tree.move("unified", f"system.slice/{NODE}_slurmstepd.scope/job_7/step_extern/slurm", stepd.pid)
    waiting = tree.spawn()
    tree.move("unified", f"system.slice/{NODE}_slurmstepd.scope/system", waiting.pid)
    jobs = cgroups.list_jobs(L)
    assert {(j.job_id, j.uid) for j in jobs} == {(7, 65534), (8, None)}
    mine = cgroups.user_jobs(L, 65534)
    assert [j.job_id for j in mine] == [7]
    assert cgroups.user_jobs(L, 8) == []            # unknown owner is nobody's
    resolver = lambda lay, jid: {8: 1234}.get(jid)
    assert [j.job_id for j in cgroups.user_jobs(L, 1234, owner_resolver=resolver)] == [8]

    p = tree.spawn()
    a = cgroups.adopt(L, p.pid, mine[0])
    rel = f"{L.v2_scope}/job_7/step_extern/user/task_special"
    assert a.how == "cgroup" and a.dirs == [L.v2_mount + rel] and proc_cgroup(p.pid)[""] == rel
    cgroups.adopt(L, p.pid, mine[0])                # idempotent
    ref = cgroups.job_of_pid(p.pid)
    assert (ref.job_id, ref.step, ref.task, ref.node, ref.version) == (7, "extern", "special", NODE, 2)
    assert cgroups.job_of_pid(task.pid).step == "batch"
    assert cgroups.job_of_pid(stepd.pid).task == "slurm"
    assert cgroups.job_of_pid(waiting.pid) is None
    assert set(cgroups.iter_job_pids(L)) == {p.pid, task.pid, stepd.pid}


def test_v2_sluid_reported(tree):
    tree.v2_job(NODE, 0, jobdir="sEKNKTV3WPV500")
    tree.sock(NODE, 12)
    L = layout(tree, 2)
    jobs = cgroups.list_jobs(L)
    assert jobs == [] and "CgroupJobIdPaths=yes" in jobs.problems[0]
    p = tree.spawn()
    tree.move("unified", f"system.slice/{NODE}_slurmstepd.scope/sEKNKTV3WPV500/step_extern/user", p.pid)
    ref = cgroups.job_of_pid(p.pid)
    assert ref.job_id is None and ref.sluid == "sEKNKTV3WPV500"
    with pytest.raises(LayoutNotFound, match="SLUID"):
        cgroups.adopt(L, p.pid, ref)


def test_v2_user_fallback(tree):
    L = layout(tree, 2, v2_user_cgroup=f"{tree.root}/callerid.slice/user-%u")
    p = tree.spawn()
    d, = cgroups.adopt_user(L, p.pid, 1000)
    assert proc_cgroup(p.pid)[""] == f"{tree.root}/callerid.slice/user-1000"
    with pytest.raises(LayoutNotFound):
        cgroups.adopt_user(layout(tree, 2), p.pid, 1000)


# ---------------------------------------------------------------- errors and races

@pytest.mark.parametrize("version", [1, 2])
def test_pid_gone(tree, version):
    tree.v1_job(NODE, 1000, 5) if version == 1 else tree.v2_job(NODE, 5)
    tree.sock(NODE, 5)
    L = layout(tree, version)
    job = cgroups.list_jobs(L)[0] if version == 1 else cgroups.Job(5, 1000, 0, NODE)
    p = tree.spawn()
    p.kill()
    p.wait()
    with pytest.raises(PidGone, match=str(p.pid)):
        cgroups.adopt(L, p.pid, job)
    assert cgroups.job_of_pid(p.pid) is None
    # the pid dies between the liveness check and the write: the kernel's ESRCH
    orig = adoption._pid_alive
    try:
        adoption._pid_alive = lambda pid: True
        with pytest.raises(PidGone):
            cgroups.adopt(L, p.pid, job)
    finally:
        adoption._pid_alive = orig


@pytest.mark.parametrize("version", [1, 2])
def test_job_gone_before_and_mid_adoption(tree, version):
    if version == 1:
        tree.v1_job(NODE, 1000, 5)
    else:
        tree.v2_job(NODE, 5)
    tree.sock(NODE, 5)
    L = layout(tree, version)
    job = cgroups.list_jobs(L)[0] if version == 1 else cgroups.Job(5, 1000, 0, NODE)
    p = tree.spawn()
    # mid-adoption: the target directory is removed right before the write
    orig = adoption._write_pid

    def racing(path, pid, job_id, what):
        os.rmdir(os.path.dirname(path))
        return orig(path, pid, job_id, what)
    adoption._write_pid = racing
    try:
        with pytest.raises(JobGone, match="job 5"):
            cgroups.adopt(L, p.pid, job)
    finally:
        adoption._write_pid = orig
    # before adoption: the whole job is gone
    for h in (("freezer", "cpuset", "devices", "pids") if version == 1 else ("unified",)):
        top = tree.hier[h] + tree.root
        for dirpath, _, _ in os.walk(top, topdown=False):
            if "job_5" in dirpath:
                os.rmdir(dirpath)
    with pytest.raises(JobGone):
        cgroups.adopt(L, p.pid, job)
    assert cgroups.job_of_pid(p.pid) is None


def test_job_gone_race_threaded(tree):
    """A thread keeps creating and removing the job's extern step while we adopt: every
    attempt either succeeds (and /proc shows it) or raises JobGone; nothing else."""
    L = layout(tree, 2)
    job = cgroups.Job(5, 1000, 0, NODE)
    tree.v2_job(NODE, 5)
    stop = threading.Event()
    base = f"{L.v2_scope_dir()}/job_5/step_extern"

    def churn():
        while not stop.is_set():
            for d in (f"{base}/user/task_special", f"{base}/user", f"{base}/slurm", base):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            for d in (base, f"{base}/user", f"{base}/slurm"):
                try:
                    os.mkdir(d)
                except OSError:
                    pass
    th = threading.Thread(target=churn)
    th.start()
    ok = gone = 0
    try:
        for _ in range(300):
            p = tree.spawn()
            try:
                cgroups.adopt(L, p.pid, job)
                ok += 1
            except JobGone:
                gone += 1
            p.kill()
            p.wait()
    finally:
        stop.set()
        th.join()
    assert ok + gone == 300 and gone > 0


def test_layout_not_found(tree):
    L = layout(tree, 1, prefix="/slurm_missing")
    p = tree.spawn()
    with pytest.raises(LayoutNotFound, match="slurm_missing"):
        cgroups.adopt(L, p.pid, cgroups.Job(5, 1000, 0, NODE))
    L2 = layout(tree, 2)
    with pytest.raises(LayoutNotFound, match="slurmstepd.scope"):
        cgroups.adopt(L2, p.pid, cgroups.Job(5, 1000, 0, NODE))
    assert cgroups.list_jobs(L2) == []


def test_permission_denied(tree):
    """A non-root caller gets PermissionDenied with the path in the message."""
    tree.v1_job(NODE, 1000, 5)
    p = tree.spawn()
    target = f"/sys/fs/cgroup/freezer{tree.root}/slurm_{NODE}/uid_1000/job_5/step_extern/cgroup.procs"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cgroups import adoption, errors\n"
            "try:\n adoption._write_pid(sys.argv[2], int(sys.argv[3]), 5, 'job 5')\n"
            "except errors.PermissionDenied as e:\n print('DENIED', e); sys.exit(0)\n"
            "sys.exit(3)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code, root, target, str(p.pid)], user=65534,
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "DENIED" in r.stdout and target in r.stdout


def test_errors_are_cgroup_errors():
    for e in (JobGone, PidGone, PermissionDenied, LayoutNotFound, cgroups.AdoptionFailed,
              cgroups.ConfError, cgroups.CgroupParseError):
        assert issubclass(e, CgroupError)


def test_job_of_pid_edge_cases():
    assert cgroups.job_of_pid(2 ** 22 + 12345) is None
    assert cgroups.job_of_pid(-1) is None
    assert cgroups.job_of_pid(os.getpid()) is None      # the test runner is in no Slurm job
    with pytest.raises(ValueError):
        cgroups.job_of_pid("x")
