"""In-process behaviour of the built module under a C PAM application (cid_pamdrv.c):
pam_start/pam_end cycles (libpam dlclose()s us: -z nodelete keeps the interpreter), threads,
fork() while another thread is inside the module (pthread_atfork GIL handling)."""
import os
import re
import subprocess

import pytest

from pamhelpers import stack

pytestmark = pytest.mark.root
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def pamdrv(tmp_path_factory):
    from pamhelpers import _need_root
    _need_root()
    out = str(tmp_path_factory.mktemp("drv") / "cid_pamdrv")
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", out,
                    os.path.join(HERE, "cid_pamdrv.c"), "-lpam"], check=True)
    return out


def drv(pamdrv, svc, user, *args, timeout=120):
    r = subprocess.run([pamdrv, svc, user] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(re.findall(r"(\w+)=([-\d.]+)", r.stdout))


@pytest.fixture
def svc(built_so, services, tmp_path):
    return services.make(stack(built_so, "config=/nonexistent action_generic_failure=allow "
                                         "audit=%s" % (tmp_path / "a.jsonl"), session=False))


def test_cycles_keep_interpreter(pamdrv, svc, cid_user):
    r = drv(pamdrv, svc, cid_user[0], "cycles", 200)
    assert r["rc"] == "0" and r["same"] == "1"
    # nodelete: no re-initialisation per cycle, so memory stays flat
    assert int(r["rss_kb_after"]) - int(r["rss_kb_before"]) < 2048, r


def test_threads(pamdrv, svc, cid_user):
    r = drv(pamdrv, svc, cid_user[0], "threads", 16)
    assert r["bad"] == "0", r


def test_fork_while_inside(pamdrv, svc, cid_user):
    r = drv(pamdrv, svc, cid_user[0], "fork", 30)
    assert (r["hung"], r["bad"]) == ("0", "0"), r


def test_first_call_cost(pamdrv, svc, cid_user):
    """Not a benchmark (see bench/bench_pam.py); only a sanity bound."""
    r = drv(pamdrv, svc, cid_user[0], "first")
    assert r["rc"] == "0"
    assert float(r["first_ms"]) < 500 and float(r["second_ms"]) < 50, r
