"""Adoption scenarios written once and run against every adoption module.

A module under test is an `Adopter`: how to put it into the node sshds' PAM stack (and start
whatever it needs), the name it signs user messages with, and its syslog ident. Issue 2 runs
them against pam_slurm_adopt (the baseline); later issues add ours to ADOPTERS.
"""
from __future__ import annotations

from dataclasses import dataclass
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

ADOPTERS = [PAM_SLURM_ADOPT]
