"""Load generators against a caller-ID daemon (used by tests/daemon and bench/bench_daemon_*).
Each mode runs for a bounded time, then prints one JSON line and exits.

    hostile.py hold   --src IP --port P --count N --seconds S
        hold N connections from source address IP: even ones send nothing, odd ones the
        first 20 bytes of a request; a connection that is closed or reset is opened again
        at once (the hostile case: the slots stay under pressure)
    hostile.py ask    --port P --config C --target SRC:PORT,DST:PORT --rate R --seconds S
                      [--host H] [--src IP ...] [--threads T] [--no-reserved]
        ask about the target connection at R requests/s on a fixed schedule (latency from the
        scheduled time), signed by whoever runs this (root: the PAM module's case; a user:
        a flood); every reply verified; outcomes counted, cacheable failures counted.
"""
from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PARTIAL = b"CLID\x01\x01\x02\x00\x00\x3e\x00\x20" + bytes(8)     # header + a little body


def hold(args):
    sel = selectors.DefaultSelector()
    end = time.monotonic() + args.seconds
    stats = {"opened": 0, "reset": 0, "connect-failed": 0}

    def open_one(i):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((args.src, 0))
            s.connect_ex(("127.0.0.1", args.port))
        except OSError:
            s.close()
            stats["connect-failed"] += 1
            return
        stats["opened"] += 1
        sel.register(s, selectors.EVENT_WRITE, i)

    for i in range(args.count):
        open_one(i)
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        for key, ev in sel.select(min(left, 0.2)):
            s, i = key.fileobj, key.data
            if ev & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    sel.unregister(s)
                    s.close()
                    stats["connect-failed"] += 1
                    open_one(i)
                    continue
                if i % 2:
                    try:
                        s.send(PARTIAL)
                    except OSError:
                        pass
                sel.modify(s, selectors.EVENT_READ, i)
            else:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    s.close()
                    stats["reset"] += 1
                    open_one(i)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    print(json.dumps(stats), flush=True)


def ask(args):
    from daemon import client as C, protocol as P, wire
    from daemon.config import load_config
    cfg = load_config(args.config)
    auth = C.auth_from_config(cfg)
    src, dst = args.target.split(",")
    sa, sp = C.parse_endpoint(src)
    da, dp = C.parse_endpoint(dst)
    n = max(1, int(args.rate * args.seconds))
    period = 1.0 / args.rate
    # sign everything before the timed window (the client's own cost is not the daemon's)
    frames = []
    for _ in range(n):
        req = P.pack_request(sa, sp, da, dp, "tcp")
        frames.append((req, *wire.seal_request(req, auth)))
    results = [None] * n
    t0 = time.monotonic() + 0.2
    srcs = args.src or [None]
    lock = threading.Lock()
    nxt = [0]

    def one(k):
        req, frame, reply_auth = frames[k]
        host_src = srcs[k % len(srcs)]
        sched = t0 + k * period
        delay = sched - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ans = C.query_sealed(args.host, args.port, req, frame, reply_auth=reply_auth,
                             timeout=args.timeout,
                             trusted_uids=cfg.reply_uids(), reserved_port=not args.no_reserved,
                             source=host_src)
        results[k] = (ans.outcome, ans.cacheable, ans.job_id,
                      (time.monotonic() - sched) * 1e3, ans.detail)

    def worker():
        while True:
            with lock:
                k = nxt[0]
                nxt[0] += 1
            if k >= n:
                return
            one(k)
    ts = [threading.Thread(target=worker) for _ in range(args.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out = {"n": n, "outcomes": {}, "cacheable": 0, "wrong_job": 0, "lat": [], "details": {}}
    for outcome, cacheable, job, ms, detail in results:
        out["outcomes"][outcome] = out["outcomes"].get(outcome, 0) + 1
        out["cacheable"] += bool(cacheable)
        if args.job and outcome == C.FOUND and job != args.job:
            out["wrong_job"] += 1
        if outcome not in (C.FOUND, C.UNKNOWN, C.BUSY) and len(out["details"]) < 5:
            out["details"][detail] = out["details"].get(detail, 0) + 1
        out["lat"].append(round(ms, 3))
    print(json.dumps(out), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("hold")
    h.add_argument("--src", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--count", type=int, default=1000)
    h.add_argument("--seconds", type=float, default=10)
    a = sub.add_parser("ask")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--config", required=True)
    a.add_argument("--target", required=True)
    a.add_argument("--rate", type=float, default=50)
    a.add_argument("--seconds", type=float, default=5)
    a.add_argument("--threads", type=int, default=8)
    a.add_argument("--timeout", type=float, default=1.0)
    a.add_argument("--job", type=int, default=0)
    a.add_argument("--src", action="append")
    a.add_argument("--no-reserved", action="store_true")
    args = ap.parse_args(argv)
    {"hold": hold, "ask": ask}[args.mode](args)


if __name__ == "__main__":
    main()
