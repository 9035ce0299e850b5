#!/usr/bin/env python3
"""The daemon's CPU share when the node is saturated (run as root): how long caller-ID answers
take while --hogs CPU-bound processes (standing in for sshd's key exchanges during a login
burst) keep both cores busy, for several ways of giving the daemon its share.

    /opt/slurm-callerid/bin/python bench/bench_daemon_cpu.py [--hogs 100] [--rate 100]
        [--seconds 8] [--setups none,same,nice-5,nice-10,weight-100,weight-1000]

The daemon (munge) answers root's queries about a connection held in job 888, paced at --rate
per second (the asker runs beside the daemon: on a real burst it is the target node's own
callerid service, just as starved).  Setups:
  none         no hogs (reference)
  same         daemon, its munged and the asker among the hogs, all nice 0, one cgroup
               (a node without per-service cgroups, or everything in one service)
  nice-5/-10   the same with the daemon, munged and asker at that nice
  weight-W     cgroup v1 cpu controller, as systemd places services: the hogs in one group
               (ssh.service, cpu.shares 1024 = CPUWeight 100), the daemon and asker in another
               with CPUWeight W (cpu.shares = W * 1024 / 100), munged in a third (munge.service,
               default weight)
The cpu groups are created under /sys/fs/cgroup/cpu/cidbench-<pid>/ (never memory) and
removed at the end, with every process moved back.

[target: caller-ID answers keep coming: max latency well inside the 1 s rpc_timeout]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon_common import HOSTILE, PY, Run, cpu_seconds, loadavg, pct, print_table  # noqa: E402

CPU = Path("/sys/fs/cgroup/cpu")
JOB = 888


class CpuGroups:
    def __init__(self):
        self.root = CPU / f"cidbench-{os.getpid()}"
        self.made = []

    def group(self, name, weight=None) -> Path:
        if not self.made:
            self.root.mkdir()
            self.made.append(self.root)
        g = self.root / name
        if not g.exists():
            g.mkdir()
            self.made.append(g)
        if weight is not None:
            (g / "cpu.shares").write_text(str(weight * 1024 // 100))
        return g

    @staticmethod
    def move(g: Path, pid: int):
        (g / "cgroup.procs").write_text(str(pid))

    def cleanup(self):
        for g in reversed(self.made):
            try:
                for pid in (g / "cgroup.procs").read_text().split():
                    try:
                        (CPU / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass
                g.rmdir()
            except OSError:
                pass
        self.made.clear()


def hogs(run: Run, n: int):
    """CPU-bound processes (killed by pid after the setup, or by Run's cleanup)."""
    return [run.start(["sha256sum", "/dev/zero"], stdout=subprocess.DEVNULL) for _ in range(n)]


def one(run, args, setup, msock, mpid, target, groups):
    nice = int(setup.split("-")[1]) * -1 if setup.startswith("nice") else 0
    d, port, cfg = run.daemon(f"AuthType=munge\nMungeSocket={msock}\nCgroupRoots={run.cgroot}\n",
                              cpu=None, name=f"cpu-{setup}", nice=nice)
    for tid in os.listdir(f"/proc/{mpid}/task"):     # nice is per thread on Linux
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    hs = [] if setup == "none" else hogs(run, args.hogs)
    if setup.startswith("weight"):
        w = int(setup.split("-")[1])
        gd, gh, gm = groups.group("callerid", w), groups.group("ssh", 100), groups.group("munge", 100)
        groups.move(gd, d.pid)
        groups.move(gm, mpid)
        for h in hs:
            groups.move(gh, h.pid)
    time.sleep(2)                     # the hogs are running
    c0, t0 = cpu_seconds(d.pid), time.monotonic()
    pre = ["nice", "-n", str(nice)] if nice else []
    asker = run.start(pre + [PY, HOSTILE, "ask", "--port", str(port), "--config", str(cfg),
                             "--target", ",".join(target), "--rate", str(args.rate),
                             "--seconds", str(args.seconds), "--job", str(JOB),
                             "--threads", str(int(args.rate * 1.5) + 8)],
                      stdout=subprocess.PIPE)
    if setup.startswith("weight"):
        groups.move(gd, asker.pid)
    out = asker.communicate(timeout=args.seconds + 120)[0].decode()
    load = loadavg()
    cpu = (cpu_seconds(d.pid) - c0) / (time.monotonic() - t0)
    for h in hs:
        h.kill()
        h.wait()
    d.terminate()
    d.wait(15)
    if setup.startswith("weight"):
        groups.cleanup()
    r = json.loads(out.splitlines()[-1])
    lat = r["lat"]
    right = r["outcomes"].get("found", 0) - r["wrong_job"]
    return dict(setup=setup, n=r["n"], right=right, late=sum(1 for x in lat if x >= 1000),
                p50=pct(lat, 0.5), p99=pct(lat, 0.99), max=max(lat), cpu=cpu, load=load,
                details=r["details"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hogs", type=int, default=100)
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--setups", default="none,same,nice-5,nice-10,weight-100,weight-1000")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    groups = CpuGroups()
    rows = []
    with Run("cidbench-cpu") as run:
        try:
            msock = run.munged("munge-daemon")
            mpid = run.procs[-1].pid                  # setpriv execs munged: the same pid
            target = run.target(JOB)
            for setup in args.setups.split(","):
                rows.append(one(run, args, setup, msock, mpid, target, groups))
                print(f"  {setup}: done (load {rows[-1]['load']})", file=sys.stderr, flush=True)
        finally:
            groups.cleanup()
    print()
    print(f"Caller-ID answers ({args.rate:.0f}/s, munge, deadline 1 s) while {args.hogs} CPU-bound "
          f"processes saturate both cores, {args.seconds:.0f} s per setup")
    print_table(["setup", "answered right", "late", "p50 ms", "p99 ms", "max ms", "daemon CPU",
                 "load"],
                [([r["setup"], f"{r['right']}/{r['n']}", str(r["late"]), f"{r['p50']:.1f}",
                   f"{r['p99']:.1f}", f"{r['max']:.1f}", f"{r['cpu'] * 100:.1f}%", str(r["load"])],
                  [f"failures: {r['details']}"] if r["details"] else []) for r in rows])


if __name__ == "__main__":
    main()
