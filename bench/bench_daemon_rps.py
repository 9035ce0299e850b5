#!/usr/bin/env python3
"""Authenticated caller-ID answers per second at 64 concurrent clients on loopback (run as root).

    /opt/slurm-callerid/bin/python bench/bench_daemon_rps.py [--seconds 8] [--clients 64]

Starts its own munged (temp dir, user munge) and an HMAC key, a target process holding a
loopback TCP connection inside a synthetic Slurm job cgroup, and the real daemon
(`python -m daemon.cli daemon`) pinned to CPU 0.  Load generators (2 processes x clients/2
threads, each a blocking `daemon.client.query` loop, pinned to CPU 1) ask about the target
connection, so every answer is a full "found" lookup, authenticated both ways.  Prints, per
auth mode: answers/s, latency p50/p99 as seen by the clients, and outcomes.
[target: >= 2,000 answers/s, p99 < 20 ms]  Everything started is killed by pid at exit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
UNIFIED = "/sys/fs/cgroup/unified"


def loadgen(args):
    """Child mode: run `threads` query loops for `seconds`, print JSON stats."""
    from daemon import client as C
    from daemon.config import load_config
    cfg = load_config(args.config)
    auth = C.auth_from_config(cfg)
    src, dst = args.src, args.dst
    stop = time.monotonic() + args.seconds
    lat: list[float] = []
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def run():
        mine, outs = [], {}
        while time.monotonic() < stop:
            a = C.query("127.0.0.1", cfg.port, src, dst, auth=auth, timeout=5.0)
            mine.append(a.elapsed_ms)
            outs[a.outcome] = outs.get(a.outcome, 0) + 1
        with lock:
            lat.extend(mine)
            for k, v in outs.items():
                outcomes[k] = outcomes.get(k, 0) + v
    ts = [threading.Thread(target=run) for _ in range(args.threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps({"lat": lat, "outcomes": outcomes, "wall": time.monotonic() - t0}))


def start_munged(base: Path):
    d = base / "munge"
    d.mkdir(mode=0o755)
    shutil.chown(d, "munge", "munge")
    key = d / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    shutil.chown(key, "munge", "munge")
    os.chmod(key, 0o600)
    sock = d / "munge.socket"
    p = subprocess.Popen(["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", "munged",
                          "--foreground", f"--socket={sock}", f"--key-file={key}",
                          f"--log-file={d / 'log'}", f"--pid-file={d / 'pid'}",
                          f"--seed-file={d / 'seed'}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if sock.exists():
            return p, str(sock)
        time.sleep(0.02)
    raise RuntimeError("munged did not start")


def pct(xs, q):
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--modes", default="hmac,munge")
    ap.add_argument("--loglevel", default="info")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--loadgen", action="store_true")
    ap.add_argument("--config")
    ap.add_argument("--src")
    ap.add_argument("--dst")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.loadgen:
        return loadgen(args)
    if os.geteuid() != 0:
        sys.exit("run as root")

    base = Path(tempfile.mkdtemp(prefix="cidbench-"))
    os.chmod(base, 0o755)
    procs: list[subprocess.Popen] = []
    cgdirs: list[Path] = []
    kids: list[int] = []
    try:
        munged, msock = start_munged(base)
        procs.append(munged)
        from daemon.auth import write_key
        key = base / "callerid.key"
        write_key(str(key))
        # target: a process in a job cgroup holding a loopback connection
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(8)
        c = socket.create_connection(lst.getsockname())
        s, _ = lst.accept()
        src = "%s:%d" % c.getsockname()
        dst = "%s:%d" % c.getpeername()
        os.set_inheritable(c.fileno(), True)
        pid = os.fork()
        if pid == 0:
            os.execv("/bin/sleep", ["sleep", "100000"])
        kids.append(pid)
        c.close()
        root = Path(UNIFIED) / f"cidbench-{os.getpid()}"
        leaf = root / "system.slice" / "cidb_slurmstepd.scope" / "job_888" / "step_extern" / "user" / "task_special"
        p = Path(UNIFIED)
        for part in leaf.relative_to(UNIFIED).parts:
            p = p / part
            p.mkdir()
            cgdirs.append(p)
        (leaf / "cgroup.procs").write_text(str(pid))

        results = {}
        for mode in args.modes.split(","):
            port = 6900 + len(results)
            cfg = base / f"{mode}.conf"
            cfg.write_text(f"AuthType={mode}\nKeyFile={key}\nMungeSocket={msock}\nPort={port}\n"
                           f"ListenAddresses=127.0.0.1\nRateLimit=1000000\nRateBurst=1000000\n"
                           f"MaxConnections=1024\nCgroupRoots={root}\nLogLevel={args.loglevel}\n"
                           f"Workers={args.workers}\n")
            log = open(base / f"daemon-{mode}.log", "wb")
            d = subprocess.Popen(["taskset", "-c", "0", PY, "-m", "daemon.cli", "daemon", "--config", str(cfg)],
                                 cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 stdout=subprocess.DEVNULL, stderr=log)
            procs.append(d)
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            # sanity: one query must find the job
            from daemon import client as C
            from daemon.config import load_config
            a = C.query("127.0.0.1", port, src, dst, auth=C.auth_from_config(load_config(str(cfg))))
            assert a.outcome == C.FOUND and a.job_id == 888, a
            nproc = 2
            gens = [subprocess.Popen(["taskset", "-c", "1", PY, __file__, "--loadgen", "--config", str(cfg),
                                      "--src", src, "--dst", dst, "--threads", str(args.clients // nproc),
                                      "--seconds", str(args.seconds)],
                                     cwd=str(ROOT), stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
                    for _ in range(nproc)]
            procs.extend(gens)
            def cpu(pid, which=(11, 12)):
                f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                return sum(int(f[i]) for i in which) / os.sysconf("SC_CLK_TCK")
            dpid = d.pid  # taskset execs the daemon
            c0, s0 = cpu(dpid), cpu(dpid, (12,))
            lat, outs, wall = [], {}, 0.0
            for g in gens:
                out, _ = g.communicate(timeout=args.seconds + 60)
                r = json.loads(out)
                lat += r["lat"]
                wall = max(wall, r["wall"])
                for k, v in r["outcomes"].items():
                    outs[k] = outs.get(k, 0) + v
            dcpu = (cpu(dpid) - c0) / wall
            print(f"  {mode}: daemon CPU {dcpu * 100:.0f}% of which system "
                  f"{(cpu(dpid, (12,)) - s0) / wall * 100:.0f}%", file=sys.stderr)
            d.send_signal(signal.SIGTERM)
            d.wait(10)
            log.close()
            lat.sort()
            results[mode] = (outs.get("found", 0) / wall, pct(lat, 0.5), pct(lat, 0.99), outs, dcpu)
        print()
        print(f"Authenticated caller-ID answers, {args.clients} concurrent clients on loopback, "
              f"daemon on 1 CPU (LogLevel={args.loglevel}), {args.seconds:.0f} s per mode")
        print("[target: >= 2,000 answers/s, p99 < 20 ms]")
        print(f"{'auth':>6} | {'answers/s':>10} | {'p50 ms':>7} | {'p99 ms':>7} | {'daemon CPU':>10} | "
              f"{'answers per daemon CPU-s':>24} | outcomes")
        print("-" * 105)
        for mode, (rps, p50, p99, outs, dcpu) in results.items():
            print(f"{mode:>6} | {rps:10.0f} | {p50:7.2f} | {p99:7.2f} | {dcpu * 100:9.0f}% | "
                  f"{rps / max(dcpu, 1e-9):24.0f} | {outs}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
                os.waitpid(k, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for dd in reversed(cgdirs):
            for _ in range(40):
                try:
                    dd.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
