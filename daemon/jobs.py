"""pid <-> Slurm job, as the lookup needs it.

Interface used by daemon.lookup (any object with these two methods works; unit tests use that):

    job_pids() -> iterable of int        pids currently in Slurm job cgroups (may be stale)
    job_of_pid(pid) -> (job_id, job_uid) | None

pid -> job goes through the project's `cgroups.job_of_pid` (every Slurm layout: v1
`slurm[_<node>]/uid_<U>/job_<J>/...`, v2 `[<node>_]slurmstepd.scope/job_<J>/...`); without that
package, a `job_<N>` path component.  The owner is `uid_<U>` of v1 paths, else the process's
real uid (cgroup v2 paths carry no uid, the cgroups package resolves v2 owners the same way).
Job dirs named by an opaque Slurm 26.05 SLUID (no numeric id) count as "not in a job".

Job pids: `LayoutJobs` takes them from the layout the cgroups package discovers from
slurm.conf/cgroup.conf (the default); `CgroupJobs` scans configured roots (CgroupRoots) for
`job_<N>` directories, caching the directory list for `refresh` seconds and reading every
`cgroup.procs` fresh on each call.
"""
from __future__ import annotations

import os
import re
import threading
import time

from cgroups import jobs as _cg     # small readers shared with the cgroups package

_JOB_RE = re.compile(r"/job_(\d+)(?:/|$)")
_UID_RE = re.compile(r"/uid_(\d+)(?:/|$)")
_JOBDIR_RE = re.compile(r"^job_(\d+)$")


def default_roots() -> list[str]:
    base = "/sys/fs/cgroup"
    if os.path.exists(f"{base}/cgroup.controllers"):
        return [base]  # pure cgroup v2
    roots = [f"{base}/{c}" for c in ("freezer", "unified") if os.path.isdir(f"{base}/{c}")]
    return roots or [base]


def parse_proc_cgroup(text: str):
    """Fallback parser: -> (job_id, uid or None) from /proc/PID/cgroup text, or None."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2]
        m = _JOB_RE.search(path)
        if m:
            u = _UID_RE.search(path)
            return int(m.group(1)), (int(u.group(1)) if u else None)
    return None


def real_uid(pid: int, proc: str = "/proc") -> int | None:
    return _cg.real_uid(pid, proc)


class CgroupJobs:
    def __init__(self, roots: list[str] | None = None, refresh: float = 2.0, max_depth: int = 8,
                 proc: str = "/proc", use_cgroups_pkg: bool = True, node: str | None = None):
        self.roots = list(roots) if roots else default_roots()
        self.refresh = refresh
        self.max_depth = max_depth
        self.proc = proc
        self.node = node
        self._lock = threading.Lock()
        self._dirs: list[str] = []
        self._stamp = 0.0
        self._pkg_job_of_pid = None
        if use_cgroups_pkg:
            try:
                import cgroups
                self._pkg_job_of_pid = cgroups.job_of_pid
            except Exception:
                self._pkg_job_of_pid = None

    # -- job pids -------------------------------------------------------------------------------
    def _scan_dirs(self) -> list[str]:
        """Every directory at or below a job_<N> directory (where processes can live)."""
        out: list[str] = []
        for root in self.roots:
            stack = [(root, 0, False)]
            while stack:
                path, depth, injob = stack.pop()
                if injob:
                    out.append(path)
                try:
                    it = os.scandir(path)
                except OSError:
                    continue
                with it:
                    for e in it:
                        try:
                            if not e.is_dir(follow_symlinks=False):
                                continue
                        except OSError:
                            continue
                        sub_injob = injob or bool(_JOBDIR_RE.match(e.name))
                        if depth + 1 <= self.max_depth or sub_injob:
                            stack.append((e.path, depth + 1, sub_injob))
        return out

    def job_dirs(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            if now - self._stamp > self.refresh:
                self._dirs = self._scan_dirs()
                self._stamp = now
            return self._dirs

    def invalidate(self):
        with self._lock:
            self._stamp = 0.0

    def job_pids(self):
        for d in self.job_dirs():
            yield from _cg._read_pids(f"{d}/cgroup.procs")

    # -- pid -> job -----------------------------------------------------------------------------
    def job_of_pid(self, pid: int):
        if self._pkg_job_of_pid is not None:
            try:
                ref = self._pkg_job_of_pid(pid, self.node)
            except Exception:
                ref = None
            if ref is None:
                return None
            job = getattr(ref, "job_id", None)
            if not isinstance(job, int):
                return None  # SLUID-named job dir (Slurm 26.05+) without a numeric id
            uid = getattr(ref, "uid", None)
            if uid is None:
                uid = real_uid(pid, self.proc)
            return (job, uid) if uid is not None else None
        data = _cg.read_small(f"{self.proc}/{pid}/cgroup")
        if not data:
            return None
        r = parse_proc_cgroup(data.decode("utf-8", "replace"))
        if r is None:
            return None
        job, uid = r
        if uid is None:
            uid = real_uid(pid, self.proc)
        return (job, uid) if uid is not None else None


class LayoutJobs(CgroupJobs):
    """Job pids from the node's discovered Slurm layout (cgroups.discover): the job cgroup
    directories are listed at most every `refresh` seconds, their cgroup.procs read fresh."""

    def __init__(self, layout, **kw):
        super().__init__(roots=["/nonexistent"], node=getattr(layout, "nodename", None), **kw)
        self.layout = layout

    def _scan_dirs(self) -> list[str]:
        return list(_cg.iter_job_dirs(self.layout))


def make_jobs(cfg, log=None):
    """The jobs source the config asks for: CgroupRoots (scan those trees for job_<N> dirs) or
    the Slurm layout discovered from SlurmConf by the cgroups package, else default roots."""
    if cfg.cgroup_roots:
        return CgroupJobs(cfg.cgroup_roots)
    try:
        import cgroups
        layout = cgroups.discover(cfg.slurm_conf, nodename=cfg.node_name)
        return LayoutJobs(layout)
    except Exception as e:
        if log is not None:
            log.warning("event=layout-discovery-failed error=%r fallback=scan roots=%s",
                        str(e), ",".join(default_roots()))
        return CgroupJobs(None)
