"""The adoption scenarios of issue 2, on the real cluster, on every platform of the matrix
(testbed/platforms.py) and for every module that can run there (testbed/adopters.py).

Each scenario checks what a user and an admin can see: the message the ssh client prints,
the cgroup of the process the login started (/proc/PID/cgroup on the node: the freezer line
on cgroup v1, the unified line on v2), that scancel kills it, and what the module logged."""
import time

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.root]


def login_cgroup(c, user, src, dst, job=None):
    r = c.ssh(user, src, dst, c.job_cgroup_cmd, job=job)
    assert r.rc == 0, f"ssh {src}->{dst} failed: {r.err}"
    return r.out.strip().split(":", 2)[2]


def test_no_job_is_denied_with_message(adopter, platform_cluster):
    c = platform_cluster
    mark = c.syslog_mark()
    r = c.ssh("alice", "login", "node3", "true")
    assert r.rc == 255
    assert adopter.no_jobs_message() in r.err
    assert any("no active jobs" in ln for ln in c.syslog("node3", since=mark, ident=adopter.ident))


def test_other_users_job_does_not_let_bob_in(adopter, platform_cluster):
    c = platform_cluster
    c.sbatch("alice", nodes=["node2"])
    r = c.ssh("bob", "login", "node2", "true")
    assert r.rc == 255 and adopter.no_jobs_message() in r.err


def test_single_job_is_adopted(adopter, platform_cluster):
    c = platform_cluster
    job = c.sbatch("alice", nodes=["node1"])
    assert login_cgroup(c, "alice", "login", "node1") == c.extern_cgroup("node1", 2001, job)


def test_ssh_from_inside_job_lands_in_extern_step_and_scancel_kills_it(adopter, platform_cluster):
    c = platform_cluster
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
    assert c.job_cgroup_of("node2", pid) == c.extern_cgroup("node2", 2001, job)
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


def test_two_jobs_login_from_inside_job_is_adopted_into_that_job(adopter, platform_cluster):
    """node2 holds job B (2 nodes, started first) and job A (newer): a login from inside B on
    node1 must land in B, which only the caller-ID lookup on node1 can tell."""
    c = platform_cluster
    b = c.sbatch("alice", nodes=["node1", "node2"])
    time.sleep(1.1)  # distinct start seconds: A is clearly the newest on node2
    a = c.sbatch("alice", nodes=["node2"])
    assert login_cgroup(c, "alice", "login", "node2") == c.extern_cgroup("node2", 2001, a), "newest sanity check"
    assert login_cgroup(c, "alice", "node1", "node2", job=b) == c.extern_cgroup("node2", 2001, b)


def test_two_jobs_login_from_login_node_picks_newest(adopter, platform_cluster):
    c = platform_cluster
    old = c.sbatch("alice", nodes=["node2"])
    time.sleep(1.1)
    new = c.sbatch("alice", nodes=["node2"])
    assert new > old
    mark = c.syslog_mark()
    assert login_cgroup(c, "alice", "login", "node2") == c.extern_cgroup("node2", 2001, new)
    assert c.syslog("node2", since=mark, ident=adopter.ident), "the module logged nothing"
