"""Fixtures for the pam_callerid tests: the built module (the C client), a real PAM service
(pam_callerid.service, in this process) on its own socket, temporary PAM services
(/etc/pam.d/cidtest-*), temporary users (cidt*), the synthetic Slurm node of fakes.py.

Everything created here is removed in finalizers; stale leftovers of our own prefixes from an
interrupted run are removed at session start.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pamhelpers import (PAM_DIR, SERVICE_PREFIX, USER_PREFIX, _is_root, _need_root,  # noqa
                        build_module)


@pytest.fixture(scope="session")
def built_so(tmp_path_factory):
    _need_root()
    d = tmp_path_factory.mktemp("pambuild")
    os.chmod(d, 0o755)
    return build_module(d)


@pytest.fixture(scope="session", autouse=True)
def _stale_cleanup():
    if _is_root():
        for f in glob.glob(os.path.join(PAM_DIR, SERVICE_PREFIX + "*")):
            if os.path.basename(f).startswith(SERVICE_PREFIX + "p"):   # ours: cidtest-p<hex>
                os.unlink(f)
    yield


class Services:
    def __init__(self):
        self.created = []

    def make(self, text_or_lines):
        name = SERVICE_PREFIX + "p" + uuid.uuid4().hex[:10]
        path = os.path.join(PAM_DIR, name)
        text = text_or_lines if isinstance(text_or_lines, str) else "\n".join(text_or_lines)
        with open(path, "w") as f:
            f.write(text.replace("{service}", name) + "\n")
        self.created.append(path)
        return name

    def cleanup(self):
        for p in self.created:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


@pytest.fixture
def services():
    _need_root()
    s = Services()
    yield s
    s.cleanup()


@pytest.fixture(scope="session")
def cid_user():
    """A throw-away user (name, uid)."""
    _need_root()
    name = USER_PREFIX + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    import pwd
    uid = pwd.getpwnam(name).pw_uid
    yield name, uid
    subprocess.run(["userdel", name], capture_output=True)


class Syslog(list):
    """Stands for the service's syslog sink: keeps (level, text) that pass log_level."""

    def __call__(self, level, text, threshold=3):
        from pam_callerid.logsink import LEVEL
        if LEVEL.get(level, 5) <= threshold:
            self.append((level, text))

    def texts(self):
        return [t for _, t in self]


class RunningService:
    """A real PAM service on a private socket: ``.socket``, ``.logins``, ``.service``,
    ``.syslog`` (its decision lines), ``.daemon_log`` (its audit writer's errors)."""

    def __init__(self, workers=8, use_peerpidfd=True, default_config=None, decision_ttl=60.0):
        from pam_callerid.audit import AuditWriter
        from pam_callerid.login import Logins
        from pam_callerid.service import Service
        from pam_callerid.settings import SettingsCache
        self.dir = tempfile.mkdtemp(prefix="cdd-pam-")
        os.chmod(self.dir, 0o755)
        self.socket = os.path.join(self.dir, "pam.sock")
        self.syslog = Syslog()
        self.daemon_log = Syslog()
        self.logins = Logins(SettingsCache(default_config or "/nonexistent/callerid.conf"),
                             self.syslog, AuditWriter(self.daemon_log), decision_ttl=decision_ttl)
        self.service = Service(self.socket, self.logins, workers=workers,
                               use_peerpidfd=use_peerpidfd).start()

    def flush(self):
        assert self.logins.flush()

    def stop(self):
        self.service.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pam_service():
    _need_root()
    s = RunningService()
    yield s
    s.stop()
