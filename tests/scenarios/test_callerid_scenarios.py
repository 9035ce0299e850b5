"""Scenarios where pam_callerid must do better than pam_slurm_adopt, on the real cluster:
keyboard-interactive logins adopted, IPv6 resolved through the caller-ID daemon, a hung daemon
costing at most rpc_timeout, and an audit line for every decision. pam_slurm_adopt runs the
keyboard-interactive case too, to show the weakness this replaces."""
import json
import os
import signal
import time

import pytest

from testbed.adopters import PAM_SLURM_ADOPT, stop_pam_callerid, use_pam_callerid

pytestmark = [pytest.mark.cluster, pytest.mark.root]


def extern(node, uid, job):
    return f"/slurm_{node}/uid_{uid}/job_{job}/step_extern"


def freezer(r):
    assert r.rc == 0, r.err
    return r.out.strip().split(":", 2)[2]


def audit_lines(path, since=0):
    try:
        with open(path) as f:
            return [json.loads(ln) for ln in f.read().splitlines()[since:]]
    except FileNotFoundError:  # made by the first login
        return []


@pytest.fixture
def ours(fresh):
    audit = use_pam_callerid(fresh, rpc_timeout=1)
    yield fresh, audit
    stop_pam_callerid(fresh)


@pytest.mark.parametrize("module", ["pam_callerid", "pam_slurm_adopt"])
def test_keyboard_interactive_login_adopted(fresh, module):
    c = fresh
    if module == "pam_callerid":
        use_pam_callerid(c)
    else:
        PAM_SLURM_ADOPT.configure(c)
    try:
        job = c.sbatch("alice", nodes=["node1"])
        where = freezer(c.ssh("alice", "login", "node1", "grep :freezer: /proc/self/cgroup", password=True))
        if module == "pam_callerid":
            assert where == extern("node1", 2001, job)
        else:
            # pam_slurm_adopt adopts the forked [pam] child that exits: the session escapes
            assert where == "/", "pam_slurm_adopt now adopts keyboard-interactive logins?"
    finally:
        stop_pam_callerid(c)


def test_ipv6_login_resolved_through_daemon(ours):
    c, audit = ours
    b = c.sbatch("alice", nodes=["node1", "node2"])
    time.sleep(1.1)
    c.sbatch("alice", nodes=["node2"])
    c.sbatch("alice", nodes=["node2"])
    n = len(audit_lines(audit))
    r = c.ssh("alice", "node1", "node2-v6", "grep :freezer: /proc/self/cgroup; echo $SLURM_JOB_ID", job=b)
    assert r.out.split()[0].split(":", 2)[2] == extern("node2", 2001, b)
    assert r.out.split()[1] == str(b)
    acct = [a for a in audit_lines(audit, n) if a["phase"] == "account"][-1]
    assert acct["path"] == "caller-ID" and acct["job"] == b
    assert acct["src_ip"] == c.hosts["node1"].ip6
    assert acct["callerid"]["authenticated"] and acct["callerid"]["job"] == b


def test_hung_daemon_costs_at_most_rpc_timeout_then_newest(ours):
    c, audit = ours
    b = c.sbatch("alice", nodes=["node1", "node2"])
    time.sleep(1.1)
    newest = c.sbatch("alice", nodes=["node2"])
    base = c.ssh("alice", "node1", "node2", "true", job=b)
    assert base.rc == 0
    daemon = c.hosts["node1"].daemons["callerid"]
    from testbed.cluster import _children_tree
    pids = _children_tree(daemon.pid)
    for p in pids:
        os.kill(p, signal.SIGSTOP)  # accepts connections (kernel backlog), never answers
    try:
        n = len(audit_lines(audit))
        r = c.ssh("alice", "node1", "node2", "grep :freezer: /proc/self/cgroup", job=b)
        assert freezer(r) == extern("node2", 2001, newest)
        assert r.seconds < base.seconds + 1.0 + 0.8, (r.seconds, base.seconds)
        acct = [a for a in audit_lines(audit, n) if a["phase"] == "account"][-1]
        assert acct["path"] == "newest" and acct["job"] == newest
        assert acct["callerid"]["status"] in ("unreachable", "timeout")
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)


def test_every_decision_leaves_an_audit_line(ours):
    c, audit = ours
    j = c.sbatch("alice", nodes=["node1"])
    c.ssh("alice", "login", "node1", "true")
    c.ssh("alice", "login", "node3", "true")
    c.ssh("bob", "login", "node1", "true")
    recs = [a for a in audit_lines(audit) if a["phase"] == "account"]
    got = [(a["user"], a["node"], a["path"], a["job"]) for a in recs]
    assert got == [("alice", "node1", "single", j), ("alice", "node3", "no-jobs", None),
                   ("bob", "node1", "no-jobs", None)], got
    sess = [a for a in audit_lines(audit) if a["phase"] == "session"]
    assert len(sess) == 1 and sess[0]["job"] == j and sess[0]["adopted_pid"]
    # `callerid audit` reads them back
    import subprocess, sys
    out = subprocess.run([sys.executable, "-m", "pam_callerid.cli", "audit", "--file", str(audit), "--job", str(j), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert {json.loads(ln)["job"] for ln in out.stdout.splitlines()} == {j}
