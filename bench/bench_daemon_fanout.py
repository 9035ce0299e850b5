#!/usr/bin/env python3
"""Fan-out: one launcher ssh-es to 1,000 nodes at once; 1,000 daemons ask its node's daemon
(run as root).

    /opt/slurm-callerid/bin/python bench/bench_daemon_fanout.py [--queries 1000,10000]
        [--sources 1000] [--window 0.5] [--auth munge,hmac] [--deadline 1.0]
        [--client alone,coalesced] [--processes 1] [--spare-cpu]

The launcher: a synthetic job (cgroup v2 layout) with --procs processes ("ssh" clients), which
between them hold one loopback TCP connection per query, made in the job's cgroup as an ssh
started in a job step makes its own.  The askers: --gens generator
processes (pinned to CPU 1) on --sources distinct source addresses 127.1.x.y, each query from
a reserved port (root's client), signed and its socket bound before the window, connected
and sent on a fixed schedule spread evenly over --window seconds, the reply read without
blocking (selectors), and verified after the window (signature, nonce, the right job).
Latency = reply received - *scheduled* send: an asker that falls behind its schedule counts
against the daemon (the send lag is reported).  --client: each source address asks every
question in a request of its own ("alone"), or as the PAM service does ("coalesced",
daemon/coalesce.py: one request in flight per daemon, the questions that came meanwhile go
together when it returns; a request is then signed as it leaves, and with munge a source's
first request carries a credential, its next ones the session ticket that the first answer
brought (daemon/session.py): each source stands for a node with a session of its own).

Where the CPU goes.  This VM has 2 cores.  The askers stand for 1,000 other machines, but
they have to run here: they cost ~100 µs of CPU per query (mostly the kernel's TCP, both
ends of loopback), ~1 s per 10,000, so they get CPU 1 of their own, and the daemon (with its
munged) gets CPU 0 at nice --nice: the model is "the daemon may use one core".  With
--processes N the daemon's helpers (daemon/group.py) stay on CPU 0 as well, unless
--spare-cpu: then they run on CPU 1 at SCHED_IDLE, i.e. on whatever the askers leave of it
(the askers' schedule keeps priority).  Reported per run: the daemon's CPU per answer (all
its processes) and its munged's, the askers' CPU per query, so a result can be set against
the cores a real node has.

[target: 100 % answered correctly, max latency < rpc_timeout (1 s)]
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon_common import (PY, ROOT, Run, cpu_seconds, loadavg, pct,  # noqa: E402
                                 print_table, rss_mb)

sys.path.insert(0, str(ROOT))
JOB = 999


# ---------------------------------------------------------------------------------------------
# generator (child process)


def _bound_socket(ip, used: set):
    """A socket bound to a reserved port of `ip` (root's client does the same) that no
    other query of this generator uses, or None."""
    for _ in range(64):
        port = 600 + int.from_bytes(os.urandom(2), "little") % 424
        if (ip, port) in used:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            s.close()
            continue
        used.add((ip, port))
        s.setblocking(False)
        return s
    return None


def generator(args):
    """Child: the queries assigned to it -> JSON {lat, lag, replies: {first k: hex}, groups:
    {first k: [k...]}, errors, nonces, cpu}.  With --coalesce each source address behaves
    as a node's PAM service does (daemon.coalesce): one request in flight; questions that
    come meanwhile go together (at most MAX_BATCH) when it returns."""
    import resource
    from daemon import client as C, protocol as P, wire
    from daemon.config import load_config
    cfg = load_config(args.config)
    auth = C.auth_from_config(cfg)
    jobs = json.loads(Path(args.plan).read_text())[args.index]   # [k, src_ip, src, dst]
    prepared = []
    used = set()
    for k, ip, src, dst in jobs:
        sa, sp = C.parse_endpoint(src)
        da, dp = C.parse_endpoint(dst)
        req = P.pack_request(sa, sp, da, dp, "tcp")
        # signed now when each goes alone (as before the window); when coalescing, a
        # request is signed as it leaves (its questions are known only then)
        sealed = None if args.coalesce else wire.seal_request(req, auth)   # (frame, reply auth)
        prepared.append((k, ip, req, sealed, _bound_socket(ip, used)))
    nonces_of = {k: r.nonce for k, _, r, _, _ in prepared}
    sel = selectors.DefaultSelector()
    t0 = args.t0
    period = args.window / args.total
    lat, lag, replies, groups, errors, keys = {}, {}, {}, {}, {}, {}
    pending, busy, waiting = {}, set(), {}
    i = 0
    end = t0 + args.window + args.deadline + 2.0

    def send(ip, items):
        """items: [(k, req, sealed, sock)], sent in one request from the first one's socket."""
        s = items[0][3]
        for *_, other in items[1:]:
            if other is not None:
                other.close()
        ks = [k for k, *_ in items]
        if s is None:
            for k in ks:
                errors[k] = "no reserved port free"
            return after(ip)
        frame, reply_auth = items[0][2] or wire.seal_requests([r for _, r, _, _ in items], auth,
                                                              peer=ip)   # each source its session
        err = s.connect_ex(("127.0.0.1", args.port))
        if err not in (0, errno.EINPROGRESS):
            for k in ks:
                errors[k] = os.strerror(err)
            s.close()
            return after(ip)
        busy.add(ip)
        pending[s] = [ks, frame, ip, P.FrameDecoder(max_frames=1), reply_auth]
        sel.register(s, selectors.EVENT_WRITE)

    def after(ip):
        """The request from `ip` returned: the questions that waited go now."""
        busy.discard(ip)
        queue = waiting.get(ip)
        if queue:
            batch, waiting[ip] = queue[:P.MAX_BATCH], queue[P.MAX_BATCH:]
            send(ip, batch)

    while time.time() < t0:
        time.sleep(min(0.01, max(0.0, t0 - time.time())))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    while time.time() < end and (i < len(prepared) or pending):
        now = time.time()
        while i < len(prepared) and t0 + prepared[i][0] * period <= now:
            k, ip, req, sealed, s = prepared[i]
            lag[k] = (time.time() - (t0 + k * period)) * 1e3
            if args.coalesce and ip in busy:
                waiting.setdefault(ip, []).append((k, req, sealed, s))
            else:
                send(ip, [(k, req, sealed, s)])
            i += 1
        nxt = t0 + prepared[i][0] * period if i < len(prepared) else end
        for key, ev in sel.select(max(0.0, min(nxt - time.time(), 0.05))):
            s = key.fileobj
            ks, frame, ip, dec, reply_auth = pending[s]
            try:
                if ev & selectors.EVENT_WRITE:
                    s.send(frame)
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                data = s.recv(P.MAX_FRAME)
                if not data:
                    raise ConnectionError("closed without a reply")
                frames = dec.feed(data)
                if not frames:
                    continue
                got = time.time()
                for k in ks:
                    lat[k] = (got - (t0 + k * period)) * 1e3
                f = frames[0]
                if args.coalesce and reply_auth.scheme == P.AUTH_MUNGE_KEY:
                    # as the client does: verify, and keep the session ticket it carries
                    wire.open_replies(f, reply_auth, [nonces_of[k] for k in ks])
                replies[ks[0]] = P.encode_frame(f.type, f.auth, f.body, f.auth_blob).hex()
                groups[ks[0]] = ks
                keys[ks[0]] = [reply_auth.scheme, getattr(reply_auth, "key", b"").hex()]
            except (OSError, ConnectionError, P.ProtocolError, wire.ReplyRejected) as e:
                for k in ks:
                    errors[k] = str(e)
            sel.unregister(s)
            s.close()
            del pending[s]
            after(ip)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for s, st in pending.items():
        for k in st[0]:
            errors[k] = "no reply by the end"
        s.close()
    for queue in waiting.values():
        for k, *_ in queue:
            errors.setdefault(k, "no reply by the end")
    for *_, s in prepared[i:]:
        if s is not None:
            s.close()
    nonces = {k: n.hex() for k, n in nonces_of.items()}
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    Path(args.out).write_text(json.dumps({"lat": lat, "lag": lag, "replies": replies,
                                          "groups": groups, "errors": errors, "nonces": nonces,
                                          "keys": keys,
                                          "cpu": cpu}))


# ---------------------------------------------------------------------------------------------
# parent


def source_ips(n):
    return [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(n)]


def make_launcher(run: Run, nconn: int, nprocs: int):
    """nconn loopback connections whose client ends are made in job JOB's cgroup and held by
    nprocs processes in it; the server ends stay with this process.  -> [(src, dst)]."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4096)
    leaf = run.job_cgroup(JOB)
    out, servers = [], []
    per = -(-nconn // nprocs)
    made = 0
    while made < nconn:
        batch = []
        with run.inside(leaf):          # the launcher's ssh processes make their connections
            for _ in range(min(per, nconn - made)):
                c = socket.create_connection(lst.getsockname())
                s, _ = lst.accept()
                out.append(("%s:%d" % c.getsockname(), "%s:%d" % c.getpeername()))
                batch.append(c)
                servers.append(s)
        pid = run.spawn_holder(batch)
        (leaf / "cgroup.procs").write_text(str(pid))
        for c in batch:
            c.close()
        made += len(batch)
    lst.close()
    return out, servers


def daemon_pids(pid: int) -> list[int]:
    """The daemon and its helper processes (daemon/group.py: its children)."""
    kids = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except OSError:
            pass
    return [pid] + kids


def wait_helpers(pid: int, n: int) -> list[int]:
    end = time.time() + 20
    while len(pids := daemon_pids(pid)) < n and time.time() < end:
        time.sleep(0.05)
    time.sleep(0.5)                        # (they import and listen after being started)
    return pids


def to_spare_cpu(pid: int):
    """Every thread of a helper onto CPU 1 at SCHED_IDLE (what the askers leave of it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {1})
        os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))


def one_run(run, args, auth_name, nq, msock, csock, key, launcher, client):
    conf = (f"AuthType={auth_name}\nMungeSocket={msock}\nKeyFile={key}\nCgroupRoots={run.cgroot}\n"
            f"RateLimit=1000000\nRateBurst=1000000\nProcesses={args.processes}\n"
            + "".join(f"{kv}\n" for kv in args.set))
    d, port, cfg = run.daemon(conf, cpu="0", name=f"fan-{auth_name}-{nq}-{client}", nice=args.nice)
    pids = wait_helpers(d.pid, args.processes)
    if args.spare_cpu:
        for pid in pids[1:]:
            to_spare_cpu(pid)
    ccfg = run.base / f"askers-{auth_name}-{nq}.conf"
    ccfg.write_text(f"Port={port}\nAuthType={auth_name}\nMungeSocket={csock}\nKeyFile={key}\n")
    ips = source_ips(args.sources)
    queries = [(k, ips[k % len(ips)], *launcher[k]) for k in range(nq)]
    plan = [queries[g::args.gens] for g in range(args.gens)]
    plan_file = run.base / f"plan-{auth_name}-{nq}-{client}.json"
    plan_file.write_text(json.dumps(plan))
    rss = lambda: sum(rss_mb(p) for p in pids)     # noqa: E731
    rss0 = rss()
    munged = int((Path(msock).parent / "pid").read_text())
    cpu0 = sum(cpu_seconds(p) for p in pids), cpu_seconds(munged)
    t0 = time.time() + 2.0 + nq / 2500           # time to pre-sign
    gens = [run.start(["taskset", "-c", "1", PY, __file__, "--gen", "--config", str(ccfg),
                       "--plan", str(plan_file), "--index", str(g), "--port", str(port),
                       "--t0", repr(t0), "--total", str(nq), "--window", str(args.window),
                       "--deadline", str(args.deadline), "--out", str(plan_file) + f".{g}"]
                      + (["--coalesce"] if client == "coalesced" else []))
            for g in range(args.gens)]
    load = None
    peak = rss0
    while any(g.poll() is None for g in gens):
        peak = max(peak, rss())
        if load is None and time.time() > t0 + args.window:
            load = loadavg()
        time.sleep(0.02)
    res = [json.loads(Path(str(plan_file) + f".{g}").read_text()) for g in range(args.gens)]
    cpu_d = sum(cpu_seconds(p) for p in pids) - cpu0[0]
    cpu_m = cpu_seconds(munged) - cpu0[1]
    d.terminate()
    d.wait(15)
    # verify every reply: signature, nonce, job
    from daemon import client as C, protocol as P, wire
    from daemon.config import load_config
    from daemon.auth import ReplyKey, SessionKey
    acfg = load_config(str(ccfg))
    auth, reply_uid = C.auth_from_config(acfg), acfg.reply_uid()
    lat, right, errors, requests = [], 0, {}, 0
    for r in res:
        for first, hx in r["replies"].items():
            ks = [str(k) for k in r["groups"][first]]
            requests += 1
            reps = [None] * len(ks)
            scheme, key = r["keys"][first]
            keyed = {P.AUTH_MUNGE_KEY: ReplyKey, P.AUTH_MUNGE_SESSION: SessionKey}.get(scheme)
            reply_auth = keyed(bytes.fromhex(key), reply_uid, fallback=auth) if keyed else auth
            try:
                reps = wire.open_replies(P.decode_frame(bytes.fromhex(hx)), reply_auth,
                                         [bytes.fromhex(r["nonces"][k]) for k in ks])
            except Exception as e:
                errors[f"rejected: {e}"] = errors.get(f"rejected: {e}", 0) + len(ks)
            for k, rep in zip(ks, reps):
                if rep is not None and rep.status == P.STATUS_FOUND and rep.job_id == JOB:
                    right += 1
                elif rep is not None:
                    errors[P.STATUS_NAMES.get(rep.status)] = errors.get(P.STATUS_NAMES.get(rep.status), 0) + 1
                lat.append(r["lat"][k])
        for k, e in r["errors"].items():
            errors[e] = errors.get(e, 0) + 1
    late = sum(1 for x in lat if x >= args.deadline * 1e3)
    lag = [x for r in res for x in r["lag"].values()]
    answered = max(1, len(lat))
    return dict(auth=auth_name, n=nq, client=client, right=right, requests=requests, late=late, errors=errors, p50=pct(lat, 0.5),
                p99=pct(lat, 0.99), max=max(lat) if lat else float("nan"), rss0=rss0, peak=peak,
                load=load, lag99=pct(lag, 0.99), lagmax=max(lag) if lag else float("nan"),
                us_daemon=cpu_d / answered * 1e6, us_munged=cpu_m / answered * 1e6,
                us_askers=sum(r["cpu"] for r in res) / nq * 1e6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", default="1000,10000")
    ap.add_argument("--sources", type=int, default=1000)
    ap.add_argument("--window", type=float, default=0.5)
    ap.add_argument("--deadline", type=float, default=1.0, help="rpc_timeout (s)")
    ap.add_argument("--auth", default="munge,hmac")
    ap.add_argument("--procs", type=int, default=1000, help="launcher processes in the job")
    ap.add_argument("--gens", type=int, default=8)
    ap.add_argument("--nice", type=int, default=-10)
    ap.add_argument("--processes", type=int, default=1, help="the daemon's Processes")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another line of the daemon's config (e.g. Workers=2)")
    ap.add_argument("--spare-cpu", action="store_true",
                    help="helpers on the askers' CPU at SCHED_IDLE (see the docstring)")
    ap.add_argument("--client", default="alone,coalesced",
                    help="how each source asks: every question alone (a client that does not "
                         "coalesce), or coalesced as the PAM service does (daemon.coalesce)")
    ap.add_argument("--gen", action="store_true")
    ap.add_argument("--coalesce", action="store_true")
    ap.add_argument("--config")
    ap.add_argument("--plan")
    ap.add_argument("--index", type=int)
    ap.add_argument("--port", type=int)
    ap.add_argument("--t0", type=float)
    ap.add_argument("--total", type=int)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.gen:
        return generator(args)
    if os.geteuid() != 0:
        sys.exit("run as root")
    sizes = [int(x) for x in args.queries.split(",")]
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # the launcher's server ends
    rows = []
    with Run("cidbench-fanout") as run:
        msock = run.munged("munge-daemon", cpu="0", nice=args.nice)
        csock = run.munged("munge-askers", key=run.munge_key, cpu="1")
        from daemon.auth import write_key
        key = run.base / "callerid.key"
        write_key(str(key))
        launcher, servers = make_launcher(run, max(sizes), args.procs)
        print(f"  launcher: {len(launcher)} connections held by {args.procs} job processes",
              file=sys.stderr, flush=True)
        for auth_name in args.auth.split(","):
            for nq in sizes:
                for client in args.client.split(","):
                    r = one_run(run, args, auth_name, nq, msock, csock, key, launcher, client)
                    rows.append(r)
                    print(f"  {auth_name} {nq} {client}: done (load {r['load']})",
                          file=sys.stderr, flush=True)
        for s in servers:
            s.close()
    print()
    where = (f"daemon ({args.processes} process{'es' if args.processes > 1 else ''}) and its "
             f"munged on CPU 0 at nice {args.nice}"
             + (", helpers on CPU 1 at SCHED_IDLE" if args.spare_cpu else "") + ", askers on CPU 1")
    print(f"Fan-out: N queries arriving within {args.window} s from {args.sources} source addresses "
          f"(reserved ports), each about a different connection of one job ({args.procs} processes); "
          f"{where}")
    print(f"[target: 100 % answered correctly, max latency < rpc_timeout ({args.deadline:g} s)]")
    print_table(["auth", "queries", "client", "requests", "answered right", "late", "p50 ms",
                 "p99 ms", "max ms",
                 "RSS MB idle/peak", "CPU µs/answer daemon+munged", "askers µs/q",
                 "send lag p99/max ms", "load"],
                [([r["auth"], str(r["n"]), r["client"], str(r["requests"]),
                   f"{r['right']} ({100 * r['right'] / r['n']:.1f}%)",
                   str(r["late"]), f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['max']:.1f}",
                   f"{r['rss0']:.1f}/{r['peak']:.1f}", f"{r['us_daemon']:.0f} + {r['us_munged']:.0f}",
                   f"{r['us_askers']:.0f}", f"{r['lag99']:.1f}/{r['lagmax']:.1f}", str(r["load"])],
                  [f"failures: {r['errors']}"] if r["errors"] else []) for r in rows])

if __name__ == "__main__":
    main()
