"""daemon.coalesce: one request in flight per daemon, the questions that wait for it go
together.  The queueing rules with a scripted `ask` (no sockets); then the real daemon
answering a batch of questions about a job process's connection and one held by no job."""
import socket
import threading
import time

import pytest

from daemon import client as C
from daemon import protocol as P
from daemon import wire
from daemon.auth import HmacAuth, load_key
from daemon.coalesce import Coalescer

from .test_client_server import KEY, ServerThread, _raw_exchange
from .test_hostile import JOB, Daemon, target  # noqa: F401 (fixture)

AUTH = HmacAuth(KEY)


class Script:
    """An `ask` that records each request's questions and holds the first one until
    `release` (a slow daemon); each answer names its question (detail=src)."""

    def __init__(self, hold_first=True):
        self.calls = []
        self.release = threading.Event()
        self.hold_first = hold_first
        self.lock = threading.Lock()

    def __call__(self, host, port, conns, *, timeout, **kw):
        with self.lock:
            self.calls.append((host, [src for src, _ in conns]))
            first = len(self.calls) == 1
        if first and self.hold_first:
            self.release.wait(timeout)
        return [C.Answer(C.UNKNOWN, detail=src) for src, _ in conns]


def _asking(co, src, out, host="10.0.0.1", timeout=5.0):
    def run():
        try:
            out[src] = co.query(host, 6820, src, "10.0.0.9:22", timeout=timeout, auth=AUTH)
        except Exception as e:      # what the sender of a batch raises, for the test to see
            out[src] = e
    t = threading.Thread(target=run)
    t.start()
    return t


def _until(cond, seconds=5.0):
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_an_idle_question_goes_at_once_alone():
    script = Script(hold_first=False)
    a = Coalescer(ask=script).query("10.0.0.1", 6820, "a", "b", timeout=1, auth=AUTH)
    assert a.detail == "a" and script.calls == [("10.0.0.1", ["a"])]


def test_questions_waiting_for_a_slow_daemon_go_together_each_gets_its_own_answer():
    script, out = Script(), {}
    co = Coalescer(ask=script)
    threads = [_asking(co, "q0", out)]
    _until(lambda: len(script.calls) == 1)
    queued = P.MAX_BATCH + 3
    threads += [_asking(co, f"q{i}", out) for i in range(1, queued + 1)]
    _until(lambda: sum(len(b.members) for p in co._peers.values() for b in p.queue) == queued)
    other = {}
    threads.append(_asking(co, "elsewhere", other, host="10.0.0.2"))   # another daemon: no wait
    _until(lambda: "elsewhere" in other)
    script.release.set()
    for t in threads:
        t.join(5)
    sizes = [len(srcs) for host, srcs in script.calls if host == "10.0.0.1"]
    assert sizes == [1, P.MAX_BATCH, 3], script.calls
    assert all(out[k].detail == k for k in out) and len(out) == queued + 1
    assert co._peers == {}                       # idle again: nothing kept


def test_a_question_leaves_the_queue_at_its_deadline_and_the_daemon_is_not_stuck():
    script, out = Script(), {}
    co = Coalescer(ask=script)
    first = _asking(co, "slow", out)
    _until(lambda: len(script.calls) == 1)
    t0 = time.monotonic()
    _asking(co, "late", out, timeout=0.2).join(5)
    assert 0.2 <= time.monotonic() - t0 < 0.5
    a = out["late"]
    assert a.outcome == C.UNREACHABLE and not a.cacheable and "timeout" in a.detail
    script.release.set()
    first.join(5)
    assert [s for _, s in script.calls] == [["slow"]]      # the one that left was not sent
    assert co.query("10.0.0.1", 6820, "next", "x", timeout=1, auth=AUTH).detail == "next"
    assert [s for _, s in script.calls] == [["slow"], ["next"]]


def test_a_failed_batch_fails_its_questions_only():
    calls = []

    def ask(host, port, conns, *, timeout, **kw):
        calls.append(len(conns))
        if len(calls) == 1:
            time.sleep(0.2)
            return [C.Answer(C.FOUND, 7, 1000, "n1")]
        raise OSError("injected")

    co, out = Coalescer(ask=ask), {}
    first = _asking(co, "a", out)
    _until(lambda: len(calls) == 1)
    rest = [_asking(co, s, out) for s in ("b", "c")]
    for t in [first] + rest:
        t.join(5)
    assert out["a"].job_id == 7 and calls == [1, 2]
    sender = [s for s in ("b", "c") if isinstance(out[s], OSError)]
    other = ({"b", "c"} - set(sender)).pop()
    assert len(sender) == 1 and out[other].outcome == C.UNREACHABLE, out
    assert co._peers == {}


# ---------------------------------------------------------------------------------------------
# the real daemon


@pytest.fixture
def hmac_daemon(jobcg, procs, tmp_root_dir, hmac_key):
    return Daemon(procs, tmp_root_dir, f"AuthType=hmac\nKeyFile={hmac_key}\n"
                  f"CgroupRoots={jobcg.root}\n").start()


def test_a_real_daemon_answers_a_batch_question_by_question(hmac_daemon, target, hmac_key):
    """One question held up, five queued behind it (job process / no job, alternating):
    the five go in one frame and each gets its own right answer."""
    auth = HmacAuth(load_key(hmac_key))
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    nojob = socket.create_connection(lst.getsockname())
    free = ("%s:%d" % nojob.getsockname(), "%s:%d" % lst.getsockname())
    gate, sizes = threading.Event(), []

    def ask(host, port, conns, **kw):
        sizes.append(len(conns))
        if len(sizes) == 1:
            gate.wait(5)
        return C.query_many(host, port, conns, **kw)

    co, out = Coalescer(ask=ask), {}

    def one(k, conn):
        out[k] = co.query("127.0.0.1", hmac_daemon.port, *conn, timeout=5, auth=auth,
                          reserved_port=False)
    threads = [threading.Thread(target=one, args=(0, target))]
    threads[0].start()
    _until(lambda: sizes == [1])
    threads += [threading.Thread(target=one, args=(k, free if k % 2 else target))
                for k in range(1, 6)]
    for t in threads[1:]:
        t.start()
    _until(lambda: sum(len(b.members) for p in co._peers.values() for b in p.queue) == 5)
    gate.set()
    for t in threads:
        t.join(10)
    nojob.close()
    lst.close()
    assert sizes == [1, 5]
    for k in range(6):
        want = (C.FOUND, JOB) if k % 2 == 0 else (C.UNKNOWN, None)
        assert (out[k].outcome, out[k].job_id) == want, (k, out[k])
    stats = hmac_daemon.stop_stats()
    assert stats["batched"] == 5 and stats["answers-found"] == 3, stats


def test_a_batch_is_checked_request_by_request():
    """A replayed request inside a batch is refused alone; a batch that fails
    authentication is refused request by request; a batch over MAX_BATCH is not a frame
    (reset, no reply); a batch's reply binds every nonce."""
    with ServerThread(AUTH) as st:
        reqs = [P.Request.make("127.0.0.1", 40000 + i, "127.0.0.1", 22) for i in range(3)]
        wire.open_reply(P.decode_frame(_raw_exchange(st.port, wire.seal_request(reqs[1], AUTH)[0])),
                        AUTH, reqs[1].nonce)
        got = wire.open_replies(P.decode_frame(_raw_exchange(
            st.port, wire.seal_requests(reqs, AUTH)[0])), AUTH, [r.nonce for r in reqs])
        assert [r.status for r in got] == [P.STATUS_UNKNOWN, P.STATUS_REFUSED, P.STATUS_UNKNOWN]
        with pytest.raises(wire.ReplyRejected, match="wrong-nonce"):
            wire.open_replies(P.decode_frame(_raw_exchange(st.port, wire.seal_requests(
                reqs[:2] + [P.Request.make("127.0.0.1", 1, "127.0.0.1", 2)], AUTH)[0])),
                AUTH, [r.nonce for r in reqs])
        forged = wire.seal_requests(reqs, HmacAuth(bytes(32)))[0]        # not the daemon's key
        got = wire.open_replies(P.decode_frame(_raw_exchange(st.port, forged)), AUTH,
                                [r.nonce for r in reqs])
        assert [r.status for r in got] == [P.STATUS_REFUSED] * 3
        body = bytes([P.MAX_BATCH + 1]) + b"".join(
            P.Request.make("127.0.0.1", 2000 + i, "127.0.0.1", 22).encode_body()
            for i in range(P.MAX_BATCH + 1))
        assert _raw_exchange(st.port, wire.seal(P.TYPE_REQUESTS, body, AUTH)) == b""
