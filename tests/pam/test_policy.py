"""pam_callerid.policy: every branch of the decision, pure."""
import pytest
from hypothesis import given, strategies as st

from pam_callerid import policy
from pam_callerid.options import parse
from pam_callerid.policy import CallerId, Job, decide

U = 2001
J1, J2, J3 = Job(11, U, 100.0), Job(12, U, 200.0), Job(13, U, 200.0)


def d(jobs=(), args=(), cid=None, service="sshd", user="alice", uid=U, jobs_error=None,
      **facts):
    return decide(service, user, uid, None if jobs is None else list(jobs), parse(list(args)),
                  callerid=cid, jobs_error=jobs_error, **facts)


def found(job, uid=U, auth=True):
    return CallerId("found", job=job, uid=uid, authenticated=auth, source="10.0.0.1:4242")


def test_messages_exact():
    assert policy.MSG_NO_JOBS == \
        "Access denied by pam_callerid: you have no active jobs on this node"
    assert policy.MSG_UNKNOWN == "Access denied by pam_callerid: unable to determine source job"
    assert policy.MSG_ADOPT_FAILURE == (
        "Access denied by pam_callerid: failed to adopt process into cgroup, denying access "
        "because action_adopt_failure=deny")


def test_service_filter():
    r = d([J1], service="login")
    assert (r.path, r.code, r.target) == ("service", "PAM_IGNORE", None)
    assert d([J1], service="login", args=["service=login"]).path == "single"
    assert d([J1], service="anything", args=["service=*"]).path == "single"
    # service names are compared exactly (libpam lowercases them itself)
    assert d([J1], service="SSHD").path == "service"


def test_root_ignored_before_anything():
    r = d(None, uid=0, user="root", jobs_error="broken config")
    assert (r.path, r.code) == ("root", "PAM_IGNORE")
    r = d(None, uid=0, user="root", args=["ignore_root=0", "action_generic_failure=deny"])
    assert (r.path, r.code) == ("root", "PAM_IGNORE")


def test_unknown_user():
    r = d([J1], user="nobody-here", uid=None)
    assert (r.path, r.code) == ("unknown-user", "PAM_SESSION_ERR")


@pytest.mark.parametrize("act,code", [("ignore", "PAM_IGNORE"), ("allow", "PAM_SUCCESS"),
                                      ("deny", "PAM_PERM_DENIED")])
def test_generic_failure(act, code):
    r = d(None, args=["action_generic_failure=" + act], jobs_error="no spool")
    assert (r.path, r.code, r.target) == ("failure", code, None)
    assert r.user_msg == policy.MSG_GENERIC
    assert any("no spool" in t for _, t in r.logs)


def test_no_jobs():
    r = d([])
    assert (r.path, r.code, r.user_msg) == ("no-jobs", "PAM_PERM_DENIED", policy.MSG_NO_JOBS)
    r = d([], args=["action_no_jobs=ignore"])
    assert (r.path, r.code, r.user_msg) == ("no-jobs", "PAM_IGNORE", None)


def test_other_users_jobs_do_not_count():
    r = d([Job(50, 3000, 1.0)])
    assert r.path == "no-jobs"


def test_single_without_rpc():
    r = d([J1])
    assert (r.path, r.code, r.target, r.job_id) == ("single", "PAM_SUCCESS", "job", 11)
    assert "job 11" in r.info
    assert policy.needs_rpc([J1], parse([])) is False
    assert policy.needs_rpc([J1], parse(["single_job_skip_rpc=0"])) is True
    assert policy.needs_rpc([J1, J2], parse([])) is True
    assert policy.needs_rpc([], parse(["single_job_skip_rpc=0"])) is False


def test_single_with_rpc_answer_and_without():
    r = d([J1], args=["single_job_skip_rpc=0"], cid=found(11))
    assert (r.path, r.job_id) == ("caller-ID", 11)
    r = d([J1], args=["single_job_skip_rpc=0", "action_unknown=deny"],
          cid=CallerId("timeout"))
    assert (r.path, r.job_id, r.code) == ("single", 11, "PAM_SUCCESS")


def test_callerid_chooses_authenticated_own_job():
    r = d([J1, J2], cid=found(11))
    assert (r.path, r.code, r.target, r.job_id) == ("caller-ID", "PAM_SUCCESS", "job", 11)
    r = d([J1, J2], cid=found(11, uid=None))       # uid not reported: job list decides
    assert r.path == "caller-ID"


@pytest.mark.parametrize("cid,why", [
    (found(11, auth=False), "unauthenticated"),
    (found(11, uid=3000), "not of the user"),
    (found(99), "not a job of uid"),
])
def test_callerid_answer_rejected(cid, why):
    r = d([J1, J2], cid=cid)
    assert r.path == "newest" and r.job_id == 12
    assert any(why in t and "security" in t for _, t in r.logs)


@pytest.mark.parametrize("status", ["unknown", "refused", "error", "timeout", "unreachable",
                                    "cached", "no-connection", "skipped"])
def test_no_answer_falls_back(status):
    r = d([J1, J2], cid=CallerId(status, job=11, authenticated=True))
    assert r.path == "newest"


def test_callerid_none_is_unknown():
    assert d([J1, J2], cid=None).path == "newest"


def test_newest_rule_ties_to_larger_id():
    assert policy.newest([J1, J2, J3]).job_id == 13
    assert policy.newest([J2, J1]).job_id == 12
    assert policy.newest([]) is None
    r = d([J3, J1, J2])
    assert (r.path, r.job_id) == ("newest", 13)


def test_action_unknown_variants():
    r = d([J1, J2], args=["action_unknown=allow"])
    assert (r.path, r.code, r.target) == ("allow", "PAM_SUCCESS", None)
    r = d([J1, J2], args=["action_unknown=deny"])
    assert (r.path, r.code, r.user_msg) == ("deny", "PAM_PERM_DENIED", policy.MSG_UNKNOWN)
    r = d([J1, J2], args=["action_unknown=user"])
    assert (r.path, r.code, r.target, r.job) == ("user", "PAM_SUCCESS", "user", None)
    # a bad value is the safest: deny
    r = d([J1, J2], args=["action_unknown=alow"])
    assert r.path == "deny"


def test_adopt_failure():
    ok = d([J1])
    r = policy.on_adopt_failure(ok, parse([]), "job gone")
    assert (r.code, r.user_msg) == ("PAM_SUCCESS", None) and "unconfined" in r.info
    r = policy.on_adopt_failure(ok, parse(["action_adopt_failure=deny"]), "job gone")
    assert (r.code, r.user_msg) == ("PAM_PERM_DENIED", policy.MSG_ADOPT_FAILURE)
    assert any("job gone" in t for _, t in r.logs)
    u = d([J1, J2], args=["action_unknown=user"])
    r = policy.on_adopt_failure(u, parse(["action_adopt_failure=deny"]), "x")
    assert r.code == "PAM_PERM_DENIED" and "user-level" in r.logs[-1][1]


jobs_st = st.lists(st.builds(Job, st.integers(1, 50), st.sampled_from([U, 3000, None]),
                             st.floats(0, 1000)), max_size=6)
cid_st = st.one_of(st.none(), st.builds(
    CallerId, st.sampled_from(["found", "unknown", "error", "timeout"]),
    job=st.one_of(st.none(), st.integers(1, 60)), uid=st.one_of(st.none(), st.sampled_from([U, 3000])),
    authenticated=st.booleans()))


@given(jobs_st, cid_st, st.sampled_from(["newest", "allow", "deny", "user"]),
       st.sampled_from(["0", "1"]))
def test_invariants(jobs, cid, unknown, skip):
    r = d(jobs, args=["action_unknown=" + unknown, "single_job_skip_rpc=" + skip], cid=cid)
    mine = [j for j in jobs if j.uid == U]
    assert r.code in ("PAM_SUCCESS", "PAM_PERM_DENIED", "PAM_IGNORE")
    if r.job is not None:
        # never a job of another user, never a job that is not on this node
        assert r.job in mine
    if r.path == "caller-ID":
        assert cid.authenticated and cid.status == "found" and cid.uid in (None, U)
        assert r.job.job_id == cid.job
    if not mine:
        assert r.path == "no-jobs"
    if r.code == "PAM_SUCCESS":
        assert r.target in ("job", "user") or r.path == "allow"


def test_exempt_groups_before_jobs_are_listed():
    r = d(None, args=["allow_groups=wheel,hpcadmin"], groups=("users", "hpcadmin"),
          jobs_error="would fail")
    assert (r.path, r.code, r.reason, r.target) == ("exempt", "PAM_IGNORE",
                                                     "allow_groups=hpcadmin", None)
    assert d([J1], args=["allow_groups=wheel"], groups=("users",)).path == "single"
    assert d([J1], groups=("wheel",)).path == "single"          # no allow_groups: nobody exempt


@pytest.mark.parametrize("act,code", [("ignore", "PAM_IGNORE"), ("allow", "PAM_SUCCESS"),
                                      ("deny", "PAM_PERM_DENIED")])
def test_not_a_compute_node_says_so(act, code):
    r = d([], args=["action_generic_failure=" + act], compute_node=False, nodename="login1")
    assert (r.path, r.code) == ("not-a-node", code)
    assert "no active jobs" not in (r.user_msg or "")
    if code == "PAM_PERM_DENIED":
        assert r.user_msg == ("Access denied by pam_callerid: this host (login1) is not a "
                              "compute node in slurm.conf")
    else:
        assert r.user_msg is None
    assert any("not a compute node" in t for _, t in r.logs)
    # a job found here after all (e.g. a dynamic node): decided as usual
    assert d([J1], compute_node=False, nodename="x").path == "single"


def test_info_line_per_messages_option():
    single, newest_ = d([J1]), d([J1, J2])
    assert policy.info_line(single, parse([])) is None              # silent on success
    assert policy.info_line(single, parse(["messages=always"])) == single.info
    newest_ = d([J1, J2], cid=CallerId("unknown"))
    assert policy.info_line(newest_, parse([])) == (
        "pam_callerid: adopted into job 12, the newest of your 2 jobs on this node "
        "(the connection's source is in no job)")
    assert policy.info_line(newest_, parse(["messages=never"])) is None
    assert policy.info_line(newest_, parse(["quiet"])) is None
    allow = d([J1, J2], args=["action_unknown=allow"], cid=CallerId("timeout"))
    assert "did not answer in time" in policy.info_line(allow, parse([]))
    user = d([J1, J2], args=["action_unknown=user"], cid=CallerId("cached"))
    assert "user-level cgroup" in policy.info_line(user, parse([]))
    failed = policy.on_adopt_failure(single, parse([]), "gone")
    assert "unconfined" in policy.info_line(failed, parse([]))
    denied = d([])
    assert policy.info_line(denied, parse(["messages=always"])) is None
