"""I/O edge: move a pid into a job's extern step (or the user-level fallback) and verify it.

v1: the pid is written to ``cgroup.procs`` of ``.../uid_<U>/job_<J>/step_extern`` in every
usable mounted controller where that directory exists (never memory unless the layout was
built with ``allow_memory``). v2: ``.../job_<J>/step_extern/user/task_special`` (created if
missing, as slurmstepd does on first use; Slurm removes the step directory tree at job end).
Afterwards /proc/PID/cgroup is read back. Writing a pid that is already there is a no-op for
the kernel, so adoption is idempotent.
"""
import errno
import os

from .errors import AdoptionFailed, JobGone, LayoutNotFound, PermissionDenied, PidGone
from . import paths as _p
from .jobs import read_small


def _write_pid(path, pid, job_id, what):
    """Write ``pid`` into the cgroup.procs file ``path``; map errno to our exceptions."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        raise JobGone(f"job {job_id} ended before pid {pid} could be adopted: "
                      f"{path} no longer exists", job_id) from None
    except PermissionError as e:
        raise PermissionDenied(f"cannot open {path} to adopt pid {pid} into {what}: "
                               f"{e.strerror} (must run as root)", path) from None
    try:
        os.write(fd, b"%d" % pid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise PidGone(f"pid {pid} exited before it could be adopted into {what}",
                          pid) from None
        if e.errno in (errno.ENOENT, errno.ENODEV):
            raise JobGone(f"job {job_id} ended while pid {pid} was being adopted "
                          f"({path}: {e.strerror})", job_id) from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(f"kernel refused to move pid {pid} into {path}: "
                                   f"{e.strerror} (need root, or delegation of both "
                                   f"cgroups)", path) from None
        raise AdoptionFailed(f"kernel refused to move pid {pid} into {path}: {e.strerror} "
                             f"(errno {e.errno}; for cpuset an empty cpuset.cpus/mems, for v2 "
                             f"a non-leaf cgroup)") from None
    finally:
        os.close(fd)


def _pid_alive(pid):
    return os.path.exists(f"/proc/{pid}")


def _read_proc_cgroup(pid):
    data = read_small(f"/proc/{pid}/cgroup")
    if not data:
        raise PidGone(f"pid {pid} exited during adoption (cannot read /proc/{pid}/cgroup)", pid)
    return _p.parse_proc_cgroup(data.decode("utf-8", "replace"))


def extern_targets(layout, job):
    """Pure: ``[(controller, cgroup.procs path, expected /proc/PID/cgroup path)]`` for
    adopting into ``job``'s extern step (``job``: Job or JobRef with job_id/uid)."""
    if job.job_id is None:
        raise LayoutNotFound(f"{job}: cannot adopt into a job known only by its SLUID")
    if layout.version == 1:
        if job.uid is None:
            raise LayoutNotFound(f"job {job.job_id}: owner uid unknown, cannot build the v1 "
                                 f"path uid_<U>/job_{job.job_id}")
        rel = layout.v1_rel_step(job.uid, job.job_id)
        return [(c, f"{m}{rel}/cgroup.procs", rel) for c, m in sorted(layout.v1_mounts.items())]
    rel = layout.v2_rel_task_special(job.job_id)
    return [("", f"{layout.v2_mount}{rel}/cgroup.procs", rel)]


def adopt(layout, pid, job, *, verify=True):
    """Move ``pid`` into ``job``'s extern step; return the list of cgroup dirs written.

    Raises PidGone, JobGone, PermissionDenied, LayoutNotFound, AdoptionFailed (all
    CgroupError). Idempotent.
    """
    pid = int(pid)
    if pid <= 0:
        raise PidGone(f"invalid pid {pid}", pid)
    if not _pid_alive(pid):
        raise PidGone(f"pid {pid} does not exist (exited before adoption)", pid)
    targets = extern_targets(layout, job)
    what = f"job {job.job_id} extern step"
    written = []
    if layout.version == 1:
        base_track = layout.v1_base(layout.track)
        if not os.path.isdir(base_track):
            raise LayoutNotFound(f"{base_track} does not exist: no Slurm cgroups for node "
                                 f"{layout.nodename} (wrong prefix or slurmd not running?)")
        for ctrl, procs, rel in targets:
            d = os.path.dirname(procs)
            if not os.path.isdir(d):
                continue
            _write_pid(procs, pid, job.job_id, what)
            written.append((ctrl, d, rel))
        if not written:
            raise JobGone(f"job {job.job_id} has no step_extern cgroup under "
                          f"{layout.v1_prefix} (job ended, or no PrologFlags=contain)",
                          job.job_id)
    else:
        ctrl, procs, rel = targets[0]
        d = os.path.dirname(procs)
        step = os.path.dirname(os.path.dirname(d))
        if not os.path.isdir(layout.v2_scope_dir()):
            raise LayoutNotFound(f"{layout.v2_scope_dir()} does not exist: no Slurm stepd scope "
                                 f"for node {layout.nodename}")
        if not os.path.isdir(step):
            raise JobGone(f"job {job.job_id} has no {step} (job ended, or no "
                          f"PrologFlags=contain)", job.job_id)
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise JobGone(f"job {job.job_id} ended before pid {pid} could be adopted "
                          f"({os.path.dirname(d)} vanished)", job.job_id) from None
        except PermissionError as e:
            raise PermissionDenied(f"cannot create {d}: {e.strerror}", d) from None
        _write_pid(procs, pid, job.job_id, what)
        written.append((ctrl, d, rel))
    if verify:
        have = {}
        for hid, ctrls, path in _read_proc_cgroup(pid):
            for c in ctrls.split(","):
                have[c] = path
            if hid == 0 and ctrls == "":
                have[""] = path
        for ctrl, d, rel in written:
            if have.get(ctrl) != rel:
                if not _pid_alive(pid):
                    raise PidGone(f"pid {pid} exited during adoption", pid)
                raise AdoptionFailed(f"pid {pid} written to {d} but /proc/{pid}/cgroup shows "
                                     f"{ctrl or 'cgroup2'}:{have.get(ctrl)!s} (moved again?)")
    return [d for _, d, _ in written]


def user_fallback_targets(layout, uid):
    """Pure: ``[(controller, dir, expected path)]`` of the user-level fallback cgroup:
    v1 ``<prefix>/uid_<U>`` in every usable controller; v2 the configured
    ``v2_user_cgroup`` (None if not configured)."""
    if layout.version == 1:
        rel = f"{layout.v1_prefix}/uid_{uid}"
        return [(c, f"{m}{rel}", rel) for c, m in sorted(layout.v1_mounts.items())]
    d = layout.v2_user_dir(uid)
    if d is None:
        return None
    return [("", d, d[len(layout.v2_mount):])]


def adopt_user(layout, pid, uid, *, verify=True):
    """Move ``pid`` into the user-level fallback cgroup of ``uid`` (v1: existing
    ``uid_<U>`` dirs; v2: the configured cgroup, created if missing). Returns dirs written."""
    pid = int(pid)
    if not _pid_alive(pid):
        raise PidGone(f"pid {pid} does not exist (exited before adoption)", pid)
    targets = user_fallback_targets(layout, uid)
    if targets is None:
        raise LayoutNotFound("no cgroup/v2 user-level fallback cgroup configured "
                             "(v2_user_cgroup)")
    written = []
    for ctrl, d, rel in targets:
        if layout.version == 2:
            os.makedirs(d, exist_ok=True)
        elif not os.path.isdir(d):
            continue
        _write_pid(f"{d}/cgroup.procs", pid, None, f"user {uid} fallback cgroup")
        written.append((ctrl, d, rel))
    if not written:
        raise JobGone(f"user {uid} has no Slurm cgroup (uid_{uid}) on node {layout.nodename}")
    if verify:
        have = {}
        for hid, ctrls, path in _read_proc_cgroup(pid):
            for c in ctrls.split(","):
                have[c] = path
        for ctrl, d, rel in written:
            if have.get(ctrl) != rel:
                raise AdoptionFailed(f"pid {pid} written to {d} but /proc/{pid}/cgroup shows "
                                     f"{have.get(ctrl)!s}")
    return [d for _, d, _ in written]
