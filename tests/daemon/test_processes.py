"""Several serving processes on one port (`Processes`, daemon/group.py), the real daemon on
loopback: every process answers, the stats are summed, a SIGHUP reaches each, a request
replayed to another process is refused, a helper that dies is replaced (its connections
answered meanwhile), SIGTERM stops all."""
import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from daemon import client as C
from daemon import protocol as P
from daemon import wire
from daemon.auth import HmacAuth, load_key, write_key
from daemon.group import REPORT_EVERY, decode_fds, encode_fds, helper_argv, merge_snapshots

from .test_hostile import JOB, Daemon, target  # noqa: F401  (target: a fixture)
from .test_netns import _wait_log

pytestmark = pytest.mark.root


def _helper_pids(d) -> list[int]:
    return [int(p) for p in re.findall(r"event=helper-started index=\d+ pid=(\d+)", d.text())]


def _wait_helpers(d, n, timeout=15.0):
    end = time.monotonic() + timeout
    while d.text().count("event=helper-listening") < n and time.monotonic() < end:
        time.sleep(0.05)
    assert d.text().count("event=helper-listening") >= n, d.text()


def _ask_many(d, target, auth, n=200, threads=32, timeout=5.0):
    src, dst = target
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(lambda _: C.query("127.0.0.1", d.port, src, dst, auth=auth,
                                             timeout=timeout), range(n)))


@pytest.fixture
def hmac_daemon(procs, tmp_root_dir, jobcg):
    key = str(tmp_root_dir / f"k-{os.getpid()}-{time.monotonic_ns()}")
    write_key(key)

    def make(extra=""):
        conf = f"AuthType=hmac\nKeyFile={key}\nCgroupRoots={jobcg.root}\nProcesses=3\n{extra}"
        d = Daemon(procs, tmp_root_dir, conf).start()
        d.key, d.conf_text = key, conf
        _wait_helpers(d, 2)
        return d
    return make


def test_every_process_answers_and_the_stats_are_summed(hmac_daemon, target):  # noqa: F811
    d = hmac_daemon()
    auth = HmacAuth(load_key(d.key))
    answers = _ask_many(d, target, auth)
    assert [a.outcome for a in answers] == [C.FOUND] * 200
    assert {a.job_id for a in answers} == {JOB}
    stats = d.stop_stats()
    helpers = [int(n) for n in re.findall(r"event=helper-stopped answered=(\d+)", d.text())]
    assert len(helpers) == 2 and all(n > 0 for n in helpers), d.text()
    assert stats["answered"] == stats["answers-found"] == 200, stats
    assert stats["connections"] == 200, stats
    for pid in _helper_pids(d):                          # SIGTERM stopped them all
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_every_process_takes_the_session_tickets_of_every_other(munged, procs, tmp_root_dir,
                                                                jobcg, target):  # noqa: F811
    """Tickets are sealed with the instance secret the processes share: one munge exchange,
    then the questions spread over the 3 processes all go with its ticket, and every process
    takes it."""
    from daemon.auth import SessionKey
    from daemon.config import parse_config
    d = Daemon(procs, tmp_root_dir, f"AuthType=munge\nMungeSocket={munged.socket}\n"
               f"CgroupRoots={jobcg.root}\nProcesses=3\n").start()
    _wait_helpers(d, 2)
    auth = C.auth_from_config(parse_config(f"MungeSocket={munged.socket}\n"))
    assert C.query("127.0.0.1", d.port, *target, auth=auth, timeout=5).job_id == JOB
    ticket = auth.sealer(("127.0.0.1", d.port)).ticket
    answers = _ask_many(d, target, auth, n=120, threads=8)
    assert [a.outcome for a in answers] == [C.FOUND] * 120
    assert isinstance(auth.sealer(("127.0.0.1", d.port)), SessionKey)
    assert auth.sealer(("127.0.0.1", d.port)).ticket == ticket      # never refused, never renewed
    d.stop_stats()
    helpers = [int(n) for n in re.findall(r"event=helper-stopped answered=(\d+)", d.text())]
    assert len(helpers) == 2 and all(n > 0 for n in helpers), d.text()
    assert "bad-ticket" not in d.text()


def test_sighup_reaches_every_process(hmac_daemon, target):  # noqa: F811
    d = hmac_daemon()
    old = HmacAuth(load_key(d.key))
    os.unlink(d.key)
    write_key(d.key)
    new = HmacAuth(load_key(d.key))
    d.write(d.conf_text + "RateLimit=7\n")
    d.proc.send_signal(signal.SIGHUP)
    end = time.monotonic() + 10
    while d.text().count("event=reloaded") < 3 and time.monotonic() < end:
        time.sleep(0.05)
    assert d.text().count("event=reloaded") == 3, d.text()      # the first process + 2
    assert [a.outcome for a in _ask_many(d, target, new, n=90)] == [C.FOUND] * 90
    assert [a.outcome for a in _ask_many(d, target, old, n=90)] == [C.INVALID] * 90
    stats = d.stop_stats()
    assert stats["reloads"] == 1, stats                 # one SIGHUP, counted once


def test_request_replayed_to_any_process_is_refused(hmac_daemon, target):  # noqa: F811
    d = hmac_daemon()
    auth = HmacAuth(load_key(d.key))
    src, dst = target
    req = P.Request.make(*C.parse_endpoint(src), *C.parse_endpoint(dst))
    frame = wire.seal_request(req, auth)[0]

    def send(_):
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
            s.sendall(frame)
            data = b""
            while chunk := s.recv(4096):                # the daemon closes after its reply
                data += chunk
        return wire.open_reply(P.decode_frame(data), auth, req.nonce).status
    with ThreadPoolExecutor(16) as ex:
        statuses = list(ex.map(send, range(60)))
    assert statuses.count(P.STATUS_FOUND) == 1, statuses
    assert statuses.count(P.STATUS_REFUSED) == 59, statuses
    stats = d.stop_stats()
    assert stats["replays"] == 59, stats


def test_a_helper_that_dies_is_replaced(hmac_daemon, target):  # noqa: F811
    d = hmac_daemon()
    auth = HmacAuth(load_key(d.key))
    assert [a.outcome for a in _ask_many(d, target, auth, n=50)] == [C.FOUND] * 50
    time.sleep(2 * REPORT_EVERY)                         # every helper has reported them
    victim = _helper_pids(d)[0]
    os.kill(victim, signal.SIGKILL)                      # a helper of our own daemon
    _wait_log(d.log, "event=helper-exited", proc=d.proc)
    # until the new one is up (RESTART_DELAY + its start), the first process takes the
    # connections steered to it: answered well within that
    assert [a.outcome for a in _ask_many(d, target, auth, n=30, timeout=0.8)] == [C.FOUND] * 30
    end = time.monotonic() + 10
    while len(_helper_pids(d)) < 3 and time.monotonic() < end:
        time.sleep(0.05)
    assert len(_helper_pids(d)) == 3, d.text()
    _wait_helpers(d, 3)
    assert [a.outcome for a in _ask_many(d, target, auth, n=100)] == [C.FOUND] * 100
    stats = d.stop_stats()
    assert stats["answered"] == 180, stats               # the dead helper's answers are kept


def test_helper_command_works_isolated_from_anywhere(tmp_path):
    """The package runs `python3 -IB` (no PYTHONPATH, not the current directory): a
    helper's command line must import this copy of the daemon all the same."""
    import subprocess
    import sys
    argv = helper_argv(None, 6820, None)
    argv = [argv[0], "-I"] + argv[1:argv.index("daemon")] + ["--help"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "caller-ID" in r.stdout, r.stderr
    assert "--serve-fds" not in r.stdout                   # not offered to users


def test_fds_spec_and_merged_counters():
    spec = encode_fds([5, 6, 7, 8], [5], 9, 10, 2)
    assert decode_fds(spec) == {"listen": [5, 6, 7, 8], "first": [5], "replay": 9,
                                "control": 10, "index": 2}
    for bad in ("", "listen=5", spec.replace("replay=9", "replay=x")):
        with pytest.raises(ValueError):
            decode_fds(bad)
    own = {"answered": 3, "reloads": 1, "active": 2}
    merged = merge_snapshots(own, [{"answered": 4, "reloads": 1, "active": 1, "replays": 2}])
    assert merged == {"answered": 7, "reloads": 1, "active": 3, "replays": 2}
