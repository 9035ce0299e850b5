"""cgroups on the platforms sites run (testbed.platforms): Slurm 22.05 and 24.11, cgroup v1 and
v2, job_container/tmpfs, configless slurmd. The package runs *inside* a node, as it does in
production: it finds slurm.conf itself, talks to the job's real extern slurmstepd, and adopts.

Each platform is brought up here in its own small cluster (1 node) with this helper's own
names (prefix <CID_TESTBED_PREFIX>p, subnet <CID_TESTBED_SUBNET>+100, node "ciap1"), so it can
coexist with the session-wide `cluster` of the other tests.
"""
import json
import os
import sys
import time

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.root]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _platforms():
    try:
        from testbed.platforms import Platform
    except ImportError:
        return []
    return [Platform("22.05", 2, job_container=True, configless=True),
            Platform("24.11", 2, job_container=True, configless=True),
            Platform("24.11", 1)]


@pytest.fixture(scope="module", params=_platforms(), ids=lambda p: p.label)
def pcluster(request):
    from testbed import platforms
    from testbed.cluster import Cluster
    missing = platforms.check()
    if missing:
        pytest.skip(f"platform prerequisites missing: {missing}")
    prefix = os.environ.get("CID_TESTBED_PREFIX", "cid") + "p"
    subnet = int(os.environ.get("CID_TESTBED_SUBNET", "3")) + 100
    c = Cluster(nodes=1, prefix=prefix, subnet=subnet, node_prefix="ciap", platform=request.param)
    t0 = time.monotonic()
    c.up()
    print(f"\n[testbed] {request.param.label} up in {time.monotonic() - t0:.2f} s", file=sys.stderr)
    try:
        yield c
    finally:
        c.down()
        assert not c.leftovers(), c.leftovers()


# Runs on the node (its mount, network, UTS and, on v2, cgroup namespaces) with the venv python.
PROBE = r'''
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import cgroups
from cgroups import stepd
node, job, mode = sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = {}
L = cgroups.discover(nodename=node, use_env=False)        # finds slurm.conf like slurmd does
out.update(notes=L.notes, version=L.version, container=L.container, jc=L.jc_basepath)
found = cgroups.user_jobs(L, 2001)
out.update(jobs=[j.job_id for j in found], problems=found.problems)
# with its socket renamed away the job is not listed (sockets are the index): adopt by id
job = next((j for j in found if j.job_id == job), cgroups.Job(job, 2001, 0, node))
sock = L.extern_socket(job.job_id)
if mode == "stepd":
    with stepd.connect(sock) as s:
        out.update(answered=s.version, release=s.protocol.release, uid=s.step_uid(),
                   x11=s.x11_display())
    try:
        stepd.connect(sock, protocol_version=38 << 8).close()
        out["v9728"] = "accepted"
    except cgroups.StepdRefused as e:
        out["v9728"] = str(e)
p = subprocess.Popen(["sleep", "600"], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
t0 = time.monotonic()
a = cgroups.adopt(L, p.pid, job)
out.update(adopt_ms=round((time.monotonic() - t0) * 1000, 2), how=a.how, reason=a.reason,
           dirs=a.dirs, stepd_version=a.stepd_version, pid=p.pid)
out["cgroup"] = dict(l.split(":", 2)[1:] for l in open(f"/proc/{p.pid}/cgroup").read().split())
def marker(fd):
    end = time.monotonic() + 15                  # the batch step writes it a moment later
    while True:
        r = subprocess.run(["nsenter", f"--mount=/proc/self/fd/{fd}", "cat",
                            f"/tmp/marker-{job.job_id}"], capture_output=True, text=True,
                           pass_fds=(fd,))
        if r.returncode == 0 or time.monotonic() > end:
            os.close(fd)
            return (r.stdout + r.stderr).strip()
        time.sleep(0.1)
if mode == "stepd" and L.container:
    out["ns_stepd"] = marker(cgroups.job_namespace_fd(L, job))
    out["ns_file"] = marker(cgroups.job_namespace_fd(L, job, use_stepd=False))
    out["own_tmp"] = os.path.exists(f"/tmp/marker-{job.job_id}")
print(json.dumps(out))
'''


def probe(c, node, job, mode):
    r = c.exec(node, [sys.executable, "-c", PROBE, REPO, node, str(job), mode], timeout=60)
    assert r.rc == 0, r.err[-3000:]
    return json.loads(r.out.strip().splitlines()[-1])


def _gone(pid, timeout=30):
    end = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
        time.sleep(0.05)
    return not os.path.exists(f"/proc/{pid}")


def _in_step(p, out, job):
    """The adopted pid sits in the job's extern step (the v2 line, or v1 freezer)."""
    if p.cgroup == 2:
        return f"/job_{job}/step_extern/" in out["cgroup"][""]
    return out["cgroup"]["freezer"].endswith(f"/uid_2001/job_{job}/step_extern")


def test_stepd_adoption_namespace_configless(pcluster):
    c, p = pcluster, pcluster.platform
    node = c.node_names[0]
    # the marker goes to the job's private /tmp (never written without a job container: the
    # node's /tmp is the machine's)
    wrap = "echo job-private > /tmp/marker-$SLURM_JOB_ID; sleep 600" if p.job_container \
        else "sleep 600"
    job = c.sbatch("alice", nodes=[node], wrap=wrap)
    out = probe(c, node, job, "stepd")
    want = {"22.05": (9728, "22.05"), "24.11": (10752, "24.11")}[p.slurm]
    assert (out["answered"], out["release"], out["uid"], out["x11"]) == (*want, 2001, None)
    if p.slurm == "24.11":      # 24.05+ accepts >= 23.02 only: our old fixed version is refused
        assert "refused protocol version 9728" in out["v9728"]
    assert out["version"] == p.cgroup and job in out["jobs"]
    assert (out["how"], out["reason"], out["stepd_version"]) == ("stepd", None, want[0]), out
    assert _in_step(p, out, job), out["cgroup"]
    where = "/run/slurm/conf/slurm.conf" if p.configless else "/etc/slurm/slurm.conf"
    assert f"slurm.conf found at {where}" in out["notes"]
    if p.configless:
        assert c.exec(node, ["test", "-e", "/etc/slurm/slurm.conf"]).rc != 0
    if p.job_container:
        assert out["jc"] == f"/run/jc/{node}" and out["container"] == "job_container/tmpfs"
        assert out["ns_stepd"] == out["ns_file"] == "job-private" and not out["own_tmp"]
    assert f"_handle_add_extern_pid_internal: for StepId={job}.extern, pid {out['pid']}" in \
        c._tail(f"slurmd-{node}.log", 400000)
    c.scancel("alice", str(job))
    assert _gone(out["pid"]), "scancel did not kill the adopted process"
    c.wait_job_gone(job)


def test_fallback_when_the_stepd_socket_is_gone(pcluster):
    c, p = pcluster, pcluster.platform
    node = c.node_names[0]
    job = c.sbatch("alice", nodes=[node])
    sock = str(c.spool(node) / f"{node}_{job}.4294967292")
    os.rename(sock, sock + ".away")
    try:
        out = probe(c, node, job, "fallback")
    finally:
        os.rename(sock + ".away", sock)
    assert out["how"] == "cgroup" and "does not exist" in out["reason"], out
    assert _in_step(p, out, job), out["cgroup"]
    if p.cgroup == 2:
        assert out["cgroup"][""].endswith(f"/job_{job}/step_extern/user/task_special")
    c.scancel("alice", str(job))
    assert _gone(out["pid"]), "scancel did not kill the fallback-adopted process"
    c.wait_job_gone(job)
