"""cgroups.namespace: job_container.conf rules (pure), the safe opening of a job's .ns file
(FIFO, symlink, foreign owner, other namespace types, a user-made namespace) and
job_namespace_fd's order (stepd first, the .ns file when the stepd cannot be asked). Real
nsfs bind mounts are made only inside throwaway mount namespaces (unshare)."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

import cgroups
from cgroups import namespace as N
from cgroups import stepd
from cgroups.conf import Conf, parse_conf_lines
from cgroups.errors import ConfError, JobGone, NamespaceError, StepdUnavailable
from cgroups.layout import Layout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def jc(text):
    return Conf(parse_conf_lines(text, "job_container.conf"), ["job_container.conf"])


# ---------------------------------------------------------------- pure: configuration

@pytest.mark.parametrize("text,node,multi,want", [
    ("AutoBasePath=true\nBasePath=/var/jc\n", "n1", False, "/var/jc"),
    ("BasePath=/var/jc\n", "n1", True, "/var/jc/n1"),                 # multiple-slurmd suffix
    ("NodeName=n[1-2] BasePath=/run/jc\nNodeName=n3 BasePath=/x\n", "n2", True, "/run/jc/n2"),
    ("NodeName=n[1-2] BasePath=/run/jc\n", "n3", False, None),        # no line for this node
    ("BasePath=/a\nNodeName=n1 BasePath=/b\n", "n1", False, "/b"),    # the last line wins
    ("NodeName=n1 BasePath=/b\nBasePath=/a\n", "n1", False, "/a"),
    ("BasePath=/jc/%n\n", "n1", False, "/jc/n1"),                     # %n (23.02+)
    ("NodeName=n1 BasePath=None\n", "n1", True, None),                # disabled (23.11+)
    ("", "n1", True, None),
])
def test_jc_basepath(text, node, multi, want):
    assert N.jc_basepath(jc(text), node, "host", multi) == want


def test_jc_basepath_errors_and_plugin():
    with pytest.raises(ConfError, match="without BasePath"):
        N.jc_basepath(jc("NodeName=n1 AutoBasePath=true\n"), "n1")
    with pytest.raises(ConfError):
        N.jc_basepath(jc("NodeName=n[1- BasePath=/x\n"), "n1")
    assert N.ns_file("/run/jc/n1/", 12) == "/run/jc/n1/12/.ns"
    assert N.container_plugin(jc("JobContainerType=job_container/tmpfs")) == "job_container/tmpfs"
    assert N.container_plugin(jc("JobContainerType=job_container/none")) is None
    assert N.container_plugin(jc("")) is None
    assert N.container_plugin(jc("JobContainerType=job_container/tmpfs\n"
                                 "NamespaceType=namespace/linux")) == "namespace/linux"


def test_discover_reads_job_container_conf(tmp_path):
    (tmp_path / "slurm.conf").write_text("SlurmdSpoolDir=/s\nJobContainerType=job_container/tmpfs\n")
    (tmp_path / "job_container.conf").write_text("AutoBasePath=true\nNodeName=n1 BasePath=/run/jc\n")
    L = cgroups.discover(str(tmp_path / "slurm.conf"), nodename="n1", use_env=False,
                         mounts="cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
                         cgroup_root="/nonexistent", multiple_slurmd=True)
    assert (L.container, L.jc_basepath) == ("job_container/tmpfs", "/run/jc/n1")
    assert L.extern_socket(7) == "/s/n1_7.4294967292"
    (tmp_path / "slurm.conf").write_text("SlurmdSpoolDir=/s\n")
    L = cgroups.discover(str(tmp_path / "slurm.conf"), nodename="n1", use_env=False,
                         mounts="cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    assert (L.container, L.jc_basepath) == (None, None)
    (tmp_path / "slurm.conf").write_text("JobContainerType=job_container/tmpfs\n")
    (tmp_path / "job_container.conf").unlink()
    with pytest.raises(ConfError, match="job_container.conf"):
        cgroups.discover(str(tmp_path / "slurm.conf"), nodename="n1", use_env=False,
                         mounts="cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")


# ---------------------------------------------------------------- opening .ns safely

def test_open_ns_file_refuses_what_is_not_a_mount_namespace(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(NamespaceError, match="not a root-owned nsfs file"):
        N.open_ns_file(str(fifo))                    # no writer: must not block
    assert time.monotonic() - t0 < 0.5
    link = tmp_path / "link"
    os.symlink("/proc/self/ns/mnt", link)
    with pytest.raises(NamespaceError, match="symlink"):
        N.open_ns_file(str(link))
    reg = tmp_path / "reg"
    reg.write_text("x")
    with pytest.raises(NamespaceError, match="not a namespace"):
        N.open_ns_file(str(reg))
    os.chown(reg, 65534, 65534)
    with pytest.raises(NamespaceError, match="uid 65534"):
        N.open_ns_file(str(reg))
    with pytest.raises(FileNotFoundError):
        N.open_ns_file(str(tmp_path / "missing"))


@pytest.mark.root
def test_open_ns_file_real_nsfs_bind_mount(tmp_path):
    """Inside a throwaway mount namespace A, as job_container/tmpfs does: a newer mount
    namespace B (the kernel only lets a newer one be bound) and B's network namespace are
    bind-mounted onto files in A and opened through open_ns_file."""
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        sys.path.insert(0, {REPO!r})
        from cgroups import namespace as N
        from cgroups.errors import NamespaceError
        d = {str(tmp_path)!r}
        b = subprocess.Popen(["unshare", "--mount", "--net", "sleep", "30"])
        try:
            while os.readlink(f"/proc/{{b.pid}}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
                time.sleep(0.01)
            for name in ("mnt", "net"):
                open(f"{{d}}/{{name}}", "w").close()
                subprocess.run(["mount", "--bind", f"/proc/{{b.pid}}/ns/{{name}}",
                                f"{{d}}/{{name}}"], check=True)
            fd = N.open_ns_file(f"{{d}}/mnt")
            print(os.fstat(fd).st_ino == os.stat(f"/proc/{{b.pid}}/ns/mnt").st_ino,
                  os.get_inheritable(fd))
            try:
                N.open_ns_file(f"{{d}}/net")
            except NamespaceError as e:
                print("net refused:", e)
        finally:
            b.kill()
            b.wait()
    """)
    # Pinned to one CPU: on this kernel (6.18) a mount namespace created later but on the other
    # CPU is sometimes refused as a bind source (EINVAL from the namespace-loop check, ~30% of
    # unpinned runs here; never when pinned), so namespace ids are evidently not ordered across
    # CPUs. Not what this test is about.
    r = subprocess.run(["taskset", "-c", "0", "unshare", "--mount", "--propagation", "private",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    mnt, net = r.stdout.splitlines()
    assert mnt == "True False"                        # B's namespace, O_CLOEXEC
    assert "not a mount namespace" in net
    assert not os.path.ismount(tmp_path / "mnt")      # nothing leaked into our namespace


@pytest.mark.root
def test_mount_namespace_of_a_user_namespace_is_refused():
    p = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{p.pid}/ns/user") == os.readlink("/proc/self/ns/user"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fd = os.open(f"/proc/{p.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(NamespaceError, match="another user namespace"):
                N.check_mount_ns(fd, "a user's namespace")
        finally:
            os.close(fd)
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------- job_namespace_fd's order

def jlayout(tmp_path, container="job_container/tmpfs", base=None):
    return Layout(2, "n1", str(tmp_path), v2_mount="/nonexistent", v2_scope="/s",
                  container=container, jc_basepath=base)


def test_no_container_plugin_asks_nobody(tmp_path, fakes):
    f = fakes(tmp_path / "n1_5.4294967292", "22.05")
    assert cgroups.job_namespace_fd(jlayout(tmp_path, container=None), cgroups.Job(5, 1, 0, "n1")) is None
    assert f.requests == []


@pytest.mark.parametrize("release", ["22.05", "24.11", "25.11"])
def test_from_the_stepd(tmp_path, fakes, release):
    mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        f = fakes(tmp_path / "n1_5.4294967292", release, ns=[(stepd.CLONE_NEWNS, mnt)])
        fd = cgroups.job_namespace_fd(jlayout(tmp_path), cgroups.Job(5, 1, 0, "n1"))
        try:
            assert os.fstat(fd).st_ino == os.fstat(mnt).st_ino
        finally:
            os.close(fd)
        assert [r for _, r in f.requests] == [f.proto.ns_request]
    finally:
        os.close(mnt)
    fakes(tmp_path / "n1_6.4294967292", release)                # plugin off on this node
    assert cgroups.job_namespace_fd(jlayout(tmp_path, base="/b"), cgroups.Job(6, 1, 0, "n1")) is None


def test_file_when_the_stepd_cannot_be_asked(tmp_path, fakes):
    base = tmp_path / "jc"
    (base / "5").mkdir(parents=True)
    (base / "5" / ".ns").write_text("")            # not a namespace: the checks run on it
    L = jlayout(tmp_path, base=str(base))
    job = cgroups.Job(5, 1, 0, "n1")
    with pytest.raises(NamespaceError, match="not a namespace"):
        cgroups.job_namespace_fd(L, job)           # no stepd socket: the file is used
    with pytest.raises(JobGone, match="no job container namespace.*stepd could not be asked"):
        cgroups.job_namespace_fd(L, cgroups.Job(6, 1, 0, "n1"))
    with pytest.raises(StepdUnavailable):          # no file to fall back to
        cgroups.job_namespace_fd(jlayout(tmp_path), job)
    fakes(tmp_path / "n1_5.4294967292", "24.11", ns_rc=-1)
    with pytest.raises(NamespaceError):            # the stepd failed to open it: the file
        cgroups.job_namespace_fd(L, job)
