"""pid <-> Slurm job, as the lookup needs it.

Interface used by daemon.lookup (any object with these two methods works, tests use that):

    job_pids() -> iterable of int        pids currently in Slurm job cgroups (may be stale)
    job_of_pid(pid) -> (job_id, job_uid) | None

`CgroupJobs` reads /proc/PID/cgroup (a `job_<N>` path component names the job; `uid_<U>`, if
present as in cgroup v1 layouts, names the owner, otherwise the process owner is used) and
finds job pids from the `cgroup.procs` files below `job_<N>` directories under the configured
cgroup roots.  The directory list is cached for `refresh` seconds; cgroup.procs is read fresh
on every call.  When the project's `cgroups` package provides `job_of_pid` it is preferred for
pid -> job (it knows every Slurm layout, including 26.05 SLUID directories).
"""
from __future__ import annotations

import os
import re
import threading
import time

_JOB_RE = re.compile(r"/job_(\d+)(?:/|$)")
_UID_RE = re.compile(r"/uid_(\d+)(?:/|$)")
_JOBDIR_RE = re.compile(r"^job_(\d+)$")


def default_roots() -> list[str]:
    base = "/sys/fs/cgroup"
    if os.path.exists(f"{base}/cgroup.controllers"):
        return [base]  # pure cgroup v2
    roots = [f"{base}/{c}" for c in ("freezer", "unified", "cpuset") if os.path.isdir(f"{base}/{c}")]
    return roots[:2] if roots else [base]


def parse_proc_cgroup(text: str):
    """-> (job_id, uid or None) from /proc/PID/cgroup text, or None."""
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


class CgroupJobs:
    def __init__(self, roots: list[str] | None = None, refresh: float = 2.0, max_depth: int = 8,
                 proc: str = "/proc", use_cgroups_pkg: bool = True):
        self.roots = list(roots) if roots else default_roots()
        self.refresh = refresh
        self.max_depth = max_depth
        self.proc = proc
        self._lock = threading.Lock()
        self._dirs: list[str] = []
        self._stamp = 0.0
        self._pkg_job_of_pid = None
        if use_cgroups_pkg:
            try:
                import cgroups  # noqa: F401
                fn = getattr(cgroups, "job_of_pid", None)
                if callable(fn):
                    self._pkg_job_of_pid = fn
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
            try:
                with open(f"{d}/cgroup.procs", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            for tok in data.split():
                try:
                    yield int(tok)
                except ValueError:
                    pass

    # -- pid -> job -----------------------------------------------------------------------------
    def job_of_pid(self, pid: int):
        if self._pkg_job_of_pid is not None:
            try:
                info = self._pkg_job_of_pid(pid)
            except Exception:
                info = None
            got = _coerce_pkg_info(info)
            if got is not None:
                return got
        try:
            with open(f"{self.proc}/{pid}/cgroup") as f:
                text = f.read()
        except OSError:
            return None
        r = parse_proc_cgroup(text)
        if r is None:
            return None
        job, uid = r
        if uid is None:
            try:
                uid = os.stat(f"{self.proc}/{pid}").st_uid
            except OSError:
                return None
        return job, uid


def _coerce_pkg_info(info):
    """Accept what cgroups.job_of_pid returns: None, (job, uid) or an object/dict with fields."""
    if info is None:
        return None
    if isinstance(info, tuple) and len(info) >= 2 and all(isinstance(x, int) for x in info[:2]):
        return info[0], info[1]
    get = info.get if isinstance(info, dict) else (lambda k, d=None: getattr(info, k, d))
    job = get("job_id", None)
    uid = get("uid", None)
    if uid is None:
        uid = get("user_id", None)
    if isinstance(job, int) and isinstance(uid, int):
        return job, uid
    return None
