"""Fixtures for the daemon tests: a private munged, HMAC key files, network namespaces with a
veth pair, synthetic Slurm job cgroups, and helper processes.  Everything is torn down even on
failure; only processes started here are killed (by pid)."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from testbed.cluster import mkdir_chain, rmdir_retry

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
NOBODY = pwd.getpwnam("nobody").pw_uid
UNIFIED = "/sys/fs/cgroup/unified"


def _kill(proc: subprocess.Popen, sig=signal.SIGTERM, wait=3.0):
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)
        except ProcessLookupError:
            pass


class Munged:
    def __init__(self, base: Path):
        self.base = base
        self.dir = base / "munge"
        self.socket = str(self.dir / "munge.socket")
        self.key = str(self.dir / "munge.key")
        self.log = str(self.dir / "munged.log")
        self.proc = None

    def start(self):
        os.chmod(self.base, 0o755)
        self.dir.mkdir(mode=0o755)
        shutil.chown(self.dir, "munge", "munge")
        subprocess.run(["mungekey", "--create", f"--keyfile={self.key}"], check=True,
                       capture_output=True)
        shutil.chown(self.key, "munge", "munge")
        os.chmod(self.key, 0o600)
        self.proc = subprocess.Popen(
            ["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", "munged",
             "--foreground", f"--socket={self.socket}", f"--key-file={self.key}",
             f"--log-file={self.log}", f"--pid-file={self.dir / 'munged.pid'}",
             f"--seed-file={self.dir / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(200):
            if os.path.exists(self.socket):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"munged died: {self.proc.stderr.read().decode()}"
                                   f" {Path(self.log).read_text() if os.path.exists(self.log) else ''}")
            time.sleep(0.02)
        raise RuntimeError("munged did not create its socket")

    def stop(self):
        if self.proc is not None:
            _kill(self.proc)


@pytest.fixture(scope="session")
def munged():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    base = Path(tempfile.mkdtemp(prefix="cidt-munge-"))
    m = Munged(base)
    try:
        m.start()
        yield m
    finally:
        m.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tmp_root_dir():
    d = Path(tempfile.mkdtemp(prefix="cidt-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def hmac_key(tmp_root_dir):
    from daemon.auth import write_key
    path = str(tmp_root_dir / "callerid.key")
    write_key(path)
    return path


# ---------------------------------------------------------------------------------------------
# network namespaces


class NetPair:
    """Two namespaces A and B joined by a veth pair: A = 10.199.77.1 / fd77::1,
    B = 10.199.77.2 / fd77::2."""

    A4, B4, A6, B6 = "10.199.77.1", "10.199.77.2", "fd77::1", "fd77::2"

    def __init__(self, tag: str):
        self.a = f"cidt-{os.getpid()}-{tag}a"
        self.b = f"cidt-{os.getpid()}-{tag}b"
        self.created: list[str] = []

    def ip(self, *args, ns=None):
        cmd = (["nsenter", f"--net=/run/netns/{ns}"] if ns else []) + ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True)

    def up(self):
        for n in (self.a, self.b):
            subprocess.run(["ip", "netns", "add", n], check=True, capture_output=True)
            self.created.append(n)
        va, vb = f"cv{os.getpid() % 100000}a", f"cv{os.getpid() % 100000}b"
        self.ip("link", "add", va, "netns", self.a, "type", "veth", "peer", "name", vb, "netns", self.b)
        for ns, dev, v4, v6 in ((self.a, va, self.A4, self.A6), (self.b, vb, self.B4, self.B6)):
            self.ip("link", "set", "lo", "up", ns=ns)
            self.ip("addr", "add", f"{v4}/24", "dev", dev, ns=ns)
            self.ip("addr", "add", f"{v6}/64", "dev", dev, "nodad", ns=ns)
            self.ip("link", "set", dev, "up", ns=ns)
        return self

    def down(self):
        for n in self.created:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        self.created.clear()

    def cmd(self, ns: str, argv: list[str], user: int | None = None) -> list[str]:
        pre = ["nsenter", f"--net=/run/netns/{ns}"]
        if user is not None:
            pre += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return pre + argv


@pytest.fixture(scope="module")
def netpair():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    p = NetPair("m")
    try:
        p.up()
        yield p
    finally:
        p.down()


# ---------------------------------------------------------------------------------------------
# synthetic Slurm job cgroups (cgroup v2 hierarchy at /sys/fs/cgroup/unified, never memory)


class JobCgroups:
    def __init__(self):
        self.root = Path(UNIFIED) / f"cidtest-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.dirs: list[Path] = []

    def make(self, job: int, step: str = "step_extern") -> Path:
        """Slurm's cgroup/v2 layout (multiple-slurmd naming), below our private root:
        <root>/system.slice/cidt_slurmstepd.scope/job_<J>/<step>/user/task_special.
        The job owner is the real uid of its processes (as on v2)."""
        d = self.root / "system.slice" / "cidt_slurmstepd.scope" / f"job_{job}" / step / "user" / "task_special"
        return mkdir_chain(d, Path(UNIFIED), self.dirs)

    def add(self, cg: Path, pid: int):
        (cg / "cgroup.procs").write_text(f"{pid}\n")

    def cleanup(self):
        for d in reversed(self.dirs):
            procs = d / "cgroup.procs"
            try:  # move any leftover (our own, already-killed) pids out: nothing should remain
                left = procs.read_text().split()
            except OSError:
                left = []
            for pid in left:
                try:
                    (Path(UNIFIED) / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            rmdir_retry(d, tries=50)


@pytest.fixture(scope="module")
def jobcg():
    if os.geteuid() != 0 or not os.path.isdir(UNIFIED):
        pytest.skip("needs root and cgroup2 at /sys/fs/cgroup/unified")
    j = JobCgroups()
    try:
        yield j
    finally:
        j.cleanup()


# ---------------------------------------------------------------------------------------------
# helper processes


class Procs:
    """Processes started by a test: killed by pid at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("cwd", str(ROOT))
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        env.pop("JOURNAL_STREAM", None)
        env.update(kw.pop("env", {}))
        p = subprocess.Popen(argv, env=env, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            _kill(p)
            for f in (p.stdout, p.stderr, p.stdin):
                if f:
                    f.close()
        self.procs.clear()


@pytest.fixture(scope="module")
def mprocs():
    p = Procs()
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def procs():
    p = Procs()
    try:
        yield p
    finally:
        p.stop_all()
