"""Adoption scenarios written once and run against every adoption module.

A module under test is an `Adopter`: how to put it into the node sshds' PAM stack (and start
whatever it needs), the name it signs user messages with, and its syslog ident. Issue 2 runs
them against pam_slurm_adopt (the baseline); later issues add ours to ADOPTERS.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Adopter:
    name: str                      # as it appears in "Access denied by <name>: ..."
    ident: str                     # syslog ident
    configure: Callable            # configure(cluster, **options)
    teardown: Callable = lambda cluster: None
    runs_on: Callable = lambda platform: True  # can it run on this test-bed platform?

    def no_jobs_message(self) -> str:
        return f"Access denied by {self.name}: you have no active jobs on this node"


def _pam_slurm_adopt(cluster, **options):
    cluster.use_pam_slurm_adopt(*(f"{k}={v}" for k, v in options.items()))


# Debian 12's pam_slurm_adopt links Slurm 22.05's libslurmfull, and Debian 13's needs glibc 2.38
# inside Debian 12's sshd: it runs on the 22.05 platforms only
PAM_SLURM_ADOPT = Adopter("pam_slurm_adopt", "pam_slurm_adopt", _pam_slurm_adopt,
                          lambda cluster: cluster.use_no_adoption(), lambda platform: platform.slurm == "22.05")


def use_pam_callerid(cluster, *, port: int = 6820, auth: str = "munge", daemon_hosts=None,
                     extra_conf: str = "", **options) -> Path:
    """Put our module into every node sshd's account (decide) and session (adopt) stacks and
    start `callerid daemon` -- the caller-ID server and the PAM decision service the module
    asks -- on `daemon_hosts` (default: every node and the login node; a node without one
    gets action_generic_failure). The C client is built from this checkout into the test
    bed's state dir; the daemon runs this checkout's Python. Each host has its own /run, so
    every daemon serves the default /run/callerid/pam.sock. Returns the audit file's path
    (every node's daemon appends to it)."""
    import sys
    root = Path(__file__).resolve().parents[1]
    work = cluster.state / "callerid"
    work.mkdir(mode=0o755, exist_ok=True)
    so = installed_module() if use_installed() else work / "pam_callerid.so"
    if not so.exists():
        from pam_callerid.build import build
        build(str(work))
    conf = work / "callerid.conf"
    lines = [f"Port={port}", f"AuthType={auth}", "LogLevel=debug"]
    if auth == "munge":
        lines.append(f"MungeSocket={cluster.munge_socket}")
    else:
        key = work / "callerid.key"
        if not key.exists():
            from daemon.auth import write_key
            write_key(str(key))
        lines.append(f"KeyFile={key}")
    conf.write_text("\n".join(lines) + "\n" + extra_conf)
    audit = work / "audit.jsonl"
    audit.unlink(missing_ok=True)
    opts = {"nodename": "@NODE@", "audit": str(audit), **options}
    args = " ".join(f"{k}={v}" if v is not True else k for k, v in opts.items())
    cluster.set_pam_all([f"account required {so} {args}"], [f"session required {so} {args}"])
    probe = (f"import os, socket; socket.create_connection(('127.0.0.1', {port}), 0.5).close(); "
             f"assert os.path.exists('/run/callerid/pam.sock')")
    for h in (cluster.nodes + ["login"]) if daemon_hosts is None else daemon_hosts:
        if "callerid" in cluster.hosts[h].daemons:
            continue
        if use_installed():
            argv, env = installed_daemon_argv(conf), {}
        else:
            argv = [sys.executable, "-m", "pam_callerid.cli", "--config", str(conf), "daemon"]
            env = {"PYTHONPATH": str(root)}
        cluster.start_daemon(h, "callerid", argv, env=env,
                             wait_for=lambda h=h: cluster.exec(h, [sys.executable, "-c", probe]).ok)
    return audit


# ---- issue 12 (helper F): the INSTALLED package instead of this checkout. packaging/run's
# package phase installs the .deb and sets CALLERID_USE_INSTALLED=1: use_pam_callerid then
# puts the PAM module the package installed into the stacks and runs /usr/sbin/callerid,
# with exactly the capability bounding set of the package's systemd unit (setpriv; the test
# bed has no systemd) and no new privileges, so the scenarios also prove the unit's set.
INSTALLED_CALLERID = "/usr/sbin/callerid"
INSTALLED_UNIT = "/lib/systemd/system/callerid.service"


def use_installed() -> bool:
    import os
    return os.environ.get("CALLERID_USE_INSTALLED") == "1"


def installed_module() -> Path:
    import subprocess
    files = subprocess.run(["dpkg-query", "-L", "slurm-callerid"], capture_output=True,
                           text=True, check=True).stdout.split()
    return Path(next(f for f in files if f.endswith("/security/pam_callerid.so")))


def unit_capabilities(unit_text: str) -> list[str]:
    """CapabilityBoundingSet= of a unit, as setpriv's names (sys_ptrace, ...)."""
    caps = []
    for line in unit_text.splitlines():
        if line.startswith("CapabilityBoundingSet="):
            caps += [c.lower().removeprefix("cap_") for c in line.split("=", 1)[1].split()]
    return caps


def installed_daemon_argv(conf) -> list[str]:
    caps = unit_capabilities(Path(INSTALLED_UNIT).read_text())
    assert caps, f"{INSTALLED_UNIT} has no CapabilityBoundingSet"
    return ["setpriv", "--bounding-set", "-all," + ",".join("+" + c for c in caps),
            "--no-new-privs", INSTALLED_CALLERID, "--config", str(conf), "daemon"]


def stop_pam_callerid(cluster) -> None:
    cluster.use_no_adoption()
    for h in cluster.hosts:
        cluster.stop_daemon(h, "callerid")


def _pam_callerid(cluster, **options):
    use_pam_callerid(cluster, **options)


PAM_CALLERID = Adopter("pam_callerid", "pam_callerid", _pam_callerid, stop_pam_callerid)

ADOPTERS = [PAM_SLURM_ADOPT, PAM_CALLERID]


def adopters_for(platform) -> list[Adopter]:
    return [a for a in ADOPTERS if a.runs_on(platform)]
