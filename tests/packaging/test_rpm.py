"""The RPM (EL9), built from this checkout by packaging/rpm/build.sh on this Debian machine
(rpmbuild --nodeps: the spec's BuildRequires are EL package names) and inspected without
installing it: the same run-time code as the .deb, the PAM module of its version where EL9's
libpam looks, configuration files kept on upgrade, the dependencies, the systemd scriptlets,
no path of the build machine.  Installing it needs an EL9 host (not in CI)."""
import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from daemon.version import VERSION
from pam_callerid.check import module_version

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("rpmbuild", "rpm2archive", "rpm", "dpkg-deb", "gcc", "readelf")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="needs " + ", ".join(TOOLS))
LIBDIR = "/usr/lib/slurm-callerid/"


def build(tool, out, version=None):
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if version:
        env["CALLERID_VERSION"] = version
    r = subprocess.run(["bash", str(ROOT / f"packaging/{tool}/build.sh"), str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out
    return path


def files(rpm) -> dict:
    """path -> bytes of every regular file in the package."""
    data = subprocess.run(["rpm2archive", "-"], stdin=open(rpm, "rb"), capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name.lstrip("."): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def query(rpm, *args) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def rpm(tmp_path_factory):
    return build("rpm", tmp_path_factory.mktemp("rpm"))


@pytest.fixture(scope="module")
def content(rpm):
    return files(rpm)


def test_name_and_version_come_from_the_tree(rpm):
    assert rpm.name == f"slurm-callerid-{VERSION}-1.x86_64.rpm"
    assert query(rpm, "--qf", "%{NAME} %{VERSION} %{RELEASE}") == f"slurm-callerid {VERSION} 1"


def test_same_runtime_code_as_the_deb(content, tmp_path):
    deb = build("deb", tmp_path)
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        in_deb = {m.name.lstrip(".") for m in t.getmembers() if m.isfile()}
    code = lambda names: {n for n in names if n.startswith(LIBDIR)}  # noqa: E731
    assert code(content) == code(in_deb)
    assert any(n.endswith(".pyc") for n in code(content))
    assert content[LIBDIR + "daemon/version.py"].endswith(f'VERSION = "{VERSION}"\n'.encode())
    pyc = next(n for n in content if re.search(r"daemon/__pycache__/server\.cpython-311\.pyc$", n))
    assert (LIBDIR + "daemon/server.py").encode() in content[pyc]


def test_pam_module_where_el9_looks_of_this_version(rpm, content, tmp_path):
    so = "/usr/lib64/security/pam_callerid.so"
    assert module_version(content[so]) == VERSION
    (tmp_path / "m.so").write_bytes(content[so])
    dyn = subprocess.run(["readelf", "-d", str(tmp_path / "m.so")], capture_output=True,
                         text=True, check=True).stdout
    assert sorted(re.findall(r"\(NEEDED\).*\[(.*)\]", dyn)) == ["libc.so.6", "libpam.so.0"]
    modes = {line.split()[-1]: line.split()[0] for line in query(rpm, "-lv").splitlines()}
    assert modes[so] == "-rw-r--r--" and modes["/usr/sbin/callerid"] == "-rwxr-xr-x"
    assert modes["/var/log/slurm-callerid"] == "drwxr-x---"


def test_wrapper_runs_el9s_python311_isolated(content):
    text = content["/usr/sbin/callerid"].decode()
    assert text.startswith("#!/usr/bin/python3.11 -IB\n")
    assert f'sys.path.insert(0, "{LIBDIR[:-1]}")' in text


def test_configuration_kept_on_upgrade_and_service_scriptlets(rpm):
    flags = dict(line.rsplit(" ", 1) for line in query(
        rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines())
    assert sorted(p for p, f in flags.items() if "c" in f) == [
        "/etc/logrotate.d/slurm-callerid", "/etc/slurm/callerid.conf"]
    assert all("n" in flags[p] for p in ("/etc/slurm/callerid.conf",
                                        "/etc/logrotate.d/slurm-callerid"))
    assert "/usr/lib/systemd/system/callerid.service" in flags
    scripts = query(rpm, "--scripts")
    for phase in ("postinstall", "preuninstall", "postuninstall"):
        assert re.search(rf"^{phase} scriptlet.*\n.*callerid\.service", scripts, re.M), scripts


def test_dependencies(rpm):
    req = set(query(rpm, "--requires").splitlines())
    assert {"python3.11", "python3.11-cffi", "munge-libs", "pam",
            "libpam.so.0()(64bit)"} <= req, req
    for unused in ("psutil", "pyroute2", "pytest", "gcc", "slurm-", "slurmd"):
        assert not any(unused in r for r in req if not r.startswith("config(")), req


def test_no_build_machine_path_in_any_file(content):
    bad = [str(ROOT).encode(), b"/opt/slurm-callerid", b"/tmp/callerid-rpm", b"BUILDROOT",
           b"site-packages"]
    hits = [f"{p}: {b.decode()}" for p, data in content.items() for b in bad if b in data]
    assert not hits, hits


def test_another_version_of_the_same_tree(tmp_path):
    """As the upgrade test builds the .deb: CALLERID_VERSION names the package, the code's
    version and the PAM module's."""
    rpm = build("rpm", tmp_path, version=VERSION + "+cidtest1")
    assert query(rpm, "--qf", "%{VERSION}") == VERSION + "+cidtest1"
    content = files(rpm)
    assert module_version(content["/usr/lib64/security/pam_callerid.so"]) == VERSION + "+cidtest1"
    assert f'VERSION = "{VERSION}+cidtest1"'.encode() in content[LIBDIR + "daemon/version.py"]
    r = subprocess.run(["bash", str(ROOT / "packaging/rpm/build.sh"), str(tmp_path)],
                       capture_output=True, text=True, env={"CALLERID_VERSION": "1.0 beta",
                                                            "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and "bad version '1.0 beta'" in r.stderr
