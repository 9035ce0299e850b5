"""Shared fixtures. The real-cluster fixtures live here so that every component's tests can
use them.

One test bed is up at a time on this machine (the node names node1..N are the same on every
platform, and Slurm names its v1 cgroups after them): the session-wide `testbeds` holds it
and switches platform on demand, tearing the previous one down first. Collection is ordered
so that each platform's tests run together: tests without a cluster first, then P1, P2, ...
(testbed/platforms.py MATRIX).

- `cluster`: the P1 cluster (Slurm 22.05, cgroup v1, nothing else); `fresh`: the same with
  no jobs before and after the test.
- `platform`: a test that takes it runs on every platform of the matrix, or on those named by
  `@pytest.mark.platforms("P2", "P3")`; CID_TESTBED_PLATFORMS=P1,P3 narrows a run.
  `platform_cluster`: that platform's cluster, no jobs before and after the test.
- `adopter` (with `platform`): each adoption module that can run on the platform
  (testbed/adopters.py: pam_slurm_adopt only on 22.05), configured on every node.
The test bed's prefix, subnet and node count come from CID_TESTBED_PREFIX, CID_TESTBED_SUBNET
and CID_TESTBED_NODES (several suites may run side by side on one machine)."""
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testbed.platforms import MATRIX  # noqa: E402

P1 = "P1"


def pytest_configure(config):
    config.addinivalue_line("markers", "platforms(*names): run a `platform` test only on these "
                                       "platforms of testbed.platforms.MATRIX (default: all)")


def selected_platforms(names=None) -> list[str]:
    """Platform names to run, in matrix order: `names` (default all), narrowed by
    CID_TESTBED_PLATFORMS."""
    chosen = list(MATRIX) if names is None else list(names)
    unknown = [n for n in chosen if n not in MATRIX]
    env = [n.strip() for n in os.environ.get("CID_TESTBED_PLATFORMS", "").split(",") if n.strip()]
    unknown += [n for n in env if n not in MATRIX]
    if unknown:
        raise pytest.UsageError(f"unknown platform(s) {unknown}; the matrix has {list(MATRIX)}")
    return [n for n in MATRIX if n in chosen and (not env or n in env)]


def pytest_generate_tests(metafunc):
    if "platform" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("platforms")
    names = selected_platforms(marker.args if marker else None)
    if "adopter" in metafunc.fixturenames:
        from testbed.adopters import adopters_for
        cases = [(n, a) for n in names for a in adopters_for(MATRIX[n])]
        metafunc.parametrize(["platform", "adopter"], cases, indirect=True,
                             ids=[f"{n}-{a.name}" for n, a in cases])
    else:
        metafunc.parametrize("platform", names, indirect=True)


def _platform_rank(item) -> int:
    """0: no cluster; then the matrix position of the platform the test runs on."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "platform" in callspec.params:
        name = callspec.params["platform"]
    elif "cluster" in item.fixturenames:
        name = P1
    else:
        return 0
    # an empty selection leaves a placeholder param (the test is skipped)
    return list(MATRIX).index(name) + 1 if name in MATRIX else 0


def pytest_collection_modifyitems(config, items):
    items.sort(key=_platform_rank)      # stable: each group keeps its collection order
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (run the suite as root, as CI does)")
    for item in items:
        if "root" in item.keywords or "cluster" in item.keywords:
            item.add_marker(skip)


class Testbeds:
    """The session's one test bed: `get(name)` brings that platform's cluster up (tearing the
    previous platform's down first) or returns the one already up."""

    def __init__(self):
        self.current = None
        self.current_name = None
        self.bringups: list[tuple[str, float, dict]] = []
        self._failed: dict[str, str] = {}

    def get(self, name: str):
        if self.current is not None and self.current_name == name:
            return self.current
        if name in self._failed:  # do not retry a bring-up that failed in this session
            pytest.fail(f"test bed {name} did not come up earlier in this session: {self._failed[name]}")
        self.close()
        from testbed.cluster import Cluster
        c = Cluster(nodes=int(os.environ.get("CID_TESTBED_NODES", "3")),
                    prefix=os.environ.get("CID_TESTBED_PREFIX", "cid"),
                    subnet=int(os.environ.get("CID_TESTBED_SUBNET", "3")), platform=MATRIX[name])
        try:
            c.up()
        except Exception as e:
            self._failed[name] = f"{type(e).__name__}: {e}"
            raise
        self.current, self.current_name = c, name
        self.bringups.append((name, c.bringup_seconds, dict(c.bringup_parts)))
        print(f"\n[testbed] {name} ({c.platform}) {len(c.nodes)}-node cluster up in {c.bringup_seconds:.2f} s",
              file=sys.stderr)
        return c

    def close(self) -> None:
        c, self.current, self.current_name = self.current, None, None
        if c is None:
            return
        t0 = time.monotonic()
        c.down()
        print(f"\n[testbed] {c.platform} down in {time.monotonic() - t0:.2f} s", file=sys.stderr)
        left = c.leftovers()
        assert not left, f"test bed left things behind: {left}"


_TESTBEDS = Testbeds()


@pytest.fixture(scope="session")
def testbeds():
    try:
        yield _TESTBEDS
    finally:
        _TESTBEDS.close()


def pytest_terminal_summary(terminalreporter):
    if _TESTBEDS.bringups:
        terminalreporter.write_sep("-", "test bed bring-up")
        for name, seconds, parts in _TESTBEDS.bringups:
            extra = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
            terminalreporter.write_line(f"{name} {MATRIX[name]}: {seconds:.2f} s" + (f" ({extra})" if extra else ""))


@pytest.fixture
def cluster(testbeds):
    return testbeds.get(P1)


@pytest.fixture
def fresh(cluster):
    """The cluster with no jobs before and after the test."""
    cluster.cancel_all()
    yield cluster
    cluster.cancel_all()


@pytest.fixture
def platform(request):
    return MATRIX[request.param]


@pytest.fixture
def platform_cluster(request, platform, testbeds):
    c = testbeds.get(request.node.callspec.params["platform"])
    c.cancel_all()
    yield c
    c.cancel_all()


@pytest.fixture
def adopter(request, platform_cluster):
    a = request.param
    a.configure(platform_cluster)
    yield a
    a.teardown(platform_cluster)
