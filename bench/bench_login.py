"""ssh login latency added by the adoption module: none vs pam_slurm_adopt vs pam_callerid,
on the same real cluster (testbed/), interleaved, medians of N logins per cell.

    /opt/slurm-callerid/bin/python bench/bench_login.py [--rounds 40]     (as root)

Paths (alice's jobs: B on node1+node2, A on node2 only):
  one job           login node -> node1 (only B there: no RPC)
  several, unknown  login node -> node2 (2 jobs; the source is outside any job -> newest)
  several, callerid inside B on node1 -> node2 (2 jobs; the caller-ID lookup names B)
Each round runs every path under every configuration, switching the node sshds' PAM stack
between measurements (sshd reads it per connection). The wall time is the ssh client's alone,
measured where it runs. pam_callerid runs with its daemon on every node and the login node
(munge authentication), as in production.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.adopters import use_pam_callerid  # noqa: E402
from testbed.cluster import Cluster  # noqa: E402

CONFIGS = ["none", "pam_slurm_adopt", "pam_callerid"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    c = Cluster(nodes=3)
    c.up()
    try:
        audit = use_pam_callerid(c, rpc_timeout=1)
        ours = {n: c._pam[n] for n in c.nodes}
        b = c.sbatch("alice", nodes=["node1", "node2"])
        time.sleep(1.1)
        a = c.sbatch("alice", nodes=["node2"])

        def configure(cfg):
            if cfg == "none":
                c.use_no_adoption()
            elif cfg == "pam_slurm_adopt":
                c.use_pam_slurm_adopt()
            else:
                for n, (acct, sess) in ours.items():
                    c.set_pam(n, acct, sess)

        paths = {
            "one job": lambda: c.ssh("alice", "login", "node1", "cat /proc/self/cgroup"),
            "several, unknown": lambda: c.ssh("alice", "login", "node2", "cat /proc/self/cgroup"),
            "several, callerid": lambda: c.ssh("alice", "node1", "node2", "cat /proc/self/cgroup", job=b),
        }
        expect = {"one job": f"job_{b}/step_extern", "several, unknown": f"job_{a}/step_extern",
                  "several, callerid": f"job_{b}/step_extern"}
        t = {(p, cfg): [] for p in paths for cfg in CONFIGS}
        wrong = {k: 0 for k in t}
        for _ in range(2):  # warm-up (page cache, first munge credential)
            for cfg in CONFIGS:
                configure(cfg)
                for fn in paths.values():
                    fn()
        audit.write_text("")
        t0 = time.monotonic()
        for _ in range(args.rounds):
            for cfg in CONFIGS:
                configure(cfg)
                for p, fn in paths.items():
                    r = fn()
                    if r.rc != 0:
                        raise SystemExit(f"{cfg} {p}: ssh failed: {r.err}")
                    t[(p, cfg)].append(r.seconds * 1000)
                    if cfg != "none" and expect[p] not in r.out:
                        wrong[(p, cfg)] += 1
        took = time.monotonic() - t0
        print(f"\nssh login latency, medians of {args.rounds} interleaved logins per cell (ms), "
              f"{len(t) * args.rounds} logins in {took:.0f} s; Δ = added over no adoption module")
        print(f"{'path':20s} {'none':>8s} {'pam_slurm_adopt':>22s} {'pam_callerid':>22s}   wrong job (psa/ours)")
        for p in paths:
            base = statistics.median(t[(p, "none")])
            cells = []
            for cfg in CONFIGS[1:]:
                m = statistics.median(t[(p, cfg)])
                cells.append(f"{m:8.1f} (Δ {m - base:+6.1f})")
            print(f"{p:20s} {base:8.1f} {cells[0]:>22s} {cells[1]:>22s}   "
                  f"{wrong[(p, 'pam_slurm_adopt')]}/{wrong[(p, 'pam_callerid')]}")
        print("\npaired per round (each round logs in once per path and configuration, back to "
              "back): median of the round's differences, ms [95% bootstrap CI]")
        print(f"{'path':20s} {'psa - none':>22s} {'ours - none':>22s} {'ours - psa':>22s}")
        for p in paths:
            n, a, o = (t[(p, cfg)] for cfg in CONFIGS)
            cols = [paired(a, n), paired(o, n), paired(o, a)]
            print(f"{p:20s} " + " ".join(f"{c:>22s}" for c in cols))
        stages(audit, {(("node1", c.hosts["login"].ip4)): "one job",
                       (("node2", c.hosts["login"].ip4)): "several, unknown",
                       (("node2", c.hosts["node1"].ip4)): "several, callerid"})
        c.cancel_all()
    finally:
        c.down()


def paired(xs, ys, boot=2000):
    """Median of xs[i] - ys[i] with a percentile bootstrap 95% interval, as text."""
    import random
    d = [x - y for x, y in zip(xs, ys)]
    rnd = random.Random(1)
    meds = sorted(statistics.median(rnd.choices(d, k=len(d))) for _ in range(boot))
    return f"{statistics.median(d):+6.1f} [{meds[int(boot * .025)]:+5.1f},{meds[int(boot * .975)]:+5.1f}]"


def stages(audit, pathof):
    """Where pam_callerid's time goes, from its own audit records (medians, ms)."""
    recs = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    acct = {r["pid"]: r for r in recs if r.get("phase") == "account"}
    cols = [("python start", lambda a, s: a.get("py_init_ms")),
            ("config", lambda a, s: a.get("ms", {}).get("config")),
            ("jobs", lambda a, s: a.get("ms", {}).get("jobs")),
            ("caller-ID", lambda a, s: a.get("ms", {}).get("callerid")),
            ("adopt", lambda a, s: a.get("ms", {}).get("adopt")),
            ("account", lambda a, s: a.get("latency_ms")),
            ("session", lambda a, s: s.get("latency_ms") if s else None)]
    sess = {r.get("stashed_from_pid", r["pid"]): r for r in recs if r.get("phase") == "session"}
    print("\npam_callerid stages from its audit records (medians, ms; 'account' and 'session' are "
          "the phases' totals after Python started)")
    print(f"{'path':20s} " + " ".join(f"{n:>12s}" for n, _ in cols))
    for key, name in pathof.items():
        rows = [(a, sess.get(pid)) for pid, a in acct.items()
                if (a.get("node"), a.get("src_ip")) == key]
        cells = []
        for _, f in cols:
            vals = [v for v in (f(a, s_) for a, s_ in rows) if v is not None]
            cells.append(f"{statistics.median(vals):12.2f}" if vals else f"{'-':>12s}")
        print(f"{name:20s} " + " ".join(cells) + f"   (n={len(rows)})")


if __name__ == "__main__":
    main()
