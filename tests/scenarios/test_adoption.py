"""The adoption scenarios of issue 2, on the real cluster, for every module in ADOPTERS.

Each scenario checks what a user and an admin can see: the message the ssh client prints,
the cgroups of the process the login started (/proc/PID/cgroup on the node), that scancel
kills it, and what the module logged."""
import time

import pytest

from testbed.adopters import ADOPTERS

pytestmark = [pytest.mark.cluster, pytest.mark.root]

FREEZER = "freezer"


@pytest.fixture(params=ADOPTERS, ids=lambda a: a.name)
def adopter(request, fresh):
    a = request.param
    a.configure(fresh)
    yield a
    a.teardown(fresh)


def extern(node, uid, job):
    return f"/slurm_{node}/uid_{uid}/job_{job}/step_extern"


def freezer_of_login(cluster, user, src, dst, job=None):
    r = cluster.ssh(user, src, dst, "grep :freezer: /proc/self/cgroup", job=job)
    assert r.rc == 0, f"ssh {src}->{dst} failed: {r.err}"
    return r.out.strip().split(":", 2)[2]


def test_no_job_is_denied_with_message(adopter, fresh):
    c = fresh
    mark = c.syslog_mark()
    r = c.ssh("alice", "login", "node3", "true")
    assert r.rc == 255
    assert adopter.no_jobs_message() in r.err
    assert any("no active jobs" in ln for ln in c.syslog("node3", since=mark, ident=adopter.ident))


def test_other_users_job_does_not_let_bob_in(adopter, fresh):
    c = fresh
    c.sbatch("alice", nodes=["node2"])
    r = c.ssh("bob", "login", "node2", "true")
    assert r.rc == 255 and adopter.no_jobs_message() in r.err


def test_single_job_is_adopted(adopter, fresh):
    c = fresh
    job = c.sbatch("alice", nodes=["node1"])
    assert freezer_of_login(c, "alice", "login", "node1") == extern("node1", 2001, job)


def test_ssh_from_inside_job_lands_in_extern_step_and_scancel_kills_it(adopter, fresh):
    c = fresh
    job = c.sbatch("alice", nodes=["node1", "node2"], wrap="ssh node2 sleep 3001")
    # the batch script runs on node1; find the remote sleep on node2
    pid = None
    end = time.monotonic() + 20
    while pid is None and time.monotonic() < end:
        for p in c.pids_in_netns("node2"):
            try:
                if open(f"/proc/{p}/cmdline").read() == "sleep\x003001\x00":
                    pid = p
            except OSError:
                pass
        time.sleep(0.05)
    assert pid, "the ssh-launched sleep never appeared on node2"
    assert c.cgroup_of("node2", pid)[FREEZER] == extern("node2", 2001, job)
    t0 = time.monotonic()
    c.scancel("alice", str(job))
    while time.monotonic() - t0 < 20:
        try:
            if open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"sleep {pid} survived scancel of job {job}")


def test_two_jobs_login_from_inside_job_is_adopted_into_that_job(adopter, fresh):
    """node2 holds job B (2 nodes, started first) and job A (newer): a login from inside B on
    node1 must land in B, which only the caller-ID lookup on node1 can tell."""
    c = fresh
    b = c.sbatch("alice", nodes=["node1", "node2"])
    time.sleep(1.1)  # distinct start seconds: A is clearly the newest on node2
    a = c.sbatch("alice", nodes=["node2"])
    assert freezer_of_login(c, "alice", "login", "node2") == extern("node2", 2001, a), "newest sanity check"
    assert freezer_of_login(c, "alice", "node1", "node2", job=b) == extern("node2", 2001, b)


def test_two_jobs_login_from_login_node_picks_newest(adopter, fresh):
    c = fresh
    old = c.sbatch("alice", nodes=["node2"])
    time.sleep(1.1)
    new = c.sbatch("alice", nodes=["node2"])
    assert new > old
    mark = c.syslog_mark()
    assert freezer_of_login(c, "alice", "login", "node2") == extern("node2", 2001, new)
    assert c.syslog("node2", since=mark, ident=adopter.ident), "the module logged nothing"
