"""cgroups: Slurm's cgroup layouts (v1 and v2), job discovery on this node, and adoption.

Answers, without any RPC to slurmctld or slurmd: which jobs of a user have an extern step on
this node, which job a pid is in, and how to move a pid into a job's extern step.
Standard library only; imports no other package of this project. Submodules are imported
lazily (the PAM hook pays every import at every login).

Slurm layout -> code that handles it
------------------------------------
slurm.conf / cgroup.conf syntax (Key=Value, Include, ...)      conf.parse_conf_text, load_conf
SlurmdSpoolDir (%n/%h), NodeName of this host                   layout.discover, resolve_nodename
CgroupPlugin cgroup/v1|cgroup/v2|autodetect + mount table       layout.choose_version, paths.parse_mounts
v1  <mnt>/<ctrl>/slurm[_<node>]/uid_<U>/job_<J>/step_<S>[/task_<N>]
    (prefix /slurm upstream, /slurm_<node> with multiple-slurmd = Debian)
                                                                Layout.v1_*; paths.match_slurm_path
v2  <cg2>/<CgroupSlice|system.slice>/[<node>_]slurmstepd.scope/job_<J>/step_<S>/
    {slurm, user/task_<N>, user/task_special}; "system" = stepds waiting
    (cg2 = CgroupMountpoint, or <mountpoint>/unified on hybrid hosts)
                                                                Layout.v2_*; paths.match_slurm_path
v2  26.05+ SLUID job dirs (no CgroupJobIdPaths=yes)             paths.JobRef.sluid (job_id None);
                                                                jobs.list_jobs -> JobList.problems
step names extern|batch|interactive|<n>|<n>+<het>              paths.split_step
stepd sockets <spool>/<node>_<job>.<step>[.<het>] (extern = 4294967292, ctime = start)
                                                                jobs.extern_sockets, paths.parse_stepd_socket_name
job owner: v1 uid_<U>; v2 task processes' real uid, else the extern
    slurmstepd (REQUEST_STEP_UID on its socket; v1 cross-check: verify_owner=True)
                                                                jobs.list_jobs; stepd.step_uid
/proc/PID/cgroup (v1 lines, v2 "0::" line, hybrid)             paths.job_from_proc_cgroup, jobs.job_of_pid
"newest": latest start, ties -> larger job id (Slurm 26.05)    paths.newest
adoption: v1 step_extern in every controller but memory; v2 step_extern/user/task_special
                                                                adoption.adopt
user-level fallback: v1 uid_<U>; v2 configured cgroup           adoption.adopt_user

Public API (re-exported here)
-----------------------------
discover(slurm_conf=..., cgroup_conf=None, nodename=None, mounts=None, **overrides) -> Layout
list_jobs(layout, uid=None, *, owner_resolver=None, stepd="fallback"|"always"|"never",
          verify_owner=False, stepd_timeout=0.5, stepd_budget=2.0) -> JobList[Job]
user_jobs(layout, uid, **same)
step_uid(socket_path, timeout=0.5) -> uid;  query_step_uid(...) -> StepReply
newest(jobs) -> Job | None
parse_proc_cgroup(text) -> [(id, controllers, path)];  job_from_proc_cgroup(text, node=None)
job_of_pid(pid, node=None) -> JobRef | None (parse cached per distinct cgroup text)
iter_job_dirs(layout) -> iterator of dirs;  iter_job_pids(layout, dirs=None) -> iterator of pids
real_uid(pid) -> int | None
adopt(layout, pid, job, *, verify=True) -> [dirs];  adopt_user(layout, pid, uid, *, verify=True)
Errors: CgroupError > ConfError, LayoutNotFound, JobGone, PidGone, PermissionDenied,
AdoptionFailed, StepdError (> StepdUnavailable, StepdTimeout, StepdProtocolError);
paths.CgroupParseError.
"""
from .errors import (AdoptionFailed, CgroupError, ConfError, JobGone, LayoutNotFound,
                     PermissionDenied, PidGone, StepdError, StepdProtocolError, StepdTimeout,
                     StepdUnavailable)

_LAZY = {
    "discover": "layout", "Layout": "layout", "resolve_nodename": "layout",
    "list_jobs": "jobs", "user_jobs": "jobs", "job_of_pid": "jobs", "iter_job_pids": "jobs",
    "iter_job_dirs": "jobs", "real_uid": "jobs",
    "Job": "jobs", "JobList": "jobs", "extern_sockets": "jobs",
    "newest": "paths", "parse_proc_cgroup": "paths", "job_from_proc_cgroup": "paths",
    "JobRef": "paths", "CgroupParseError": "paths", "parse_mounts": "paths",
    "adopt": "adoption", "adopt_user": "adoption",
    "step_uid": "stepd", "query_step_uid": "stepd",
    "parse_conf_text": "conf", "load_conf": "conf", "Conf": "conf",
}

__all__ = ["CgroupError", "ConfError", "LayoutNotFound", "JobGone", "PidGone",
           "PermissionDenied", "AdoptionFailed", "StepdError", "StepdUnavailable", "StepdTimeout",
           "StepdProtocolError"] + sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'cgroups' has no attribute {name!r}")
    import sys                                  # no importlib package at login
    full = f"{__name__}.{mod}"
    __import__(full)
    value = getattr(sys.modules[full], name)
    globals()[name] = value
    return value
