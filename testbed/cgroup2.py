"""Real Slurm on cgroup v2 on this hybrid host (v1 controllers + cgroup2 at /sys/fs/cgroup/unified).

Each compute node gets a cgroup2 subtree of its own, `<MOUNT>/<prefix>-tb/<node>` with a
`system.slice` in it (Slurm's mkdir of `system.slice/<node>_slurmstepd.scope` is not
recursive; systemd makes system.slice on a real node). The node's namespace holder starts in
that cgroup and unshares a cgroup namespace; its mount namespace mounts a fresh cgroup2 at
MOUNT (node_init.sh), so inside the node the subtree is the cgroup root, as on a v2 host.
Once the holder is up it moves on into the leaf `<node>/testbed`, and every command run on
the node is first moved into that leaf, then enters the node's namespaces including the
cgroup one (`prefix_argv`; else its /proc/self/cgroup would not match the mount). The node's
root cgroup stays empty: slurmd 24.11 moves every process it finds there into /system at
start and gives up when one of them exits meanwhile ("cannot empty the false root cgroup",
measured with the test bed's short-lived commands in the root). For the same reason slurmd
runs in the foreground in a cgroup of its own, `system.slice/slurmd.service`, as systemd runs
it on a v2 node (its daemonizing parent, exiting while 24.11 empties its starting cgroup,
made it fail the same way). slurmd runs with the LD_PRELOAD shim unified_only.c (see there:
needed on a hybrid host only). No controller is enabled anywhere, and memory cgroups are
never touched.
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


def leaf(prefix: str, node: str) -> Path:
    """Where the test bed's own processes on a node live (its holder, daemons, commands)."""
    return node_dir(prefix, node) / "testbed"


SLURMD_SERVICE = "system.slice/slurmd.service"


def prepare(prefix: str, node: str) -> Path:
    d = node_dir(prefix, node)
    (d / SLURMD_SERVICE).mkdir(parents=True, exist_ok=True)
    leaf(prefix, node).mkdir(exist_ok=True)
    return d


def slurmd_argv(argv: list[str], shim: Path) -> list[str]:
    """Run `argv` (slurmd -D ...) inside a v2 node: in its own service cgroup, with the shim."""
    return ["/bin/sh", "-c", f'echo $$ > {MOUNT}/{SLURMD_SERVICE}/cgroup.procs && exec "$@"', "sh",
            "env", f"LD_PRELOAD={shim}", *argv]


def park(prefix: str, node: str, pid: int) -> None:
    """Move the node's holder out of the root into the leaf (its cgroup namespace keeps the
    node's directory as its root)."""
    (leaf(prefix, node) / "cgroup.procs").write_text(str(pid))


def prefix_argv(prefix: str, node: str, nsenter: list[str], argv: list[str]) -> list[str]:
    """`nsenter -t H ... -- argv` for a v2 node: moved into the node's leaf first, and into
    its cgroup namespace (-C)."""
    assert nsenter[0] == "nsenter" and nsenter[-1] == "--", nsenter
    return ["/bin/sh", "-c", f'echo $$ > {leaf(prefix, node)}/cgroup.procs && exec "$@"', "sh",
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
