"""pid <-> Slurm job, as the lookup needs it.

Interface used by daemon.lookup (any object with these two methods works; unit tests use that):

    job_pids() -> iterable of int        pids in Slurm job cgroups now (job dirs listed afresh)
    job_of_pid(pid) -> (job_id, job_uid) | None
    job_cgroup_ids() -> {cgroup id: job_id}   the job dirs on cgroup2 (listed afresh)

pid -> job goes through the project's `cgroups.job_of_pid` (every Slurm layout: v1
`slurm[_<node>]/uid_<U>/job_<J>/...`, v2 `[<node>_]slurmstepd.scope/job_<J>/...`).  The owner is `uid_<U>` of v1 paths, else the process's
real uid (cgroup v2 paths carry no uid, the cgroups package resolves v2 owners the same way).
Job dirs named by an opaque Slurm 26.05 SLUID (no numeric id) count as "not in a job".

Job pids: `LayoutJobs` takes them from the layout the cgroups package discovers from
slurm.conf/cgroup.conf (the default); `CgroupJobs` scans configured roots (CgroupRoots) for
`job_<N>` directories.  Both list the job directories and read every `cgroup.procs` afresh on
each call (daemon.lookup.JobSockets calls it only when its index misses), so a job that
started a moment ago is seen.
"""
from __future__ import annotations

import os
import re

from cgroups import jobs as _cg     # small readers shared with the cgroups package
from cgroups.paths import CgroupParseError, match_slurm_path, parse_mounts

_JOBDIR_RE = re.compile(r"^job_(\d+)$")


def default_roots() -> list[str]:
    base = "/sys/fs/cgroup"
    if os.path.exists(f"{base}/cgroup.controllers"):
        return [base]  # pure cgroup v2
    roots = [f"{base}/{c}" for c in ("freezer", "unified") if os.path.isdir(f"{base}/{c}")]
    return roots or [base]


class CgroupJobs:
    def __init__(self, roots: list[str] | None = None, max_depth: int = 8,
                 proc: str = "/proc", node: str | None = None):
        self.roots = list(roots) if roots else default_roots()
        self.max_depth = max_depth
        self.proc = proc
        self.node = node

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

    def job_pids(self):
        for d in self._scan_dirs():
            yield from _cg._read_pids(f"{d}/cgroup.procs")

    def job_cgroup_ids(self) -> dict[int, int]:
        """cgroup id -> job id for every directory at or below a job directory on a cgroup2
        file system.  A cgroup2 directory's inode number is its cgroup id, what the kernel
        reports as the cgroup of a socket's maker (daemon.lookup.JobCgroups).  Directories
        of cgroup v1 hierarchies are left out: their inode numbers are not cgroup2 ids.  The
        job is read from the path as job_of_pid reads it (cgroups.paths.match_slurm_path)."""
        mounts = _cgroup2_mounts()
        out = {}
        for d in self._scan_dirs():
            ref = match_slurm_path(d, 2) if any(d.startswith(m) for m in mounts) else None
            if ref is None or ref["job_id"] is None:        # (a SLUID-named job dir)
                continue
            try:
                out[os.stat(d).st_ino] = ref["job_id"]
            except OSError:            # removed meanwhile
                continue
        return out

    # -- pid -> job -----------------------------------------------------------------------------
    def job_of_pid(self, pid: int):
        try:
            ref = _cg.job_of_pid(pid, self.node)
        except Exception:          # malformed /proc/PID/cgroup text: not a job we can name
            return None
        if ref is None or not isinstance(ref.job_id, int):
            return None            # not in a job, or a SLUID-named job dir (Slurm 26.05+)
        uid = ref.uid if ref.uid is not None else _cg.real_uid(pid, self.proc)
        return (ref.job_id, uid) if uid is not None else None


def _cgroup2_mounts() -> list[str]:
    """Mount points of cgroup2 file systems, each ending in "/" (the cgroups package's
    parse of /proc/self/mounts; none if the table cannot be read)."""
    try:
        v2 = parse_mounts((_cg.read_small("/proc/self/mounts", 1 << 20) or b"").decode()).v2
    except (CgroupParseError, UnicodeDecodeError):
        return []
    return [m.rstrip("/") + "/" for m in v2]


class LayoutJobs(CgroupJobs):
    """Job pids from the node's discovered Slurm layout (cgroups.discover)."""

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
        # SlurmConf when that file exists, else where slurmd keeps it (configless first)
        conf = cfg.slurm_conf if cfg.slurm_conf and os.path.isfile(cfg.slurm_conf) else None
        layout = cgroups.discover(conf, nodename=cfg.node_name)
        return LayoutJobs(layout)
    except Exception as e:
        if log is not None:
            log.warning("event=layout-discovery-failed error=%r fallback=scan roots=%s",
                        str(e), ",".join(default_roots()))
        return CgroupJobs(None)
