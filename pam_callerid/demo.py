"""The demo (the README's main-job command): a local Slurm mini-cluster, real users and jobs,
ssh logins, and what the adoption module decided for each.

    bash packaging/run demo            (or: python -m pam_callerid.demo [--module pam_slurm_adopt])

Brings up the test bed of testbed/ (3 nodes, a controller and a login node, each in its
own namespaces), plays the adoption scenarios, prints each decision with the cgroup the
session landed in and the module's own log lines, and tears everything down.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _where(cluster, user, src, dst, job=None):
    r = cluster.ssh(user, src, dst, "grep :freezer: /proc/self/cgroup", job=job)
    if r.rc != 0:
        return r, (r.err.strip().splitlines() or ["(no message)"])[0]
    return r, "landed in " + r.out.strip().split(":", 2)[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", default="pam_callerid", choices=["pam_callerid", "pam_slurm_adopt"],
                    help="adoption module in the node sshds' PAM stack")
    ap.add_argument("--prefix", default="cid", help="test bed name prefix (namespaces, bridge)")
    ap.add_argument("--subnet", type=int, default=3, help="10.199.<subnet>.0/24 for the test bed")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from testbed.cluster import Cluster

    c = Cluster(nodes=3, prefix=args.prefix, subnet=args.subnet)
    print("== bringing up a 3-node Slurm cluster in network namespaces ...", flush=True)
    c.up()
    try:
        print(f"   up in {c.bringup_seconds:.1f} s")
        for h in c.hosts.values():
            print(f"   {h.name:6s} {h.ip4:14s} {h.ip6:18s} {h.kind}")
        print(c.exec("login", ["sinfo"]).out)
        audit = None
        if args.module == "pam_callerid":
            from testbed.adopters import use_pam_callerid
            audit = use_pam_callerid(c, auth="hmac", daemon_hosts=c.nodes, rpc_timeout=0.5,
                                     action_adopt_failure="deny")
            print("== node sshd PAM stack: pam_callerid (a thin C client) in account (decide) and "
                  "session (adopt), asking its node's `callerid daemon`; the daemon runs on "
                  f"{', '.join(c.nodes)}, none on the login node\n")
        else:
            c.use_pam_slurm_adopt()
            print(f"== node sshd PAM account stack ends with: {args.module} nodename=<node>\n")
        steps = []

        def play(title, user, src, dst, job=None):
            mark = c.syslog_mark()
            r, outcome = _where(c, user, src, dst, job)
            logs = [ln.split("]: ", 1)[-1] for ln in c.syslog(dst, since=mark, ident=args.module)]
            steps.append((title, f"{r.seconds * 1000:.0f} ms", outcome))
            print(f"-- {title}\n   ssh {user}@{dst} from {src}{f' inside job {job}' if job else ''}: "
                  f"{outcome}  ({r.seconds * 1000:.0f} ms)")
            for ln in logs:
                print(f"   {args.module}: {ln}")

        play("no job on node3 -> denied", "alice", "login", "node3")
        a = c.sbatch("alice", nodes=["node1"])
        play(f"one job ({a}) on node1 -> adopted", "alice", "login", "node1")
        b = c.sbatch("alice", nodes=["node1", "node2"])
        time.sleep(1.1)
        n = c.sbatch("alice", nodes=["node2"])
        play(f"jobs {b},{n} on node2, ssh from inside job {b} on node1 -> caller-ID", "alice", "node1", "node2", job=b)
        play(f"jobs {b},{n} on node2, ssh from the login node -> newest", "alice", "login", "node2")
        if args.module == "pam_callerid":
            play("again from the login node -> negative cache, no wait", "alice", "login", "node2")
            r = c.ssh("alice", "login", "node1", "grep :freezer: /proc/self/cgroup", password=True)
            steps.append(("keyboard-interactive login -> adopted in session",
                          f"{r.seconds * 1000:.0f} ms",
                          "landed in " + r.out.strip().split(":", 2)[2] if r.rc == 0 else r.err.strip()))
            print(f"-- keyboard-interactive login alice@node1: {steps[-1][2]}")
        play("bob has no job on node2 -> denied", "bob", "login", "node2")
        print("\n== summary")
        for title, ms, outcome in steps:
            print(f"   {title:62s} {ms:>7s}  {outcome}")
        if audit is not None:
            from pam_callerid import audit_reader as A
            print(f"\n== audit records ({audit}; `callerid audit` reads them)")
            print(A.format_table(list(A.read_all(str(audit)))))
        c.cancel_all()
    finally:
        print("\n== tearing down ...", flush=True)
        c.down()
        left = c.leftovers()
        print("   machine clean" if not left else f"   LEFT BEHIND: {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
