"""cgroups.adopt: the stepd way (a protocol fake stepd that moves the pid like Slurm's plugins
do), verification, completion of controllers the stepd left out, and the fallback writes with
their reason. Real cgroups under unique test roots (never memory); the controller-set test
with memory uses a synthetic tree of plain directories in a tmp dir."""
import os
import subprocess
import time

import pytest

import cgroups
from cgroups import adoption
from cgroups.conf import Conf
from cgroups.errors import JobGone, PidGone
from cgroups.layout import Layout

pytestmark = pytest.mark.root
NODE = "nodeA"
EXTERN = 4294967292


def layout(tree, version):
    return cgroups.discover(Conf(), Conf(), nodename=NODE, spool_dir=tree.spool,
                            cgroup_root=tree.root, plugin=f"cgroup/v{version}", use_env=False)


def proc_cgroup(pid):
    with open(f"/proc/{pid}/cgroup") as f:
        return {c: p for _, c, p in (l.rstrip("\n").split(":", 2) for l in f)}


def sock(tree, job):
    return f"{tree.spool}/{NODE}_{job}.{EXTERN}"


# ---------------------------------------------------------------- the controller set (pure-ish)

def test_fallback_controller_set_includes_memory(tmp_path):
    """Synthetic v1 tree in plain directories (not cgroupfs): the job's step_extern exists in
    memory and freezer, cpuset has only the job level, devices nothing. The fallback writes
    exactly memory and freezer."""
    mounts = {c: str(tmp_path / c) for c in ("memory", "freezer", "cpuset", "devices")}
    rel = "/slurm_n1/uid_1000/job_5"
    for c in ("memory", "freezer"):
        os.makedirs(f"{mounts[c]}{rel}/step_extern")
        open(f"{mounts[c]}{rel}/step_extern/cgroup.procs", "w").close()
    os.makedirs(f"{mounts['cpuset']}{rel}")
    os.makedirs(f"{mounts['devices']}/slurm_n1")
    os.mkdir(tmp_path / "spool")
    L = Layout(1, "n1", str(tmp_path / "spool"), v1_mounts=mounts, v1_prefix="/slurm_n1")
    job = cgroups.Job(5, 1000, 0, "n1")
    assert [t.ctrl for t in adoption.extern_targets(L, job)] == ["freezer", "memory"]
    p = subprocess.Popen(["sleep", "60"])
    try:
        a = cgroups.adopt(L, p.pid, job, verify=False)
    finally:
        p.kill()
        p.wait()
    assert a.how == "cgroup" and "does not exist" in a.reason
    assert a.dirs == [f"{mounts[c]}{rel}/step_extern" for c in ("freezer", "memory")]
    for c in ("memory", "freezer"):
        with open(f"{mounts[c]}{rel}/step_extern/cgroup.procs") as f:
            assert f.read() == str(p.pid)
    # a hierarchy mounted with two controllers ("cpu,cpuacct") is written once
    L2 = Layout(1, "n1", str(tmp_path / "spool"),
                v1_mounts={"cpu": mounts["memory"], "cpuacct": mounts["memory"],
                           "freezer": mounts["freezer"]}, v1_prefix="/slurm_n1")
    assert [t.ctrl for t in adoption.extern_targets(L2, job)] == ["cpu", "freezer"]
    # v2: the step's user/task_special, whether it exists yet or not
    os.makedirs(tmp_path / "cg2/system.slice/n1_slurmstepd.scope/job_5/step_extern")
    L3 = Layout(2, "n1", str(tmp_path / "spool"), v2_mount=str(tmp_path / "cg2"),
                v2_scope="/system.slice/n1_slurmstepd.scope")
    t, = adoption.extern_targets(L3, job)
    assert t.dir.endswith("/job_5/step_extern/user/task_special") and t.ctrl == ""
    with pytest.raises(JobGone, match="job 6"):
        adoption.extern_targets(L3, cgroups.Job(6, 1000, 0, "n1"))


def test_open_entry_opens_every_tasks_file_for_writing(tmp_path):
    """v1: one writable fd per controller where the extern step exists (memory included, a
    synthetic tree here); v2 has no such entry."""
    mounts = {c: str(tmp_path / c) for c in ("memory", "freezer", "cpuset")}
    rel = "/slurm_n1/uid_1000/job_5/step_extern"
    for c in ("memory", "freezer"):
        os.makedirs(mounts[c] + rel)
        open(f"{mounts[c]}{rel}/tasks", "w").close()
    os.mkdir(tmp_path / "spool")
    L = Layout(1, "n1", str(tmp_path / "spool"), v1_mounts=mounts, v1_prefix="/slurm_n1")
    entry = cgroups.open_entry(L, cgroups.Job(5, 1000, 0, "n1"))
    try:
        assert [t.ctrl for t, _ in entry] == ["freezer", "memory"]
        for t, fd in entry:
            os.write(fd, b"0")
            with open(f"{t.dir}/tasks") as f:
                assert f.read() == "0"
    finally:
        for _, fd in entry:
            os.close(fd)
    with pytest.raises(JobGone, match="job 6"):
        cgroups.open_entry(L, cgroups.Job(6, 1000, 0, "n1"))
    L2 = Layout(2, "n1", str(tmp_path / "spool"), v2_mount=str(tmp_path),
                v2_scope="/system.slice/n1_slurmstepd.scope")
    with pytest.raises(cgroups.LayoutNotFound, match="v1"):
        cgroups.open_entry(L2, cgroups.Job(5, 1000, 0, "n1"))


# ---------------------------------------------------------------- the stepd way

def _slurm_like(tree, version, job, ctrls):
    """An add_pid callback that moves the pid where Slurm's plugins would."""
    def add(pid):
        for c in ctrls:
            if version == 1:
                tree.move(c, f"slurm_{NODE}/uid_1000/job_{job}/step_extern", pid)
            else:
                tree.mk("unified", f"system.slice/{NODE}_slurmstepd.scope/job_{job}/"
                                   f"step_extern/user/task_special")
                tree.move("unified", f"system.slice/{NODE}_slurmstepd.scope/job_{job}/"
                                     f"step_extern/user/task_special", pid)
        return 0
    return add


def test_v1_stepd_adopts(tree, fakes):
    tree.v1_job(NODE, 1000, 5)
    L = layout(tree, 1)
    f = fakes(sock(tree, 5), "22.05", add_pid=_slurm_like(tree, 1, 5, tree.hier.keys() - {"unified"}))
    job, = cgroups.user_jobs(L, 1000)
    p = tree.spawn()
    a = cgroups.adopt(L, p.pid, job)
    assert (a.how, a.reason, a.job_id, a.pid, a.stepd_version) == ("stepd", None, 5, p.pid, 9728)
    assert [r for _, r in f.requests] == [22]
    rel = f"{tree.root}/slurm_{NODE}/uid_1000/job_5/step_extern"
    assert all(proc_cgroup(p.pid)[c] == rel for c in ("freezer", "cpuset", "devices", "pids"))
    assert len(a.dirs) == 4


def test_v1_stepd_left_controllers_out(tree, fakes):
    """The stepd accepted but put the pid in freezer only: the others are written directly and
    the record says so (how stays "stepd": Slurm tracks and accounts the pid)."""
    tree.v1_job(NODE, 1000, 5)
    L = layout(tree, 1)
    fakes(sock(tree, 5), "24.11", add_pid=_slurm_like(tree, 1, 5, ["freezer"]))
    p = tree.spawn()
    a = cgroups.adopt(L, p.pid, cgroups.Job(5, 1000, 0, NODE))
    assert a.how == "stepd" and a.stepd_version == 10752
    assert "left it out of cpuset, devices, pids: written directly" in a.reason
    rel = f"{tree.root}/slurm_{NODE}/uid_1000/job_5/step_extern"
    assert all(proc_cgroup(p.pid)[c] == rel for c in ("freezer", "cpuset", "devices", "pids"))


def test_v2_stepd_adopts(tree, fakes):
    tree.v2_job(NODE, 7)
    L = layout(tree, 2)
    fakes(sock(tree, 7), "25.11", add_pid=_slurm_like(tree, 2, 7, ["unified"]))
    p = tree.spawn()
    a = cgroups.adopt(L, p.pid, cgroups.Job(7, None, 0, NODE))   # v2 needs no owner
    rel = f"{L.v2_scope}/job_7/step_extern/user/task_special"
    assert (a.how, a.reason, a.stepd_version) == ("stepd", None, 11264)
    assert a.dirs == [L.v2_mount + rel] and proc_cgroup(p.pid)[""] == rel


# ---------------------------------------------------------------- the fallback and its reason

@pytest.mark.parametrize("kind,reason", [
    ("none", "does not exist"),
    ("stale", "nobody listening"),
    ("refuse", "refused protocol version 11264"),
    ("rc", "answered rc -1"),
    ("hang", "no answer within the deadline"),
    ("untrusted", "not trusted"),
])
def test_fallback_reasons(tree, fakes, monkeypatch, kind, reason):
    tree.v1_job(NODE, 1000, 5)
    L = layout(tree, 1)
    if kind == "stale":
        tree.sock(NODE, 5)
    elif kind == "refuse":
        fakes(sock(tree, 5), "24.11", mode="refuse")
    elif kind == "rc":
        fakes(sock(tree, 5), "22.05", add_pid=lambda pid: -1)
    elif kind == "hang":
        fakes(sock(tree, 5), "22.05", mode="hang")
    elif kind == "untrusted":
        fakes(sock(tree, 5), "22.05")
        real = cgroups.stepd.connect
        monkeypatch.setattr(cgroups.stepd, "connect",
                            lambda path, t, **kw: real(path, t, trusted_uids=(4321,)))
    p = tree.spawn()
    t0 = time.monotonic()
    a = cgroups.adopt(L, p.pid, cgroups.Job(5, 1000, 0, NODE), stepd_timeout=0.2)
    took = time.monotonic() - t0
    assert a.how == "cgroup" and reason in a.reason and a.reason.startswith("stepd not used")
    assert a.stepd_version is None and len(a.dirs) == 4
    assert proc_cgroup(p.pid)["freezer"] == f"{tree.root}/slurm_{NODE}/uid_1000/job_5/step_extern"
    assert took < 0.2 + 0.3, took


def test_use_stepd_false_and_errors(tree, fakes):
    tree.v1_job(NODE, 1000, 5)
    L = layout(tree, 1)
    f = fakes(sock(tree, 5), "22.05")
    p = tree.spawn()
    a = cgroups.adopt(L, p.pid, cgroups.Job(5, 1000, 0, NODE), use_stepd=False)
    assert a.how == "cgroup" and "use_stepd=False" in a.reason and f.requests == []
    # the stepd answers rc -1 for a dead pid (Slurm's proctrack refuses it): PidGone, typed
    fakes(sock(tree, 6), "22.05", add_pid=lambda pid: -1)
    tree.v1_job(NODE, 1000, 6)
    p.kill()
    p.wait()
    with pytest.raises(PidGone):
        cgroups.adopt(L, p.pid, cgroups.Job(6, 1000, 0, NODE))
    assert "how='cgroup'" in repr(a) and "job_id=5" in repr(a)
