"""pytest plugin for the package phase of `bash packaging/run test` (loaded with
``-p tests.packaging.installed``): installs ``$CALLERID_TEST_DEB`` on this machine with apt
before the first test and sets ``CALLERID_USE_INSTALLED=1``, so testbed/adopters.py runs the
INSTALLED daemon (/usr/sbin/callerid) and PAM module in the test bed instead of the
checkout; purges the package and restores what it replaced at the end, also on failure."""
import os

import pytest

from tests.packaging.pkgtool import Machine


@pytest.fixture(scope="session", autouse=True)
def installed_package():
    deb = os.environ.get("CALLERID_TEST_DEB")
    if not deb:
        yield None
        return
    machine = Machine(deb)
    try:
        machine.install()
        os.environ["CALLERID_USE_INSTALLED"] = "1"
        yield machine
    finally:
        os.environ.pop("CALLERID_USE_INSTALLED", None)
        machine.purge()
        machine.restore()
