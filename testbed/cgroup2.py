"""Real Slurm on cgroup v2 on this hybrid host (v1 controllers + cgroup2 at /sys/fs/cgroup/unified).

Each compute node gets a cgroup2 subtree of its own, `<MOUNT>/<prefix>-tb/<node>` with a
`system.slice` in it (Slurm's mkdir of `system.slice/<node>_slurmstepd.scope` is not
recursive; systemd makes system.slice on a real node). The node's namespace holder starts in
that cgroup and unshares a cgroup namespace; its mount namespace mounts a fresh cgroup2 at
MOUNT (node_init.sh), so inside the node the subtree is the cgroup root, as on a v2 host.
Every command run on the node is first moved into that cgroup, then enters the node's
namespaces including the cgroup one (`prefix_argv`), else its /proc/self/cgroup would not
match the mount. slurmd runs with the LD_PRELOAD shim unified_only.c (see there: needed on a
hybrid host only). No controller is enabled anywhere, and memory cgroups are never touched.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

MOUNT = Path("/sys/fs/cgroup/unified")
SHIM_SOURCE = Path(__file__).resolve().parent / "unified_only.c"


def subtree(prefix: str) -> Path:
    return MOUNT / f"{prefix}-tb"


def node_dir(prefix: str, node: str) -> Path:
    return subtree(prefix) / node


def prepare(prefix: str, node: str) -> Path:
    d = node_dir(prefix, node)
    (d / "system.slice").mkdir(parents=True, exist_ok=True)
    return d


def prefix_argv(prefix: str, node: str, nsenter: list[str], argv: list[str]) -> list[str]:
    """`nsenter -t H ... -- argv` for a v2 node: moved into the node's cgroup first, and into
    its cgroup namespace (-C)."""
    assert nsenter[0] == "nsenter" and nsenter[-1] == "--", nsenter
    return ["/bin/sh", "-c", f'echo $$ > {node_dir(prefix, node)}/cgroup.procs && exec "$@"', "sh",
            *nsenter[:-1], "-C", "--", *argv]


def build_shim(dest: Path) -> Path:
    """Compile unified_only.c to `dest` (at bring-up, into the state dir)."""
    p = subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(dest), str(SHIM_SOURCE), "-ldl"],
                       capture_output=True, text=True, timeout=120)
    if p.returncode:
        raise RuntimeError(f"building {SHIM_SOURCE}: {p.stderr.strip()[-800:]}")
    return dest


def remove(prefix: str) -> bool:
    """Kill whatever is left in the subtree (all of it ours) and remove it depth-first.
    True when it is gone."""
    from .cluster import rmdir_retry
    top = subtree(prefix)
    if not top.is_dir():
        return True
    for _ in range(50):
        try:
            (top / "cgroup.kill").write_text("1")      # every process below, frozen or not
        except OSError:
            pass
        if not _pids(top):
            break
        time.sleep(0.1)
    for pid in _pids(top):                              # cgroup.kill refused: by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    return all([rmdir_retry(d, tries=40) for d in [*dirs, top]])


def _pids(top: Path) -> list[int]:
    out = []
    for procs in top.rglob("cgroup.procs"):
        try:
            out += [int(x) for x in procs.read_text().split()]
        except OSError:
            pass
    return out


def leftovers(prefix: str) -> list[str]:
    return [f"cgroup2 {subtree(prefix)}"] if subtree(prefix).exists() else []
