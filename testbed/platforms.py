"""The platforms the test bed runs: Slurm release x cgroup version x job container x configless
slurmd x accounting database. `Cluster(platform=...)` builds one; MATRIX is what CI runs.

    python -m testbed.platforms install    # everything every platform needs (the install step)
    python -m testbed.platforms check      # is it all there? (no downloads)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

SLURM_RELEASES = ("22.05", "24.11")
# Debian packages per platform feature beyond the base test bed's (cluster.PACKAGES);
# installed, never started as services (policy-rc.d denies starts, this host has no systemd)
ACCOUNTING_PACKAGES = ["mariadb-server", "slurmdbd"]


@dataclass(frozen=True)
class Platform:
    """slurm: "22.05" (Debian 12's packages) or "24.11" (Debian 13's, see trixie.py);
    cgroup: 1 or 2 (v2 on this hybrid host: see cgroup2.py); job_container: job_container/tmpfs;
    configless: slurmd --conf-server, no slurm.conf on the nodes; accounting: slurmdbd + MariaDB."""
    slurm: str = "22.05"
    cgroup: int = 1
    job_container: bool = False
    configless: bool = False
    accounting: bool = False

    def __post_init__(self):
        if self.slurm not in SLURM_RELEASES:
            raise ValueError(f"slurm must be one of {SLURM_RELEASES}, not {self.slurm!r}")
        if self.cgroup not in (1, 2):
            raise ValueError(f"cgroup must be 1 or 2, not {self.cgroup!r}")

    @property
    def label(self) -> str:
        parts = [self.slurm, f"v{self.cgroup}"]
        parts += [name for name, on in (("jc", self.job_container), ("configless", self.configless),
                                        ("acct", self.accounting)) if on]
        return "/".join(parts)

    def __str__(self) -> str:
        return self.label


# The CI matrix: each axis on both Slurm releases, without multiplying the runs.
# pam_slurm_adopt runs on the 22.05 platforms only (Debian 13's needs glibc 2.38 in sshd).
MATRIX = {
    "P1": Platform(),                                                        # all existing tests
    "P2": Platform("22.05", 2, job_container=True, configless=True, accounting=True),
    "P3": Platform("24.11", 2, job_container=True, configless=True, accounting=True),
    "P4": Platform("24.11", 1),
}
DEFAULT = MATRIX["P1"]


def name_of(platform: Platform) -> str:
    """"P2" for a matrix platform, else its label."""
    return next((k for k, v in MATRIX.items() if v == platform), platform.label)


def install(log=print) -> None:
    """Everything the platforms need, idempotent: the Debian packages of the base test bed and
    of accounting, and the private Slurm 24.11 tree."""
    from . import cluster, trixie
    cluster.ensure_packages(cluster.PACKAGES + ACCOUNTING_PACKAGES)
    trixie.ensure(log=log)


def check() -> list[str]:
    """What is missing for which platform (empty when everything is there)."""
    from . import cluster, trixie
    missing = [f"Debian package {p}" for p in cluster.missing_packages(cluster.PACKAGES + ACCOUNTING_PACKAGES)]
    try:
        trixie.tree()
    except trixie.TrixieError as e:
        missing.append(str(e))
    return missing


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        install(log=lambda m: print(f"[testbed.platforms] {m}", file=sys.stderr))
        return 0
    if argv[:1] == ["check"]:
        missing = check()
        for m in missing:
            print(m)
        return 1 if missing else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
