"""Start the kernel's cgroup-migration grace period when a login arrives, so that it runs
while the login is being decided instead of after.

Measured here (Linux 6.x): moving a process between cgroups after an idle second costs
11-21 ms, a second move right after it 0.04 ms. The first writer of
``cgroup_threadgroup_rwsem`` (one lock for every hierarchy, v1 and v2) waits for an RCU grace
period (``percpu_down_write`` -> ``rcu_sync_enter``); writers that follow within about a grace
period do not. Every adoption -- the extern slurmstepd's own cgroup writes included -- pays
it, pam_slurm_adopt too. So when a decision starts on a cgroup v2 node, a helper thread
writes this daemon's own pid into the cgroup it is already in (a no-op move that still takes
the lock) and the real adoption, a few milliseconds later, finds the grace period partly or
wholly elapsed. Not on v1: there the module enters the job's cgroups itself without the lock
(cgroups.open_entry), and a warm-up write, which holds ``cgroup_mutex`` through its grace
period, would make that entry wait.

The cgroup written is the daemon's own: its cgroup2 one when cgroup2 is mounted, else its v1
freezer or pids cgroup; never a memory cgroup. (A site that wants the whole cost gone can mount
cgroup2 with ``favordynmods``, Linux >= 6.2, which keeps the lock ready for writers at some
cost to fork and exit; that is the site's choice, not ours.)
"""
from __future__ import annotations

import os
import threading
import time

_V1_ORDER = ("freezer", "pids")        # harmless to write; memory never


def own_procs_file(proc_cgroup_text, mounts_text):
    """Pure: the ``cgroup.procs`` of the cgroup this process is in, in the first hierarchy of
    cgroup2, v1 freezer, v1 pids that is mounted; None if none is."""
    from cgroups.paths import parse_mounts, parse_proc_cgroup
    mounts = parse_mounts(mounts_text)
    mine = {}
    for _, ctrls, path in parse_proc_cgroup(proc_cgroup_text):
        for c in ctrls.split(","):
            mine[c] = path                   # "" = the cgroup2 line
    if "" in mine and mounts.v2:
        return _join(mounts.v2[0], mine[""])
    for c in _V1_ORDER:
        if c in mine and c in mounts.v1:
            return _join(mounts.v1[c], mine[c])
    return None


def _join(mount, path):
    return mount.rstrip("/") + ("/" + path.strip("/") if path.strip("/") else "") + "/cgroup.procs"


class Warmup:
    """``kick()`` (never blocks) asks the helper thread for one no-op move of this process;
    kicks that arrive while one is under way are folded into it."""

    def __init__(self, procs_file=None):
        if procs_file is None:
            procs_file = self._find()
        self.procs_file = procs_file
        self.moves = self.errors = 0
        self._event = threading.Event()
        if procs_file is not None:
            threading.Thread(target=self._run, name="cgroup-warmup", daemon=True).start()

    @staticmethod
    def _find():
        try:
            with open("/proc/self/cgroup") as f, open("/proc/self/mounts") as m:
                return own_procs_file(f.read(), m.read())
        except (OSError, ValueError):
            return None

    def kick(self):
        if self.procs_file is not None:
            self._event.set()
            time.sleep(0)             # let the helper take the GIL and enter its write now

    def _run(self):
        pid = b"%d" % os.getpid()
        while True:
            self._event.wait()
            self._event.clear()
            try:
                fd = os.open(self.procs_file, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
                self.moves += 1
            except OSError:
                self.errors += 1
