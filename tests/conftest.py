"""Shared fixtures. The real-cluster fixture lives here so that every component's tests can
use it: `cluster` is one session-wide Slurm mini-cluster (testbed/cluster.py), brought
up on first use and torn down at the end of the session (also on failure or Ctrl-C)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (run the suite as root, as CI does)")
    for item in items:
        if "root" in item.keywords or "cluster" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster():
    from testbed.cluster import Cluster
    nodes = int(os.environ.get("CID_TESTBED_NODES", "3"))
    # several suites may run side by side on one machine, each with its own prefix and subnet
    c = Cluster(nodes=nodes, prefix=os.environ.get("CID_TESTBED_PREFIX", "cid"),
                subnet=int(os.environ.get("CID_TESTBED_SUBNET", "3")))
    c.up()
    print(f"\n[testbed] {nodes}-node cluster up in {c.bringup_seconds:.2f} s", file=sys.stderr)
    try:
        yield c
    finally:
        c.down()
        left = c.leftovers()
        assert not left, f"test bed left things behind: {left}"


@pytest.fixture
def fresh(cluster):
    """The cluster with no jobs before and after the test."""
    cluster.cancel_all()
    yield cluster
    cluster.cancel_all()
