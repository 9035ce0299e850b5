"""The adoption decision of pam_callerid (pure: no I/O, no clock, no PAM).

The hook gathers *facts* (PAM service, user and uid, this user's jobs with an extern step on
this node, the caller-ID daemon's answer as a typed :class:`CallerId`) and asks
:func:`decide` for a :class:`Decision`.  The flow is pam_slurm_adopt's (account phase), with
two fixes: the caller-ID answer counts only if it was authenticated AND names one of this
user's jobs on this node, and ``action_unknown=user`` adopts into the user-level cgroup.

    service filter -> unknown user -> root -> job discovery failure -> no jobs
    -> one job (no RPC unless single_job_skip_rpc=0) -> caller-ID answer
    -> one job after all -> action_unknown (newest | allow | deny | user)

The session phase uses :func:`on_adopt_failure` when the cgroup write failed.
"""

__all__ = ["Job", "CallerId", "Decision", "decide", "pre_decide", "needs_rpc", "newest",
           "on_adopt_failure", "MODULE", "MSG_NO_JOBS", "MSG_UNKNOWN", "MSG_ADOPT_FAILURE",
           "MSG_GENERIC"]

MODULE = "pam_callerid"
MSG_NO_JOBS = "Access denied by %s: you have no active jobs on this node" % MODULE
MSG_UNKNOWN = "Access denied by %s: unable to determine source job" % MODULE
MSG_ADOPT_FAILURE = "Access denied by %s: adoption failure" % MODULE
MSG_GENERIC = "No Slurm jobs found on node."

# decision paths (also the audit record's "path")
ROOT, SERVICE, NOUSER, FAILURE, NO_JOBS, SINGLE, CALLERID, NEWEST, ALLOW, DENY, USER = (
    "root", "service", "unknown-user", "failure", "no-jobs", "single", "caller-ID", "newest",
    "allow", "deny", "user")

_GENERIC_CODE = {"ignore": "PAM_IGNORE", "allow": "PAM_SUCCESS", "deny": "PAM_PERM_DENIED"}


class Job:
    """A job of the user with an extern step on this node. ``start``: start time here
    (seconds, any epoch as long as all jobs use the same one)."""

    __slots__ = ("id", "uid", "start")

    def __init__(self, id, uid, start=0.0):
        self.id = int(id)
        self.uid = None if uid is None else int(uid)
        self.start = float(start)

    def __eq__(self, other):
        return isinstance(other, Job) and (self.id, self.uid, self.start) == \
            (other.id, other.uid, other.start)

    def __hash__(self):
        return hash((self.id, self.uid, self.start))

    def __repr__(self):
        return "Job(%d, uid=%r, start=%r)" % (self.id, self.uid, self.start)


class CallerId:
    """The caller-ID daemon's answer, typed.

    ``status``: ``found`` (the daemon named a job), ``unknown`` (it answered: no job owns that
    connection), ``refused`` (it refused to tell), ``error`` (bad reply, auth failure, protocol
    error), ``timeout``, ``unreachable`` (no daemon there / connection refused),
    ``cached`` (skipped: the source is in the negative cache), ``no-connection`` (no TCP
    connection found for this PAM handle, e.g. pamtester) or ``skipped`` (not asked).
    ``authenticated`` is True only when the reply's signature verified and matched our request.
    """

    __slots__ = ("status", "job", "uid", "node", "authenticated", "source", "detail")

    def __init__(self, status, job=None, uid=None, node=None, authenticated=False,
                 source=None, detail=None):
        self.status = status
        self.job = None if job is None else int(job)
        self.uid = None if uid is None else int(uid)
        self.node = node
        self.authenticated = bool(authenticated)
        self.source = source
        self.detail = detail

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self):
        return "CallerId(%r)" % self.as_dict()


class Decision:
    """What to do with this login.

    ``code``: PAM return code name for the account phase. ``target``: ``"job"`` (adopt into
    ``job``), ``"user"`` (adopt into the user-level cgroup) or None (no adoption).
    ``user_msg``: error text for the user (sent with PAM_ERROR_MSG) or None. ``info``: the
    one-line explanation for the user when access is granted (unless quiet). ``logs``: list
    of ``(level, text)`` for syslog. ``reason``: short machine-readable cause.
    """

    __slots__ = ("path", "code", "job", "target", "user_msg", "info", "logs", "reason")

    def __init__(self, path, code, job=None, target=None, user_msg=None, info=None,
                 logs=None, reason=None):
        self.path = path
        self.code = code
        self.job = job
        self.target = target
        self.user_msg = user_msg
        self.info = info
        self.logs = list(logs or ())
        self.reason = reason

    @property
    def job_id(self):
        return None if self.job is None else self.job.id

    def as_dict(self):
        return {"path": self.path, "code": self.code, "job": self.job_id,
                "target": self.target, "user_msg": self.user_msg, "info": self.info,
                "reason": self.reason}

    def __repr__(self):
        return "Decision(%r)" % self.as_dict()


def newest(jobs):
    """The newest job: latest start on this node, ties to the larger job id."""
    return max(jobs, key=lambda j: (j.start, j.id)) if jobs else None


def needs_rpc(jobs, opts):
    """Whether the caller-ID daemon must be asked (pam_slurm_adopt's rule)."""
    return len(jobs) > 1 or (len(jobs) == 1 and not opts.single_job_skip_rpc)


def pre_decide(service, user, uid, opts):
    """The checks made before any configuration is read: the service filter, the user's
    existence and root. Returns a final Decision, or None to go on."""
    if opts.service != "*" and service != opts.service:
        return Decision(SERVICE, "PAM_IGNORE", reason="service",
                        logs=[("debug", "Not adopting process since this is not an allowed "
                                        "pam service (%r, allowed %r)" % (service, opts.service))])
    if user is None or uid is None:
        return Decision(NOUSER, "PAM_SESSION_ERR", reason="unknown-user",
                        logs=[("error", "user %r not found" % (user,))])
    if uid == 0 and opts.ignore_root:
        return Decision(ROOT, "PAM_IGNORE", reason="root", logs=[("info", "Ignoring root user")])
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
        if j.id == cid.job:
            return j
    logs.append(("error", "security: caller-ID answer from %s names job %s, which is not a job "
                          "of uid %s with an extern step on this node; ignored"
                 % (src, cid.job, uid)))
    return None


def decide(service, user, uid, jobs, opts, callerid=None, jobs_error=None):
    """The account-phase decision.

    ``jobs``: this user's jobs with an extern step on this node (list of :class:`Job`, only
    those owned by ``uid`` are considered), or None with ``jobs_error`` (str) when the
    discovery failed. ``callerid``: :class:`CallerId` or None when the daemon was not asked.
    """
    d = pre_decide(service, user, uid, opts)
    if d is not None:
        return d
    logs = []
    if jobs is None:
        code = _GENERIC_CODE[opts.action_generic_failure]
        logs.append(("error", "cannot list the jobs on this node: %s; "
                              "action_generic_failure=%s" % (jobs_error or "unknown error",
                                                            opts.action_generic_failure)))
        return Decision(FAILURE, code, user_msg=MSG_GENERIC, logs=logs, reason="generic-failure")
    mine = [j for j in jobs if j.uid is None or j.uid == uid]
    if len(mine) != len(jobs):
        logs.append(("error", "ignored %d job(s) not owned by uid %s"
                     % (len(jobs) - len(mine), uid)))
    jobs = sorted(mine, key=lambda j: (-j.start, -j.id))
    if not jobs:
        if opts.action_no_jobs == "ignore":
            logs.append(("info", "user %s has no active jobs on this node; "
                                 "action_no_jobs=ignore" % user))
            return Decision(NO_JOBS, "PAM_IGNORE", logs=logs, reason="no-jobs")
        logs.append(("info", "Access denied: user %s has no active jobs on this node" % user))
        return Decision(NO_JOBS, "PAM_PERM_DENIED", user_msg=MSG_NO_JOBS, logs=logs,
                        reason="no-jobs")
    if len(jobs) == 1 and opts.single_job_skip_rpc:
        j = jobs[0]
        logs.append(("info", "user %s has only job %d on this node" % (user, j.id)))
        return Decision(SINGLE, "PAM_SUCCESS", job=j, target="job", logs=logs, reason="single",
                        info="%s: adopted into job %d (your only job on this node)"
                             % (MODULE, j.id))
    chosen = _accept(callerid, jobs, uid, logs)
    src = (callerid.source if callerid is not None else None) or "?"
    if chosen is not None:
        logs.append(("info", "From %s as %s: member of job %d" % (src, user, chosen.id)))
        return Decision(CALLERID, "PAM_SUCCESS", job=chosen, target="job", logs=logs,
                        reason="caller-id",
                        info="%s: adopted into job %d (your connection comes from that job)"
                             % (MODULE, chosen.id))
    status = callerid.status if callerid is not None else "skipped"
    logs.append(("info", "From %s as %s: unable to determine source job (caller-ID: %s)"
                 % (src, user, status)))
    if len(jobs) == 1:
        j = jobs[0]
        return Decision(SINGLE, "PAM_SUCCESS", job=j, target="job", logs=logs, reason="single",
                        info="%s: adopted into job %d (your only job on this node)"
                             % (MODULE, j.id))
    act = opts.action_unknown
    if act == "allow":
        logs.append(("info", "action_unknown=allow: access granted without adoption"))
        return Decision(ALLOW, "PAM_SUCCESS", logs=logs, reason="unknown-allow",
                        info="%s: source job unknown; session not adopted into any job"
                             % MODULE)
    if act == "deny":
        return Decision(DENY, "PAM_PERM_DENIED", user_msg=MSG_UNKNOWN, logs=logs,
                        reason="unknown-deny")
    if act == "user":
        return Decision(USER, "PAM_SUCCESS", target="user", logs=logs, reason="unknown-user-cg",
                        info="%s: source job unknown; session placed in your user-level "
                             "cgroup" % MODULE)
    j = newest(jobs)
    logs.append(("info", "Newest job %d" % j.id))
    return Decision(NEWEST, "PAM_SUCCESS", job=j, target="job", logs=logs, reason="newest",
                    info="%s: adopted into job %d (newest of your %d jobs on this node; source "
                         "job unknown)" % (MODULE, j.id, len(jobs)))


def on_adopt_failure(decision, opts, error):
    """The Decision after the cgroup write for ``decision`` failed with ``error`` (str)."""
    what = "job %d" % decision.job_id if decision.target == "job" else "the user-level cgroup"
    logs = [("error", "adoption into %s FAILED: %s; action_adopt_failure=%s"
             % (what, error, opts.action_adopt_failure))]
    if opts.action_adopt_failure == "deny":
        return Decision(decision.path, "PAM_PERM_DENIED", job=decision.job,
                        target=decision.target, user_msg=MSG_ADOPT_FAILURE, logs=logs,
                        reason="adopt-failure-deny")
    return Decision(decision.path, "PAM_SUCCESS", job=decision.job, target=decision.target,
                    logs=logs, reason="adopt-failure-allow",
                    info="%s: could not place your session in %s; continuing unconfined"
                         % (MODULE, what))
