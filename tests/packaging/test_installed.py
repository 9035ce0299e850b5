"""The installed package (issue 12), in the package phase of `bash packaging/run test`
(tests/packaging/installed.py installed $CALLERID_TEST_DEB): files, version, the unit, the
code importing in isolation under Debian's python3, `callerid check` on a healthy test-bed
node running the installed daemon, and the same node with each piece broken."""
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from tests.packaging.pkgtool import PKG, installed_version, run

LIB = "/usr/lib/slurm-callerid"
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not os.environ.get("CALLERID_TEST_DEB"),
                       reason="package phase only (bash packaging/run test)"),
]


def deb_version():
    return re.search(r"_([^_]+)_[^_]+\.deb$", os.environ["CALLERID_TEST_DEB"])[1]


def test_installed_version_and_files():
    assert installed_version() == deb_version()
    upstream = deb_version().rsplit("-", 1)[0]
    out = run(["/usr/sbin/callerid", "--version"]).stdout.strip()
    assert out == f"slurm-callerid {upstream}"
    assert run(["dpkg", "--verify", PKG]).stdout == ""
    st = os.lstat("/var/log/slurm-callerid")
    assert stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid) == (0, 0)
    assert stat.S_IMODE(st.st_mode) == 0o750
    for page in ("callerid", "pam_callerid", "callerid.conf"):
        assert run(["man", "-w", page]).stdout.startswith("/usr/share/man/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies():
    r = run(["systemd-analyze", "verify", "/lib/systemd/system/callerid.service"], check=False)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_installed_code_imports_in_isolation_from_the_system_only():
    probe = (
        "import sys, pkgutil, importlib\n"
        f"sys.path.insert(0, {LIB!r})\n"
        "names = [m.name for m in pkgutil.walk_packages([" + repr(LIB) + "])]\n"
        "for pkg in ('pam_callerid', 'daemon', 'cgroups'):\n"
        "    names += [pkg + '.' + m.name for m in pkgutil.iter_modules([" + repr(LIB)
        + " + '/' + pkg])]\n"
        "for n in names: importlib.import_module(n)\n"
        "bad = [m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)\n"
        "       and not m.__file__.startswith(('/usr/lib/', '/usr/lib64/'))]\n"
        "assert not bad, bad\n"
        "print(len(names))\n")
    r = subprocess.run(["/usr/bin/python3", "-I", "-B", "-c", probe], capture_output=True,
                       text=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 20


# ------------------------------------------------------------------ in the test bed
def write_conf(cluster, name, extra=""):
    path = cluster.state / f"{name}.conf"
    path.write_text(f"AuthType=munge\nMungeSocket={cluster.munge_socket}\nLogLevel=debug\n"
                    f"PamSocket=/run/callerid/pam.sock\n{extra}")
    os.chmod(path, 0o644)
    return path


def start_installed(cluster, host, conf):
    probe = ("import socket; socket.create_connection(('127.0.0.1', 6820), 0.5).close()")
    cluster.start_daemon(host, "callerid-pkg", ["/usr/sbin/callerid", "--config", str(conf),
                                                "daemon"],
                         wait_for=lambda: cluster.exec(host, [sys.executable, "-c", probe]).ok)


def check(cluster, host, conf, *args):
    return cluster.exec(host, ["/usr/sbin/callerid", "--config", str(conf), "check",
                               "--timeout", "1", *args])


@pytest.fixture
def healthy(cluster):
    conf = write_conf(cluster, "pkg-healthy")
    for h in ("node1", "node2"):
        start_installed(cluster, h, conf)
    try:
        yield conf
    finally:
        for h in ("node1", "node2"):
            cluster.stop_daemon(h, "callerid-pkg")


@pytest.mark.cluster
def test_check_passes_on_a_healthy_node(cluster, healthy):
    r = check(cluster, "node1", healthy, "--nodes", "node2")
    assert r.rc == 0, r.out + r.err
    out = r.out
    for name in ("config", "layout", "auth", "daemon", "pam-socket", "module", "node node2"):
        assert re.search(rf"^  ok\s+{re.escape(name)}\s", out, re.M), out
    assert re.search(r"Slurm 2\d\.\d\d\.\d+, cgroup v[12], node node1", out), out


@pytest.mark.cluster
def test_check_lists_each_broken_piece(cluster, healthy):
    # the daemon of node3 is not running, a config with a bad value, munged's socket wrong
    r = check(cluster, "node1", healthy, "--nodes", "node2,node3")
    assert r.rc == 1 and re.search(r"^  FAIL\s+node node3\s", r.out, re.M), r.out
    bad = cluster.state / "pkg-bad.conf"
    bad.write_text("Port=6820\nQueryTimeout=-1\n")
    r = check(cluster, "node1", bad)
    assert r.rc == 1 and "pkg-bad.conf:2" in r.out and "QueryTimeout" in r.out
    nomunge = write_conf(cluster, "pkg-nomunge").read_text().replace(
        str(cluster.munge_socket), "/nonexistent/munge.socket")
    (cluster.state / "pkg-nomunge.conf").write_text(nomunge)
    r = check(cluster, "node1", cluster.state / "pkg-nomunge.conf")
    assert r.rc == 1 and re.search(r"^  FAIL\s+auth\s", r.out, re.M), r.out
    cluster.stop_daemon("node1", "callerid-pkg")
    r = check(cluster, "node1", healthy)
    assert r.rc == 1
    assert re.search(r"^  FAIL\s+daemon\s.*no answer", r.out, re.M), r.out
    assert re.search(r"^  FAIL\s+pam-socket\s", r.out, re.M), r.out


# ------------------------------------------------------------------ what the scenarios run
UNIT_CAPS = (1 << 19) | (1 << 1) | (1 << 2) | (1 << 10)   # sys_ptrace dac_override
#                                                           dac_read_search net_bind_service


def daemon_pid(cluster, host):
    from testbed.cluster import _children_tree
    for pid in _children_tree(cluster.hosts[host].daemons["callerid"].pid):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"/usr/sbin/callerid" in argv and b"daemon" in argv:
            return pid
    raise AssertionError("no /usr/sbin/callerid daemon process on " + host)


@pytest.mark.cluster
def test_scenario_daemons_run_the_installed_package_with_the_units_capabilities(fresh):
    from testbed.adopters import installed_module, stop_pam_callerid, use_pam_callerid
    use_pam_callerid(fresh, daemon_hosts=["node1"])
    try:
        status = open(f"/proc/{daemon_pid(fresh, 'node1')}/status").read()
        assert int(re.search(r"^CapBnd:\s*(\w+)", status, re.M)[1], 16) == UNIT_CAPS
        assert re.search(r"^NoNewPrivs:\s*1", status, re.M)
        assert str(installed_module()).startswith("/lib/") or \
            str(installed_module()).startswith("/usr/lib/")
        job = fresh.sbatch("alice", nodes=["node1"])
        r = fresh.ssh("alice", "login", "node1", "cat /proc/self/cgroup")
        assert r.rc == 0 and f"/job_{job}/step_extern" in r.out, r.out + r.err
    finally:
        stop_pam_callerid(fresh)


@pytest.mark.cluster
def test_metrics_count_real_logins(fresh):
    from testbed.adopters import stop_pam_callerid, use_pam_callerid
    d = fresh.state / "metrics"
    d.mkdir(mode=0o755, exist_ok=True)
    prom = d / "callerid.prom"
    use_pam_callerid(fresh, daemon_hosts=["node1"],
                     extra_conf=f"MetricsFile={prom}\nMetricsInterval=1\n")
    try:
        fresh.sbatch("alice", nodes=["node1"])
        for _ in range(2):
            assert fresh.ssh("alice", "login", "node1", "true").rc == 0
        want = re.compile(r'^callerid_pam_decisions_total\{[^}]*path="single"[^}]*\} (\d+)', re.M)
        import time
        end = time.monotonic() + 10
        while time.monotonic() < end:
            m = want.search(prom.read_text()) if prom.exists() else None
            if m and float(m[1]) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("metrics never counted the logins:\n" +
                        (prom.read_text() if prom.exists() else "(no file)"))
        text = prom.read_text()
        assert 'callerid_build_info{version="' in text
        assert "callerid_pam_decision_seconds_bucket" in text
        assert "callerid_server_answers_total" in text or "callerid_server_events_total" in text
    finally:
        stop_pam_callerid(fresh)


@pytest.mark.cluster
def test_planted_fifo_or_symlink_at_the_audit_path_never_delays_a_login(fresh):
    from testbed.adopters import stop_pam_callerid, use_pam_callerid
    audit = use_pam_callerid(fresh, daemon_hosts=["node1"])
    try:
        fresh.sbatch("alice", nodes=["node1"])
        base = fresh.ssh("alice", "login", "node1", "true")
        assert base.rc == 0, base.err
        victim = fresh.state / "victim"
        victim.write_text("precious\n")
        for plant in (lambda: os.mkfifo(audit), lambda: audit.symlink_to(victim)):
            if os.path.lexists(audit):
                audit.unlink()
            plant()
            r = fresh.ssh("alice", "login", "node1", "true")
            assert r.rc == 0, r.err
            assert r.seconds < base.seconds + 1.0, (r.seconds, base.seconds)
        assert victim.read_text() == "precious\n"
        log = fresh.daemon_log("node1", "callerid")
        assert str(audit) in log and "FIFO" in log, log[-2000:]
    finally:
        if os.path.lexists(audit):
            audit.unlink()
        stop_pam_callerid(fresh)
