"""pam_callerid.warmup: which cgroup the no-op move writes (pure), and that it is a no-op."""
import os
import time

import pytest

from pam_callerid.warmup import Warmup, own_procs_file

MOUNTS_HYBRID = ("cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
                 "cgroup /sys/fs/cgroup/freezer cgroup rw,freezer 0 0\n"
                 "cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n"
                 "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
CG_HYBRID = "9:memory:/infra/x\n6:freezer:/a/b\n5:pids:/\n0::/user.slice/s\n"


def test_prefers_cgroup2_then_freezer_then_pids_never_memory():
    assert own_procs_file(CG_HYBRID, MOUNTS_HYBRID) == \
        "/sys/fs/cgroup/unified/user.slice/s/cgroup.procs"
    no_v2 = MOUNTS_HYBRID.replace("cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n", "")
    assert own_procs_file(CG_HYBRID, no_v2) == "/sys/fs/cgroup/freezer/a/b/cgroup.procs"
    assert own_procs_file("9:memory:/infra/x\n5:pids:/\n", no_v2) == \
        "/sys/fs/cgroup/pids/cgroup.procs"
    assert own_procs_file("9:memory:/infra/x\n", no_v2) is None
    pure_v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"
    assert own_procs_file("0::/system.slice/callerid.service\n", pure_v2) == \
        "/sys/fs/cgroup/system.slice/callerid.service/cgroup.procs"


@pytest.mark.root
def test_the_move_keeps_this_process_where_it_is():
    before = open("/proc/self/cgroup").read()
    w = Warmup()
    assert w.procs_file is not None and "memory" not in w.procs_file
    for _ in range(3):
        w.kick()
        time.sleep(0.1)
    end = time.monotonic() + 5
    while w.moves + w.errors < 1 and time.monotonic() < end:
        time.sleep(0.05)
    assert (w.moves >= 1, w.errors) == (True, 0)
    assert open("/proc/self/cgroup").read() == before
    assert os.getpid() in [int(p) for p in open(w.procs_file).read().split()]
