#!/usr/bin/env python3
"""Legitimate caller-ID queries while the daemon is under hostile load (run as root).

    /opt/slurm-callerid/bin/python bench/bench_daemon_hostile.py [--seconds 10] [--hosts 10]
        [--conns 1000] [--flood 500] [--legit 100] [--variants ours,ours-256,baseline]

Load (everything on loopback, bounded in time):
  * --hosts source addresses 127.0.1.N each hold --conns connections to the daemon: half
    idle, half with 20 bytes of a request sent; any that is closed or reset is re-opened at
    once (tests/daemon/hostile.py hold);
  * one ordinary user (nobody) floods at --flood requests/s with valid munge credentials,
    from 127.0.0.1;
  * root (the PAM module's case: munge-signed, from a reserved source port) asks --legit
    requests/s about a connection held by a process of job 888, alternating between the
    flooding user's own address 127.0.0.1 and 9 other addresses; deadline 1 s (rpc_timeout);
    the asker runs at nice -10 (on a real cluster it is another host).
The daemon and its munged are pinned to CPU 0 at nice --nice (default -10: the CPU share
bench_daemon_cpu.py recommends; the 2 cores are shared with other work); the load and the
askers' own munged (same key: another host of the realm) to CPU 1.

Variants: ours (defaults), ours-256 (MaxConnections=256, the baseline's cap: reclaiming, not
a bigger table, is what keeps the slots), baseline (the daemon at commit 6b555aa, its
defaults: cap 256 refused beyond, rate limit per source address).

[target, ours: legit p99 < 100 ms, 0 refused, 0 cached as unreachable]
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon_common import (HOSTILE, PY, Run, cpu_seconds, loadavg, pct,  # noqa: E402
                                 print_table, rss_mb)

JOB = 888


def run_variant(run: Run, name, conf, tree, target, args, client_munge, client_extra=""):
    d, port, cfg = run.daemon(conf, cpu="0", tree=tree, name=name, nice=args.nice)
    ccfg = run.base / f"client-{name}.conf"          # the askers' side: their own munged
    ccfg.write_text(f"Port={port}\nAuthType=munge\nMungeSocket={client_munge}\n{client_extra}")
    os.chmod(ccfg, 0o644)
    nobody = pwd.getpwnam("nobody").pw_uid
    c0 = cpu_seconds(d.pid)
    t0 = time.monotonic()
    hold_s = args.seconds + 4
    holders = [run.start(["taskset", "-c", "1", PY, HOSTILE, "hold", "--src", f"127.0.1.{i + 1}",
                          "--port", str(port), "--count", str(args.conns), "--seconds", str(hold_s)],
                         stdout=subprocess.PIPE)
               for i in range(args.hosts)]
    time.sleep(2.0)                         # the slots fill with junk
    ask = [HOSTILE, "ask", "--port", str(port), "--config", str(ccfg), "--target", ",".join(target),
           "--seconds", str(args.seconds), "--job", str(JOB)]
    flood = run.start(["taskset", "-c", "1", "setpriv", f"--reuid={nobody}", f"--regid={nobody}",
                       "--clear-groups", PY, *ask, "--rate", str(args.flood), "--threads", "64",
                       "--src", "127.0.0.1"], stdout=subprocess.PIPE)
    srcs = ["127.0.0.1"] + [f"127.0.2.{i}" for i in range(1, 10)]
    legit = run.start(["taskset", "-c", "1", "nice", "-n", "-10", PY, *ask, "--rate", str(args.legit),
                       "--threads", str(int(args.legit * 1.5) + 8)] + sum((["--src", s] for s in srcs), []),
                      stdout=subprocess.PIPE)
    load = loadavg()
    lres = json.loads(legit.communicate(timeout=args.seconds + 120)[0].decode().splitlines()[-1])
    fres = json.loads(flood.communicate(timeout=args.seconds + 120)[0].decode().splitlines()[-1])
    rss = rss_mb(d.pid)
    hres = [json.loads(h.communicate(timeout=hold_s + 60)[0].decode().splitlines()[-1]) for h in holders]
    cpu = (cpu_seconds(d.pid) - c0) / (time.monotonic() - t0)
    d.terminate()
    d.wait(15)
    stats = {}
    for line in run.log_of(cfg).splitlines():
        if "event=stopped" in line:
            stats = dict(f.split("=", 1) for f in line.split("event=stopped", 1)[1].split()
                         if "=" in f)
    lat = lres["lat"]
    return dict(name=name, legit=lres, flood=fres, holders=hres, stats=stats, load=load,
                p50=pct(lat, 0.5), p99=pct(lat, 0.99), max=max(lat), rss=rss, cpu=cpu)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--flood", type=float, default=500)
    ap.add_argument("--legit", type=float, default=100)
    ap.add_argument("--variants", default="ours,ours-256,baseline")
    ap.add_argument("--nice", type=int, default=-10, help="the daemon's (and its munged's) nice")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    rows = []
    with Run("cidbench-hostile") as run:
        msock = run.munged("munge-daemon", cpu="0", nice=args.nice)
        csock = run.munged("munge-askers", key=run.munge_key, cpu="1", nice=args.nice)
        target = run.target(JOB)
        common = f"AuthType=munge\nMungeSocket={msock}\nCgroupRoots={run.cgroot}\n"
        for name in args.variants.split(","):
            if name == "baseline":
                conf, tree = common, run.baseline_tree()
            elif name == "ours-256":
                conf, tree = common + "MaxConnections=256\n", None
            elif name == "ours-2proc":          # Processes=2, both on CPU 0 (CPU, RSS: the first)
                conf, tree = common + "Processes=2\n", None
            else:
                conf, tree = common, None
            # the baseline predates munge requests with a reply key: ask it in plain munge
            extra = "MungeReplyKey=no\n" if name == "baseline" else ""
            r = run_variant(run, name, conf, tree, target, args, csock, extra)
            rows.append(r)
            print(f"  {name}: done (load {r['load']})", file=sys.stderr, flush=True)
            time.sleep(1)
    print()
    print(f"Legitimate root queries ({args.legit:.0f}/s, deadline 1 s) while {args.hosts} hosts hold "
          f"{args.conns} idle/half-sent connections each and one user floods at {args.flood:.0f}/s, "
          f"{args.seconds:.0f} s; daemon (munge) on CPU 0 at nice {args.nice}, load on CPU 1")
    print("[target: p99 < 100 ms, 0 refused, 0 cached as unreachable]")
    table = []
    for r in rows:
        L, st = r["legit"], r["stats"]
        right = L["outcomes"].get("found", 0) - L["wrong_job"]
        flood = ",".join(f"{k}={v}" for k, v in sorted(r["flood"]["outcomes"].items()))
        notes = [f"legit failures: {L['details']}"] if L["details"] else []
        notes.append(f"daemon side (accept -> reply written), reserved-port p50/p99 <= "
                     f"{st.get('p50-ms-reserved<', '-')}/{st.get('p99-ms-reserved<', '-')} ms, "
                     f"others p99 <= {st.get('p99-ms-other<', '-')} ms")
        table.append(([r["name"], f"{right}/{L['n']}", str(L["n"] - right), str(L["cacheable"]),
                       f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['max']:.1f}", flood,
                       str(st.get("reclaimed", "-")), str(st.get("over-capacity", "0")),
                       f"{r['cpu'] * 100:.0f}%", f"{r['rss']:.1f}", str(r["load"])], notes))
    print_table(["daemon", "legit answered right", "refused/failed", "cacheable", "p50 ms",
                 "p99 ms", "max ms", "flood outcomes", "reclaimed", "over-cap", "CPU", "RSS MB",
                 "load"], table)

if __name__ == "__main__":
    main()
