"""Upgrade and purge of the installed package (issue 12), last in the package phase of
`bash packaging/run test`: the same tree built with a higher version installs over the
installed one (local configuration kept), and a purge leaves nothing behind."""
import os

import pytest

from pam_callerid.check import OK, check_module
from tests.packaging.pkgtool import deb_files, installed_version, leftovers, run

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not (os.environ.get("CALLERID_TEST_DEB")
                            and os.environ.get("CALLERID_TEST_DEB_UPGRADE")),
                       reason="package phase only (bash packaging/run test)"),
]


def test_upgrade_keeps_local_configuration_and_the_audit_trail(installed_package):
    conf = "/etc/slurm/callerid.conf"
    with open(conf, "a") as f:
        f.write("# local change kept across upgrades\n")
    audit = "/var/log/slurm-callerid/audit.jsonl"
    with open(audit, "a") as f:
        f.write('{"ts": 1, "path": "single"}\n')
    new = os.environ["CALLERID_TEST_DEB_UPGRADE"]
    installed_package.install(new)
    version = installed_version()
    assert version and new.endswith(f"_{version}_" + new.rsplit("_", 1)[1])
    upstream = version.rsplit("-", 1)[0]
    assert run(["/usr/sbin/callerid", "--version"]).stdout.strip() == f"slurm-callerid {upstream}"
    module = check_module(upstream)                # the package's PAM module, of its version
    assert module.status == OK and module.detail.endswith(f": version {upstream}"), module
    assert open(conf).read().endswith("# local change kept across upgrades\n")
    assert '"path": "single"' in open(audit).read()
    # only the conffile we changed differs from the package
    changed = run(["dpkg", "--verify", "slurm-callerid"], check=False).stdout.splitlines()
    assert [line.split()[-1] for line in changed] == [conf], changed


def test_purge_leaves_nothing_behind(installed_package):
    files = deb_files(os.environ["CALLERID_TEST_DEB_UPGRADE"])
    installed_package.purge()
    assert installed_version() is None
    assert run(["dpkg-query", "-W", "slurm-callerid"], check=False).returncode != 0
    assert leftovers(files) == []
