"""The test bed itself: it comes up with every host isolated, gives the API the scenarios use,
and leaves the machine exactly as it found it — after a normal run, after Ctrl-C, and (through
the next run's stale cleanup) after being killed outright."""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

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


def mounts():
    return Path("/proc/self/mounts").read_text()


def test_hosts_are_isolated(cluster):
    c = cluster
    assert c.exec("node2", ["hostname"]).out.strip() == "node2"
    # the root namespace has no address of the test network, only the bridge
    assert "10.199.3." not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
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


def _child_script(prefix, subnet, then):
    return textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from testbed.cluster import Cluster
        c = Cluster(nodes=1, prefix={prefix!r}, subnet={subnet}, node_prefix="x{prefix}n")
        c.up()
        c.sbatch("alice", nodes=c.nodes)
        print("UP", flush=True)
        {then}
    """)


def _fresh_cluster_checks(prefix):
    c = Cluster(nodes=1, prefix=prefix, subnet=9, node_prefix=f"x{prefix}n")
    return c


@pytest.mark.parametrize("how", ["normal", "ctrl-c", "kill-9-then-next-run"])
def test_teardown_leaves_machine_clean(how):
    prefix = {"normal": "cidn", "ctrl-c": "cidc", "kill-9-then-next-run": "cidk"}[how]
    before_etc, before_mounts = etc_digest(), mounts()
    then = {"normal": "c.down()", "ctrl-c": "time.sleep(600)", "kill-9-then-next-run": "time.sleep(600)"}[how]
    p = subprocess.Popen([sys.executable, "-c", _child_script(prefix, 9, then)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "UP", p.stderr.read()
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
        if p.poll() is None:
            p.kill()
            p.wait()
    c = _fresh_cluster_checks(prefix)
    assert c.leftovers() == []
    assert etc_digest() == before_etc
    assert mounts() == before_mounts
    assert not any(n.startswith(prefix + "-") for n in os.listdir("/run/netns")) if os.path.isdir("/run/netns") else True
