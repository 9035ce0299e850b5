#!/usr/bin/env python3
"""In-process cost of pam_callerid per login (first pam_acct_mgmt in a fresh process, which
is what every ssh login pays: sshd re-execs per connection, so the interpreter starts anew).

    /opt/slurm-callerid/bin/python bench/bench_pam.py [--runs N]

As root. Builds the module and tests/pam/cid_pamdrv.c, creates a throw-away user (cidt*),
PAM services (/etc/pam.d/cidtest-*), a synthetic Slurm node (freezer cgroups under a unique
root, stepd sockets) and a fake caller-ID daemon (the test fixtures), and removes them all.
Prints, per path, the median of N runs: the C driver's wall time of the first acct_mgmt
(incl. Python start-up), the second call, the interpreter start-up (py_init_ms), and the
Python-side latency recorded in the audit line.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "pam"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    from pamhelpers import build_module, stack
    import test_slurm as T

    tmp = Path(tempfile.mkdtemp(prefix="cidbench-"))
    os.chmod(tmp, 0o755)
    so = build_module(tmp)
    drv = str(tmp / "cid_pamdrv")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", drv,
                    str(REPO / "tests/pam/cid_pamdrv.c"), "-lpam"], check=True)
    user = "cidt" + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True)
    import pwd
    uid = pwd.getpwnam(user).pw_uid
    svcs = []
    stages = {}
    slurm = T.FakeSlurm(tmp)
    daemon = T.FakeDaemon(slurm.key)

    def service(args):
        name = "cidtest-p" + uuid.uuid4().hex[:10]
        with open("/etc/pam.d/" + name, "w") as f:
            f.write("\n".join(stack(so, args, session=False)).replace("{service}", name) + "\n")
        svcs.append("/etc/pam.d/" + name)
        return name

    def run(svc, who, audit, with_conn=False):
        pass_fds, socks = (), []
        if with_conn:
            lst = socket.socket()
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            cli = socket.create_connection(lst.getsockname())
            srv, _ = lst.accept()
            socks = [lst, cli, srv]
            pass_fds = (srv.fileno(),)
        try:
            r = subprocess.run([drv, svc, who, "first"], capture_output=True, text=True,
                               pass_fds=pass_fds, check=True)
        finally:
            for s in socks:
                s.close()
        d = dict(kv.split("=") for kv in r.stdout.split())
        with open(audit) as f:
            last = [json.loads(x) for x in f][-2]        # the first call's record
        stages.setdefault(svc, []).append(last.get("ms") or {})
        return float(d["first_ms"]), float(d["second_ms"]), last.get("py_init_ms"), \
            last.get("latency_ms"), last.get("path")

    try:
        rows = []
        permit = "cidtest-p" + uuid.uuid4().hex[:10]
        with open("/etc/pam.d/" + permit, "w") as f:
            f.write("account required pam_permit.so\n")
        svcs.append("/etc/pam.d/" + permit)
        base = [float(dict(kv.split("=") for kv in subprocess.run(
            [drv, permit, user, "first"], capture_output=True, text=True).stdout.split())
            ["first_ms"]) for _ in range(a.runs)]
        rows.append(("pam_permit (baseline)", statistics.median(base), None, None, None, ""))

        def scenario(label, args, who=user, with_conn=False, ttl=0):
            audit = tmp / ("a-%s.jsonl" % uuid.uuid4().hex[:6])
            svc = service("config=%s audit=%s %s" % (slurm.conf(daemon.port, ttl), audit, args))
            res = [run(svc, who, audit, with_conn) for _ in range(a.runs)]
            med = [statistics.median(x[i] for x in res) if res[0][i] is not None else None
                   for i in range(4)]
            st = stages.get(svc) or [{}]
            keys = sorted({k for x in st for k in x})
            detail = " ".join("%s=%.2f" % (k, statistics.median(x.get(k, 0) for x in st))
                              for k in keys)
            rows.append((label, med[0], med[1], med[2], med[3],
                         "%s %s" % (res[0][4], detail)))

        scenario("root (ignored)", "", who="root")
        scenario("no jobs (denied)", "")
        slurm.add_job(uid, 101)
        scenario("one job (adopt, no RPC)", "")
        slurm.add_job(uid, 102)
        scenario("two jobs, no connection (newest)", "")
        daemon.mode = ("found", 101, uid)
        scenario("two jobs, caller-ID answered (HMAC)", "", with_conn=True)
        daemon.mode = ("unknown",)
        scenario("two jobs, caller-ID unknown (newest)", "", with_conn=True)
        print("%-40s %10s %10s %10s %10s  %s" % ("path", "first_ms", "second_ms", "py_init",
                                                   "py_side", "audit path, py-side stages (ms)"))
        for label, f, s, pi, lat, path in rows:
            fmt = lambda v: "-" if v is None else "%.2f" % v  # noqa: E731
            print("%-40s %10s %10s %10s %10s  %s" % (label, fmt(f), fmt(s), fmt(pi), fmt(lat),
                                                     path))
        print("(medians of %d fresh processes; first_ms includes the interpreter start)"
              % a.runs)
    finally:
        daemon.close()
        for p in svcs:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        slurm.cleanup()
        subprocess.run(["userdel", user], capture_output=True)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
