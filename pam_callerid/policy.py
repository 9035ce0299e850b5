"""The adoption decision of pam_callerid (pure: no I/O, no clock, no PAM).

The service gathers *facts* (PAM service, user, uid and groups, this user's jobs with an
extern step on this node, whether this host is a compute node, the caller-ID daemon's answer
as a typed :class:`CallerId`) and asks :func:`decide` for a :class:`Decision`. The flow is
pam_slurm_adopt's (its account phase), with these differences: the caller-ID answer counts
only if it was authenticated AND names one of this user's jobs on this node;
``action_unknown=user`` adopts into the user-level cgroup; ``allow_groups=`` exempts admin
groups like root; a host that is not a compute node says so.

    service filter -> unknown user -> root -> exempt group -> job listing failed
    -> no jobs (not a compute node?) -> one job (no RPC unless single_job_skip_rpc=0)
    -> caller-ID answer -> one job after all -> action_unknown (newest | allow | deny | user)

:func:`on_adopt_failure` gives the decision after the adoption failed;
:func:`info_line` the one line the user sees on success (``messages=``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from cgroups.paths import newest      # the one "newest" rule: latest start, ties -> larger id

__all__ = ["Job", "CallerId", "Decision", "decide", "pre_decide", "needs_rpc", "newest",
           "on_adopt_failure", "info_line", "MODULE", "MSG_NO_JOBS", "MSG_UNKNOWN",
           "MSG_ADOPT_FAILURE", "MSG_GENERIC", "FALLBACKS"]

MODULE = "pam_callerid"
# pam_slurm_adopt's texts (contribs/pam_slurm_adopt/pam_slurm_adopt.c, slurm-22-05-8-1:
# send_user_msg calls), with our module name as it uses its own
MSG_NO_JOBS = "Access denied by %s: you have no active jobs on this node" % MODULE
MSG_UNKNOWN = "Access denied by %s: unable to determine source job" % MODULE
MSG_ADOPT_FAILURE = ("Access denied by %s: failed to adopt process into cgroup, denying access "
                     "because action_adopt_failure=deny" % MODULE)
MSG_GENERIC = "No Slurm jobs found on node."
MSG_NOT_A_NODE = "Access denied by %s: this host (%%s) is not a compute node in slurm.conf" \
    % MODULE

# decision paths (also the audit record's "path")
ROOT, SERVICE, NOUSER, EXEMPT, FAILURE, NOT_A_NODE, NO_JOBS, SINGLE, CALLERID, NEWEST, ALLOW, \
    DENY, USER = ("root", "service", "unknown-user", "exempt", "failure", "not-a-node",
                  "no-jobs", "single", "caller-ID", "newest", "allow", "deny", "user")
# paths where a fallback, not the facts, chose what happens: the user is told (messages=)
FALLBACKS = (NEWEST, ALLOW, USER)

_GENERIC_CODE = {"ignore": "PAM_IGNORE", "allow": "PAM_SUCCESS", "deny": "PAM_PERM_DENIED"}


@dataclass(frozen=True, slots=True)
class Job:
    """A job with an extern step on this node (the fields policy needs of cgroups.Job).
    ``start_time``: its start here (any epoch, the same for all jobs)."""
    job_id: int
    uid: int | None
    start_time: float = 0.0


@dataclass(frozen=True, slots=True)
class CallerId:
    """The caller-ID daemon's answer, typed.

    ``status``: ``found`` (the daemon named a job), ``unknown`` (it answered: no job owns that
    connection), ``refused`` (it refused to tell), ``error`` (bad reply, auth failure, protocol
    error), ``timeout``, ``unreachable`` (no daemon there), ``cached`` (not asked: the source
    is in the negative cache), ``no-connection`` (no TCP connection for this login, e.g.
    pamtester) or ``skipped`` (not asked). ``authenticated`` is True only when the reply's
    signature verified and matched our request.
    """
    status: str
    job: int | None = None
    uid: int | None = None
    node: str | None = None
    authenticated: bool = False
    source: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with this login.

    ``code``: PAM return code name. ``target``: ``"job"`` (adopt into ``job``), ``"user"``
    (the user-level cgroup) or None (no adoption). ``user_msg``: error text for the user
    (PAM_ERROR_MSG) or None. ``info``: the explanation for the user when access is granted
    (shown per ``messages=``, see :func:`info_line`). ``logs``: ``(level, text)`` for syslog.
    ``reason``: short machine-readable cause.
    """
    path: str
    code: str
    job: object = None
    target: str | None = None
    user_msg: str | None = None
    info: str | None = None
    logs: tuple = ()
    reason: str | None = None

    @property
    def job_id(self):
        return None if self.job is None else self.job.job_id


def needs_rpc(jobs, opts):
    """Whether the caller-ID daemon must be asked (pam_slurm_adopt's rule)."""
    return len(jobs) > 1 or (len(jobs) == 1 and not opts.single_job_skip_rpc)


def pre_decide(service, user, uid, opts, groups=()):
    """The checks made before any job is listed: the service filter, the user's existence,
    root and the exempt groups (``groups``: names of the user's groups). Returns a final
    Decision, or None to go on."""
    if opts.service != "*" and service != opts.service:
        return Decision(SERVICE, "PAM_IGNORE", reason="service",
                        logs=(("debug", "Not adopting process since this is not an allowed "
                                        "pam service (%r, allowed %r)" % (service, opts.service)),))
    if not user or uid is None:
        return Decision(NOUSER, "PAM_SESSION_ERR", reason="unknown-user",
                        logs=(("error", "user %r not found" % (user,)),))
    if uid == 0 and opts.ignore_root:
        return Decision(ROOT, "PAM_IGNORE", reason="root", logs=(("info", "Ignoring root user"),))
    exempt = [g for g in opts.allow_groups if g in groups]
    if exempt:
        return Decision(EXEMPT, "PAM_IGNORE", reason="allow_groups=%s" % exempt[0],
                        logs=(("info", "user %s is in exempt group %s (allow_groups): not "
                                       "adopting" % (user, exempt[0])),))
    return None


def _accept(cid, jobs, uid, logs):
    """The job named by the caller-ID answer, if it may be used; else None (with a log)."""
    if cid is None or cid.status != "found" or cid.job is None:
        return None
    src = cid.source or "?"
    if not cid.authenticated:
        logs.append(("error", "security: unauthenticated caller-ID answer from %s naming job "
                              "%s ignored" % (src, cid.job)))
        return None
    if cid.uid is not None and cid.uid != uid:
        logs.append(("error", "security: caller-ID answer from %s names job %s of uid %s, "
                              "not of the user logging in (uid %s); ignored"
                     % (src, cid.job, cid.uid, uid)))
        return None
    for j in jobs:
        if j.job_id == cid.job:
            return j
    logs.append(("error", "security: caller-ID answer from %s names job %s, which is not a job "
                          "of uid %s with an extern step on this node; ignored"
                 % (src, cid.job, uid)))
    return None


def _no_jobs(user, opts, logs, compute_node, nodename):
    if not compute_node:
        code = _GENERIC_CODE[opts.action_generic_failure]
        logs.append(("error", "this host (%s) is not a compute node in slurm.conf (no NodeName "
                              "line names it) and user %s has no job here; "
                              "action_generic_failure=%s"
                     % (nodename, user, opts.action_generic_failure)))
        return Decision(NOT_A_NODE, code, logs=tuple(logs), reason="not-a-node",
                        user_msg=MSG_NOT_A_NODE % nodename if code == "PAM_PERM_DENIED" else None)
    if opts.action_no_jobs == "ignore":
        logs.append(("info", "user %s has no active jobs on this node; action_no_jobs=ignore"
                     % user))
        return Decision(NO_JOBS, "PAM_IGNORE", logs=tuple(logs), reason="no-jobs")
    logs.append(("info", "Access denied: user %s has no active jobs on this node" % user))
    return Decision(NO_JOBS, "PAM_PERM_DENIED", user_msg=MSG_NO_JOBS, logs=tuple(logs),
                    reason="no-jobs")


def _unknown(jobs, opts, logs, why):
    """action_unknown, with several jobs and no usable caller-ID answer."""
    act = opts.action_unknown
    logs = tuple(logs)
    if act == "allow":
        return Decision(ALLOW, "PAM_SUCCESS", logs=logs + (
            ("info", "action_unknown=allow: access granted without adoption"),),
            reason="unknown-allow",
            info="%s: not placed in any of your %d jobs on this node (%s)"
                 % (MODULE, len(jobs), why))
    if act == "deny":
        return Decision(DENY, "PAM_PERM_DENIED", user_msg=MSG_UNKNOWN, logs=logs,
                        reason="unknown-deny")
    if act == "user":
        return Decision(USER, "PAM_SUCCESS", target="user", logs=logs, reason="unknown-user-cg",
                        info="%s: placed in your user-level cgroup, not in one of your %d jobs "
                             "(%s)" % (MODULE, len(jobs), why))
    j = newest(jobs)
    return Decision(NEWEST, "PAM_SUCCESS", job=j, target="job", reason="newest",
                    logs=logs + (("info", "action_unknown: Picked job %d" % j.job_id),),
                    info="%s: adopted into job %d, the newest of your %d jobs on this node (%s)"
                         % (MODULE, j.job_id, len(jobs), why))


_WHY = {"unknown": "the connection's source is in no job",
        "no-connection": "no TCP connection to ask about",
        "cached": "no caller-ID daemon at the source",
        "unreachable": "no caller-ID daemon at the source",
        "timeout": "the source's caller-ID daemon did not answer in time",
        "refused": "the source's caller-ID daemon refused to answer",
        "found": "the source's answer named no job of yours here"}


def decide(service, user, uid, jobs, opts, callerid=None, jobs_error=None, groups=(),
           compute_node=True, nodename=None):
    """The decision for a login.

    ``jobs``: this user's jobs with an extern step on this node (objects with job_id, uid,
    start_time; only those owned by ``uid`` count), or None with ``jobs_error`` (str) when
    the listing failed. ``callerid``: :class:`CallerId` or None when not asked.
    ``compute_node``: False when slurm.conf names no node ``nodename`` for this host.
    """
    d = pre_decide(service, user, uid, opts, groups)
    if d is not None:
        return d
    logs = []
    if jobs is None:
        code = _GENERIC_CODE[opts.action_generic_failure]
        logs.append(("error", "cannot list the jobs on this node: %s; "
                              "action_generic_failure=%s" % (jobs_error or "unknown error",
                                                            opts.action_generic_failure)))
        return Decision(FAILURE, code, user_msg=MSG_GENERIC, logs=tuple(logs),
                        reason="generic-failure")
    mine = [j for j in jobs if j.uid == uid]
    if len(mine) != len(jobs):
        logs.append(("error", "ignored %d job(s) not owned by uid %s"
                     % (len(jobs) - len(mine), uid)))
    if not mine:
        return _no_jobs(user, opts, logs, compute_node, nodename)
    if len(mine) == 1 and opts.single_job_skip_rpc:
        j = mine[0]
        logs.append(("info", "Connection by user %s: user has only one job %d" % (user, j.job_id)))
        return Decision(SINGLE, "PAM_SUCCESS", job=j, target="job", logs=tuple(logs),
                        reason="single",
                        info="%s: adopted into job %d, your only job on this node"
                             % (MODULE, j.job_id))
    chosen = _accept(callerid, mine, uid, logs)
    src = (callerid.source if callerid is not None else None) or "?"
    if chosen is not None:
        logs.append(("info", "From %s as %s: member of job %d" % (src, user, chosen.job_id)))
        return Decision(CALLERID, "PAM_SUCCESS", job=chosen, target="job", logs=tuple(logs),
                        reason="caller-id",
                        info="%s: adopted into job %d, where your connection comes from"
                             % (MODULE, chosen.job_id))
    status = callerid.status if callerid is not None else "skipped"
    logs.append(("info", "From %s as %s: unable to determine source job (caller-ID: %s)"
                 % (src, user, status)))
    if len(mine) == 1:
        j = mine[0]
        return Decision(SINGLE, "PAM_SUCCESS", job=j, target="job", logs=tuple(logs),
                        reason="single",
                        info="%s: adopted into job %d, your only job on this node"
                             % (MODULE, j.job_id))
    return _unknown(mine, opts, logs, _WHY.get(status, "caller-ID: %s" % status))


def on_adopt_failure(decision, opts, error):
    """The Decision after the adoption for ``decision`` failed with ``error`` (str)."""
    what = "job %d" % decision.job_id if decision.target == "job" else "the user-level cgroup"
    logs = decision.logs + (("error", "Process adoption into %s FAILED: %s; "
                                      "action_adopt_failure=%s"
                             % (what, error, opts.action_adopt_failure)),)
    if opts.action_adopt_failure == "deny":
        return replace(decision, code="PAM_PERM_DENIED", user_msg=MSG_ADOPT_FAILURE, logs=logs,
                       info=None, reason="adopt-failure-deny")
    return replace(decision, code="PAM_SUCCESS", logs=logs, reason="adopt-failure-allow",
                   info="%s: could not place your session in %s; continuing unconfined"
                        % (MODULE, what))


def info_line(decision, opts):
    """The info line the user sees for ``decision``, or None: ``messages=never`` shows
    none, ``always`` every success's, ``fallback`` (default) only when a fallback chose
    (newest / allow / user) or the adoption failed and access was allowed anyway."""
    if decision.code != "PAM_SUCCESS" or decision.info is None or opts.messages == "never":
        return None
    if opts.messages == "always" or decision.path in FALLBACKS or \
            decision.reason == "adopt-failure-allow":
        return decision.info
    return None
