"""Shared pieces of the daemon benchmarks (not a benchmark itself): a private munged, a
target connection held by a process in a synthetic Slurm job cgroup, the daemon (ours or a
baseline revision) started pinned to a CPU, percentiles, CPU and RSS readings.  Everything
started is recorded in a `Run` and killed by pid / removed at its end (also on Ctrl-C)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cgroups.paths import parse_proc_cgroup  # noqa: E402
from testbed.cluster import mkdir_chain, rmdir_retry  # noqa: E402
PY = sys.executable
UNIFIED = "/sys/fs/cgroup/unified"
HOSTILE = str(ROOT / "tests" / "daemon" / "hostile.py")
BASELINE = "6b555aa"       # the daemon before issue 11 (reviewed state of session 2)


def print_table(header: list[str], rows: list) -> None:
    """A results table: right-aligned cells, each column as wide as its widest cell, a rule
    under the header.  rows: (cells, notes) pairs, cells as strings (each bench formats its
    own numbers); notes are lines printed indented under their row."""
    widths = [max([len(h)] + [len(cells[i]) for cells, _ in rows]) for i, h in enumerate(header)]

    def line(cells):
        return " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
    hdr = line(header)
    print(hdr)
    print("-" * len(hdr))
    for cells, notes in rows:
        print(line(cells))
        for note in notes:
            print(" " * (widths[0] + 3) + note)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def loadavg():
    return open("/proc/loadavg").read().split()[0]


class Run:
    def __init__(self, tag="cidbench"):
        self.base = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        os.chmod(self.base, 0o755)
        self.procs: list[subprocess.Popen] = []
        self.kids: list[int] = []
        self.cgdirs: list[Path] = []
        self.cgroot = Path(UNIFIED) / f"{tag}-{os.getpid()}"

    def __enter__(self):
        def term(signum, frame):                # `timeout`, kill: clean up like on Ctrl-C
            raise SystemExit(f"signal {signum}")
        signal.signal(signal.SIGTERM, term)
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def start(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("cwd", str(ROOT))
        kw.setdefault("env", {**os.environ, "PYTHONPATH": str(ROOT)})
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def munged(self, name="munge", key: Path | None = None, cpu: str | None = None,
               nice: int = 0) -> str:
        """Start a munged; `key`: share another one's key (two hosts of one realm: the
        daemon's node and the askers' nodes each have their own munged)."""
        d = self.base / name
        d.mkdir(mode=0o755)
        shutil.chown(d, "munge", "munge")
        if key is None:
            key = d / "munge.key"
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
            shutil.chown(key, "munge", "munge")
            os.chmod(key, 0o600)
        self.munge_key = key
        sock = d / "munge.socket"
        pre = (["taskset", "-c", cpu] if cpu else []) + (["nice", "-n", str(nice)] if nice else [])
        self.start(pre + ["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", "munged",
                    "--foreground", f"--socket={sock}", f"--key-file={key}", "--num-threads=4",
                    f"--log-file={d / 'log'}", f"--pid-file={d / 'pid'}", f"--seed-file={d / 'seed'}"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if sock.exists():
                return str(sock)
            time.sleep(0.02)
        raise RuntimeError("munged did not start")

    def job_cgroup(self, job: int) -> Path:
        leaf = self.cgroot / "system.slice" / "cidb_slurmstepd.scope" / f"job_{job}" / "step_extern" / "user" / "task_special"
        return mkdir_chain(leaf, Path(UNIFIED), self.cgdirs)

    @contextlib.contextmanager
    def inside(self, leaf: Path):
        """Run the block with this process in cgroup `leaf` (sockets made meanwhile are
        made in it, as an ssh started in a job step makes its connection), then move back."""
        own = next(path for _, ctrls, path in parse_proc_cgroup(open("/proc/self/cgroup").read())
                   if ctrls == "")
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (Path(UNIFIED + own.rstrip("/")) / "cgroup.procs").write_text(str(os.getpid()))

    def spawn_holder(self, socks) -> int:
        """Fork a `sleep` that inherits the given sockets (and holds them)."""
        pid = spawn_sleeper([s.fileno() for s in socks])
        self.kids.append(pid)
        return pid

    def target(self, job: int = 888):
        """A connection on loopback whose client end is held by a process of `job`:
        (src, dst) as the peer would ask about it."""
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(8)
        c = socket.create_connection(lst.getsockname())
        s, _ = lst.accept()
        src, dst = "%s:%d" % c.getsockname(), "%s:%d" % c.getpeername()
        pid = self.spawn_holder([c, s])
        c.close()
        s.close()
        lst.close()
        (self.job_cgroup(job) / "cgroup.procs").write_text(str(pid))
        return src, dst

    def baseline_tree(self, rev: str = BASELINE) -> Path:
        d = self.base / f"baseline-{rev}"
        d.mkdir()
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "daemon", "cgroups"],
                             check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(d)], input=tar, check=True)
        return d

    def daemon(self, conf_text: str, *, cpu: str | None = "0", tree: Path | None = None,
               name="daemon", nice: int = 0) -> tuple[subprocess.Popen, int, Path]:
        """Start `callerid daemon` (from `tree`, default this checkout) on loopback; wait
        until it answers TCP connects.  -> (process, port, config path)."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        conf = self.base / f"{name}-{port}.conf"
        conf.write_text(f"Port={port}\nListenAddresses=127.0.0.1\nNodeName=bench\n{conf_text}")
        os.chmod(conf, 0o644)
        log = open(self.base / f"{name}-{port}.log", "wb")
        pre = (["taskset", "-c", cpu] if cpu else []) + (["nice", "-n", str(nice)] if nice else [])
        env = {**os.environ, "PYTHONPATH": str(tree or ROOT)}
        entry = os.environ.get("CID_BENCH_ENTRY")     # (diagnostics: a wrapper script)
        p = self.start(pre + [PY] + ([entry] if entry else ["-m", "daemon.cli"]) + ["daemon", "--config", str(conf)],
                       cwd=str(tree or ROOT), env=env, stdout=subprocess.DEVNULL, stderr=log)
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if p.poll() is not None:
                    raise RuntimeError(f"daemon exited: {(self.base / f'{name}-{port}.log').read_text()}")
                time.sleep(0.05)
        return p, port, conf

    def log_of(self, conf: Path) -> str:
        return conf.with_suffix(".log").read_text()

    def cleanup(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for k in self.kids:
            try:
                os.kill(k, signal.SIGKILL)
                os.waitpid(k, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.kids.clear()
        for d in reversed(self.cgdirs):
            rmdir_retry(d)
        self.cgdirs.clear()
        shutil.rmtree(self.base, ignore_errors=True)


def spawn_sleeper(fds) -> int:
    """Fork a `sleep 100000` that inherits (and so holds) the file descriptors ``fds``; the
    caller kills it by pid."""
    for fd in fds:
        os.set_inheritable(fd, True)
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/bin/sleep", ["sleep", "100000"])
        finally:
            os._exit(127)
    return pid
