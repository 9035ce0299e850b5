"""The test bed itself: it comes up with every host isolated, gives the API the scenarios use,
runs the platform it says it runs, and leaves the machine exactly as it found it — after a
normal run, after Ctrl-C, and (through the next run's stale cleanup) after being killed
outright, also with the platform machinery (cgroup2 subtree and shim, the private Slurm 24.11,
MariaDB and slurmdbd) up."""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from testbed import cgroup2, trixie
from testbed.cluster import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.root]
ROOT = Path(__file__).resolve().parents[2]


def etc_digest():
    """What the test bed could have changed in the root namespace's /etc. (Other programs on a
    shared machine may add users meanwhile, so the account files are checked for ours only.)"""
    out = {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in ["/etc/hosts", "/etc/pam.d/sshd"]}
    for f in ["/etc/passwd", "/etc/group", "/etc/shadow"]:
        out[f] = [ln for ln in Path(f).read_text().splitlines() if ln.split(":")[0] in ("alice", "bob")]
    out["/etc/slurm"] = sorted(os.listdir("/etc/slurm"))
    return out


def mounts(prefix):
    """The root namespace's mounts of a run with this prefix (its netns files, its state dir):
    other suites on a shared machine mount and unmount theirs meanwhile."""
    return [ln for ln in Path("/proc/self/mounts").read_text().splitlines()
            if f"/run/netns/{prefix}-" in ln or f"/{prefix}-testbed" in ln]


def test_hosts_are_isolated(cluster):
    c = cluster
    assert c.exec("node2", ["hostname"]).out.strip() == "node2"
    # the root namespace has no address of the test network, only the bridge
    net = c.hosts["login"].ip4.rsplit(".", 1)[0] + "."
    assert net not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    r = c.exec("login", ["ip", "-o", "addr", "show", "dev", "eth0"])
    assert c.hosts["login"].ip4 in r.out and c.hosts["login"].ip6 in r.out
    # test users exist only inside the test bed
    assert c.exec("node1", ["id", "-u", "alice"]).out.strip() == "2001"
    assert subprocess.run(["id", "alice"], capture_output=True).returncode != 0
    # sshd on a node listens inside its namespace only
    assert ":22 " in c.exec("node1", ["ss", "-ltnH"]).out


def test_ipv6_ssh_between_hosts(fresh):
    c = fresh
    c.use_no_adoption()
    r = c.ssh("alice", "login", "node1-v6", "echo $SSH_CONNECTION")
    assert r.rc == 0, r.err
    assert r.out.split()[0] == c.hosts["login"].ip6


def test_daemon_start_stop_and_syslog(fresh):
    c = fresh
    p = c.start_daemon("node3", "echo-daemon", ["python3", "-c", "import time,syslog\n"
                       "syslog.openlog('cidprobe'); syslog.syslog('hello from node3')\nprint('ready', flush=True)\n"
                       "time.sleep(600)"], wait_for=lambda: "ready" in c.daemon_log("node3", "echo-daemon"))
    assert any("hello from node3" in ln for ln in c.syslog("node3", ident="cidprobe"))
    assert p.pid in c.pids_in_netns("node3"), "the daemon does not run inside node3's namespace"
    c.stop_daemon("node3", "echo-daemon")
    time.sleep(0.1)
    assert not any("time.sleep(600)" in open(f"/proc/{q}/cmdline").read().replace("\0", " ")
                   for q in c.pids_in_netns("node3") if os.path.exists(f"/proc/{q}/cmdline"))


def test_password_login_works(fresh):
    c = fresh
    c.use_no_adoption()
    r = c.ssh("alice", "login", "node1", "id -un", password=True)
    assert r.rc == 0 and r.out.strip() == "alice", r.err


def test_platform_is_what_it_says(platform_cluster, platform):
    """The Slurm release, cgroup plugin, job container, configless slurmd and database the
    platform names are the ones running; the system's own Slurm stays 22.05."""
    c = platform_cluster
    assert c.exec("login", ["scontrol", "version"]).out.startswith(f"slurm-wlm {platform.slurm}")
    assert c.exec("node1", ["slurmd", "-V"]).out.startswith(f"slurm-wlm {platform.slurm}")
    system = subprocess.run(["/usr/sbin/slurmd", "-V"], capture_output=True, text=True).stdout
    assert system.startswith("slurm-wlm 22.05"), system
    log = (c.logs / "slurmd-node1.log").read_text()
    assert f"cgroup/v{platform.cgroup}: init" in log
    slurmd = int((c.hostdir("node1") / "slurmd.pid").read_text())
    environ = Path(f"/proc/{slurmd}/environ").read_bytes().split(b"\0")
    if platform.cgroup == 2:   # in its node's subtree, with the hybrid-host shim
        assert c.job_cgroup_of("node1", slurmd) == "/system.slice/node1_slurmstepd.scope/slurmd"
        assert f"LD_PRELOAD={c.shim}".encode() in environ
    else:
        assert not any(e.startswith(b"LD_PRELOAD=") for e in environ)
    config = c.exec("login", ["scontrol", "show", "config"]).out
    assert ("job_container/tmpfs" in config) == platform.job_container
    assert c.exec("node1", ["test", "-e", "/etc/slurm/slurm.conf"]).ok != platform.configless
    assert ("accounting_storage/slurmdbd" in config) == platform.accounting
    if platform.accounting:
        assert c.exec("ctl", ["sacctmgr", "-n", "-P", "show", "cluster", "format=Cluster"]).out.split() == \
            [c.cluster_name]
        assert c.sacct("-n", "-a", "-X", "-o", "JobID").ok


def _child_script(prefix, subnet, platform, then):
    # Ctrl-C's KeyboardInterrupt even when this suite was started in the background of a
    # non-interactive shell (which starts it with SIGINT ignored, inherited by the child)
    return textwrap.dedent(f"""
        import os, signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(ROOT)!r})
        from testbed.cluster import Cluster
        from testbed.platforms import MATRIX
        c = Cluster(nodes=1, prefix={prefix!r}, subnet={subnet}, node_prefix="x{prefix}n",
                    platform=MATRIX[{platform!r}])
        c.up()
        c.sbatch("alice", nodes=c.nodes)
        print("UP", flush=True)
        {then}
    """)


def _fresh_cluster_checks(prefix):
    """What the next run of the same prefix constructs (whatever platform it will run)."""
    return Cluster(nodes=1, prefix=prefix, subnet=9, node_prefix=f"x{prefix}n")


def _machinery(prefix):
    """The platform machinery of a run with this prefix still on the machine: the cgroup2
    subtree, the temporary apt source, processes running from its state dir or its database."""
    left = cgroup2.leftovers(prefix) + trixie.leftovers()
    state = f"/{prefix}-testbed/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if state in cmd and int(pid) != os.getpid():
            left.append(f"process {pid}: {cmd.replace(chr(0), ' ')[:120]}")
    return left


@pytest.mark.parametrize("platform_name, how", [
    ("P1", "normal"), ("P1", "ctrl-c"), ("P1", "kill-9-then-next-run"),
    ("P2", "ctrl-c"), ("P2", "kill-9-then-next-run"), ("P3", "ctrl-c"), ("P3", "kill-9-then-next-run")])
def test_teardown_leaves_machine_clean(platform_name, how):
    base = os.environ.get("CID_TESTBED_PREFIX", "cid")
    prefix = base + {"normal": "n", "ctrl-c": "c", "kill-9-then-next-run": "k"}[how] + platform_name[1]
    before_etc = etc_digest()
    assert mounts(prefix) == []
    assert not _machinery(prefix)
    then = {"normal": "c.down()", "ctrl-c": "time.sleep(600)", "kill-9-then-next-run": "time.sleep(600)"}[how]
    p = subprocess.Popen([sys.executable, "-c", _child_script(prefix, 9, platform_name, then)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "UP", p.stderr.read()
        assert _machinery(prefix), "nothing of the run to be found (else this test proves nothing)"
        c = _fresh_cluster_checks(prefix)
        assert c.leftovers() or how == "normal"
        if how == "ctrl-c":
            p.send_signal(signal.SIGINT)
        elif how == "kill-9-then-next-run":
            p.kill()
        p.wait(60)
        if how == "kill-9-then-next-run":
            assert c.leftovers(), "a killed run leaves state behind (else this test proves nothing)"
            c.down()  # what the next run does first
    finally:
        if p.poll() is None:         # the test failed while the run was up: clean up after it
            p.kill()
            p.wait()
            _fresh_cluster_checks(prefix).down()
    c = _fresh_cluster_checks(prefix)
    assert c.leftovers() == []
    assert _machinery(prefix) == []
    assert etc_digest() == before_etc
    assert mounts(prefix) == []
    assert not any(n.startswith(prefix + "-") for n in os.listdir("/run/netns")) if os.path.isdir("/run/netns") else True
