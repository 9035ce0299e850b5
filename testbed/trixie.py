"""Slurm 24.11 for the test bed: Debian 13 ("trixie") packages, unpacked into a private cache
and run through trixie's own dynamic loader, next to the system's Slurm 22.05 (untouched).

Nothing from trixie is installed. `ensure()` (the install step: `bash packaging/run install`,
i.e. `python -m testbed.platforms install`) adds a temporary trixie apt source with a
negative pin (nothing can be installed from it), `apt-get download`s the packages, removes
source and pin again and re-runs `apt-get update` (also when the download fails or is
interrupted), then `dpkg -x` unpacks them under CACHE and checks the result runs. A test bed
host that runs 24.11 bind-mounts, in its own mount namespace only, a wrapper over each Slurm
program (`wrapper()`) and the trixie plugin directory over Debian's (`binds()`).

Why a private loader: trixie's Slurm needs glibc >= 2.38 (bookworm has 2.36) and hwloc 2.12.
Why `--argv0`: 24.11 knows which daemon it is by the basename of argv[0]
(src/common/run_in_daemon.c, run_in_daemon() at slurm-24-11-5-1), and slurmctld re-execs
argv[0] for slurmscriptd: without it slurmctld fatal()s ("certmgr plugin only allowed on
slurmctld and slurmd") and re-execs would bypass the loader.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("CID_TESTBED_CACHE", "/var/cache/slurm-callerid-testbed")) / "slurm-24.11"
SUITE = "trixie"
# the Slurm programs and plugins (unpacked to root/), and the C library + hwloc they need (libc/)
SLURM_DEBS = ["slurmd", "slurmctld", "slurm-client", "slurm-wlm-basic-plugins", "libslurm42t64",
              "slurmdbd", "slurm-wlm-mysql-plugin"]
LIBC_DEBS = ["libc6", "libhwloc15"]
APT_SOURCE = Path("/etc/apt/sources.list.d/slurm-callerid-testbed-trixie.sources")
APT_PIN = Path("/etc/apt/preferences.d/slurm-callerid-testbed-trixie")
SYSTEM_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
PLUGIN_DIR = "/usr/lib/x86_64-linux-gnu/slurm-wlm"      # compiled-in PluginDir and RUNPATH
DAEMONS = {"slurmctld": "slurmctld-wlm", "slurmd": "slurmd-wlm", "slurmstepd": "slurmstepd-wlm",
           "slurmdbd": "slurmdbd"}
VERSION_PREFIX = "slurm-wlm 24.11"


class TrixieError(RuntimeError):
    """The private Slurm 24.11 tree is missing, incomplete or does not run."""


class Tree:
    """The unpacked packages below `base`: root/ (Slurm) and libc/ (glibc, hwloc)."""

    def __init__(self, base: Path = CACHE):
        self.base = base
        self.root = base / "root"
        self.libc = base / "libc" / "usr/lib/x86_64-linux-gnu"
        self.loader = self.libc / "ld-linux-x86-64.so.2"
        self.complete = base / "COMPLETE"

    @property
    def library_path(self) -> str:
        return f"{self.libc}:{self.root}/usr/lib/x86_64-linux-gnu:{PLUGIN_DIR}"

    def program(self, target: str) -> Path:
        """The trixie binary that replaces the system program `target` (/usr/sbin/X, /usr/bin/X)."""
        name = Path(target).name
        if target.startswith("/usr/sbin/"):
            return self.root / "usr/sbin" / DAEMONS[name]
        return self.root / "usr/bin" / name

    def targets(self) -> list[str]:
        """System paths a 24.11 host covers: the daemons, and every client program that both
        releases ship (a 22.05 client cannot talk to a 24.11 slurmctld)."""
        out = [f"/usr/sbin/{d}" for d in DAEMONS if Path(f"/usr/sbin/{d}").exists()]
        for p in sorted((self.root / "usr/bin").iterdir()):
            if Path(f"/usr/bin/{p.name}").exists():
                out.append(f"/usr/bin/{p.name}")
        return out

    def wrapper(self, target: str) -> str:
        """A shell wrapper to bind-mount over `target` inside a test bed host."""
        return (f"#!/bin/sh\n# test bed: Slurm 24.11 (Debian 13) through its own loader, bound over {target}\n"
                f"exec {self.loader} --library-path {self.library_path} --argv0 {target} "
                f"{self.program(target)} \"$@\"\n")

    def check(self) -> str:
        """Raise TrixieError unless the tree is complete and slurmd runs; returns its version."""
        if not self.complete.exists():
            raise TrixieError(f"Slurm 24.11 is not unpacked in {self.base} (run: bash packaging/run install)")
        missing = [str(p) for p in (self.loader, *(self.program(t) for t in
                                                    ("/usr/sbin/slurmd", "/usr/sbin/slurmctld",
                                                     "/usr/sbin/slurmstepd", "/usr/sbin/slurmdbd")),
                                    self.root / PLUGIN_DIR.lstrip("/") / "cgroup_v2.so",
                                    self.root / PLUGIN_DIR.lstrip("/") / "accounting_storage_mysql.so")
                   if not p.exists()]
        if missing:
            raise TrixieError(f"{self.base} is incomplete, missing {missing} (run: bash packaging/run install)")
        p = subprocess.run([str(self.loader), "--library-path", f"{self.libc}:{self.root}/usr/lib/x86_64-linux-gnu:"
                            f"{self.root}{PLUGIN_DIR}", "--argv0", "/usr/sbin/slurmd",
                            str(self.program("/usr/sbin/slurmd")), "-V"],
                           capture_output=True, text=True, timeout=30)
        if p.returncode or not p.stdout.startswith(VERSION_PREFIX):
            raise TrixieError(f"{self.program('/usr/sbin/slurmd')} -V through {self.loader}: rc {p.returncode} "
                              f"{p.stdout.strip()} {p.stderr.strip()[-400:]}")
        return p.stdout.strip()


def tree() -> Tree:
    """The private Slurm 24.11, checked (for a cluster's bring-up: never downloads)."""
    t = Tree()
    t.check()
    return t


def ensure(log=print) -> Tree:
    """The install step: download and unpack when missing or incomplete, then check. Idempotent;
    one installer at a time (flock in the cache dir)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE.parent, 0o755)
    os.chmod(CACHE, 0o755)
    with open(CACHE.parent / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        drop_apt_source()                     # a killed earlier download's, if any
        t = Tree()
        try:
            version = t.check()
            log(f"Slurm 24.11 present in {CACHE}: {version}")
            return t
        except TrixieError:
            pass
        for d in ("debs", "root", "libc"):
            shutil.rmtree(CACHE / d, ignore_errors=True)
        t.complete.unlink(missing_ok=True)
        debs = CACHE / "debs"
        debs.mkdir()
        log(f"downloading {SLURM_DEBS + LIBC_DEBS} from {SUITE} into {debs}")
        _download(debs, SLURM_DEBS + LIBC_DEBS)
        for deb in sorted(debs.glob("*.deb")):
            dest = "libc" if deb.name.split("_")[0] in LIBC_DEBS else "root"
            subprocess.run(["dpkg", "-x", str(deb), str(CACHE / dest)], check=True, capture_output=True)
        t.complete.write_text("".join(f"{d.name}\n" for d in sorted(debs.glob("*.deb"))))
        version = t.check()
        log(f"Slurm 24.11 unpacked in {CACHE}: {version}")
        return t


def _mirror() -> str:
    for line in SYSTEM_SOURCES.read_text().splitlines():
        if line.startswith("URIs:"):
            return line.split(":", 1)[1].split()[0]
    raise TrixieError(f"no URIs: line in {SYSTEM_SOURCES}")


def _download(dest: Path, packages: list[str]) -> None:
    """apt-get download from a temporary trixie source pinned to -10; the source and pin are
    removed and the package lists refreshed whatever happens (KeyboardInterrupt included)."""
    try:
        APT_SOURCE.write_text(f"# temporary: slurm-callerid test bed downloads Slurm 24.11 (removed afterwards)\n"
                              f"Types: deb\nURIs: {_mirror()}\nSuites: {SUITE}\nComponents: main\n"
                              "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        APT_PIN.write_text(f"# temporary: nothing may be installed from {SUITE}\n"
                           f"Package: *\nPin: release n={SUITE}\nPin-Priority: -10\n")
        _apt(["apt-get", "update", "-q"])
        _apt(["apt-get", "download", *[f"{p}/{SUITE}" for p in packages]], cwd=dest)
    finally:
        drop_apt_source()


def drop_apt_source() -> None:
    """Remove the temporary trixie source and pin (if present) and refresh the package lists."""
    if APT_SOURCE.exists() or APT_PIN.exists():
        APT_SOURCE.unlink(missing_ok=True)
        APT_PIN.unlink(missing_ok=True)
        _apt(["apt-get", "update", "-q"], check=False)


def _apt(argv: list[str], cwd: Path | None = None, check: bool = True) -> None:
    """Run apt-get, waiting while another apt holds its locks."""
    argv = [argv[0], "-o", "DPkg::Lock::Timeout=600", *argv[1:]]
    for _ in range(40):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=1200, cwd=cwd)
        if p.returncode == 0 or "lock" not in p.stderr.lower():
            break
        time.sleep(15)
    if check and p.returncode:
        raise TrixieError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-800:]}")


def leftovers() -> list[str]:
    return [f"apt file {p}" for p in (APT_SOURCE, APT_PIN) if p.exists()]
