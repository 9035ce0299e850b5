"""Every policy branch through real libpam (pamtester) against the built C client and a real
PAM service, with the synthetic Slurm node and the scripted caller-ID daemon of fakes.py.

pamtester gets a connected TCP socket (as sshd's [priv] has) so that the client finds the
connection 4-tuple and the service asks the fake daemon about it.
"""
import json
import socket
import uuid

import pytest

from fakes import NODE, FakeDaemon, FakeSlurm, pamtester_conn
from pamhelpers import outcome, pamtester, stack

pytestmark = pytest.mark.root


@pytest.fixture
def slurm(tmp_path):
    s = FakeSlurm(tmp_path)
    yield s
    s.cleanup()


@pytest.fixture
def fake_daemon(slurm):
    d = FakeDaemon(slurm.key)
    yield d
    d.close()


class AuditPath(str):
    """The audit file of a test's PAM service: audit_of() flushes the service's writer."""
    service = None


def audit_of(path):
    if getattr(path, "service", None) is not None:
        path.service.flush()
    with open(path) as f:
        return [json.loads(x) for x in f]


@pytest.fixture
def env(built_so, services, slurm, pam_service, tmp_path):
    """Make a PAM service: env(args, port=...) -> (service name, audit path)."""
    def make(args="", port=1, ttl=0):
        audit = AuditPath(tmp_path / ("audit-%s.jsonl" % uuid.uuid4().hex[:6]))
        audit.service = pam_service
        svc = services.make(stack(built_so, "socket=%s config=%s audit=%s %s"
                                  % (pam_service.socket, slurm.conf(port, ttl), audit, args)))
        return svc, audit
    return make


# ------------------------------------------------------------------ no jobs / single job
def test_no_jobs_denied_with_message(env, cid_user):
    svc, audit = env()
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "denied", out
    assert "Access denied by pam_callerid: you have no active jobs on this node" in out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["result"], rec["jobs"], rec["node"]) == \
        ("no-jobs", "PAM_PERM_DENIED", [], NODE)


def test_no_jobs_ignore(env, cid_user):
    svc, audit = env("action_no_jobs=ignore")
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "ignore", out


def test_other_users_job_is_not_mine(env, slurm, cid_user):
    slurm.add_job(cid_user[1] + 1000, 70)
    svc, audit = env()
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "denied", out


def test_single_job_adopted_without_rpc(env, slurm, cid_user, fake_daemon):
    slurm.add_job(cid_user[1], 41)
    svc, audit = env(port=fake_daemon.port)
    rc, out, el, _, _ = pamtester_conn(svc, cid_user[0], "acct_mgmt", "open_session")
    assert rc == 0, out
    assert "pam_callerid" not in out                 # silent on success
    acc, ses = audit_of(audit)
    assert (acc["path"], acc["job"], acc["result"]) == ("single", 41, "PAM_SUCCESS")
    assert acc["adopted_pid"] == acc["pid"]          # pamtester itself
    # single-threaded on a v1 layout: it entered the job's cgroup (the freezer) itself; then
    # the registration: no slurmstepd listens on the fake's socket, so the direct cgroup
    # write, and the record says why -- unless pamtester had exited by then (it does not
    # wait for the registration; sshd's [priv] lives on for the session)
    assert (acc["entered"], acc["adopted"]) == (1, "peer")
    assert acc["how"] == "cgroup" and "stepd" in acc["how_reason"] and \
        "nobody listening" in acc["how_reason"] or \
        acc["how"] == "entered" and "exited" in acc["how_reason"], acc
    assert (ses["phase"], ses["job"], ses["adopted_pid"], ses["reused"]) == \
        ("session", 41, ses["pid"], True)
    assert "callerid" not in acc and fake_daemon.requests == []
    assert slurm.procs(cid_user[1], 41) == []        # pamtester has exited


@pytest.mark.parametrize("args,shown", [("", False), ("messages=always", True),
                                        ("messages=never", False), ("quiet", False)])
def test_single_job_messages(env, slurm, cid_user, args, shown):
    slurm.add_job(cid_user[1], 42)
    svc, audit = env(args)
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert rc == 0, out
    assert ("pam_callerid: adopted into job 42, your only job on this node" in out) is shown


def test_single_job_rpc_when_skip_disabled(env, slurm, cid_user, fake_daemon):
    slurm.add_job(cid_user[1], 43)
    fake_daemon.mode = ("found", 43, cid_user[1])
    svc, audit = env("single_job_skip_rpc=0", port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"]) == ("caller-ID", 43)


def test_module_in_session_only_decides_there(env, slurm, cid_user):
    slurm.add_job(cid_user[1], 44)
    svc, audit = env()
    rc, out = pamtester(svc, cid_user[0], "open_session")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["phase"], rec["job"], rec["adopted_pid"]) == ("session", 44, rec["pid"])
    assert "reused" not in rec


# ------------------------------------------------------------------ several jobs
@pytest.fixture
def two_jobs(slurm, cid_user):
    old = slurm.add_job(cid_user[1], 51)
    new = slurm.add_job(cid_user[1], 52)
    return old, new


def test_callerid_answer_adopts_that_job(env, two_jobs, cid_user, fake_daemon):
    old, new = two_jobs
    fake_daemon.mode = ("found", old, cid_user[1])
    svc, audit = env(port=fake_daemon.port)
    rc, out, el, cli, srv = pamtester_conn(svc, cid_user[0], "acct_mgmt", "open_session")
    assert rc == 0, out
    acc = audit_of(audit)[0]
    assert (acc["path"], acc["job"], acc["jobs"]) == ("caller-ID", old, [new, old])
    assert acc["callerid"]["authenticated"] is True
    # the daemon was asked about exactly this connection, from the client's side
    req = fake_daemon.requests[-1]
    assert (str(req.src), req.src_port, str(req.dst), req.dst_port) == \
        (cli[0], cli[1], srv[0], srv[1])
    assert (acc["src_ip"], acc["src_port"], acc["dst_port"]) == (cli[0], cli[1], srv[1])


@pytest.mark.parametrize("mode", ["other-user", "not-on-node", "forged", "wrongnonce",
                                  "unknown"])
def test_untrusted_or_useless_answers_fall_back_to_newest(env, two_jobs, cid_user,
                                                          fake_daemon, mode):
    old, new = two_jobs
    fake_daemon.mode = {"other-user": ("found", old, cid_user[1] + 1),
                        "not-on-node": ("found", 999, cid_user[1]),
                        "forged": ("forged", old, cid_user[1]),
                        "wrongnonce": ("wrongnonce", old, cid_user[1]),
                        "unknown": ("unknown",)}[mode]
    svc, audit = env(port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"]) == ("newest", new), rec
    if mode in ("forged", "wrongnonce"):
        assert rec["callerid"]["status"] == "error" and not rec["callerid"]["authenticated"]


def test_ipv6_connection(env, two_jobs, cid_user, slurm):
    old, new = two_jobs
    d = FakeDaemon(slurm.key, host="::1")
    try:
        d.mode = ("found", old, cid_user[1])
        svc, audit = env(port=d.port)
        rc, out, el, cli, srv = pamtester_conn(svc, cid_user[0], "acct_mgmt", listen="::1")
        assert rc == 0, out
        rec = audit_of(audit)[-1]
        assert (rec["path"], rec["job"], rec["src_ip"]) == ("caller-ID", old, "::1")
        assert str(d.requests[-1].src) == "::1" and d.requests[-1].src_port == cli[1]
    finally:
        d.close()


def test_ipv4_mapped_connection_is_normalised(env, two_jobs, cid_user, fake_daemon):
    """sshd on a dual-stack socket sees ::ffff:127.0.0.1; the daemon is asked in IPv4."""
    old, new = two_jobs
    fake_daemon.mode = ("found", old, cid_user[1])
    svc, audit = env(port=fake_daemon.port)
    rc, out, el, cli, srv = pamtester_conn(svc, cid_user[0], "acct_mgmt", listen="::",
                                           connect="127.0.0.1")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"], rec["src_ip"]) == ("caller-ID", old, "127.0.0.1")
    assert str(fake_daemon.requests[-1].src) == "127.0.0.1"


def test_no_connection_newest(env, two_jobs, cid_user):
    old, new = two_jobs
    svc, audit = env()
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert rc == 0 and "newest" in out, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"], rec["callerid"]["status"]) == \
        ("newest", new, "no-connection")


def test_action_unknown_deny(env, two_jobs, cid_user, fake_daemon):
    svc, audit = env("action_unknown=deny", port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "denied", out
    assert "Access denied by pam_callerid: unable to determine source job" in out


def test_action_unknown_allow(env, two_jobs, cid_user, fake_daemon):
    svc, audit = env("action_unknown=allow", port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt", "open_session")
    assert rc == 0, out
    acc = audit_of(audit)[-1]
    assert (acc["path"], acc["job"], acc["adopted_pid"]) == ("allow", None, None)


def test_action_unknown_user(env, two_jobs, cid_user, fake_daemon):
    svc, audit = env("action_unknown=user", port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["target"], rec["adopted_pid"]) == ("user", "user", rec["pid"])


def test_silent_daemon_bounded_by_rpc_timeout(env, two_jobs, cid_user, fake_daemon):
    old, new = two_jobs
    fake_daemon.mode = ("silent", 3)
    svc, audit = env("rpc_timeout=0.3", port=fake_daemon.port)
    rc, out, el, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert rc == 0, out
    assert el < 1.5, el
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"], rec["callerid"]["status"]) == ("newest", new, "timeout")


def test_no_daemon_negative_cache(env, two_jobs, cid_user):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                       # nothing listens there: connection refused
    svc, audit = env(port=port, ttl=30)
    for _ in range(2):
        rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
        assert rc == 0, out
    first, second = audit_of(audit)
    assert first["callerid"]["status"] == "unreachable"
    assert second["callerid"]["status"] == "cached"
    assert second["path"] == "newest"


# ------------------------------------------------------------------ adoption failure
@pytest.mark.parametrize("act,expect", [("allow", "success"), ("deny", "denied")])
def test_adoption_failure(env, slurm, cid_user, act, expect):
    slurm.add_job(cid_user[1], 61, cpuset=True)
    svc, audit = env("action_adopt_failure=" + act)
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == expect, out
    rec = audit_of(audit)[-1]
    assert rec["adopted_pid"] is None and rec["path"] == "single"
    if act == "deny":
        assert "Access denied by pam_callerid: failed to adopt process into cgroup, denying " \
            "access because action_adopt_failure=deny" in out
        assert rec["result"] == "PAM_PERM_DENIED"
