"""Adoption: put a pid into a job's extern step the way Slurm does, or by cgroup writes.

1. **The stepd way** (pam_slurm_adopt's): REQUEST_ADD_EXTERN_PID to the job's extern
   slurmstepd (:mod:`cgroups.stepd`). Slurm then adds the pid to every cgroup of the step
   (memory included), its process tracking, its accounting and ``ulimit_pam_adopt``.
   Afterwards /proc/PID/cgroup is read back: every controller in which the step exists must
   show it (v1 ``.../step_extern``, v2 anywhere below ``.../step_extern/``); a controller the
   stepd left out is written directly and said so in ``Adoption.reason``.
2. **The fallback** when the stepd cannot be used (socket gone, version refused, timeout, rc
   error): the pid is written to ``cgroup.procs`` of the job's ``step_extern`` in **every**
   controller where that directory exists, memory included (v1), or to
   ``.../step_extern/user/task_special`` (v2, created if missing as slurmstepd does). Slurm's
   accounting does not see such a pid; the cgroups (limits, scancel) do.

Writing a pid that is already there is a no-op for the kernel: adoption is idempotent.

3. **Entry by the process itself** (cgroup v1, :func:`open_entry`): the extern step's ``tasks``
   files, opened here and handed to a single-threaded process that writes ``0`` into each.
   The kernel then moves only the calling thread and skips the global
   ``cgroup_threadgroup_rwsem`` (``cgroup_procs_write_start`` in kernel/cgroup/cgroup.c:
   "If we migrate a single thread ... we can skip the global lock"), so the move costs no RCU
   grace period: 0.03 ms instead of 6-20 ms measured on this machine's 6.18 kernel. The stepd
   way still follows (its writes are then no-ops; its accounting is what it adds). cgroup v2
   has no such path (``cgroup.threads`` only moves threads within one domain).
"""
import errno
import os
from dataclasses import dataclass

from .errors import (AdoptionFailed, JobGone, LayoutNotFound, PermissionDenied, PidGone,
                     StepdError)
from . import paths as _p
from .jobs import read_small


@dataclass(frozen=True, slots=True)
class Adoption:
    """How a pid was adopted into a job.

    how      "stepd" (REQUEST_ADD_EXTERN_PID accepted) or "cgroup" (direct writes)
    reason   why the fallback was used (None when how == "stepd" and nothing was missing;
             with how == "stepd", which controllers had to be written directly)
    dirs     the step's cgroup directories the pid is in (v1: one per controller; v2: the
             leaf written, or the step directory when the stepd placed it)
    job_id, pid, stepd_version (the protocol version the stepd answered, or None)
    """

    how: str
    reason: str | None
    dirs: list
    job_id: int
    pid: int
    stepd_version: int | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Pure: one cgroup the pid must end up in: ``ctrl`` ("" on v2), ``dir`` to write,
    ``rel`` the path /proc/PID/cgroup shows, ``step_rel`` the step's path (v2: the stepd may
    choose any leaf below it)."""

    ctrl: str
    dir: str
    rel: str
    step_rel: str

    def shown(self, have, by_stepd):
        """Does the map {controller: path} of /proc/PID/cgroup show this target?"""
        got = have.get(self.ctrl)
        if got == self.rel:
            return True
        return by_stepd and got is not None and (got == self.step_rel or
                                                 got.startswith(self.step_rel + "/"))


def extern_targets(layout, job, isdir=os.path.isdir):
    """The cgroups of ``job``'s extern step that exist (``isdir``): v1 every controller of
    the layout (memory included) whose ``step_extern`` exists; v2 the step's
    ``user/task_special``. Pure apart from ``isdir``. Raises LayoutNotFound for a SLUID job or
    an unknown v1 owner, JobGone when the step exists nowhere."""
    if job.job_id is None:
        raise LayoutNotFound(f"{job}: cannot adopt into a job known only by its SLUID")
    if layout.version == 1:
        if job.uid is None:
            raise LayoutNotFound(f"job {job.job_id}: owner uid unknown, cannot build the v1 "
                                 f"path uid_<U>/job_{job.job_id}")
        rel = layout.v1_rel_step(job.uid, job.job_id)
        mounts = {}                               # "cpu,cpuacct" is one hierarchy: once
        for c, m in sorted(layout.v1_mounts.items()):
            mounts.setdefault(m, c)
        found = [Target(c, f"{m}{rel}", rel, rel) for m, c in mounts.items()
                 if isdir(f"{m}{rel}")]
        where = layout.v1_prefix
    else:
        leaf = layout.v2_rel_task_special(job.job_id)
        step = leaf[:-len("/user/task_special")]
        found = [Target("", layout.v2_mount + leaf, leaf, step)] \
            if isdir(layout.v2_mount + step) else []
        where = layout.v2_scope
    if not found:
        raise JobGone(f"job {job.job_id} has no step_extern cgroup under {where} (job ended, "
                      f"or no PrologFlags=contain)", job.job_id)
    return found


def open_entry(layout, job):
    """cgroup v1 only: ``[(Target, fd)]``, the ``tasks`` file of every controller where
    ``job``'s extern step exists (memory included), opened for writing, for a single-threaded
    process to enter by writing ``0`` (module docstring, 3). The caller closes the fds.
    Raises JobGone / LayoutNotFound / PermissionDenied."""
    if layout.version != 1:
        raise LayoutNotFound("entry by the process itself needs cgroup v1 (tasks files)")
    out = []
    try:
        for t in extern_targets(layout, job):
            out.append((t, _open_for_write(f"{t.dir}/tasks", job.job_id, "enter")))
    except BaseException:
        for _, fd in out:
            os.close(fd)
        raise
    return out


def _open_for_write(path, job_id, why):
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise JobGone(f"job {job_id} ended: {path} no longer exists", job_id) from None
    except PermissionError as e:
        raise PermissionDenied(f"cannot open {path} to {why} it: {e.strerror} (must run as "
                               f"root)", path) from None


def _write_pid(path, pid, job_id, what):
    """Write ``pid`` into the cgroup.procs file ``path``; map errno to our exceptions."""
    fd = _open_for_write(path, job_id, f"adopt pid {pid} into {what} through")
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


def _mkdir_leaf(d, job_id, pid):
    """v2: create step_extern/user/task_special as slurmstepd does on first use."""
    try:
        os.mkdir(d)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise JobGone(f"job {job_id} ended before pid {pid} could be adopted "
                      f"({os.path.dirname(d)} vanished)", job_id) from None
    except PermissionError as e:
        raise PermissionDenied(f"cannot create {d}: {e.strerror}", d) from None


def _write_targets(targets, pid, job_id, version):
    what = f"job {job_id} extern step"
    for t in targets:
        if version == 2:
            _mkdir_leaf(t.dir, job_id, pid)
        _write_pid(f"{t.dir}/cgroup.procs", pid, job_id, what)


def _check_pid(pid):
    pid = int(pid)
    if pid <= 0:
        raise PidGone(f"invalid pid {pid}", pid)
    if not _pid_alive(pid):
        raise PidGone(f"pid {pid} does not exist (exited before adoption)", pid)
    return pid


def _pid_alive(pid):
    return os.path.exists(f"/proc/{pid}")


def _proc_cgroup_map(pid):
    """{controller: path} of /proc/PID/cgroup; the v2 line under ""."""
    data = read_small(f"/proc/{pid}/cgroup")
    if not data:
        raise PidGone(f"pid {pid} exited during adoption (cannot read /proc/{pid}/cgroup)", pid)
    have = {}
    for hid, ctrls, path in _p.parse_proc_cgroup(data.decode("utf-8", "replace")):
        for c in ctrls.split(","):
            have[c] = path
    return have


def _missing(targets, pid, by_stepd):
    have = _proc_cgroup_map(pid)
    return [t for t in targets if not t.shown(have, by_stepd)], have


def _stepd_add(layout, job, pid, timeout):
    """REQUEST_ADD_EXTERN_PID; the stepd's protocol version, or a StepdError."""
    from .stepd import connect
    with connect(layout.extern_socket(job.job_id), timeout) as c:
        c.add_extern_pid(pid)
        return c.version


def _after_stepd(layout, job, pid, version, verify):
    """Check what the stepd did; write any controller it left out. Returns an Adoption."""
    try:
        targets = extern_targets(layout, job)
    except (JobGone, LayoutNotFound) as e:     # e.g. v1 owner unknown: nothing to compare
        return Adoption("stepd", f"not verified: {e}", [], job.job_id, pid, version)
    if not verify:
        return Adoption("stepd", None, [t.dir for t in targets], job.job_id, pid, version)
    missing, have = _missing(targets, pid, True)
    reason = None
    if missing:
        _write_targets(missing, pid, job.job_id, layout.version)
        _verify(missing, pid, False)
        reason = ("the stepd added the pid but left it out of " +
                  ", ".join(t.ctrl or "cgroup2" for t in missing) + ": written directly")
    dirs = [t.dir if (t in missing or t.ctrl) else layout.v2_mount + have[""]
            for t in targets]
    return Adoption("stepd", reason, dirs, job.job_id, pid, version)


def _verify(targets, pid, by_stepd):
    missing, have = _missing(targets, pid, by_stepd)
    if missing:
        if not _pid_alive(pid):
            raise PidGone(f"pid {pid} exited during adoption", pid)
        t = missing[0]
        raise AdoptionFailed(f"pid {pid} written to {t.dir} but /proc/{pid}/cgroup shows "
                             f"{t.ctrl or 'cgroup2'}:{have.get(t.ctrl)!s} (moved again?)")


def _fallback(layout, job, pid, reason, verify, version):
    if layout.version == 1:
        base = layout.v1_base(layout.track)
        if not os.path.isdir(base):
            raise LayoutNotFound(f"{base} does not exist: no Slurm cgroups for node "
                                 f"{layout.nodename} (wrong prefix or slurmd not running?)")
    elif not os.path.isdir(layout.v2_scope_dir()):
        raise LayoutNotFound(f"{layout.v2_scope_dir()} does not exist: no Slurm stepd scope "
                             f"for node {layout.nodename}")
    targets = extern_targets(layout, job)
    _write_targets(targets, pid, job.job_id, layout.version)
    if verify:
        _verify(targets, pid, False)
    return Adoption("cgroup", reason, [t.dir for t in targets], job.job_id, pid, version)


def adopt(layout, pid, job, *, stepd_timeout=0.5, verify=True, use_stepd=True):
    """Adopt ``pid`` into ``job``'s extern step (``job``: anything with ``job_id`` and, on
    v1 for the fallback, ``uid``); returns an :class:`Adoption`.

    The stepd way first (bounded by ``stepd_timeout`` seconds for the whole exchange), the
    cgroup writes when the stepd cannot be used (module docstring). ``verify`` reads
    /proc/PID/cgroup back. Raises PidGone, JobGone, PermissionDenied, LayoutNotFound,
    AdoptionFailed (all CgroupError). Idempotent.
    """
    pid = _check_pid(pid)
    if job.job_id is None:
        raise LayoutNotFound(f"{job}: cannot adopt into a job known only by its SLUID")
    if not use_stepd:
        return _fallback(layout, job, pid, "stepd not asked (use_stepd=False)", verify, None)
    try:
        version = _stepd_add(layout, job, pid, stepd_timeout)
    except StepdError as e:
        return _fallback(layout, job, pid, f"stepd not used: {e}", verify, None)
    return _after_stepd(layout, job, pid, version, verify)


# ---------------------------------------------------------------- user-level fallback

def user_fallback_targets(layout, uid):
    """Pure: ``[(controller, dir, expected path)]`` of the user-level fallback cgroup:
    v1 ``<prefix>/uid_<U>`` in every controller; v2 the configured ``v2_user_cgroup`` (None
    if not configured)."""
    if layout.version == 1:
        rel = f"{layout.v1_prefix}/uid_{uid}"
        return [(c, f"{m}{rel}", rel) for c, m in sorted(layout.v1_mounts.items())]
    d = layout.v2_user_dir(uid)
    if d is None:
        return None
    return [("", d, d[len(layout.v2_mount):])]


def adopt_user(layout, pid, uid, *, verify=True):
    """Move ``pid`` into the user-level fallback cgroup of ``uid`` (v1: the existing
    ``uid_<U>`` dirs; v2: the configured cgroup, created if missing). Returns dirs written."""
    pid = _check_pid(pid)
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
        written.append(Target(ctrl, d, rel, rel))
    if not written:
        raise JobGone(f"user {uid} has no Slurm cgroup (uid_{uid}) on node {layout.nodename}")
    if verify:
        _verify(written, pid, False)
    return [t.dir for t in written]
