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
    for name in ("config", "layout", "auth", "daemon", "pam-socket", "node node2"):
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
