"""Fixtures for the pam_callerid tests: the built module, temporary PAM services
(/etc/pam.d/cidtest-*), temporary users (cidt*).

Everything created here is removed in finalizers; stale leftovers of our own prefixes from an
interrupted run are removed at session start.
"""
import glob
import os
import subprocess
import sys
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


