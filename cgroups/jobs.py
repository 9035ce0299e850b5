"""I/O edge: jobs on this node (stepd sockets + cgroup tree), pid -> job, pids in job cgroups.

Owner of a job (uid):

* v1: the ``uid_<U>`` component of the job's cgroup path. slurmstepd creates it (as root) from
  the job credential, so it is as trustworthy as Slurm itself. ``verify_owner=True`` also asks
  each job's extern slurmstepd (below) and drops jobs where the two disagree.
* v2: the tree carries no uid and every directory is root-owned, and the extern step's
  placeholder ("sleep 100000000") runs as root. Two local sources, both reliable:

  - the **extern slurmstepd itself** (:mod:`cgroups.stepd`, REQUEST_STEP_UID over
    ``<spool>/<node>_<job>.4294967292``, the source pam_slurm_adopt uses): the socket is in the
    root-owned spool dir, its listener is checked to run as root (SO_PEERCRED) and the uid
    comes from the stepd's own job record. Works for a job with only its extern step on this
    node (salloc + ssh, the main case). Bounded: ``stepd_timeout`` per stepd (0.5 s) and
    ``stepd_budget`` for the whole listing (2 s); a stepd that fails leaves the owner unknown
    and adds a note to ``JobList.problems``.
  - the **real uid of the task processes of the job's other steps**
    (``job_<J>/step_<S>/user/task_<N>``, S not extern): slurmstepd setuid()s to the job owner
    before it execs a task, and only root can place processes in those root-owned cgroups,
    so a process there with real uid U was started by Slurm for the job's owner. A task that
    runs a setuid program keeps its real uid. Needs no IPC, but exists only for jobs with
    a running task step on this node.

  ``stepd="fallback"`` (default): task processes first, the stepd when there is none.
  Measured (bench/bench_cgroups.py, test bed): the task scan costs ~65 µs per job that has a
  task step and about one directory listing for an extern-only job; one exchange with the
  real Slurm 22.05 slurmstepd costs ~115 µs median (it starts a thread per connection), so
  the scan is the cheaper first source and the stepd covers the jobs it cannot.
  ``stepd="always"``: the stepd only. ``stepd="never"``: task processes only.
  ``owner_resolver(layout, job_id) -> uid|None`` is consulted last. A job whose owner stays
  unknown (``Job.uid is None``) is never reported as a given user's.
"""
from dataclasses import dataclass, field
import os
import stat as _stat
import time as _time

from . import paths as _p
from .paths import SLURM_EXTERN_CONT


@dataclass(slots=True, unsafe_hash=True)
class Job:
    """A job with an extern step on this node.

    job_id, uid (owner or None if unknown on v2), start_time (ctime of the extern stepd socket
    = the job's start on this node), node, socket (path of the extern stepd socket),
    extern_cgroups ({controller: step_extern dir} on v1, {"": step_extern dir} on v2),
    computed on first access from ``layout``.
    """

    job_id: int
    uid: int | None = field(compare=False)
    start_time: float = field(compare=False)
    node: str
    socket: str | None = field(default=None, compare=False, repr=False)
    layout: object = field(default=None, compare=False, repr=False)
    _ext: dict | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def extern_cgroups(self):
        if self._ext is None:
            L = self.layout
            if L is None or (L.version == 1 and self.uid is None):
                self._ext = {}
            elif L.version == 1:
                self._ext = {c: L.v1_step_dir(c, self.uid, self.job_id) for c in L.v1_mounts}
            else:
                self._ext = {"": f"{L.v2_job_dir(self.job_id)}/step_extern"}
        return self._ext


class JobList(list):
    """A list of :class:`Job` with ``problems``: admin-readable notes about extern stepd
    sockets that could not be matched to a job cgroup (stale sockets, SLUID-named dirs)."""

    def __init__(self, jobs=(), problems=()):
        super().__init__(jobs)
        self.problems = list(problems)


_EXTERN_SUFFIX = "." + str(SLURM_EXTERN_CONT)


def extern_socket_names(spool_dir, node):
    """``{job_id: socket_path}`` of names like ``<node>_<job>.4294967292`` (no stat calls).

    This runs on every login: one listdir, string checks only; other steps' sockets
    (``.<step>[.<het>]``), other nodes' (``<other>_``) and odd names are skipped."""
    try:
        names = os.listdir(spool_dir)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    pre = node + "_"
    lp, ls = len(pre), len(_EXTERN_SUFFIX)
    base = spool_dir if spool_dir.endswith("/") else spool_dir + "/"
    for name in names:
        if name.startswith(pre) and name.endswith(_EXTERN_SUFFIX):
            j = name[lp:-ls]
            if 0 < len(j) <= 10 and j.isdigit() and j.isascii():
                out[int(j)] = base + name
    return out


def _socket_ctime(path):
    """ctime of a unix socket file, or None if it vanished or is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ctime if _stat.S_ISSOCK(st.st_mode) else None


def _subdirs(path):
    try:
        with os.scandir(path) as it:
            return [e.name for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_small(path, limit=65536):
    """The bytes of a small kernel file (/proc, cgroupfs), at most `limit`, with os.open/
    os.read and no Python file object; None if it does not exist or cannot be read.  Reads
    until EOF: cgroupfs hands out one page per read (a cgroup.procs of ~680 pids)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, limit)
        parts = [data]
        left = limit - len(data)
        while data and left > 0:
            data = os.read(fd, left)
            parts.append(data)
            left -= len(data)
        return b"".join(parts)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_pids(path):
    data = read_small(path, 1 << 20)
    if not data:
        return []
    try:
        return [int(x) for x in data.split()]
    except ValueError:
        return []


def real_uid(pid, proc="/proc"):
    """Real uid of ``pid`` from /proc/PID/status, or None (gone, unreadable, malformed)."""
    data = read_small(f"{proc}/{pid}/status", 8192)
    if not data:
        return None
    i = data.find(b"\nUid:")
    if i < 0:
        return None
    try:
        return int(data[i + 5:i + 64].split()[0])   # "Uid:\t<real>\t<eff>\t<saved>\t<fs>"
    except (ValueError, IndexError):
        return None



def v2_owner_from_tasks(job_dir):
    """Owner of a v2 job from its non-extern task processes (see module docstring), or None."""
    for step in _subdirs(job_dir) or ():
        if not step.startswith("step_") or step == "step_extern":
            continue
        user = f"{job_dir}/{step}/user"
        for task in _subdirs(user) or ():
            if not task.startswith("task_") or task == "task_special":
                continue
            for pid in _read_pids(f"{user}/{task}/cgroup.procs"):
                uid = real_uid(pid)
                if uid is not None:
                    return uid
    return None


class _StepdAsker:
    """REQUEST_STEP_UID with a per-call timeout and a budget for the whole listing."""

    __slots__ = ("timeout", "end", "problems", "_query")

    def __init__(self, timeout, budget, problems):
        self.timeout = timeout
        self.end = _time.monotonic() + budget
        self.problems = problems
        self._query = None

    def uid(self, job_id, spath):
        if self._query is None:
            from .stepd import step_uid
            self._query = step_uid
        left = self.end - _time.monotonic()
        if left <= 0:
            self.problems.append(f"job {job_id}: owner not asked from its stepd ({spath}): "
                                 f"the listing's stepd budget is spent")
            return None
        from .errors import StepdError
        try:
            return self._query(spath, min(self.timeout, left))
        except StepdError as e:
            self.problems.append(f"job {job_id}: owner unknown: {e}")
            return None


STEPD_MODES = ("fallback", "always", "never")


def list_jobs(layout, uid=None, *, owner_resolver=None, stepd="fallback", verify_owner=False,
              stepd_timeout=0.5, stepd_budget=2.0):
    """Jobs with an extern step on this node, newest first (see :func:`paths.newest`).

    ``uid`` keeps only that user's jobs. Each job is cross-checked with the cgroup tree: an
    extern stepd socket whose job has no ``step_extern`` cgroup is left out and explained in
    ``JobList.problems``. Cost: one directory listing of the spool dir plus O(jobs) listings.
    Owner sources (module docstring): ``stepd`` = "fallback" | "always" | "never" chooses how
    v2 uses the extern slurmstepd; ``verify_owner`` asks the stepd of every job that would be
    listed (v1 and v2) and drops a job whose stepd names another uid or cannot be asked.
    ``stepd_timeout`` bounds one stepd exchange, ``stepd_budget`` all of them together
    (seconds). ``owner_resolver(layout, job_id) -> uid|None`` is consulted on v2 when nothing
    else tells the owner.
    """
    if stepd not in STEPD_MODES:
        raise ValueError(f"stepd must be one of {STEPD_MODES}, not {stepd!r}")
    socks = extern_socket_names(layout.spool_dir, layout.nodename)
    if not socks:
        return JobList()
    problems = []
    asker = _StepdAsker(stepd_timeout, stepd_budget, problems) \
        if (verify_owner or (stepd != "never" and layout.version == 2)) else None
    if layout.version == 1:
        jobs = _v1_jobs(layout, uid, socks, asker if verify_owner else None, problems)
    else:
        owners = _V2Owners(stepd, asker, owner_resolver)
        jobs = _v2_jobs(layout, uid, socks, owners, verify_owner, problems)
    jobs.sort(key=lambda j: (j.start_time, j.job_id), reverse=True)
    return JobList(jobs, problems)


def _job_number(d):
    """'job_<J>' -> J, else None (string checks only: this runs per job at every login)."""
    j = d[4:]
    if d.startswith("job_") and 0 < len(j) <= 10 and j.isdigit() and j.isascii():
        return int(j)
    return None


def _v1_owner_dirs(base, uid):
    """{uid: [names under uid_<U>]} in the tracking controller (one listing per user)."""
    if uid is not None:
        return {uid: _subdirs(f"{base}/uid_{uid}") or ()}
    return {int(d[4:]): _subdirs(f"{base}/{d}") or ()
            for d in _subdirs(base) or () if d.startswith("uid_") and _p._dec(d[4:])}


def _v1_jobs(layout, uid, socks, verifier, problems):
    """v1: a job is listed when its socket exists and ``uid_<U>/job_<J>`` exists in the
    tracking controller (slurmstepd creates it with step_extern; a missing step_extern is
    adopt()'s JobGone). The owner is U; ``verifier`` (a _StepdAsker) cross-checks it."""
    base = layout.v1_base(layout.track)
    jobs, seen = [], set()
    for owner, names in _v1_owner_dirs(base, uid).items():
        for d in names:
            jid = _job_number(d)
            spath = socks.get(jid) if jid is not None else None
            if spath is None:
                continue
            seen.add(jid)
            ctime = _socket_ctime(spath)
            if ctime is None:
                continue                          # the job ended meanwhile
            if verifier is not None and not _verified(verifier, jid, spath, owner, problems):
                continue
            jobs.append(Job(jid, owner, ctime, layout.nodename, spath, layout=layout))
    if uid is None:
        for jid in socks.keys() - seen:
            problems.append(f"job {jid}: extern stepd socket {socks[jid]} has no job "
                            f"cgroup under {base} (stale socket or job ending)")
    return jobs


class _V2Owners:
    """v2 owner of a job directory from the sources ``stepd`` selects (module docstring).
    ``owner(layout, job_id, job_dir, socket)`` returns ``(uid or None, whether the stepd
    told it)``."""

    __slots__ = ("stepd", "asker", "resolver")

    def __init__(self, stepd, asker, resolver):
        self.stepd, self.asker, self.resolver = stepd, asker, resolver

    def owner(self, layout, jid, jdir, spath):
        uid = v2_owner_from_tasks(jdir) if self.stepd != "always" else None
        asked = False
        if uid is None and self.stepd != "never":
            uid = self.asker.uid(jid, spath)
            asked = uid is not None
        if uid is None and self.resolver is not None:
            uid = self.resolver(layout, jid)
        return uid, asked


def _v2_missing_dir(jid, jdir, scope, sluids):
    """The problem note for a socket whose job has no ``job_<J>/step_extern``."""
    if sluids:
        return (f"job {jid}: no {jdir}/step_extern but {scope} holds SLUID-named job "
                f"directories ({', '.join(sluids[:3])}...): Slurm 26.05+ without "
                f"CgroupJobIdPaths=yes in cgroup.conf; set it so job ids can be mapped")
    return (f"job {jid}: extern stepd socket present but {jdir}/step_extern does not exist "
            f"(stale socket or job ending)")


def _v2_jobs(layout, uid, socks, owners, verify_owner, problems):
    scope = layout.v2_scope_dir()
    dirs = set(_subdirs(scope) or ())
    sluids = sorted(d for d in dirs if _p.is_sluid(d))
    jobs = []
    for jid, spath in socks.items():
        jdir = f"{scope}/job_{jid}"
        if f"job_{jid}" not in dirs or not os.path.isdir(f"{jdir}/step_extern"):
            problems.append(_v2_missing_dir(jid, jdir, scope, sluids))
            continue
        owner, asked = owners.owner(layout, jid, jdir, spath)
        if uid is not None and owner != uid:
            continue
        ctime = _socket_ctime(spath)
        if ctime is None:
            continue
        if verify_owner and not asked and \
                not _verified(owners.asker, jid, spath, owner, problems):
            continue
        jobs.append(Job(jid, owner, ctime, layout.nodename, spath, layout=layout))
    return jobs


def _verified(asker, jid, spath, owner, problems):
    """Cross-check ``owner`` with the job's extern stepd; False (and a note) if they differ
    or the stepd cannot be asked."""
    got = asker.uid(jid, spath)
    if got is None:
        problems.append(f"job {jid}: left out: owner {owner} could not be confirmed by its stepd")
        return False
    if got != owner:
        problems.append(f"job {jid}: left out: cgroup says owner {owner}, its stepd "
                        f"({spath}) says {got}")
        return False
    return True


def user_jobs(layout, uid, **kw):
    """The jobs of ``uid`` with an extern step on this node, newest first."""
    return list_jobs(layout, uid, **kw)


_REF_CACHE = {}          # (/proc/PID/cgroup text, node) -> JobRef | None; bounded
_REF_CACHE_MAX = 1024


def job_of_pid(pid, node=None):
    """The Slurm job (and step) of ``pid`` from /proc/PID/cgroup, or None.

    Needs no layout. None when the pid does not exist (or vanished meanwhile) or is not in a
    Slurm job cgroup. ``node`` restricts matches to that node's prefix (several slurmds on one
    kernel). Returns a :class:`paths.JobRef` (shared: do not modify it); ``job_id`` is None for
    SLUID-named job dirs.  The parse of each distinct cgroup text is cached (processes of one
    step share it), so a caller-ID lookup pays one small read here.
    """
    data = read_small(f"/proc/{int(pid)}/cgroup")
    if not data:
        return None
    key = (data, node)
    try:
        return _REF_CACHE[key]
    except KeyError:
        pass
    ref = _p.job_from_proc_cgroup(data.decode("utf-8", "replace"), node)
    if len(_REF_CACHE) >= _REF_CACHE_MAX:
        _REF_CACHE.clear()
    _REF_CACHE[key] = ref
    return ref


def iter_job_dirs(layout):
    """Every cgroup directory where a job's processes can live: each job directory and all
    directories below it (v1: the tracking controller only).  Vanished directories are
    skipped."""
    if layout.version == 1:
        roots = [layout.v1_base(layout.track)]
    else:
        roots = [layout.v2_scope_dir()]
    stack = list(roots)
    while stack:
        d = stack.pop()
        if d not in roots:
            yield d
        for sub in _subdirs(d) or ():
            if layout.version == 2 and d in roots and not (sub.startswith("job_") or
                                                           _p.is_sluid(sub)):
                continue   # e.g. "system": stepds waiting for their job dir
            stack.append(f"{d}/{sub}")


def iter_job_pids(layout, dirs=None):
    """Yield the pids in this node's Slurm job cgroups (every ``cgroup.procs`` of
    ``iter_job_dirs``, or of ``dirs`` when a caller keeps that list), each pid once."""
    seen = set()
    for d in iter_job_dirs(layout) if dirs is None else dirs:
        for pid in _read_pids(f"{d}/cgroup.procs"):
            if pid not in seen:
                seen.add(pid)
                yield pid
