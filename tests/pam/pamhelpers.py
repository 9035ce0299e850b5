"""Helpers for the pam_callerid tests (imported by conftest.py and the test modules)."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAM_DIR = "/etc/pam.d"
SERVICE_PREFIX = "cidtest-"     # lowercase: libpam lowercases service names
USER_PREFIX = "cidt"


def _is_root():
    return os.geteuid() == 0


def _need_root():
    if not _is_root():
        pytest.skip("needs root")
    if not shutil.which("pamtester"):
        pytest.skip("needs pamtester")


def build_module(out, name="pam_callerid"):
    from pam_callerid.build import build
    return build(str(out), name=name)


def stack(so, args="", account=True, session=True, extra_account=None):
    """A PAM file that makes every result of our module distinguishable through pamtester:
    SUCCESS -> success; IGNORE -> pam_deny's 'Authentication failure' (account) or
    'Cannot make/remove an entry...' (session); PERM_DENIED -> 'Permission denied';
    SYSTEM_ERR -> 'System error'."""
    lines = []
    if account:
        lines += ["account [success=done ignore=ignore default=die] %s service={service} %s"
                  % (so, args), "account required pam_deny.so"]
    if session:
        lines += ["session [success=done ignore=ignore default=die] %s service={service} %s"
                  % (so, args), "session required pam_deny.so"]
    return lines


def pamtester(service, user, *ops, env=None, timeout=30):
    """Run pamtester; returns (exit code, combined output). The environment is minimal
    unless ``env`` adds to it."""
    e = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if env:
        e.update(env)
    r = subprocess.run(["pamtester", "-v", service, user] + list(ops), env=e,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout


OUTCOME = {
    "success": " done.",
    "ignore_account": "Authentication failure",
    "ignore_session": "Cannot make/remove an entry for the specified session",
    "denied": "Permission denied",
    "system": "System error",
}


def outcome(out):
    """Map pamtester's output for the LAST operation to a short word."""
    last = [ln for ln in out.splitlines() if ln.startswith("pamtester:")][-1]
    if "successfully" in last:
        return "success"
    for k, v in OUTCOME.items():
        if v in last:
            return k.split("_")[0]
    return last
