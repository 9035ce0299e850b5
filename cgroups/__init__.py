"""cgroups: Slurm's cgroup layouts (v1 and v2), job discovery on this node, and adoption.

Answers, without any RPC to slurmctld or slurmd: which jobs of a user have an extern step on
this node, which job a pid is in; and adopts a pid into a job's extern step the way Slurm
does (the job's own slurmstepd over its local socket, else cgroup writes), with the job's
mount namespace and X11 display when it has them. Slurm 22.05 .. 25.11, cgroup v1 and v2,
job_container/tmpfs, configless slurmd. Standard library only; imports no other package of
this project. Submodules are imported lazily.

Slurm layout -> code that handles it
------------------------------------
slurm.conf / cgroup.conf syntax (Key=Value, Include, ...)      conf.parse_conf_text, load_conf
booleans in configuration files and module arguments          conf.parse_bool
where slurm.conf is (configless: /run/slurm/conf,
    <SlurmdSpoolDir>/conf-cache, then /etc/slurm)               layout.slurm_conf_candidates
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
stepd sockets <spool>/<node>_<job>.4294967292 (extern; ctime = start)
                                                                jobs.extern_socket_names
stepd protocol 22.05 .. 25.11 (handshake, request numbers and
    reply layouts per release, as data)                         stepd.PROTOCOLS, stepd.connect
job owner: v1 uid_<U>; v2 task processes' real uid, else the extern
    slurmstepd (REQUEST_STEP_UID; v1 cross-check: verify_owner=True)
                                                                jobs.list_jobs; stepd.step_uid
/proc/PID/cgroup (v1 lines, v2 "0::" line, hybrid)             paths.job_from_proc_cgroup, jobs.job_of_pid
"newest": latest start, ties -> larger job id (Slurm 26.05)    paths.newest
adoption: the extern stepd (REQUEST_ADD_EXTERN_PID), else
    cgroup.procs of step_extern in every controller where it
    exists (memory included); v2 step_extern/user/task_special  adoption.adopt -> Adoption
v1 entry by the process itself ("0" into each tasks file: no
    RCU grace period)                                           adoption.open_entry
user-level fallback: v1 uid_<U>; v2 configured cgroup           adoption.adopt_user
job container mount namespace (stepd GET_NS_FD[S], else
    job_container/tmpfs <BasePath>[/<node>]/<job>/.ns)          namespace.job_namespace_fd
X11 display of a job (stepd REQUEST_X11_DISPLAY)                stepd.x11_display

Public API (re-exported here)
-----------------------------
discover(slurm_conf=None, cgroup_conf=None, nodename=None, mounts=None, **overrides) -> Layout
list_jobs(layout, uid=None, *, owner_resolver=None, stepd="fallback"|"always"|"never",
          verify_owner=False, stepd_timeout=0.5, stepd_budget=2.0) -> JobList[Job]
user_jobs(layout, uid, **same)
adopt(layout, pid, job, *, stepd_timeout=0.5, verify=True, use_stepd=True) -> Adoption
adopt_user(layout, pid, uid, *, verify=True) -> [dirs]
open_entry(layout, job) -> [(Target, fd)]   (v1: the extern step's tasks files, for writing)
job_namespace_fd(layout, job, *, stepd_timeout=0.5, use_stepd=True) -> fd | None
x11_display(layout, job, *, timeout=0.5) -> (display, xauthority | None) | None
step_uid(socket_path, timeout=0.5) -> uid;  query_step_uid(...) -> StepReply
newest(jobs) -> Job | None
parse_proc_cgroup(text) -> [(id, controllers, path)];  job_from_proc_cgroup(text, node=None)
job_of_pid(pid, node=None) -> JobRef | None (parse cached per distinct cgroup text)
iter_job_dirs(layout) -> iterator of dirs;  iter_job_pids(layout, dirs=None) -> iterator of pids
real_uid(pid) -> int | None
parse_bool(value, *, prefix=False) -> True | False | None
Errors: CgroupError > ConfError, LayoutNotFound, JobGone, PidGone, PermissionDenied,
AdoptionFailed, NamespaceError, StepdError (> StepdUnavailable, StepdTimeout,
StepdRequestFailed, StepdProtocolError > StepdRefused); paths.CgroupParseError.
"""
from .errors import (AdoptionFailed, CgroupError, ConfError, JobGone, LayoutNotFound,
                     NamespaceError, PermissionDenied, PidGone, StepdError, StepdProtocolError,
                     StepdRefused, StepdRequestFailed, StepdTimeout, StepdUnavailable)

_LAZY = {
    "discover": "layout", "Layout": "layout", "resolve_nodename": "layout",
    "list_jobs": "jobs", "user_jobs": "jobs", "job_of_pid": "jobs", "iter_job_pids": "jobs",
    "iter_job_dirs": "jobs", "real_uid": "jobs",
    "Job": "jobs", "JobList": "jobs",
    "newest": "paths", "parse_proc_cgroup": "paths", "job_from_proc_cgroup": "paths",
    "JobRef": "paths", "CgroupParseError": "paths", "parse_mounts": "paths",
    "adopt": "adoption", "adopt_user": "adoption", "Adoption": "adoption",
    "open_entry": "adoption",
    "job_namespace_fd": "namespace",
    "step_uid": "stepd", "query_step_uid": "stepd", "x11_display": "stepd",
    "parse_conf_text": "conf", "load_conf": "conf", "Conf": "conf", "parse_bool": "conf",
}

__all__ = ["CgroupError", "ConfError", "LayoutNotFound", "JobGone", "PidGone",
           "PermissionDenied", "AdoptionFailed", "NamespaceError", "StepdError",
           "StepdUnavailable", "StepdTimeout", "StepdProtocolError", "StepdRefused",
           "StepdRequestFailed"] + sorted(_LAZY)


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
