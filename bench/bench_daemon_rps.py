#!/usr/bin/env python3
"""Authenticated caller-ID answers per second at 64 concurrent clients on loopback (run as root).

    /opt/slurm-callerid/bin/python bench/bench_daemon_rps.py [--seconds 8] [--clients 64] [--rate 2000]

Starts its own munged (temp dir, user munge) and an HMAC key, a target process holding a
loopback TCP connection inside a synthetic Slurm job cgroup, and the real daemon
(`python -m daemon.cli daemon`) pinned to CPU 0.  Load generators (8 processes x clients/8
threads, pinned to CPU 1) ask about the target connection, so every answer is a full "found"
lookup, authenticated both ways.  Two loads per auth mode:

  closed  every client sends its next request as soon as it has the reply (saturation:
          the daemon's capacity; latency is then queueing, ~ clients / answers-per-second)
  paced   the same 64 clients together offer --rate requests/s on a fixed schedule; latency
          is measured from each request's scheduled time (no coordinated omission)

The daemon's work per answer is the same as in production (verify the request's credential,
replay check, lookup, sign the reply).  To keep the one spare core for munged, the load
generators sign their munge requests *before* the timed window and verify every reply
(signature, nonce, job) *after* it; only verified answers count.  HMAC requests are signed
when sent (~10 µs each): pre-signed ones would be seconds old, and at thousands of answers
per second the daemon's replay table (bounded: its floor rises when a bucket overflows)
rightly refuses old requests once it is full of newer ones.  Mode "munge-session": munge as
a node's PAM service asks a daemon it asked before: each generator process makes one munge
exchange, then signs every request with the session ticket it brought (daemon/session.py;
HMAC with the ticket's key, signed when sent, no munged on either side).

[target: >= 2,000 answers/s on one core, p99 < 20 ms]  Everything started is killed by pid.
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
    """Child mode: pre-sign requests, run `threads` clients for `seconds` (closed loop, or
    paced at `rate` requests/s for this process), verify every reply, print JSON stats."""
    from daemon import client as C, protocol as P, wire
    from daemon.config import load_config
    cfg = load_config(args.config)
    auth = C.auth_from_config(cfg)
    sa, sp = C.parse_endpoint(args.src)
    da, dp = C.parse_endpoint(args.dst)
    nthreads = args.threads
    per_thread = int(args.presign / nthreads) + 1
    peer = ("127.0.0.1", cfg.port) if args.session else None
    if args.session:                  # the first exchange brings the ticket
        assert C.query(*peer, args.src, args.dst, auth=auth, timeout=5).found

    def signed():
        req = P.pack_request(sa, sp, da, dp, "tcp")
        return (req.nonce, *wire.seal_request(req, auth, peer))    # nonce, frame, reply auth

    def presign(out):
        if auth.name == "hmac" or args.session:   # signed when sent (~10 µs): see the docstring
            return
        for _ in range(per_thread):
            out.append(signed())
    pools = [[] for _ in range(nthreads)]
    ts = [threading.Thread(target=presign, args=(pools[i],)) for i in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()

    addr = ("127.0.0.1", cfg.port)
    results = [[] for _ in range(nthreads)]   # (latency ms, nonce, reply auth, reply | None, error)
    barrier = threading.Barrier(nthreads + 1)
    period = nthreads / args.rate if args.rate else 0.0   # per thread, paced mode

    def one(frame):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5.0)
        try:
            s.connect(addr)
            s.sendall(frame)
            dec = P.FrameDecoder(max_frames=1)
            while True:
                data = s.recv(P.MAX_FRAME)
                if not data:
                    return None, "closed"
                frames = dec.feed(data)
                if frames:
                    return frames[0], ""
        except OSError as e:
            return None, type(e).__name__
        finally:
            s.close()

    def run(i):
        pool, res = pools[i], results[i]
        barrier.wait()
        t0 = time.monotonic()
        stop = t0 + args.seconds
        k = 0
        nxt = t0 + period * i / nthreads
        while k < len(pool) or not pool:
            if period:
                now = time.monotonic()
                if nxt >= stop:
                    break
                if nxt > now:
                    time.sleep(nxt - now)
                start = nxt
                nxt += period
            else:
                start = time.monotonic()
                if start >= stop:
                    break
            nonce, frame, reply_auth = pool[k] if pool else signed()
            k += 1
            got, err = one(frame)
            res.append(((time.monotonic() - start) * 1e3, nonce, reply_auth, got, err))
        if pool and k >= len(pool):
            res.append((None, None, None, None, "presigned-requests-exhausted"))
    ts = [threading.Thread(target=run, args=(i,)) for i in range(nthreads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    for t in ts:
        t.join()
    wall = time.monotonic() - t0
    lat, outcomes = [], {}
    for res in results:
        for ms, nonce, reply_auth, got, err in res:
            if got is None:
                key = err
            else:
                try:
                    r = wire.open_reply(got, reply_auth, nonce)
                    key = P.STATUS_NAMES[r.status] if r.job_id == 888 or r.status != P.STATUS_FOUND \
                        else "wrong-job"
                except Exception as e:
                    key = f"rejected:{getattr(e, 'reason', type(e).__name__)}"
            if ms is not None:
                lat.append(ms)
            outcomes[key] = outcomes.get(key, 0) + 1
    print(json.dumps({"lat": lat, "outcomes": outcomes, "wall": wall}))


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


def cpu_seconds(pid, which=(11, 12)):
    """utime+stime (fields 14, 15 of /proc/PID/stat) in seconds; which=(12,): system only."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(f[i]) for i in which) / os.sysconf("SC_CLK_TCK")


def run_load(args, cfg, src, dst, dpid, rate, procs, session=False):
    """One load against the running daemon -> dict of results."""
    nproc = args.procs
    per = rate / nproc if rate else 0
    presign = (per * args.seconds * 1.05 + 64) if rate else args.seconds * args.max_rate / nproc
    gens = [subprocess.Popen(["taskset", "-c", "1", PY, __file__, "--loadgen", "--config", str(cfg),
                              "--src", src, "--dst", dst, "--threads", str(args.clients // nproc),
                              "--seconds", str(args.seconds), "--rate", str(per),
                              "--presign", str(int(presign))] + (["--session"] if session else []),
                             cwd=str(ROOT), stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
            for _ in range(nproc)]
    procs.extend(gens)
    c0, s0 = cpu_seconds(dpid), cpu_seconds(dpid, (12,))
    t0 = time.monotonic()
    lat, outs, wall = [], {}, 0.0
    for g in gens:
        out, _ = g.communicate(timeout=args.seconds + 300)
        r = json.loads(out)
        lat += r["lat"]
        wall = max(wall, r["wall"])
        for k, v in r["outcomes"].items():
            outs[k] = outs.get(k, 0) + v
    # the daemon idles while the generators pre-sign and verify: its CPU since the start of
    # this load is the timed window's
    dcpu_total = cpu_seconds(dpid) - c0
    dsys_total = cpu_seconds(dpid, (12,)) - s0
    lat.sort()
    found = outs.get("found", 0)
    return dict(rps=found / wall, p50=pct(lat, 0.5), p99=pct(lat, 0.99), outs=outs,
                cpu=dcpu_total / wall, sys=dsys_total / wall, cpu_per_answer_us=dcpu_total / max(found, 1) * 1e6,
                elapsed=time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2000.0, help="offered load of the paced run")
    ap.add_argument("--max-rate", type=float, default=6000.0,
                    help="requests pre-signed for the closed run: seconds x this")
    ap.add_argument("--procs", type=int, default=8,
                    help="load generator processes (clients/procs threads each: few threads per "
                         "process keep the generators' own GIL out of the latencies)")
    ap.add_argument("--modes", default="hmac,munge,munge-session")
    ap.add_argument("--loads", default="closed,paced")
    ap.add_argument("--loglevel", default="info")
    ap.add_argument("--workers", type=int, default=0, help="daemon Workers= (0: its default)")
    ap.add_argument("--loadgen", action="store_true")
    ap.add_argument("--config")
    ap.add_argument("--src")
    ap.add_argument("--dst")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--presign", type=int)
    ap.add_argument("--session", action="store_true")
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

        rows = []
        for mode in args.modes.split(","):
            port = 6900 + len(rows)
            cfg = base / f"{mode}.conf"
            cfg.write_text(f"AuthType={mode.split('-')[0]}\nKeyFile={key}\nMungeSocket={msock}\nPort={port}\n"
                           f"ListenAddresses=127.0.0.1\nRateLimit=1000000\nRateBurst=1000000\n"
                           f"MaxConnections=1024\nCgroupRoots={root}\nLogLevel={args.loglevel}\n"
                           + (f"Workers={args.workers}\n" if args.workers else ""))
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
            for load in args.loads.split(","):
                rate = 0.0 if load == "closed" else args.rate
                r = run_load(args, cfg, src, dst, d.pid, rate, procs, mode == "munge-session")
                label = "closed" if load == "closed" else f"{rate:.0f}/s"
                rows.append((mode, label, r))
                print(f"  {mode} {label}: done in {r['elapsed']:.1f} s", file=sys.stderr)
            d.send_signal(signal.SIGTERM)
            d.wait(10)
            log.close()
        print()
        print(f"Authenticated caller-ID answers, {args.clients} concurrent clients on loopback, "
              f"daemon on 1 CPU (LogLevel={args.loglevel}), {args.seconds:.0f} s per load")
        print("[target: >= 2,000 answers/s on one core, p99 < 20 ms]")
        print(f"{'auth':>13} | {'load':>7} | {'answers/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | "
              f"{'daemon CPU':>10} | {'CPU µs/answer':>13} | outcomes (replies verified)")
        print("-" * 110)
        for mode, label, r in rows:
            print(f"{mode:>13} | {label:>7} | {r['rps']:9.0f} | {r['p50']:7.2f} | {r['p99']:7.2f} | "
                  f"{r['cpu'] * 100:9.0f}% | {r['cpu_per_answer_us']:13.0f} | {r['outs']}")
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
