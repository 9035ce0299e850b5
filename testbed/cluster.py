"""A real Slurm mini-cluster on one kernel, for tests, benchmarks and the demo.

Every host is a process tree in its own network + UTS + mount namespace:

    ctl      slurmctld, munged, the syslog sink
    node1..N slurmd + sshd (PAM stack chosen by the test), optional extra daemons
    login    nothing by default: users submit jobs and ssh from here

The root namespace holds only the bridge (no address on it), so no test daemon listens on
the machine's real interfaces. Hosts get IPv4 10.199.3.0/24 and IPv6 fd42:199:3::/64.
Debian's Slurm is built with multiple-slurmd support, so every slurmd keeps its cgroups under
/sys/fs/cgroup/<ctrl>/slurm_<NodeName>/ and no cgroup namespace is needed. The memory
controller is never configured (cgroup.conf Constrain{RAM,Swap}Space=no).

Nothing in the root namespace's /etc is edited: each host's mount namespace binds private
copies of /etc/{passwd,group,shadow,hosts}, /etc/slurm and /etc/pam.d over the real ones, so
the test users exist only inside the test bed. Teardown (also of a stale earlier run of the
same prefix) kills every process living in one of our network namespaces, removes the
slurm_<node> cgroups the slurmds made, the veths, namespaces and the bridge, and the state dir.

The platform (platforms.Platform) picks the Slurm release (22.05 from Debian 12, or 24.11 from
Debian 13 through its own loader: trixie.py), cgroup v1 or v2 (cgroup2.py), job_container/tmpfs,
configless slurmd and slurmdbd accounting (accounting.py). The state dir is not under /tmp:
job_container/tmpfs gives every job a private /tmp, and the job's script, spool and the
users' homes live in the state dir.
"""
from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import accounting, cgroup2, mntns, trixie
from .platforms import ACCOUNTING_PACKAGES, DEFAULT, Platform

HERE = Path(__file__).resolve().parent
EXTERN_STEP = 4294967292
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "openssh-server", "openssh-client",
            "libpam-slurm-adopt", "iproute2", "util-linux", "procps", "sshpass"]
CGROUP_CONTROLLERS = ["freezer", "cpuset", "devices", "pids", "cpu", "cpuacct", "blkio"]  # never memory


class TestbedError(RuntimeError):
    pass


@dataclass
class User:
    name: str
    uid: int
    password: str

    @property
    def gid(self) -> int:
        return self.uid


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class Host:
    name: str
    ip4: str
    ip6: str
    kind: str  # "ctl" | "node" | "login"
    holder: int | None = None
    daemons: dict = field(default_factory=dict)  # name -> Popen


def _run(argv, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise TestbedError(f"{' '.join(map(str, argv))!r} failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    return p


def _alive(pid: int) -> bool:
    """True for a live, non-zombie process (PID 1 here reaps orphans late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def missing_packages(packages: list[str]) -> list[str]:
    return [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]


def ensure_packages(packages: list[str] = PACKAGES) -> None:
    """Install the Debian packages the test bed needs (no-op when present). No service is
    started (a policy-rc.d denying starts is in place meanwhile), and the empty /run/mysqld
    mariadb-server's postinst makes is removed again."""
    missing = missing_packages(packages)
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy, run_mysqld = Path("/usr/sbin/policy-rc.d"), Path("/run/mysqld")
    ours, had_run_mysqld = not policy.exists(), run_mysqld.exists()
    if ours:
        policy.write_text("#!/bin/sh\n# slurm-callerid test bed install: start no services\nexit 101\n")
        policy.chmod(0o755)
    try:
        _run(["apt-get", "update", "-q"], timeout=600, env=env)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], timeout=1200, env=env)
    finally:
        if ours:
            policy.unlink(missing_ok=True)
        if not had_run_mysqld and run_mysqld.is_dir():
            shutil.rmtree(run_mysqld, ignore_errors=True)


class Cluster:
    """Bring up with `up()`, tear down with `down()` (idempotent, also for stale runs)."""

    def __init__(self, nodes: int = 3, prefix: str = "cid", subnet: int = 3,
                 state_dir: str | None = None, node_prefix: str = "node", platform: Platform = DEFAULT):
        if not (1 <= nodes <= 9):
            raise ValueError("1..9 nodes")
        self.prefix = prefix
        self.platform = platform
        self.bridge = f"{prefix}br0"
        self.state = Path(state_dir or f"/var/tmp/{prefix}-testbed")
        self.node_names = [f"{node_prefix}{i}" for i in range(1, nodes + 1)]
        net4, net6 = f"10.199.{subnet}", f"fd42:199:{subnet}"
        self.hosts: dict[str, Host] = {"ctl": Host("ctl", f"{net4}.250", f"{net6}::250", "ctl")}
        for i, n in enumerate(self.node_names, 1):
            self.hosts[n] = Host(n, f"{net4}.{i}", f"{net6}::{i}", "node")
        self.hosts["login"] = Host("login", f"{net4}.254", f"{net6}::254", "login")
        self.users = [User("alice", 2001, "alice-pw-1"), User("bob", 2002, "bob-pw-2")]
        self.munge_socket = self.state / "munge" / "munge.socket.2"
        self.bringup_seconds = None
        self.bringup_parts: dict[str, float] = {}
        self._slurm24: trixie.Tree | None = None
        self._atexit = False
        self._pam = {}
        self._lockfd = None
        # One test bed per node-name set at a time on this machine: Slurm names its v1 cgroups
        # after the nodes (slurm_<node>), so two clusters with the same node names would share
        # them whatever their prefixes. An flock, held from up() to the end
        # of down(); other runs wait for it.
        # /run/lock, not the checkout: two checkouts (a CI clone beside a working tree) must
        # see the same lock.
        self._lockpath = Path("/run/lock") / f"callerid-testbed-{node_prefix}.lock"

    def _lock(self, timeout: float = 1800) -> None:
        import fcntl
        if self._lockfd is not None:
            return
        fd = os.open(self._lockpath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    os.close(fd)
                    raise TestbedError(f"another test bed with the same node names is in use (lock {self._lockpath})")
                time.sleep(0.5)
        self._lockfd = fd

    def _unlock(self) -> None:
        if self._lockfd is not None:
            os.close(self._lockfd)
            self._lockfd = None

    # ---------------------------------------------------------------- names and paths
    def netns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def hostdir(self, host: str) -> Path:
        return self.state / "hosts" / host

    @property
    def nodes(self) -> list[str]:
        return list(self.node_names)

    def user(self, name: str) -> User:
        return next(u for u in self.users if u.name == name)

    def spool(self, node: str) -> Path:
        return self.hostdir(node) / "spool"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def cluster_name(self) -> str:
        return CLUSTER_NAME

    # ---------------------------------------------------------------- bring-up
    def up(self) -> "Cluster":
        if os.geteuid() != 0:
            raise TestbedError("the test bed needs root")
        self._lock()
        t0 = time.monotonic()
        self.down(unlock=False)  # a stale run of ours (same prefix) is cleaned first
        ensure_packages(PACKAGES + (ACCOUNTING_PACKAGES if self.platform.accounting else []))
        if self.platform.slurm == "24.11":
            self._slurm24 = trixie.tree()   # downloaded by the install step, never here
        if not self._atexit:
            atexit.register(self.down)
            self._atexit = True
        try:
            self._write_files()
            self._start_network()
            self._start_host("ctl")
            self._start_munge_and_syslog()
            for h in [*self.node_names, "login"]:
                self._start_host(h)
            self._start_slurm()
            self._wait_idle()
        except BaseException:
            self.down()
            raise
        self.bringup_seconds = time.monotonic() - t0
        return self

    def _write_files(self) -> None:
        st = self.state
        for d in ("etc/slurm", "logs", "munge", "ctld", "home", "jobs", "hosts"):
            (st / d).mkdir(parents=True, exist_ok=True)
        os.chmod(st, 0o755)
        os.chmod(st / "jobs", 0o1777)
        (st / "meta.json").write_text(json.dumps({"nodes": self.node_names, "bridge": self.bridge,
                                                   "prefix": self.prefix, "hosts": list(self.hosts),
                                                   "platform": self.platform.label}))
        # host key shared by every node sshd, and known_hosts for the users
        key = st / "etc" / "ssh_host_ed25519_key"
        if not key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cid-testbed", "-f", str(key)])
        hostkey_pub = " ".join(Path(f"{key}.pub").read_text().split()[:2])
        # private /etc/passwd, group, shadow with the test users (root ns files untouched)
        import warnings
        with warnings.catch_warnings():  # crypt is deprecated in 3.11 but present; test users' hashes only
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        passwd = Path("/etc/passwd").read_text().rstrip("\n").split("\n")
        group = Path("/etc/group").read_text().rstrip("\n").split("\n")
        shadow = Path("/etc/shadow").read_text().rstrip("\n").split("\n")
        for u in self.users:
            home = st / "home" / u.name
            passwd.append(f"{u.name}:x:{u.uid}:{u.gid}:test user:{home}:/bin/bash")
            group.append(f"{u.name}:x:{u.gid}:")
            shadow.append(f"{u.name}:{crypt.crypt(u.password, crypt.mksalt(crypt.METHOD_SHA512))}:19000:0:99999:7:::")
        (st / "etc" / "passwd").write_text("\n".join(passwd) + "\n")
        (st / "etc" / "group").write_text("\n".join(group) + "\n")
        (st / "etc" / "shadow").write_text("\n".join(shadow) + "\n")
        os.chmod(st / "etc" / "shadow", 0o640)
        os.chown(st / "etc" / "shadow", 0, _gid_of_group("shadow"))
        hosts = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        for h in self.hosts.values():
            hosts += [f"{h.ip4} {h.name}", f"{h.ip6} {h.name}-v6"]
        (st / "etc" / "hosts").write_text("\n".join(hosts) + "\n")
        names = ",".join(f"{h.name},{h.name}-v6,{h.ip4},{h.ip6}" for h in self.hosts.values())
        for u in self.users:
            home = st / "home" / u.name
            ssh = home / ".ssh"
            ssh.mkdir(parents=True, exist_ok=True)
            if not (ssh / "id_ed25519").exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{u.name}@cid", "-f", str(ssh / "id_ed25519")])
            (ssh / "authorized_keys").write_text((ssh / "id_ed25519.pub").read_text())
            (ssh / "known_hosts").write_text(f"{names} {hostkey_pub}\n")
            (ssh / "config").write_text("Host *\n    StrictHostKeyChecking yes\n    BatchMode yes\n"
                                        "    GSSAPIAuthentication no\n    ConnectTimeout 10\n")
            for p in [home, ssh, *ssh.iterdir()]:
                os.chown(p, u.uid, u.gid)
            os.chmod(home, 0o755)
            os.chmod(ssh, 0o700)
            for p in ssh.iterdir():
                os.chmod(p, 0o600)
        # Slurm configuration (per-node paths through %n)
        nodelines = "\n".join(
            f"NodeName={n} NodeAddr={self.hosts[n].ip4} CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 "
            f"ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN" for n in self.node_names)
        (st / "etc/slurm/slurm.conf").write_text(slurm_conf(
            self.platform, st=st, ctl_ip=self.hosts["ctl"].ip4, munge=self.munge_socket, nodelines=nodelines,
            nodelist=",".join(self.node_names)))
        (st / "etc/slurm/cgroup.conf").write_text(cgroup_conf(self.platform))
        if self.platform.job_container:
            (st / "etc/slurm/job_container.conf").write_text(job_container_conf(self.node_names))
        (st / "etc/sshd_config").write_text(SSHD_CONFIG.format(key=key))
        os.chown(st / "ctld", _uid("slurm"), _gid("slurm"))
        for h in self.hosts:
            hd = self.hostdir(h)
            for d in ("etc.upper", "etc.work"):
                if (hd / d).exists():
                    shutil.rmtree(hd / d)
            up = hd / "etc.upper"
            (up / "pam.d").mkdir(parents=True)
            (hd / "etc.work").mkdir()
            if self.platform.configless and h in self.node_names:
                _slurm_dir_without_conf(up / "slurm", [f.name for f in (st / "etc/slurm").iterdir()])
            else:
                shutil.copytree(st / "etc" / "slurm", up / "slurm")
            for f in ("passwd", "group", "shadow", "hosts"):
                shutil.copy2(st / "etc" / f, up / f)
            (hd / "spool").mkdir(exist_ok=True)
        for n in self.node_names:
            self.set_pam(n, account=[], session=[])
        if self.platform.accounting:
            accounting.write_files(self)
        if self._slurm24:
            wrappers = self.state / "slurm24"
            wrappers.mkdir(mode=0o755, exist_ok=True)
            for target in self._slurm24.targets():
                w = wrappers / Path(target).name
                w.write_text(self._slurm24.wrapper(target))
                w.chmod(0o755)
        if self.platform.cgroup == 2:
            cgroup2.build_shim(self.shim)

    @property
    def shim(self) -> Path:
        """The hybrid-host LD_PRELOAD shim of cgroup v2 platforms (compiled at bring-up)."""
        return self.state / "unified_only.so"

    def _start_network(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _sysctl(f"net/ipv6/conf/{self.bridge}/disable_ipv6", "1")
        _run(["ip", "link", "set", self.bridge, "up"])
        for h in self.hosts.values():
            ns, veth = self.netns(h.name), f"{self.prefix}-{h.name}-h"[:15]
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _sysctl(f"net/ipv6/conf/{veth}/disable_ipv6", "1")
            _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{h.ip4}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "addr", "add", f"{h.ip6}/64", "dev", "eth0", "nodad"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _v2(self, host: str) -> bool:
        """Does `host` run in its own cgroup2 subtree and cgroup namespace (cgroup2.py)?"""
        return self.platform.cgroup == 2 and host in self.node_names

    def _start_host(self, name: str) -> None:
        hd = self.hostdir(name)
        if not (hd / "devlog.sock").exists():
            (hd / "devlog.sock").touch()
        argv = ["nsenter", f"--net=/run/netns/{self.netns(name)}", "--", "unshare", "--uts", "--mount",
                "--propagation", "private", "--", "/bin/sh", str(HERE / "node_init.sh"), name, str(self.state)]
        if self._v2(name):
            cg = cgroup2.prepare(self.prefix, name)
            argv = ["/bin/sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh",
                    *argv[:4], "--cgroup", *argv[4:], "cgroup2"]
        if self.platform.job_container and name in self.node_names:
            self._start_holder_oldest_mntns(name, argv)
        else:
            self._start_holder(name, argv)
        if self._v2(name):
            cgroup2.park(self.prefix, name, self.hosts[name].holder)
        if self._slurm24:
            self._bind_slurm24(name)
        if self.platform.configless and name in self.node_names:
            # a configless slurmd asks for its configuration before it knows AuthInfo: munge
            # at its default place in the host's private /run, as on a real node
            self.exec(name, ["/bin/sh", "-ec", f"mkdir -p /run/munge; ln -s {self.munge_socket} "
                             "/run/munge/munge.socket.2"], check=True)

    def _start_holder(self, name: str, argv: list[str]) -> int:
        hd = self.hostdir(name)
        (hd / "holder.pid").unlink(missing_ok=True)
        log = open(self.logs / f"holder-{name}.log", "ab")
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        for _ in range(100):
            try:
                pid = int((hd / "holder.pid").read_text())
                if _alive(pid):
                    self.hosts[name].holder = pid
                    return pid
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        raise TestbedError(f"host {name} did not come up: {(self.logs / f'holder-{name}.log').read_text()[-800:]}")

    def _start_holder_oldest_mntns(self, name: str, argv: list[str], tries: int = 5) -> None:
        """A job_container node's mount namespace must be older (by id) than every namespace
        its slurmstepds make later (mntns.py: per-CPU ids on Linux 6.18)."""
        for _ in range(tries):
            cpu = mntns.lowest_cpu()
            pid = self._start_holder(name, ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv)
            if mntns.is_oldest(f"/proc/{pid}/ns/mnt"):
                return
            os.kill(pid, signal.SIGKILL)     # sleep infinity: its namespace goes with it
            self.hosts[name].holder = None
        raise TestbedError(f"host {name}: no mount namespace with an id below every CPU's next one in {tries} tries")

    def _bind_slurm24(self, host: str) -> None:
        """In `host`'s own mount namespace: trixie's plugin dir over Debian's, and a wrapper
        over every Slurm program (trixie.py)."""
        t = self._slurm24
        cmds = [f"mount -o bind,ro {t.root}{trixie.PLUGIN_DIR} {trixie.PLUGIN_DIR}"]
        cmds += [f"mount --bind {self.state / 'slurm24' / Path(target).name} {target}" for target in t.targets()]
        self.exec(host, ["/bin/sh", "-ec", "\n".join(cmds)], check=True)

    def _start_munge_and_syslog(self) -> None:
        m = self.state / "munge"
        os.chown(m, _uid("munge"), _gid("munge"))
        os.chmod(m, 0o755)
        keyf = m / "munge.key"
        if not keyf.exists():
            _run(["mungekey", "--create", f"--keyfile={keyf}"])
        os.chown(keyf, _uid("munge"), _gid("munge"))
        os.chmod(keyf, 0o600)
        self.exec("ctl", ["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={self.munge_socket}",
                          f"--key-file={keyf}", f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid",
                          f"--seed-file={m}/munged.seed"], check=True)
        # the syslog sink binds one socket per host; node_init.sh mounts it onto /dev/log
        specs = []
        for h in self.hosts:
            sock = self.hostdir(h) / "devlog.sock"
            sock.unlink(missing_ok=True)
            specs.append(f"{h}={sock}")
        self.start_daemon("ctl", "devlog", ["/usr/bin/python3", "-I", str(HERE / "devlog.py"),
                                            str(self.logs / "syslog.log"), *specs])
        for _ in range(200):
            if all((self.hostdir(h) / "devlog.sock").is_socket() for h in self.hosts):
                return
            time.sleep(0.01)
        raise TestbedError("syslog sink did not come up")

    def _start_slurm(self) -> None:
        if self.platform.accounting:
            t = time.monotonic()
            self.bringup_parts.update(accounting.start(self))
            self.bringup_parts["accounting"] = time.monotonic() - t
        (self.logs / "slurmctld.log").touch()
        os.chown(self.logs / "slurmctld.log", _uid("slurm"), _gid("slurm"))
        r = self.exec("ctl", ["/usr/sbin/slurmctld", "-c"])
        if r.rc:
            raise TestbedError(f"slurmctld: {r.err} {self._tail('slurmctld.log')}")
        for n in self.node_names:
            log = self.logs / f"slurmd-{n}.log"      # SlurmdLogFile
            self.start_daemon(n, "slurmd-foreground", self._slurmd_argv(n), timeout=60,
                              wait_for=lambda: "slurmd version" in _read(log) and " started" in _read(log))
            if self.platform.configless:
                self._check_configless(n)
            self._start_sshd(n)

    def _slurmd_argv(self, node: str) -> list[str]:
        """slurmd in the foreground (-D), as systemd's slurmd.service runs it."""
        argv = ["/usr/sbin/slurmd", "-D"]
        if self.platform.configless:
            # -N: slurmd expands %n in SlurmdSpoolDir (where it caches the fetched configs)
            # before it knows its node name from the config (src/slurmd/slurmd/slurmd.c,
            # _establish_configuration(), slurm-22-05-8-1 and slurm-24-11-5-1)
            argv += ["--conf-server", "ctl", "-N", node]
        if self._v2(node):
            argv = cgroup2.slurmd_argv(argv, self.shim)
        return argv

    def _check_configless(self, node: str, timeout: float = 30) -> None:
        """A configless slurmd has no slurm.conf in /etc/slurm and the fetched one in its cache
        (<SlurmdSpoolDir>/conf-cache, which /run/slurm/conf links to). 24.11 fetches it after
        it has daemonized."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = self.exec(node, ["/bin/sh", "-c", "test ! -e /etc/slurm/slurm.conf && test -f /run/slurm/conf/slurm.conf"])
            if r.ok and (self.spool(node) / "conf-cache" / "slurm.conf").is_file():
                return
            time.sleep(0.1)
        r = self.exec(node, ["ls", "-l", "/etc/slurm", "/run/slurm", str(self.spool(node))])
        raise TestbedError(f"slurmd on {node} is not configless after {timeout}s: {r.out!r} {r.err!r} "
                           f"{self._tail(f'slurmd-{node}.log', 2000)}")

    def _start_sshd(self, n: str) -> None:
        r = self.exec(n, ["/usr/sbin/sshd", "-f", str(self.state / "etc/sshd_config"),
                          "-E", str(self.logs / f"sshd-{n}.log"),
                          "-o", f"PidFile={self.hostdir(n) / 'sshd.pid'}"])
        if r.rc:
            raise TestbedError(f"sshd on {n}: {r.err} {self._tail(f'sshd-{n}.log')}")

    def _wait_idle(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        out = ""
        while time.monotonic() < end:
            r = self.exec("login", ["sinfo", "-h", "-N", "-o", "%N %T"])
            out = r.out
            states = dict(line.split() for line in r.out.splitlines() if line.strip())
            if r.rc == 0 and all(states.get(n) == "idle" for n in self.node_names):
                return
            time.sleep(0.2)
        raise TestbedError(f"nodes not idle after {timeout}s: {out!r} {self._tail('slurmctld.log')}")

    def _tail(self, logname: str, n: int = 1200) -> str:
        try:
            return (self.logs / logname).read_text()[-n:]
        except FileNotFoundError:
            return ""

    # ---------------------------------------------------------------- running things
    def _holder(self, host: str) -> int:
        h = self.hosts[host]
        if h.holder is None or not _alive(h.holder):
            raise TestbedError(f"host {host} is not up")
        return h.holder

    def _argv(self, host: str, argv, user: str | None) -> list[str]:
        pre = ["nsenter", "-t", str(self._holder(host)), "-n", "-u", "-m", "--"]
        if user is None:
            cmd = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"] + list(argv)
        else:
            u = self.user(user)
            cmd = ["setpriv", f"--reuid={u.uid}", f"--regid={u.gid}", "--init-groups", "--reset-env",
                   "env", f"HOME={self.state / 'home' / u.name}", f"USER={u.name}", f"LOGNAME={u.name}",
                   "PATH=/usr/bin:/bin", "LANG=C.UTF-8"] + list(argv)
        if self._v2(host):
            return cgroup2.prefix_argv(self.prefix, host, pre, cmd)
        return pre + cmd

    def exec(self, host: str, argv, user: str | None = None, timeout: float = 60, check: bool = False,
             input: str | None = None) -> Result:
        """Run argv on `host` (as root, or as test user `user`); returns rc/out/err/seconds."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        t0 = time.monotonic()
        p = subprocess.run(self._argv(host, argv, user), capture_output=True, text=True, timeout=timeout,
                           input=input, cwd="/")
        r = Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)
        if check and r.rc:
            raise TestbedError(f"on {host} as {user or 'root'}: {argv!r} -> {r.rc}: {r.err.strip()[-800:]}")
        return r

    def popen(self, host: str, argv, user: str | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self._argv(host, argv, user), cwd="/", **kw)

    # -- jobs
    def sbatch(self, user: str, *args: str, wrap: str | None = "sleep 600", nodes: list[str] | None = None,
               wait: bool = True, timeout: float = 30) -> int:
        """Submit a job as `user` from the login node; by default wait until its extern step
        exists on every node of the job. Returns the job id."""
        argv = ["sbatch", "--parsable", "-o", str(self.state / "jobs" / "job-%j.out")]
        if nodes:
            argv += ["-N", str(len(nodes)), "-w", ",".join(nodes)]
        argv += list(args)
        if wrap is not None:
            argv += ["--wrap", wrap]
        r = self.exec("login", argv, user=user, check=True)
        job = int(r.out.strip().split(";")[0])
        if wait:
            self.wait_job(job, timeout=timeout)
        return job

    def job_nodes(self, job: int) -> list[str]:
        r = self.exec("login", ["squeue", "-h", "-j", str(job), "-o", "%N"])
        nl = r.out.strip()
        if not nl:
            return []
        return self.exec("login", ["scontrol", "show", "hostnames", nl], check=True).out.split()

    def wait_job(self, job: int, timeout: float = 30) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = self.exec("login", ["squeue", "-h", "-j", str(job), "-o", "%T"])
            if r.out.strip() == "RUNNING":
                nodes = self.job_nodes(job)
                if nodes and all(self._extern_ready(n, job) for n in nodes):
                    return nodes
            time.sleep(0.05)
        raise TestbedError(f"job {job} did not start with its extern steps in {timeout}s: "
                           f"{self.exec('login', ['squeue', '-a']).out}")

    def _extern_ready(self, node: str, job: int) -> bool:
        """The extern stepd's socket exists and its step cgroup holds its placeholder process
        (the socket appears slightly before the cgroup)."""
        if not (self.spool(node) / f"{node}_{job}.{EXTERN_STEP}").is_socket():
            return False
        if self._v2(node):  # the placeholder sits in a leaf below user/ (task_special or task_0)
            leaves = (self.scope_dir(node) / f"job_{job}" / "step_extern" / "user").glob("*/cgroup.procs")
        else:
            leaves = Path(f"/sys/fs/cgroup/freezer/slurm_{node}").glob(f"uid_*/job_{job}/step_extern/cgroup.procs")
        for procs in leaves:
            try:
                if procs.read_text().strip():
                    return True
            except OSError:
                pass
        return False

    # -- where jobs live in the cgroup tree (v1: the freezer hierarchy; v2: the unified one)
    def scope_dir(self, node: str) -> Path:
        """v2: the node's Slurm scope as seen from the root namespace."""
        return cgroup2.node_dir(self.prefix, node) / "system.slice" / f"{node}_slurmstepd.scope"

    @property
    def job_cgroup_cmd(self) -> str:
        """A shell command printing the /proc/self/cgroup line that tells the job (parse it with
        `split(":", 2)[2]`)."""
        return "grep ^0:: /proc/self/cgroup" if self.platform.cgroup == 2 else "grep :freezer: /proc/self/cgroup"

    def extern_cgroup(self, node: str, uid: int, job: int) -> str:
        """The cgroup of a session adopted into the job's extern step, as job_cgroup_cmd shows
        it inside `node` (v2: the leaf the extern stepd puts added pids into)."""
        if self.platform.cgroup == 2:
            return f"/system.slice/{node}_slurmstepd.scope/job_{job}/step_extern/user/task_special"
        return f"/slurm_{node}/uid_{uid}/job_{job}/step_extern"

    def job_cgroup_of(self, node: str, pid: int) -> str:
        """`pid`'s cgroup in the hierarchy that tells the job, as it reads inside `node`."""
        if self.platform.cgroup == 1:
            return self.cgroup_of(node, pid)["freezer"]
        path = self.cgroup_of(node, pid)[""]
        top = f"/{cgroup2.node_dir(self.prefix, node).relative_to(cgroup2.MOUNT)}"
        if path == top or path.startswith(top + "/"):
            return path[len(top):] or "/"
        return path      # outside the node's cgroup namespace

    def scancel(self, user: str, *args: str) -> None:
        self.exec("login", ["scancel", *args], user=user, check=True)

    def wait_job_gone(self, job: int, timeout: float = 30) -> None:
        """Until the job's extern step sockets are gone from every node."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not any(self.step_sockets(n, f"{n}_{job}.*") for n in self.node_names):
                return
            time.sleep(0.05)
        raise TestbedError(f"job {job} still has steps after {timeout}s")

    def step_sockets(self, node: str, pattern: str) -> list[Path]:
        """The node's slurmstepd sockets matching `pattern` whose stepd still runs. A socket
        file nothing is bound to any more is removed, as slurmd removes stray sockets
        (src/common/stepd_api.c, _handle_stray_socket(), slurm-24-11-5-1): Slurm 24.11.0-.5's
        extern stepd can die at job end without removing it when pids were added to it
        (segfault or lost privileges in its _wait_extern_pid() threads; SchedMD ticket 22770,
        fixed in 24.11.6 by "Join threads used to track external pids in slurmstepd")."""
        files = list(self.spool(node).glob(pattern))
        if not files:
            return []
        with open(f"/proc/{self._holder(node)}/net/unix") as f:   # the node's network namespace
            bound = {line.split()[-1] for line in f.read().splitlines()[1:] if len(line.split()) == 8}
        live = []
        for path in files:
            if str(path) in bound:
                live.append(path)
            else:
                path.unlink(missing_ok=True)
                print(f"[testbed] {node}: removed stray stepd socket {path.name} (its slurmstepd is gone)",
                      file=sys.stderr)
        return live

    # -- accounting (platform.accounting)
    def sacct(self, *args: str, user: str | None = None) -> Result:
        return self.exec("login", ["sacct", *args], user=user)

    def sstat(self, *args: str, user: str | None = None) -> Result:
        return self.exec("login", ["sstat", *args], user=user)

    def wait_accounted(self, job: int, step: str | None = None, timeout: float = 60) -> list[str]:
        """Until slurmdbd has the job (or `job.step`) finished: not RUNNING/PENDING, End known.
        Returns its sacct row [JobID, State, End]. (The stepd's own record of a step can
        replace slurmctld's about a second later: poll the numbers, not just this.)"""
        sel = f"{job}.{step}" if step else str(job)
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            r = self.sacct("-n", "-P", "-j", sel, "-o", "JobID,State,End")
            last = r.out + r.err
            for row in (ln.split("|") for ln in r.out.splitlines()):
                if len(row) == 3 and row[0] == sel and row[1] and \
                        row[1].split()[0] not in ("RUNNING", "PENDING") and row[2] not in ("", "Unknown"):
                    return row
            time.sleep(0.25)
        raise TestbedError(f"slurmdbd does not have {sel} finished after {timeout}s: {last!r}")

    def cancel_all(self, timeout: float = 30) -> None:
        for u in self.users:
            self.exec("login", ["scancel", "-u", u.name], user=u.name)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            q = self.exec("login", ["squeue", "-h", "-a"])
            if not q.out.strip() and not any(self.step_sockets(n, f"{n}_[0-9]*.*") for n in self.node_names):
                return
            time.sleep(0.1)
        raise TestbedError(f"jobs did not end: {self.exec('login', ['squeue', '-a'])} "
                           f"{[list(self.spool(n).iterdir()) for n in self.node_names]}")

    # -- ssh
    def ssh(self, user: str, src: str, dst: str, command: str = "true", job: int | None = None,
            options: list[str] | None = None, timeout: float = 60, password: bool = False) -> Result:
        """ssh as `user` from host `src` to `dst` (a host name, `name-v6`, or an address).
        With `job`, the ssh client runs inside that job on `src` (srun --overlap).
        With `password`, the login uses keyboard-interactive with the user's password (sshpass).
        `seconds` is the wall time of the ssh client alone."""
        opts = list(options or [])
        ssh = ["ssh", *opts]
        if password:
            ssh = ["sshpass", "-p", self.user(user).password, "ssh", "-o", "BatchMode=no",
                   "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=keyboard-interactive,password",
                   *opts]
        inner = ("s=$EPOCHREALTIME; " + shlex.join([*ssh, dst, command]) +
                 '; rc=$?; echo "__cid_t $s $EPOCHREALTIME" >&2; exit $rc')
        argv = ["bash", "-c", inner]
        if job is not None:
            argv = ["srun", f"--jobid={job}", "--overlap", "-w", src, "-N1", "-n1", *argv]
            src = "login"
        r = self.exec(src, argv, user=user, timeout=timeout)
        lines = [ln for ln in r.err.splitlines() if ln.startswith("__cid_t ")]
        if lines:
            s, e = map(float, lines[-1].split()[1:3])
            r.seconds = e - s
            r.err = "\n".join(ln for ln in r.err.splitlines() if not ln.startswith("__cid_t ")) + "\n"
        return r

    # -- PAM
    def set_pam(self, node: str, account: list[str], session: list[str] | None = None) -> None:
        """Set the node sshd's PAM stack: Debian's auth, pam_nologin + common-account, then the
        given account lines (last in the account stack), the session modules of the test bed
        (no pam_systemd), then the given session lines. sshd re-reads it per connection."""
        text = PAM_SSHD.format(account="\n".join(account), session="\n".join(session or []))
        # rewritten in place (same inode) in the host's /etc overlay upper layer
        with open(self.hostdir(node) / "etc.upper" / "pam.d" / "sshd", "w") as f:
            f.write(text)
        self._pam[node] = (account, session)

    def set_pam_all(self, account: list[str], session: list[str] | None = None) -> None:
        for n in self.node_names:
            self.set_pam(n, [a.replace("@NODE@", n) for a in account],
                         [s.replace("@NODE@", n) for s in (session or [])])

    def use_pam_slurm_adopt(self, *args: str) -> None:
        """pam_slurm_adopt last in the account stack; nodename= set (Debian builds Slurm with
        multiple-slurmd, so its `newest` heuristic needs it)."""
        self.set_pam_all([f"account required pam_slurm_adopt.so nodename=@NODE@ {' '.join(args)}".rstrip()])

    def use_no_adoption(self) -> None:
        self.set_pam_all([])

    # -- daemons
    def start_daemon(self, host: str, name: str, argv, user: str | None = None, env: dict | None = None,
                     wait_for: callable | None = None, timeout: float = 10) -> subprocess.Popen:
        """Start a foreground daemon on `host`; stdout+stderr go to logs/<name>-<host>.log.
        Stopped (by pid) with stop_daemon() or at teardown."""
        self.stop_daemon(host, name)
        logf = self.logs / f"{name}-{host}.log"
        if logf.exists():  # a fresh log per start, so wait_for never sees a previous run's lines
            os.replace(logf, logf.with_suffix(".log.prev"))
        log = open(logf, "ab")
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        p = self.popen(host, (["env", *extra] if extra else []) + list(argv), user=user,
                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.hosts[host].daemons[name] = p
        if wait_for:
            end = time.monotonic() + timeout
            while not wait_for():
                if p.poll() is not None or time.monotonic() > end:
                    raise TestbedError(f"{name} on {host} did not become ready: {self.daemon_log(host, name)[-800:]}")
                time.sleep(0.02)
        return p

    def stop_daemon(self, host: str, name: str, sig: int = signal.SIGTERM, timeout: float = 5) -> int | None:
        p = self.hosts[host].daemons.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            # p is the nsenter process; with -t it execs nothing itself but waits for its child
            for pid in _children_tree(p.pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in _children_tree(p.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait(timeout)
        return p.returncode

    def daemon_log(self, host: str, name: str) -> str:
        return self._tail(f"{name}-{host}.log", 100000)

    # -- logs
    def syslog_mark(self) -> int:
        try:
            return (self.logs / "syslog.log").stat().st_size
        except FileNotFoundError:
            return 0

    def syslog(self, host: str | None = None, since: int = 0, ident: str | None = None,
               settle: float = 0.2) -> list[str]:
        """Lines the hosts sent to syslog since `since` (a syslog_mark()), optionally only those
        of one host and/or one ident (e.g. 'pam_slurm_adopt')."""
        time.sleep(settle)
        with open(self.logs / "syslog.log", "rb") as f:
            f.seek(since)
            lines = f.read().decode("utf-8", "replace").splitlines()
        if host:
            lines = [ln for ln in lines if f" [{host}] " in ln]
        if ident:
            lines = [ln for ln in lines if f" {ident}[" in ln or f" {ident}:" in ln]
        return lines

    # -- inspection helpers
    def cgroup_of(self, host: str, pid: int) -> dict[str, str]:
        """controller -> path from /proc/PID/cgroup (same kernel, so readable from here)."""
        out = {}
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in (ctrls.split(",") if ctrls else [""]):
                    out[c] = path
        return out

    def pids_in_netns(self, host: str) -> list[int]:
        return _pids_in_netns({os.stat(f"/run/netns/{self.netns(host)}").st_ino})

    # ---------------------------------------------------------------- teardown
    def down(self, unlock: bool = True) -> None:
        """Leave the machine as it was: every process in our namespaces killed, the slurmds'
        cgroups removed, veths, namespaces, bridge and state dir deleted. Idempotent, and also
        cleans a stale run of the same prefix (using its recorded metadata)."""
        if os.geteuid() != 0:
            return
        self._lock()
        try:
            self._down()
        finally:
            if unlock:
                self._unlock()

    def _down(self) -> None:
        meta = {}
        try:
            meta = json.loads((self.state / "meta.json").read_text())
        except (FileNotFoundError, ValueError):
            pass
        node_names = set(self.node_names) | set(meta.get("nodes", []))
        for h in self.hosts.values():
            for name in list(h.daemons):
                try:
                    self.stop_daemon(h.name, name, timeout=2)
                except Exception:
                    pass
            h.holder = None
        ours = _our_netns(self.prefix)
        inodes = set()
        for ns in ours:
            try:
                inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
            except FileNotFoundError:
                pass
        _thaw(node_names)
        for i in range(40):
            pids = _pids_in_netns(inodes) if inodes else []
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM if i < 10 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for n in node_names:
            _rm_cgroup_tree(n)
        cgroup2.remove(self.prefix)
        for ns in ours:
            host = ns[len(self.prefix) + 1:]
            subprocess.run(["ip", "link", "del", f"{self.prefix}-{host}-h"[:15]], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", meta.get("bridge", self.bridge)], capture_output=True)
        if self.state.exists():
            keep = os.environ.get("CID_KEEP_TESTBED_LOGS")
            if keep and (self.state / "logs").exists():
                dst = Path(keep) / time.strftime("%Y%m%d-%H%M%S")
                shutil.copytree(self.state / "logs", dst, dirs_exist_ok=True)
            _umount_below(self.state)
            shutil.rmtree(self.state, ignore_errors=True)
        _drop_empty_netns_dir()

    def leftovers(self) -> list[str]:
        """What of ours is still on the machine (empty when clean)."""
        left = [f"netns {ns}" for ns in _our_netns(self.prefix)]
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode == 0:
            left.append(f"bridge {self.bridge}")
        for c in CGROUP_CONTROLLERS + ["memory", "unified"]:
            for n in self.node_names:
                if Path(f"/sys/fs/cgroup/{c}/slurm_{n}").exists():
                    left.append(f"cgroup {c}/slurm_{n}")
        left += cgroup2.leftovers(self.prefix) + trixie.leftovers()
        if self.state.exists():
            left.append(f"state dir {self.state}")
        with open("/proc/self/mounts") as f:
            for line in f:
                if str(self.state) in line.split()[1]:
                    left.append(f"mount {line.split()[1]}")
        return left


# -------------------------------------------------------------------- helpers
def _uid(name: str) -> int:
    import pwd
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    import pwd
    return pwd.getpwnam(name).pw_gid


def _gid_of_group(name: str) -> int:
    import grp
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return 0


def _sysctl(key: str, value: str) -> None:
    try:
        Path(f"/proc/sys/{key}").write_text(value)
    except OSError:
        pass


def _our_netns(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(f"{prefix}-"))
    except FileNotFoundError:
        return []


def _pids_in_netns(inodes: set[int]) -> list[int]:
    me = os.getpid()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino in inodes and _alive(int(d)):
                pids.append(int(d))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return pids


def _children_tree(pid: int) -> list[int]:
    """pid and all its descendants (deepest first)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                pass
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(kids.get(p, []))
    return out[::-1]


def _thaw(node_names) -> None:
    for n in node_names:
        base = Path(f"/sys/fs/cgroup/freezer/slurm_{n}")
        if base.exists():
            for st in base.rglob("freezer.state"):
                try:
                    if "FROZEN" in st.read_text():
                        st.write_text("THAWED")
                except OSError:
                    pass


def _rm_cgroup_tree(node: str) -> None:
    for c in CGROUP_CONTROLLERS + ["unified"]:  # never memory: Slurm here never creates it
        base = Path(f"/sys/fs/cgroup/{c}/slurm_{node}")
        if not base.is_dir():
            continue
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, base]:
            rmdir_retry(d, tries=20)


def mkdir_chain(leaf: Path, base: Path, made: list) -> Path:
    """Create `leaf` and every missing directory between `base` and it, one by one, appending
    each one created to `made` (parents first: remove them in reverse).  -> leaf"""
    p = Path(base)
    for part in Path(leaf).relative_to(base).parts:
        p = p / part
        if not p.exists():
            p.mkdir()
            made.append(p)
    return Path(leaf)


def rmdir_retry(d, tries: int = 40, pause: float = 0.05) -> bool:
    """rmdir a cgroup directory, retrying while its last processes are still exiting.
    True when it is gone."""
    for _ in range(tries):
        try:
            os.rmdir(d)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(pause)
    return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _slurm_dir_without_conf(d: Path, names: list[str]) -> None:
    """A configless node's /etc/slurm upper layer: overlay whiteouts (0/0 character devices)
    hide the configuration files slurmctld serves, whatever the root namespace's /etc/slurm has."""
    import stat
    d.mkdir()
    for n in names:
        os.mknod(d / n, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _umount_below(path: Path) -> None:
    with open("/proc/self/mounts") as f:
        mps = [line.split()[1] for line in f if line.split()[1].startswith(str(path))]
    for mp in sorted(mps, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def _drop_empty_netns_dir() -> None:
    """`ip netns add` leaves /run/netns as a mount point; remove it when nobody uses it."""
    d = Path("/run/netns")
    try:
        if d.is_dir() and not any(d.iterdir()):
            subprocess.run(["umount", str(d)], capture_output=True)
            d.rmdir()
    except OSError:
        pass


CLUSTER_NAME = "cidtest"
SLURM_CONF = """\
# slurm-callerid test bed: Slurm {release} in network/UTS/mount namespaces
ClusterName={cluster}
SlurmctldHost=ctl({ctl_ip})
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}
StateSaveLocation={st}/ctld
SlurmctldPidFile={st}/ctld/slurmctld.pid
SlurmctldLogFile={st}/logs/slurmctld.log
SlurmctldDebug=info
SlurmdSpoolDir={st}/hosts/%n/spool
SlurmdPidFile={st}/hosts/%n/slurmd.pid
SlurmdLogFile={st}/logs/slurmd-%n.log
SlurmdDebug=debug
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
PrologFlags=contain
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency={jag_frequency}
{accounting}JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=60
MessageTimeout=10
MailProg=/bin/true
KillWait=5
{platform_lines}{nodelines}
PartitionName=debug Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""

RELEASES = {"22.05": "22.05 (Debian 12 packages)", "24.11": "24.11 (Debian 13 packages, own loader)"}


def slurm_conf(p: Platform, **fields) -> str:
    lines = ""
    if p.job_container:
        lines += "JobContainerType=job_container/tmpfs\n"
    if p.configless:
        lines += "SlurmctldParameters=enable_configless\n"
    return SLURM_CONF.format(
        release=RELEASES[p.slurm], cluster=CLUSTER_NAME, platform_lines=lines,
        # accounting: Slurm samples the processes of a step every second (the default 30 s
        # never sees a short adopted session)
        jag_frequency="task=1" if p.accounting else "30",
        accounting=accounting.slurm_conf_lines(fields["munge"]) if p.accounting
        else "AccountingStorageType=accounting_storage/none\n", **fields)


# Never the memory controller: memory cgroups belong to the machine's infrastructure.
def cgroup_conf(p: Platform) -> str:
    lines = ["CgroupPlugin=cgroup/v1", "CgroupMountpoint=/sys/fs/cgroup", "ConstrainCores=yes"]
    if p.cgroup == 2:
        # no controller is enabled in the test bed's cgroup2 subtrees: only device
        # confinement (eBPF, no controller needed) is on
        lines = ["CgroupPlugin=cgroup/v2", f"CgroupMountpoint={cgroup2.MOUNT}", "IgnoreSystemd=yes",
                 "ConstrainCores=no"]
    if p.slurm == "22.05":
        lines.append("CgroupAutomount=no")   # defunct in 24.11 (an error is logged)
    lines += ["ConstrainDevices=yes", "ConstrainRAMSpace=no", "ConstrainSwapSpace=no"]
    return "\n".join(lines) + "\n"


def job_container_conf(nodes: list[str]) -> str:
    """BasePath on the node's private /run (a tmpfs per host): 22.05 chown()s the job's
    directory by its absolute path after mounting it on /tmp, so a BasePath under /tmp fails
    (measured: "_create_ns: chown failed"). Multiple-slurmd builds append /<node>."""
    return "AutoBasePath=true\n" + "".join(f"NodeName={n} BasePath=/run/jc\n" for n in nodes)


SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
ListenAddress ::
HostKey {key}
UsePAM yes
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication yes
PermitRootLogin prohibit-password
AuthorizedKeysFile .ssh/authorized_keys
X11Forwarding no
PrintMotd no
PrintLastLog no
UseDNS no
LogLevel VERBOSE
MaxStartups 100:30:200
"""

PAM_SSHD = """\
# slurm-callerid test bed: node sshd PAM stack (no pam_systemd)
@include common-auth
account    required     pam_nologin.so
@include common-account
{account}
session    optional     pam_loginuid.so
session    optional     pam_keyinit.so force revoke
session    required     pam_unix.so
session    required     pam_limits.so
session    required     pam_env.so
{session}
@include common-password
"""
