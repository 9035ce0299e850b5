#!/usr/bin/env python3
"""Login burst on the test-bed cluster (run as root): --logins concurrent ssh logins from
inside a job on node1 into node2, through the whole login path (pam_callerid.so + `callerid
daemon` on every host, munge).  alice has job A on node1+node2 and a newer job B on node2, so
each login needs a caller-ID answer from node1's daemon to land in A (the fallback 'newest'
would pick B).  node1's daemon answers while both nodes' ssh/sshd processes eat the 2 cores.

    CID_TESTBED_PREFIX=cie CID_TESTBED_SUBNET=25 \\
    /opt/slurm-callerid/bin/python bench/bench_daemon_burst.py [--logins 100] [--rounds 2]
        [--nice 0,-10]

Per round: every login's audit record on node2 (account phase) gives the caller-ID time
(ms.callerid: the PAM service's query to node1's daemon) and the path; each session prints
its cgroup, which must be job A's extern step.  --nice: the daemons' nice (all threads;
-10 stands in for systemd's CPUWeight, which the test bed without systemd cannot give).

[target: max caller-ID latency <= 250 ms, 100 % in the right job]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon_common import loadavg, pct, print_table  # noqa: E402


def renice_daemons(c, nice: int):
    """Every thread of every host's `callerid daemon` (the test bed started them at 0)."""
    from testbed.cluster import _children_tree
    n = 0
    for h in c.nodes + ["login"]:
        p = c.hosts[h].daemons.get("callerid")
        if p is None:
            continue
        for pid in _children_tree(p.pid):
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                    n += 1
            except (FileNotFoundError, ProcessLookupError):
                pass
    return n


def burst(c, job_a, n: int, audit: Path):
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    script = (f"for i in $(seq {n}); do ssh -o BatchMode=yes node2 "
              "'grep -m1 -E \"freezer|^0::\" /proc/self/cgroup' > /tmp/cid-burst-$$-$i.out 2>&1 & done; "
              f"wait; cat /tmp/cid-burst-$$-*.out; rm -f /tmp/cid-burst-$$-*.out")
    t = time.monotonic()
    r = c.exec("login", ["srun", f"--jobid={job_a}", "--overlap", "-w", "node1", "-N1", "-n1",
                         "bash", "-c", script], user="alice", timeout=300)
    wall = time.monotonic() - t
    lines = [x for x in r.out.splitlines() if x.strip()]
    right = sum(1 for x in lines if f"/job_{job_a}/step_extern" in x)
    end = time.monotonic() + 15
    while True:
        recs = [json.loads(x) for x in audit.read_text().splitlines()[before:]]
        acc = [x for x in recs if x["node"] == "node2" and x["phase"] == "account"]
        if len(acc) >= n or time.monotonic() > end:
            break
        time.sleep(0.2)
    cid = [x["ms"].get("callerid") for x in acc if x.get("ms", {}).get("callerid") is not None]
    paths = {}
    for x in acc:
        paths[x["path"]] = paths.get(x["path"], 0) + 1
    return dict(n=n, sessions=len(lines), right=right, records=len(acc), paths=paths,
                p50=pct(cid, 0.5), p99=pct(cid, 0.99), max=max(cid) if cid else float("nan"),
                wall=wall, load=loadavg(),
                wrong=[x for x in lines if f"/job_{job_a}/" not in x][:3])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logins", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--nice", default="0,-10")
    ap.add_argument("--prefix", default=os.environ.get("CID_TESTBED_PREFIX", "cid"))
    ap.add_argument("--subnet", type=int, default=int(os.environ.get("CID_TESTBED_SUBNET", "3")))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    from testbed.adopters import stop_pam_callerid, use_pam_callerid
    from testbed.cluster import Cluster
    rows = []
    c = Cluster(nodes=3, prefix=args.prefix, subnet=args.subnet)
    c.up()
    try:
        # the test bed's LogLevel=debug logs every answer; a node runs at info
        audit = use_pam_callerid(c, rpc_timeout=1, extra_conf="LogLevel=info\n")
        a = c.sbatch("alice", nodes=["node1", "node2"])
        time.sleep(1.1)
        c.sbatch("alice", nodes=["node2"])
        try:
            for nice in [int(x) for x in args.nice.split(",")]:
                threads = renice_daemons(c, nice)
                for rnd in range(args.rounds):
                    r = burst(c, a, args.logins, audit)
                    r.update(nice=nice, round=rnd + 1, threads=threads)
                    rows.append(r)
                    print(f"  nice {nice} round {rnd + 1}: {r['right']}/{r['n']} right, caller-ID "
                          f"max {r['max']:.0f} ms (load {r['load']})", file=sys.stderr, flush=True)
        finally:
            stop_pam_callerid(c)
            c.cancel_all()
    finally:
        c.down()
    print()
    print(f"Login burst: {args.logins} concurrent ssh logins from inside job A on node1 into node2 "
          "(caller-ID needed: a newer job B is on node2), test-bed cluster, 2 shared cores")
    print("[target: max caller-ID latency <= 250 ms, 100 % in the right job]")
    print_table(["daemon nice", "round", "in job A", "audit paths", "caller-ID p50", "p99",
                 "max ms", "burst s", "load"],
                [([str(r["nice"]), str(r["round"]), f"{r['right']}/{r['n']}",
                   ",".join(f"{k}={v}" for k, v in sorted(r["paths"].items())), f"{r['p50']:.1f}",
                   f"{r['p99']:.1f}", f"{r['max']:.1f}", f"{r['wall']:.1f}", str(r["load"])],
                  [f"not in job A: {r['wrong']}"] if r["wrong"] else []) for r in rows])


if __name__ == "__main__":
    main()
