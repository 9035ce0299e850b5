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

    def no_jobs_message(self) -> str:
        return f"Access denied by {self.name}: you have no active jobs on this node"


def _pam_slurm_adopt(cluster, **options):
    cluster.use_pam_slurm_adopt(*(f"{k}={v}" for k, v in options.items()))


PAM_SLURM_ADOPT = Adopter("pam_slurm_adopt", "pam_slurm_adopt", _pam_slurm_adopt,
                          lambda cluster: cluster.use_no_adoption())


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
    so = work / "pam_callerid.so"
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
        cluster.start_daemon(h, "callerid", [sys.executable, "-m", "pam_callerid.cli", "--config",
                                             str(conf), "daemon"],
                             env={"PYTHONPATH": str(root)},
                             wait_for=lambda h=h: cluster.exec(h, [sys.executable, "-c", probe]).ok)
    return audit


def stop_pam_callerid(cluster) -> None:
    cluster.use_no_adoption()
    for h in cluster.hosts:
        cluster.stop_daemon(h, "callerid")


def _pam_callerid(cluster, **options):
    use_pam_callerid(cluster, **options)


PAM_CALLERID = Adopter("pam_callerid", "pam_callerid", _pam_callerid, stop_pam_callerid)

ADOPTERS = [PAM_SLURM_ADOPT, PAM_CALLERID]
