"""Fixtures for real-kernel cgroup tests: unique test roots, synthetic Slurm trees, spool dirs
with real stepd-like unix sockets, child processes. Never touches the memory hierarchy and
never moves the pytest process itself."""
import os
import secrets
import signal
import socket
import subprocess

import pytest

CG = "/sys/fs/cgroup"
V1_CTRLS = ("freezer", "cpuset", "devices", "pids")
V2_MOUNT = CG + "/unified"
EXTERN = 4294967292


def _mounted(path, fstype):
    with open("/proc/self/mounts") as f:
        return any(l.split()[1] == path and l.split()[2] == fstype for l in f if len(l.split()) > 2)


def cgroups_available():
    return os.geteuid() == 0 and all(_mounted(f"{CG}/{c}", "cgroup") for c in V1_CTRLS) \
        and _mounted(V2_MOUNT, "cgroup2")


class Tree:
    """A unique test root (``/cidtest-<pid>-<rand>``) in freezer/cpuset/devices/pids and the
    unified hierarchy, plus a spool dir and child processes; everything is removed at the end."""

    def __init__(self, tmp_path):
        self.name = f"cidtest-{os.getpid()}-{secrets.token_hex(4)}"
        self.root = "/" + self.name
        self.spool = str(tmp_path / "spool")
        os.mkdir(self.spool)
        self.children = []
        self.hier = {c: f"{CG}/{c}" for c in V1_CTRLS}
        self.hier["unified"] = V2_MOUNT
        for h in self.hier.values():
            self._mkdir(h, h + self.root)

    @staticmethod
    def _mkdir(mount, path):
        os.mkdir(path)
        if mount.endswith("/cpuset"):
            parent = os.path.dirname(path)
            for f in ("cpuset.cpus", "cpuset.mems"):
                with open(f"{parent}/{f}") as src:
                    val = src.read().strip()
                with open(f"{path}/{f}", "w") as dst:
                    dst.write(val)

    def mk(self, hier, rel):
        """mkdir -p ``<hier mount>/<test root>/<rel>`` (cpuset values copied per level)."""
        mount = self.hier[hier]
        path = mount + self.root
        for comp in rel.strip("/").split("/"):
            path += "/" + comp
            if not os.path.isdir(path):
                self._mkdir(mount, path)
        return path

    def v1_job(self, node, uid, job, steps=("extern",)):
        for c in V1_CTRLS:
            for s in steps:
                self.mk(c, f"slurm_{node}/uid_{uid}/job_{job}/step_{s}")

    def v2_job(self, node, job, steps=("extern",), slice_="system.slice", jobdir=None):
        jd = jobdir or f"job_{job}"
        for s in steps:
            self.mk("unified", f"{slice_}/{node}_slurmstepd.scope/{jd}/step_{s}/slurm")
            self.mk("unified", f"{slice_}/{node}_slurmstepd.scope/{jd}/step_{s}/user")

    def sock(self, node, job, step=EXTERN):
        """A real unix socket file named like slurmstepd's."""
        path = f"{self.spool}/{node}_{job}.{step}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()
        return path

    def spawn(self, user=None):
        p = subprocess.Popen(["sleep", "600"], user=user, stdin=subprocess.DEVNULL,
                             close_fds=True)
        self.children.append(p)
        return p

    def move(self, hier, rel, pid):
        with open(f"{self.hier[hier]}{self.root}/{rel.strip('/')}/cgroup.procs", "w") as f:
            f.write(str(pid))

    def cleanup(self):
        for p in self.children:           # our own children, by pid
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        errors = []
        for h in self.hier.values():
            top = h + self.root
            if not os.path.isdir(top):
                continue
            for dirpath, dirnames, _ in os.walk(top, topdown=False):
                try:
                    os.rmdir(dirpath)
                except OSError as e:
                    errors.append(f"{dirpath}: {e}")
        assert not errors, errors


@pytest.fixture
def tree(tmp_path):
    if not cgroups_available():
        pytest.skip("needs root and cgroup v1 freezer/cpuset/devices/pids + cgroup2 at "
                    f"{V2_MOUNT}")
    t = Tree(tmp_path)
    try:
        yield t
    finally:
        t.cleanup()


@pytest.fixture
def fakes():
    """make(path, release="22.05", **kw) -> a running FakeStepd; all closed at the end."""
    from fakestepd import FakeStepd
    made = []

    def make(path, release="22.05", **kw):
        f = FakeStepd(path, release, **kw)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


@pytest.fixture
def p1(fresh):
    """The session cluster (no jobs) when it runs Slurm 22.05 on cgroup v1 without a job
    container: these tests read the node's cgroups from the host side and expect 22.05's
    answers. Every other platform is covered by test_cluster_platforms.py."""
    p = getattr(fresh, "platform", None)
    if p is not None and (p.slurm, p.cgroup, p.job_container) != ("22.05", 1, False):
        pytest.skip(f"22.05/v1 host-side test; platform {p} is covered by "
                    f"test_cluster_platforms.py")
    return fresh
