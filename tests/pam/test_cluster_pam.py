"""pam_callerid (C client + `callerid daemon` on every host) on the real test-bed cluster, per
platform: a job started just before the login is found, one decision per login for
keyboard-interactive logins, the job container joined (job_container/tmpfs: the session sees
the job's private /tmp), SLURM_JOB_ID, and what the audit says about each login."""
import json
import time

import pytest

from testbed.adopters import stop_pam_callerid, use_pam_callerid

pytestmark = [pytest.mark.cluster, pytest.mark.root]


@pytest.fixture
def ours(platform_cluster):
    c = platform_cluster
    audit = use_pam_callerid(c, rpc_timeout=1)
    yield c, audit
    stop_pam_callerid(c)


def records(path, since=0, want=0, timeout=5.0):
    """The audit records after the first ``since``; waits (the daemons' audit writers are
    asynchronous) until there are at least ``want``."""
    end = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                recs = [json.loads(x) for x in f.read().splitlines()[since:]]
        except FileNotFoundError:
            recs = []
        if len(recs) >= want or time.monotonic() > end:
            return recs
        time.sleep(0.05)


def where(c, r):
    assert r.rc == 0, r.err
    return r.out.strip().splitlines()[0].split(":", 2)[2]


@pytest.mark.platforms("P1", "P2")
def test_job_started_just_before_the_login_is_found(ours, platform):
    c, audit = ours
    r = c.ssh("alice", "login", "node1", "true")       # the service has node1's settings now
    assert r.rc != 0 and "no active jobs" in r.err
    job = c.sbatch("alice", nodes=["node1"])           # returns when the extern step is up
    r = c.ssh("alice", "login", "node1", c.job_cgroup_cmd + "; echo JOB=$SLURM_JOB_ID")
    assert where(c, r) == c.extern_cgroup("node1", 2001, job)
    assert f"JOB={job}" in r.out


@pytest.mark.platforms("P1", "P2", "P3", "P4")
@pytest.mark.parametrize("password", [False, True], ids=["publickey", "keyboard-interactive"])
def test_one_decision_per_login(ours, platform, password):
    c, audit = ours
    b = c.sbatch("alice", nodes=["node1", "node2"])
    time.sleep(1.1)
    c.sbatch("alice", nodes=["node2"])
    n = len(records(audit))
    if password:      # from the login node (no job there): sshpass runs outside any job
        r = c.ssh("alice", "login", "node2", c.job_cgroup_cmd, password=True)
    else:
        r = c.ssh("alice", "node1", "node2", c.job_cgroup_cmd, job=b)
    assert r.rc == 0, r.err
    recs = [x for x in records(audit, n, want=2) if x["node"] == "node2"]
    acc, ses = [x for x in recs if x["phase"] == "account"], \
        [x for x in recs if x["phase"] == "session"]
    assert len(acc) == 1 and len(ses) == 1, recs
    assert ses[0]["reused"] is True and ses[0]["path"] == acc[0]["path"]
    assert ses[0]["adopted_pid"] == ses[0]["pid"]
    if password:
        assert acc[0]["adopted"] == "[priv] parent" and acc[0]["adopted_pid"] == ses[0]["pid"]
        assert acc[0]["path"] == "newest"
    else:
        assert acc[0]["path"] == "caller-ID" and where(c, r) == c.extern_cgroup("node2", 2001, b)
        # cgroup v1: sshd's [priv] entered the job's cgroups itself (no grace period), then
        # the stepd registered it; v2: the stepd moved it after the account reply (the
        # module is in this sshd's session stack), the session phase waiting for it
        assert acc[0]["how"] == "stepd" and acc[0]["adopted_pid"] == acc[0]["pid"], acc[0]
        assert (acc[0].get("entered", 0) > 0) is (c.platform.cgroup == 1), acc[0]
        assert acc[0].get("after_reply", False) is (c.platform.cgroup == 2), acc[0]
        # node1's daemon: on cgroup v2 the ssh's socket, made in the srun step, is the job's
        # by the cgroup the kernel reports; Slurm's v1 cgroups are not in the socket's record
        answers = [ln for ln in c.daemon_log("node1", "callerid").splitlines()
                   if "event=answer" in ln and f"job={b} " in ln]
        assert answers and f"by={'cgroup' if c.platform.cgroup == 2 else 'holder'}" in answers[-1], answers


def test_the_next_question_to_a_daemon_goes_with_its_session_ticket(ours, platform):
    """node2 asks node1's daemon with munge once (a reply key: scheme 3); the answer's session
    ticket signs node2's next question to it (scheme 4): both logins land in the right job."""
    c, _ = ours
    b = c.sbatch("alice", nodes=["node1", "node2"])
    time.sleep(1.1)
    c.sbatch("alice", nodes=["node2"])
    for _ in range(2):
        r = c.ssh("alice", "node1", "node2", c.job_cgroup_cmd, job=b)
        assert r.rc == 0 and where(c, r) == c.extern_cgroup("node2", 2001, b), r.err
    answers = [ln.split(" auth=")[1].split()[0]
               for ln in c.daemon_log("node1", "callerid").splitlines()
               if "event=answer" in ln and f"job={b} " in ln]
    assert answers == ["munge-key", "munge-session"], answers


@pytest.mark.platforms("P2", "P3")
@pytest.mark.parametrize("password", [False, True], ids=["publickey", "keyboard-interactive"])
def test_session_joins_the_job_container(ours, platform, password):
    c, audit = ours
    job = c.sbatch("alice", nodes=["node1"],
                   wrap="echo inside-$SLURM_JOB_ID > /tmp/cid-jc-marker; sleep 600")
    end = time.monotonic() + 20
    while True:                           # the batch step writes the marker in the job's /tmp
        r = c.ssh("alice", "login", "node1", "cat /tmp/cid-jc-marker", password=password)
        if r.rc == 0 or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert r.rc == 0 and r.out.strip() == f"inside-{job}", (r.out, r.err)
    recs = [x for x in records(audit, want=2) if x["node"] == "node1" and x["job"] == job]
    assert any(x.get("setns") == "mnt" for x in recs), recs
    c.use_no_adoption()                   # without the module the session has the node's /tmp
    r = c.ssh("alice", "login", "node1", "cat /tmp/cid-jc-marker")
    assert r.rc != 0


@pytest.mark.platforms("P1")
@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_node_daemon_stopped_or_killed_bounded_then_generic_failure(platform_cluster, how):
    """The node's own daemon (its PAM service) SIGSTOPped: each phase (account, session) waits
    daemon_timeout, then action_generic_failure (default ignore: in, not adopted); killed:
    at once."""
    import os
    import signal
    from testbed.cluster import _children_tree
    c = platform_cluster
    use_pam_callerid(c, daemon_timeout=0.5)
    try:
        job = c.sbatch("alice", nodes=["node1"])
        base = c.ssh("alice", "login", "node1", c.job_cgroup_cmd)
        assert where(c, base) == c.extern_cgroup("node1", 2001, job)
        pids = _children_tree(c.hosts["node1"].daemons["callerid"].pid)
        sig = signal.SIGSTOP if how == "stopped" else signal.SIGKILL
        for p in pids:
            os.kill(p, sig)
        try:
            mark = c.syslog_mark()
            r = c.ssh("alice", "login", "node1", c.job_cgroup_cmd)
            assert r.rc == 0, r.err                            # ignore: the login goes on
            assert where(c, r) != c.extern_cgroup("node1", 2001, job)
            assert r.seconds < base.seconds + (2 * 0.5 if how == "stopped" else 0) + 0.5, \
                (r.seconds, base.seconds)
            said = [ln for ln in c.syslog("node1", since=mark) if "pam_callerid(" in ln]
            assert said and "daemon" in said[0], "no line said why"   # pam_syslog: sshd[..]
        finally:
            if how == "stopped":
                for p in pids:
                    os.kill(p, signal.SIGCONT)
    finally:
        stop_pam_callerid(c)

