"""Mount namespace ids on kernels that hand them out per CPU (Linux 6.18 here), for
job_container/tmpfs nodes.

job_container/tmpfs keeps a job's mount namespace alive by bind-mounting
/proc/<child>/ns/mnt of a child that just unshared a new one (src/plugins/job_container/tmpfs/
job_container_tmpfs.c, _create_ns(), slurm-22-05-8-1 and slurm-24-11-5-1). The kernel refuses
such a bind (EINVAL, logged by Slurm as "_create_ns: ns base mount failed: Invalid argument")
when the caller's own mount namespace does not have a smaller id than the bound one
(fs/namespace.c, mnt_ns_loop()). Since 6.18 the ids come from a cookie generator with
per-CPU batches of 4096 (alloc_mnt_ns() -> ns_tree_gen_id() -> gen_cookie_next()), so a
namespace made later on another CPU can get a SMALLER id: measured here, new namespaces on
CPU 0 got ids 921, 922, ... while those on CPU 1 got 4891, 4892, ... In the test bed about one
first job in four failed ("launch failed requeued held"). A node's mount namespace is therefore
made on the CPU whose batch is lowest, and checked: its id must be below what any CPU hands
out next. Kernels with one global sequence pass the check as they are.
"""
from __future__ import annotations

import fcntl
import os
import struct
import subprocess

NS_GET_MNTNS_ID = 0x8008B705     # _IOR(0xb7, 0x5, __u64), include/uapi/linux/nsfs.h

_PROBE = ("import fcntl,os,struct;fd=os.open('/proc/self/ns/mnt',os.O_RDONLY);"
          f"print(struct.unpack('Q',fcntl.ioctl(fd,{NS_GET_MNTNS_ID},bytes(8)))[0])")


def ns_id(path: str) -> int | None:
    """The id of the mount namespace file `path` (None when the kernel has no such ioctl)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return struct.unpack("Q", fcntl.ioctl(fd, NS_GET_MNTNS_ID, bytes(8)))[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def next_ids() -> dict[int, int]:
    """cpu -> the id a mount namespace made on it now gets (one throwaway namespace per CPU)."""
    out = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        p = subprocess.run(["taskset", "-c", str(cpu), "unshare", "--mount", "/usr/bin/python3", "-I", "-c", _PROBE],
                           capture_output=True, text=True, timeout=30)
        if p.returncode == 0 and p.stdout.strip().isdigit():
            out[cpu] = int(p.stdout)
    return out


def lowest_cpu() -> int | None:
    ids = next_ids()
    return min(ids, key=ids.get) if ids else None


def is_oldest(path: str) -> bool:
    """Is the namespace `path` older (smaller id) than any a CPU makes from now on?"""
    mine = ns_id(path)
    return mine is None or all(mine < other for other in next_ids().values())
