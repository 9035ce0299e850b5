"""ssh login latency and CPU added by the adoption module: none vs pam_slurm_adopt vs
pam_callerid (the C client asking its node's `callerid daemon`), on the same real cluster
(testbed/), interleaved.

    /opt/slurm-callerid/bin/python bench/bench_login.py [--rounds 40] [--platform P1|P2]
        [--prefix P --subnet N]

As root. Paths (alice's jobs: B on node1+node2, A on node2 only):
  one job           login node -> node1 (only B there: no RPC)
  several, unknown  login node -> node2 (2 jobs; the source is outside any job -> newest)
  several, callerid inside B on node1 -> node2 (2 jobs; the caller-ID lookup names B)
  root              login node -> node1 as root (a second sshd on node1, port 2222, same PAM
                    stack; a bench-only key), which every module must let through at once
Each round runs every path under every configuration, switching the node sshds' PAM stack
between measurements (sshd reads it per connection). Then a second block, the same way, with
node1's slurm.conf grown by 5,000 flat NodeName lines (its own copy only: slurmctld keeps the
small one): "one job" again, so the two blocks tell what slurm.conf's size costs per login.

Latency: the ssh client's wall time, measured where it runs. The client uses the
curve25519-sha256 key exchange (KEX): Debian 12's default, the sntrup761x25519 hybrid, costs
~150 ms of CPU per login on this VM, the same with every module, and its scheduling jitter
hid the modules' few milliseconds. CPU: after each login, the CPU
time (user+system) of everything the adoption can make work, on every host -- the sshd
listeners (with their reaped per-connection children: the module runs inside them), slurmd,
slurmstepd and the callerid daemons -- per login, minus the same for no module ("Δ CPU").
Clock-tick resolution (10 ms) per process, averaged over the rounds.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.adopters import use_pam_callerid  # noqa: E402
from testbed.cluster import Cluster  # noqa: E402
from testbed.platforms import MATRIX  # noqa: E402

CONFIGS = ["none", "pam_slurm_adopt", "pam_callerid"]
KEX = ["-o", "KexAlgorithms=curve25519-sha256"]
BIG_NODES = 5000
ROOT_PORT = 2222
_HZ = os.sysconf("SC_CLK_TCK")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--platform", default="P1", choices=("P1", "P2"),
                    help="test-bed platform (those pam_slurm_adopt runs on): P1 22.05 cgroup "
                         "v1, P2 22.05 cgroup v2 + job container + configless")
    ap.add_argument("--prefix", default=os.environ.get("CID_TESTBED_PREFIX", "cid"))
    ap.add_argument("--subnet", type=int, default=int(os.environ.get("CID_TESTBED_SUBNET", "3")))
    args = ap.parse_args(argv)
    c = Cluster(nodes=3, prefix=args.prefix, subnet=args.subnet,
                platform=MATRIX[args.platform])
    c.up()
    print(f"platform {args.platform}: {c.platform}")
    try:
        run(c, args.rounds)
        c.cancel_all()
    finally:
        c.down()


def run(c, rounds):
    audit = use_pam_callerid(c, rpc_timeout=1)
    ours = {n: c._pam[n] for n in c.nodes}
    root_ssh = start_root_sshd(c, "node1")
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

    cat = "cat /proc/self/cgroup"
    paths = {
        "one job": (lambda: c.ssh("alice", "login", "node1", cat, options=KEX),
                    f"job_{b}/step_extern"),
        "several, unknown": (lambda: c.ssh("alice", "login", "node2", cat, options=KEX),
                             f"job_{a}/step_extern"),
        "several, callerid": (lambda: c.ssh("alice", "node1", "node2", cat, job=b, options=KEX),
                              f"job_{b}/step_extern"),
        "root": (root_ssh, None),
    }
    cpu = CpuMeter(c)
    for _ in range(2):                     # warm-up (page cache, first munge credential)
        for cfg in CONFIGS:
            configure(cfg)
            for fn, _ in paths.values():
                fn()
    audit.write_text("")
    small = measure(paths, CONFIGS, configure, rounds, cpu)
    if c.platform.configless:            # slurm.conf is slurmd's cached copy: not grown here
        report(rounds, small, None)
        return stages(records(audit), where(c), "the test bed's slurm.conf")
    n = len(records(audit))
    grow_slurm_conf(c, "node1")
    for cfg in CONFIGS:                    # each module reads the new file once
        configure(cfg)
        paths["one job"][0]()
    big = measure({"one job, 5,000-node slurm.conf": paths["one job"]}, CONFIGS, configure,
                  rounds, cpu)
    report(rounds, small, big)
    recs = records(audit)
    stages(recs[:n], where(c), "the test bed's slurm.conf")
    stages(recs[n:], {("node1", c.hosts["login"].ip4): "one job"},
           f"node1's slurm.conf + {BIG_NODES} NodeName lines (after the first login read it)")


def records(audit):
    return [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]


def where(c):
    """(node, source address) -> path, for the stage table."""
    return {("node1", c.hosts["login"].ip4): "one job",
            ("node2", c.hosts["login"].ip4): "several, unknown",
            ("node2", c.hosts["node1"].ip4): "several, callerid"}


def measure(paths, configs, configure, rounds, cpu):
    """{(path, cfg): {"ms": [...], "cpu": [...], "wrong": n}}, interleaved rounds."""
    out = {(p, cfg): {"ms": [], "cpu": [], "wrong": 0} for p in paths for cfg in configs}
    for _ in range(rounds):
        for cfg in configs:
            configure(cfg)
            for p, (fn, expect) in paths.items():
                before = cpu.sample()
                r = fn()
                if r.rc != 0:
                    raise SystemExit(f"{cfg} {p}: ssh failed: {r.err}")
                time.sleep(0.1)             # the per-connection sshd exits and is reaped
                cell = out[(p, cfg)]
                cell["cpu"].append(cpu.sample() - before)
                cell["ms"].append(r.seconds * 1000)
                if cfg != "none" and expect and expect not in r.out:
                    cell["wrong"] += 1
    return out


# ------------------------------------------------------------------ root login
def start_root_sshd(c, node):
    """A second sshd on `node` (port 2222, PAM service sshd: the same stack) that lets root in
    with a bench-only key; returns a function doing one timed root login from the login node."""
    d = c.state / "bench-root"
    d.mkdir(mode=0o700, exist_ok=True)
    key = d / "id_ed25519"
    if not key.exists():
        import subprocess
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    cfg = d / "sshd_config"
    base = (c.state / "etc/sshd_config").read_text()
    cfg.write_text(base.replace("Port 22\n", f"Port {ROOT_PORT}\n").replace(
        "AuthorizedKeysFile .ssh/authorized_keys", f"AuthorizedKeysFile {d}/authorized_keys") +
        f"\nPidFile {d}/sshd.pid\n"
        "StrictModes no\n")          # the key file's path crosses /var/tmp (1777), not ~root
    c.start_daemon(node, "sshd-root", ["/usr/sbin/sshd", "-D", "-f", str(cfg), "-E",
                                       str(c.logs / f"sshd-root-{node}.log")],
                   wait_for=lambda: c.exec(node, ["bash", "-c", f"echo > /dev/tcp/127.0.0.1/{ROOT_PORT}"]).ok)
    ssh = (f"ssh -F /dev/null -p {ROOT_PORT} -i {key} {' '.join(KEX)} -o StrictHostKeyChecking=no "
           f"-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR root@{node} true")

    def login():
        r = c.exec("login", ["bash", "-c", f's=$EPOCHREALTIME; {ssh}; rc=$?; '
                                          f'echo "__t $s $EPOCHREALTIME" >&2; exit $rc'])
        t = [ln for ln in r.err.splitlines() if ln.startswith("__t ")]
        if t:
            s, e = map(float, t[-1].split()[1:3])
            r.seconds = e - s
        return r
    return login


# ------------------------------------------------------------------ 5,000-node slurm.conf
def grow_slurm_conf(c, node):
    """node's own copy of slurm.conf (its /etc overlay) grows by BIG_NODES flat NodeName lines."""
    conf = c.hostdir(node) / "etc.upper" / "slurm" / "slurm.conf"
    extra = "".join(f"NodeName=big{i:05d} NodeAddr=10.255.{i // 250}.{i % 250 + 1} CPUs=2 "
                    f"RealMemory=1000 State=UNKNOWN\n" for i in range(BIG_NODES))
    with open(conf, "a") as f:
        f.write(extra)


# ------------------------------------------------------------------ CPU
class CpuMeter:
    """CPU seconds used so far by sshd (with reaped children), slurmd, slurmstepd and the
    callerid daemons on every host of the cluster."""

    NAMES = ("sshd", "slurmd", "slurmstepd", "python3", "python")

    def __init__(self, c):
        self.c = c

    def sample(self):
        total = 0
        for h in self.c.hosts:
            for pid in self.c.pids_in_netns(h):
                total += self._ticks(pid)
        return total / _HZ

    def _ticks(self, pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            return 0
        comm = data[data.find("(") + 1:data.rfind(")")]
        if comm not in self.NAMES:
            return 0
        if comm.startswith("python"):
            try:                            # only the callerid daemon, not test tools
                if b"callerid" not in open(f"/proc/{pid}/cmdline", "rb").read():
                    return 0
            except OSError:
                return 0
        f = data[data.rfind(")") + 2:].split()
        ticks = int(f[11]) + int(f[12])                    # utime, stime
        if comm == "sshd":
            ticks += int(f[13]) + int(f[14])               # cutime, cstime: reaped children
        return ticks


# ------------------------------------------------------------------ report
def report(rounds, small, big):
    blocks = [("test bed's slurm.conf", small)]
    if big is not None:
        blocks.append((f"node1's slurm.conf + {BIG_NODES} NodeName lines", big))
    for title, res in blocks:
        paths = list(dict.fromkeys(p for p, _ in res))
        print(f"\n== {title}: ssh login latency, medians of {rounds} interleaved logins per "
              f"cell (ms); Δ = added over no adoption module")
        print(f"{'path':32s} {'none':>8s} {'pam_slurm_adopt':>22s} {'pam_callerid':>22s}  "
              f"{'ours/psa':>8s}  wrong job (psa/ours)")
        for p in paths:
            base = statistics.median(res[(p, "none")]["ms"])
            d = {cfg: statistics.median(res[(p, cfg)]["ms"]) - base for cfg in CONFIGS[1:]}
            ratio = d["pam_callerid"] / d["pam_slurm_adopt"] if d["pam_slurm_adopt"] > 0 else float("nan")
            cells = [f"{base + d[cfg]:8.1f} (Δ {d[cfg]:+6.1f})" for cfg in CONFIGS[1:]]
            print(f"{p:32s} {base:8.1f} {cells[0]:>22s} {cells[1]:>22s}  {ratio:8.2f}  "
                  f"{res[(p, 'pam_slurm_adopt')]['wrong']}/{res[(p, 'pam_callerid')]['wrong']}")
        print("\npaired per round: median of the round's differences, ms [95% bootstrap CI]")
        print(f"{'path':32s} {'psa - none':>22s} {'ours - none':>22s} {'ours - psa':>22s}")
        for p in paths:
            n, a, o = (res[(p, cfg)]["ms"] for cfg in CONFIGS)
            print(f"{p:32s} " + " ".join(f"{x:>22s}" for x in (paired(a, n), paired(o, n),
                                                                 paired(o, a))))
        print(f"\nCPU per login (ms, mean over {rounds}; sshd incl. the module, slurmd, "
              f"slurmstepd, callerid daemons on every host); Δ = over no module")
        print(f"{'path':32s} {'none':>8s} {'Δ pam_slurm_adopt':>18s} {'Δ pam_callerid':>16s}")
        for p in paths:
            m = {cfg: statistics.mean(res[(p, cfg)]["cpu"]) * 1000 for cfg in CONFIGS}
            print(f"{p:32s} {m['none']:8.1f} {m['pam_slurm_adopt'] - m['none']:+18.1f} "
                  f"{m['pam_callerid'] - m['none']:+16.1f}")


def paired(xs, ys, boot=2000):
    """Median of xs[i] - ys[i] with a percentile bootstrap 95% interval, as text."""
    import random
    d = [x - y for x, y in zip(xs, ys)]
    rnd = random.Random(1)
    meds = sorted(statistics.median(rnd.choices(d, k=len(d))) for _ in range(boot))
    return f"{statistics.median(d):+6.1f} [{meds[int(boot * .025)]:+5.1f},{meds[int(boot * .975)]:+5.1f}]"


def stages(recs, pathof, title):
    """Where the service's time goes, from its audit records (medians, ms)."""
    key = lambda r: (r.get("node"), r.get("src_ip"), r.get("src_port"))  # noqa: E731
    sess = {key(r): r for r in recs if r.get("phase") == "session"}
    acct = [r for r in recs if r.get("phase") == "account"]
    ms = lambda name: lambda a, s: (a.get("ms") or {}).get(name)  # noqa: E731
    cols = [("queue", ms("queue")), ("settings", ms("settings")), ("jobs", ms("jobs")),
            ("caller-ID", ms("callerid")), ("holder", ms("holder")), ("adopt", ms("adopt")),
            ("entry", ms("entry")), ("x11", ms("x11")),
            ("account", lambda a, s: a.get("latency_ms")),
            ("session", lambda a, s: s.get("latency_ms") if s else None),
            ("register", ms("register"))]
    print(f"\npam_callerid's service with {title}, from its audit records (medians, ms; "
          "'account' and 'session': each phase's time in the service, request to reply; "
          "'adopt': the stepd moved the process before the reply; 'entry': the job's tasks "
          "files opened for the module to enter them itself (cgroup v1); 'register': the "
          "stepd's registration of that process, after the reply)")
    print(f"{'path':20s} " + " ".join(f"{n:>9s}" for n, _ in cols))
    for where, name in pathof.items():
        rows = [(a, sess.get(key(a))) for a in acct if (a.get("node"), a.get("src_ip")) == where]
        cells = []
        for _, f in cols:
            vals = [v for v in (f(a, s) for a, s in rows) if v is not None]
            cells.append(f"{statistics.median(vals):9.2f}" if vals else f"{'-':>9s}")
        print(f"{name:20s} " + " ".join(cells) + f"   (n={len(rows)})")


if __name__ == "__main__":
    main()
