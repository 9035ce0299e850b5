"""The Debian package's contents (issue 12): built from this checkout by packaging/deb/build.sh,
inspected without installing it (test_installed.py installs it).

Files and where they go, owners and modes, control fields, the PAM module's links and
exports, no path of the build machine (checkout, venv, staging dir) in any file, man pages
that render without warnings."""
import gzip
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("dpkg-deb", "dpkg-shlibdeps", "gcc", "readelf", "nm")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="needs " + ", ".join(TOOLS))


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run(["bash", str(ROOT / "packaging/deb/build.sh"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out
    return path


@pytest.fixture(scope="module")
def tree(deb, tmp_path_factory):
    d = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(d)], check=True)
    return d


def members(deb):
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                          capture_output=True).stdout
    import io
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name.lstrip("."): m for m in t.getmembers()}


def field(deb, name):
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True,
                          text=True).stdout.strip()


def pam_dir():
    import sys
    sys.path.insert(0, str(ROOT))
    from pam_callerid.build import pam_module_dir
    return pam_module_dir()


def test_files_owners_and_modes(deb):
    m = members(deb)
    so = pam_dir() + "/pam_callerid.so"
    expected = {
        so: 0o644, "/usr/sbin/callerid": 0o755, "/etc/slurm/callerid.conf": 0o644,
        "/etc/logrotate.d/slurm-callerid": 0o644, "/lib/systemd/system/callerid.service": 0o644,
        "/usr/share/man/man8/pam_callerid.8.gz": 0o644, "/usr/share/man/man8/callerid.8.gz": 0o644,
        "/usr/share/man/man5/callerid.conf.5.gz": 0o644,
        "/usr/share/doc/slurm-callerid/copyright": 0o644,
        "/usr/share/doc/slurm-callerid/changelog.Debian.gz": 0o644,
        "/usr/share/doc/slurm-callerid/admin-guide.md.gz": 0o644,
        "/usr/lib/slurm-callerid/pam_callerid/cli.py": 0o644,
        "/usr/lib/slurm-callerid/daemon/server.py": 0o644,
        "/usr/lib/slurm-callerid/cgroups/layout.py": 0o644,
    }
    for path, mode in expected.items():
        assert path in m, f"{path} missing from the package"
        assert m[path].mode & 0o7777 == mode, f"{path}: mode {m[path].mode:o}"
    for name, info in m.items():
        assert (info.uname, info.gname, info.uid, info.gid) == ("root", "root", 0, 0), name
        if info.isdir():
            assert info.mode & 0o7777 == 0o755, name
        elif name != "/usr/sbin/callerid":
            assert info.mode & 0o7777 == 0o644, f"{name}: {info.mode:o}"
        assert not info.issym() and not info.islnk(), name
        for bad in ("/opt/", "/usr/local/", "/home/", "/tmp/", "/root/"):
            assert not name.startswith(bad), name


def test_only_runtime_code_is_shipped(deb):
    m = members(deb)
    py = sorted(n for n in m if n.startswith("/usr/lib/slurm-callerid/") and n.endswith(".py"))
    pkgs = {n.split("/")[4] for n in py}
    assert pkgs == {"pam_callerid", "daemon", "cgroups"}
    for gone in ("pam_callerid/build.py", "pam_callerid/demo.py", "pam_callerid/pam_callerid.c"):
        assert "/usr/lib/slurm-callerid/" + gone not in m
    assert not any("testbed" in n or "/tests/" in n or "/bench/" in n for n in m)
    # every module is byte-compiled for the python3 it will run on (the wrapper uses -B)
    for n in py:
        d, f = n.rsplit("/", 1)
        assert any(x.startswith(f"{d}/__pycache__/{f[:-3]}.cpython-") for x in m), n


def test_control_fields(deb):
    dep = field(deb, "Depends")
    for need in ("libpam0g", "libc6", "python3 (>=", "python3-cffi-backend",
                 "python3-prometheus-client", "libmunge2"):
        assert need in dep, dep
    for unused in ("psutil", "pyroute2", "python3-pam", "pytest", "gcc", "slurm"):
        assert unused not in dep, dep
    assert "python3-pyroute2" in field(deb, "Suggests")
    assert field(deb, "Architecture") == subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    ctrl = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], check=True,
                          capture_output=True).stdout
    import io
    with tarfile.open(fileobj=io.BytesIO(ctrl)) as t:
        names = {m.name.lstrip("./"): m for m in t.getmembers()}
        conffiles = t.extractfile(names["conffiles"]).read().decode().split()
    assert conffiles == ["/etc/slurm/callerid.conf", "/etc/logrotate.d/slurm-callerid"]
    for script in ("postinst", "prerm", "postrm"):
        assert names[script].mode & 0o777 == 0o755


def test_pam_module_links_libpam_and_libc_only_and_exports_pam_sm_only(tree):
    so = tree / pam_dir().lstrip("/") / "pam_callerid.so"
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", subprocess.run(
        ["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout)
    assert sorted(needed) == ["libc.so.6", "libpam.so.0"]
    syms = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True,
                          text=True, check=True).stdout.split("\n")
    names = [line.split()[-1] for line in syms if line.strip()]
    assert names and all(n.startswith("pam_sm_") for n in names), names
    assert "pam_sm_acct_mgmt" in names
    assert subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout.count(
        "libpython") == 0


def test_no_build_machine_path_in_any_file(tree):
    # (the checkout, the developer venv, the staging dir, a pip install; /usr/local is fine:
    # `callerid check` looks for a source-built slurmd there)
    bad = [str(ROOT).encode(), b"/opt/slurm-callerid", b"/tmp/callerid-deb", b"site-packages"]
    hits = []
    for p in tree.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.suffix == ".gz":
            data = gzip.decompress(data)
        hits += [f"{p.relative_to(tree)}: {b.decode()}" for b in bad if b in data]
    assert not hits, hits


def test_bytecode_names_the_installed_paths(tree):
    pyc = next((tree / "usr/lib/slurm-callerid/daemon/__pycache__").glob("server.cpython-*.pyc"))
    assert b"/usr/lib/slurm-callerid/daemon/server.py" in pyc.read_bytes()


def test_wrapper_is_isolated_and_fixed(tree):
    text = (tree / "usr/sbin/callerid").read_text()
    assert text.startswith("#!/usr/bin/python3 -IB\n")
    assert 'sys.path.insert(0, "/usr/lib/slurm-callerid")' in text


@pytest.mark.skipif(shutil.which("man") is None, reason="needs man-db")
@pytest.mark.parametrize("page", ["usr/share/man/man8/pam_callerid.8.gz",
                                  "usr/share/man/man8/callerid.8.gz",
                                  "usr/share/man/man5/callerid.conf.5.gz"])
def test_man_pages_render_without_warnings(tree, page):
    r = subprocess.run(["man", "--warnings", "-l", str(tree / page)], capture_output=True,
                       text=True, env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": ""})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "@VERSION@" not in r.stdout and "SEE ALSO" in r.stdout


def test_every_config_key_is_in_the_man_page_and_the_example(tree):
    import sys
    sys.path.insert(0, str(ROOT))
    from daemon.config import KEY_NAMES
    page = gzip.decompress((tree / "usr/share/man/man5/callerid.conf.5.gz").read_bytes()).decode()
    example = (tree / "etc/slurm/callerid.conf").read_text()
    documented = set(re.findall(r"^\.BI (\w+)= VALUE$", page, re.M))
    missing = sorted(set(KEY_NAMES.values()) - documented)
    assert not missing, f"callerid.conf(5) lacks {missing}"
    stale = sorted(documented - set(KEY_NAMES.values()))
    assert not stale, f"callerid.conf(5) documents keys that do not exist: {stale}"
    for line in example.splitlines():
        m = re.match(r"#(\w+)=", line)
        if m:
            assert m[1] in KEY_NAMES.values(), f"example callerid.conf: unknown key {m[1]}"
