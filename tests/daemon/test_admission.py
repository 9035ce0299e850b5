"""Admission bookkeeping (pure), the client's cacheable classification against real sockets
on loopback (and a test namespace for "no route"), and the stats line on a moved clock."""
import logging
import os
import socket
import subprocess
import threading
import time

import pytest

from daemon import client as C
from daemon import protocol as P
from daemon import wire
from daemon.admission import FairQueue, Holders, TokenBuckets, hinted
from daemon.auth import HmacAuth

from .conftest import PY, ROOT
from .test_client_server import KEY, FakeServer, ServerThread, _q


# ---------------------------------------------------------------------------------------------
# Holders: who is reclaimed at the cap


def test_victim_is_oldest_of_the_biggest_holder():
    h = Holders()
    for i in range(3):
        h.add("junk", f"j{i}")
    h.add("legit", "l0")
    h.add("other", "o0")
    h.add("other", "o1")
    assert len(h) == 6 and h.count("junk") == 3
    assert h.victim() == "j0"          # junk holds 3
    assert h.victim() == "o0"          # junk and other hold 2: other got there first
    assert h.victim() == "j1"          # junk holds 2
    assert h.count("junk") == 1
    assert {h.victim(), h.victim(), h.victim()} == {"j2", "l0", "o1"}
    assert h.victim() is None and len(h) == 0


def test_holders_discard_and_idempotence():
    h = Holders()
    h.add("a", 1)
    h.add("a", 1)
    h.add("b", 2)
    h.add("b", 3)
    h.discard("b", 2)
    h.discard("b", 2)
    h.discard("zz", 9)
    assert len(h) == 2 and h.count("b") == 1
    assert h.victim() in (1, 3)
    h.discard("a", 1)
    h.discard("b", 3)
    assert len(h) == 0 and h.victim() is None


def test_reserved_port_hint():
    assert hinted(600) and hinted(1023) and not hinted(1024) and not hinted(40000)
    assert not hinted(0)


# ---------------------------------------------------------------------------------------------
# FairQueue: round-robin by source, reserved share


def _drain(q, n):
    return [q.get() for _ in range(n)]


def test_fair_queue_round_robin_between_sources():
    q = FairQueue(share=0.75)
    for i in range(5):
        q.put("flood", False, f"f{i}")
    q.put("a", False, "a0")
    q.put("b", False, "b0")
    assert _drain(q, 4) == ["f0", "a0", "b0", "f1"]
    assert q.waiting == 3


def test_fair_queue_hinted_share_and_no_starvation():
    q = FairQueue(share=0.75)
    for i in range(8):
        q.put("n1", True, f"h{i}")
        q.put("n1", False, f"u{i}")
    got = _drain(q, 8)
    assert got == ["h0", "h1", "h2", "u0", "h3", "h4", "h5", "u1"]
    q = FairQueue(share=1.0)
    for i in range(3):
        q.put("n1", False, f"u{i}")
        q.put("n1", True, f"h{i}")
    assert _drain(q, 6) == ["h0", "h1", "h2", "u0", "u1", "u2"]


def test_fair_queue_blocks_and_closes():
    q = FairQueue()
    out = []
    t = threading.Thread(target=lambda: out.append(q.get()))
    t.start()
    time.sleep(0.05)
    assert out == []
    q.put("x", False, 1)
    t.join(2)
    assert out == [1]
    ts = [threading.Thread(target=lambda: out.append(q.get())) for _ in range(3)]
    for t in ts:
        t.start()
    q.close(3)
    for t in ts:
        t.join(2)
    assert out == [1, None, None, None]


def test_token_buckets_per_key():
    tb = TokenBuckets(rate=1, burst=2)
    assert tb.allow(1000, now=0) and tb.allow(1000, now=0) and not tb.allow(1000, now=0)
    assert tb.allow(1001, now=0)                  # another uid is not affected
    assert tb.allow(1000, now=1.01)


# ---------------------------------------------------------------------------------------------
# the client: what may be negative-cached


def test_refused_is_cacheable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                     # nothing listens there
    a = _q(port, HmacAuth(KEY))
    assert a.outcome == C.UNREACHABLE and a.cacheable and "refused" in a.detail


def test_reset_from_a_running_daemon_is_not_cacheable():
    """A daemon that accepts and resets (over capacity, reclaimed, a crash mid-answer)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)

    def rst():
        while True:
            try:
                c, _ = lst.accept()
            except OSError:
                return
            c.recv(4096)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            c.close()
    threading.Thread(target=rst, daemon=True).start()
    try:
        a = _q(lst.getsockname()[1], HmacAuth(KEY))
        assert a.outcome == C.UNREACHABLE and not a.cacheable, a
        assert "reset" in a.detail.lower() or "closed" in a.detail, a
    finally:
        lst.close()


def test_closed_without_reply_and_timeout_after_accept_are_not_cacheable():
    fs = FakeServer(lambda f: b"")                 # reads the request, closes
    try:
        a = _q(fs.port, HmacAuth(KEY))
        assert a.outcome == C.UNREACHABLE and not a.cacheable and "closed" in a.detail
    finally:
        fs.close()
    fs = FakeServer(lambda f: None)                # reads the request, never answers
    try:
        a = _q(fs.port, HmacAuth(KEY), timeout=0.4)
        assert a.outcome == C.UNREACHABLE and not a.cacheable and "waiting for reply" in a.detail
    finally:
        fs.close()


def test_connect_timeout_is_cacheable():
    """A listener whose accept queue is full drops SYNs: connect() times out."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fill = []
    try:
        for _ in range(8):                         # fill the accept queue (never accepted)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(lst.getsockname())
            fill.append(s)
        time.sleep(0.1)
        t = time.monotonic()
        a = _q(lst.getsockname()[1], HmacAuth(KEY), timeout=0.5)
        assert a.outcome == C.UNREACHABLE and a.cacheable and "timeout" in a.detail, a
        assert time.monotonic() - t < 0.9
    finally:
        for s in fill:
            s.close()
        lst.close()


def test_busy_reply_and_answers_are_not_cacheable():
    auth = HmacAuth(KEY)

    def busy(f):
        req = P.Request.decode_body(f.body)
        return wire.seal_reply(P.Reply(P.STATUS_BUSY, req.nonce, node="n"), auth)
    fs = FakeServer(busy)
    try:
        a = _q(fs.port, auth)
        assert a.outcome == C.BUSY and not a.cacheable and a.node == "n"
    finally:
        fs.close()
    with ServerThread(auth) as st:
        a = _q(st.port, auth)
        assert a.outcome == C.UNKNOWN and not a.cacheable


@pytest.mark.root
def test_no_route_and_host_unreachable_are_cacheable():
    """In a private network namespace: no route to the network (ENETUNREACH) and an
    'unreachable' route (EHOSTUNREACH)."""
    ns = f"cidt-{os.getpid()}-route"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        pre = ["nsenter", f"--net=/run/netns/{ns}"]
        subprocess.run(pre + ["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        subprocess.run(pre + ["ip", "route", "add", "unreachable", "10.199.98.0/24"], check=True,
                       capture_output=True)
        code = ("import sys; sys.path.insert(0, %r); from daemon import client as C; "
                "from daemon.auth import HmacAuth; "
                "a = C.query(sys.argv[1], 6820, sys.argv[1] + ':1000', '10.0.0.1:22', "
                "auth=HmacAuth(bytes(32)), timeout=1); print(a.outcome, a.cacheable, a.detail)"
                % str(ROOT))
        for host, word in (("10.199.97.1", "no route"), ("10.199.98.1", "unreachable")):
            r = subprocess.run(pre + [PY, "-c", code, host], capture_output=True, text=True,
                               timeout=30)
            assert r.stdout.startswith("unreachable True") and word in r.stdout, r.stdout + r.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.root
def test_root_client_uses_a_reserved_source_port():
    ports = []
    auth = HmacAuth(KEY)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)

    def acc():
        while True:
            try:
                c, addr = lst.accept()
            except OSError:
                return
            ports.append(addr[1])
            c.close()
    threading.Thread(target=acc, daemon=True).start()
    try:
        for reserved in (True, True, False):
            C.query("127.0.0.1", lst.getsockname()[1], "127.0.0.1:4000", "127.0.0.1:22",
                    auth=auth, timeout=1, reserved_port=reserved)
        time.sleep(0.1)
        assert all(C.RESERVED_FIRST <= p <= C.RESERVED_LAST for p in ports[:2]), ports
        assert ports[2] >= 1024, ports
    finally:
        lst.close()


# ---------------------------------------------------------------------------------------------
# the stats line, on a clock the test moves


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_stats_line_fires_every_interval_when_changed(caplog):
    auth = HmacAuth(KEY)
    clock = Clock()
    caplog.set_level(logging.INFO, logger="callerid")
    with ServerThread(auth, clock=clock) as st:
        def stats_lines():
            return [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=stats")]

        assert _q(st.port, auth).outcome == C.UNKNOWN
        time.sleep(0.3)                  # sweeps happen; the clock has not moved
        assert stats_lines() == []
        clock.t += 61
        end = time.monotonic() + 3
        while not stats_lines() and time.monotonic() < end:
            time.sleep(0.05)
        lines = stats_lines()
        assert len(lines) == 1 and "answers-unknown=1" in lines[0] and "answered=1" in lines[0]
        clock.t += 61                   # nothing changed since: no line
        time.sleep(0.3)
        assert len(stats_lines()) == 1
        assert _q(st.port, auth).outcome == C.UNKNOWN
        time.sleep(0.2)
        clock.t += 61
        end = time.monotonic() + 3
        while len(stats_lines()) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(stats_lines()) == 2 and "answers-unknown=2" in stats_lines()[1]


@pytest.mark.root
@pytest.mark.parametrize("fam,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_reserved_port_connections_get_their_own_accept_queue(fam, host):
    """The SO_REUSEPORT steering program: reserved source ports to socket 0, the others
    spread over sockets 1..3 -- root's connections never queue behind junk in the kernel."""
    from daemon.server import steer_reserved_ports
    group, clients = [], []
    try:
        for _ in range(4):
            s = socket.socket(fam)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, group[0].getsockname()[1] if group else 0))
            s.listen(64)
            s.setblocking(False)
            group.append(s)
        steer_reserved_ports(group[0], len(group))
        port = group[0].getsockname()[1]
        for sport in (700, 701, 702) + (0,) * 12:
            c = socket.socket(fam)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            c.bind((host, sport))
            c.connect((host, port))
            clients.append(c)
        time.sleep(0.05)
        got = []
        for s in group:
            ports = []
            while True:
                try:
                    a, addr = s.accept()
                except BlockingIOError:
                    break
                ports.append(addr[1])
                a.close()
            got.append(ports)
        assert sorted(got[0]) == [700, 701, 702]
        assert all(p >= 1024 for ports in got[1:] for p in ports)
        assert sum(len(p) for p in got[1:]) == 12
    finally:
        for s in group + clients:
            s.close()


def test_server_listens_with_a_steered_group():
    auth = HmacAuth(KEY)
    with ServerThread(auth) as st:
        assert len(st.srv.listeners) == st.srv.LISTENERS and len(st.srv.first_listeners) == 1
        assert _q(st.port, auth).outcome == C.UNKNOWN
