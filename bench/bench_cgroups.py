#!/usr/bin/env python3
"""Benchmark cgroups: list a user's jobs and pid -> job with 1, 100 and 1000 synthetic jobs.

Builds synthetic Slurm trees under a unique /cidtest-bench-<pid>-<rand> root in the v1 freezer
hierarchy and in cgroup2 at /sys/fs/cgroup/unified (never memory), a spool dir with real unix
sockets named like extern stepd sockets, and one `sleep` child adopted into the newest job.
Prints microseconds per call (median of repeated batches). The synthetic stepd sockets have
no listener, so the v2 rows use ``stepd="never"`` (owner from task processes only); the cost
of asking a stepd is the "step_uid" row (one exchange with a Python fake stepd in a thread of
this process; the real Slurm 22.05 slurmstepd of the test bed answers in ~115 µs median). Cleans up after itself (kills its
child by pid, removes the tree depth-first) even on errors. Needs root.

    /opt/slurm-callerid/bin/python bench/bench_cgroups.py [--sizes 1,100,1000]
"""
import argparse
import os
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cgroups                                   # noqa: E402
from cgroups.conf import Conf                    # noqa: E402

NODE = "benchnode"
UID = 1000
FREEZER = "/sys/fs/cgroup/freezer"
UNIFIED = "/sys/fs/cgroup/unified"


def per_call_us(fn, min_time=0.2):
    n, t = 1, 0.0
    while True:                                   # calibrate the batch size
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t > 0.02:
            break
        n *= 2
    samples = []
    end = time.perf_counter() + min_time
    while time.perf_counter() < end or len(samples) < 5:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def rm_tree(top):
    if not os.path.isdir(top):
        return
    for dirpath, _, _ in os.walk(top, topdown=False):
        os.rmdir(dirpath)


def build(root, spool, n, child_pid):
    others = max(0, n // 10)                       # 10% of the jobs belong to someone else
    for j in range(1, n + 1):
        uid = UID if j > others else UID + 1
        os.makedirs(f"{FREEZER}{root}/slurm_{NODE}/uid_{uid}/job_{j}/step_extern")
        scope = f"{UNIFIED}{root}/system.slice/{NODE}_slurmstepd.scope/job_{j}"
        for d in ("step_extern/slurm", "step_extern/user", "step_0/slurm", "step_0/user/task_0"):
            os.makedirs(f"{scope}/{d}")
        s = socket.socket(socket.AF_UNIX)
        s.bind(f"{spool}/{NODE}_{j}.4294967292")
        s.close()
    # the child: v1 in the newest job's extern step; v2 as the batch task of every... one job
    with open(f"{FREEZER}{root}/slurm_{NODE}/uid_{UID}/job_{n}/step_extern/cgroup.procs", "w") as f:
        f.write(str(child_pid))
    with open(f"{UNIFIED}{root}/system.slice/{NODE}_slurmstepd.scope/job_{n}/step_0/user/task_0/"
              "cgroup.procs", "w") as f:
        f.write(str(child_pid))


def fake_stepd(spool, stop):
    """A listening socket answering the stepd handshake + REQUEST_STEP_UID (thread)."""
    path = f"{spool}/fake_stepd"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(64)
    srv.settimeout(0.1)

    def run():
        with srv:
            while not stop.is_set():
                try:
                    c, _ = srv.accept()
                except socket.timeout:
                    continue
                with c:     # the client reads the handshake answer before it asks
                    if len(c.recv(4, socket.MSG_WAITALL)) == 4:
                        c.sendall(struct.pack("=i", 38 << 8))
                        if len(c.recv(4, socket.MSG_WAITALL)) == 4:
                            c.sendall(struct.pack("=I", UID))
    threading.Thread(target=run, daemon=True).start()
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,100,1000")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (creates cgroups)")
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    for n in sizes:
        root = f"/cidtest-bench-{os.getpid()}-{secrets.token_hex(3)}"
        spool = tempfile.mkdtemp(prefix="cidbench-spool-")
        child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        stop = threading.Event()
        try:
            os.mkdir(FREEZER + root)
            os.mkdir(UNIFIED + root)
            t0 = time.perf_counter()
            build(root, spool, n, child.pid)
            build_s = time.perf_counter() - t0
            kw = dict(nodename=NODE, spool_dir=spool, cgroup_root=root, use_env=False)
            L1 = cgroups.discover(Conf(), Conf(), plugin="cgroup/v1", **kw)
            L2 = cgroups.discover(Conf(), Conf(), plugin="cgroup/v2", **kw)
            fake = fake_stepd(spool, stop)
            mine = cgroups.user_jobs(L1, UID)
            assert len(mine) == n - n // 10 and mine[0].job_id == n, (len(mine), n)
            assert cgroups.job_of_pid(child.pid).job_id == n
            text = open(f"/proc/{child.pid}/cgroup").read()
            r = {
                "v1 user_jobs": per_call_us(lambda: cgroups.user_jobs(L1, UID)),
                "v1 list_jobs(all)": per_call_us(lambda: cgroups.list_jobs(L1)),
                "v2 list_jobs(all) tasks only": per_call_us(
                    lambda: cgroups.list_jobs(L2, stepd="never")),
                "v2 user_jobs tasks only": per_call_us(
                    lambda: cgroups.user_jobs(L2, UID, stepd="never")),
                "step_uid (fake stepd)": per_call_us(lambda: cgroups.step_uid(fake)),
                "job_of_pid": per_call_us(lambda: cgroups.job_of_pid(child.pid)),
                "job_from_proc_cgroup (pure)": per_call_us(
                    lambda: cgroups.job_from_proc_cgroup(text)),
                "iter_job_pids v1": per_call_us(lambda: list(cgroups.iter_job_pids(L1))),
            }
            rows.append((n, build_s, r))
        finally:
            stop.set()
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait()
            rm_tree(FREEZER + root)
            rm_tree(UNIFIED + root)
            shutil.rmtree(spool, ignore_errors=True)
    names = list(rows[0][2])
    w = max(len(x) for x in names)
    print(f"{'µs per call':<{w}} " + " ".join(f"{f'{n} jobs':>11}" for n, _, _ in rows))
    for name in names:
        print(f"{name:<{w}} " + " ".join(f"{r[name]:>11.1f}" for _, _, r in rows))
    print(f"{'(tree build, s)':<{w}} " + " ".join(f"{b:>11.2f}" for _, b, _ in rows))


if __name__ == "__main__":
    main()
