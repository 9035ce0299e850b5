"""Session tickets (daemon/session.py) and the scheme-4 sealing around them: pure, no munged
(MungeAuth only loads libmunge; nothing here encodes or decodes a credential)."""
import os
import socket
import threading

import pytest

from daemon import client as C
from daemon import protocol as P
from daemon import wire
from daemon.auth import AuthError, MungeAuth, ReplyKey, SessionKey
from daemon.config import ConfigError, parse_config
from daemon.session import TICKET_SIZE, Tickets, expiry_ms

NOW = 1_800_000_000_000
KEY = bytes(range(32))


def _req():
    return P.Request.make("10.0.0.5", 40022, "10.0.0.7", 22)


def test_a_ticket_opens_to_its_key_and_uid_until_it_expires():
    t = Tickets(os.urandom(32), lifetime=60)
    ticket = t.issue(KEY, 0, NOW)
    assert len(ticket) == TICKET_SIZE and expiry_ms(ticket) == NOW + 60_000
    assert t.open(ticket, NOW + 60_000) == (KEY, 0)
    assert t.open(t.issue(KEY, 1000, NOW), NOW) == (KEY, 1000)
    assert KEY not in ticket and t.issue(KEY, 0, NOW) != ticket      # sealed, fresh each time
    with pytest.raises(AuthError) as e:
        t.open(ticket, NOW + 60_001)
    assert e.value.reason == "expired-ticket"


def test_a_ticket_of_another_instance_altered_or_cut_is_refused():
    t = Tickets(os.urandom(32), lifetime=60)
    ticket = t.issue(KEY, 0, NOW)
    bad = [Tickets(os.urandom(32), 60).issue(KEY, 0, NOW), ticket[:-1], ticket + b"\0", b""]
    for i in range(TICKET_SIZE):           # every byte: nonce, expiry, uid, key, tag
        b = bytearray(ticket)
        b[i] ^= 1
        bad.append(bytes(b))
    for b in bad:
        with pytest.raises(AuthError) as e:
            t.open(b, NOW)
        assert e.value.reason == "bad-ticket"
    with pytest.raises(ValueError):
        Tickets(b"short", 60)


def _daemon_auth(lifetime=60):
    auth = MungeAuth("/nonexistent/munge.socket")
    auth.tickets = Tickets(os.urandom(32), lifetime)
    return auth


def test_the_ticket_rides_in_the_keyed_answer_covered_by_its_tag():
    ticket = Tickets(os.urandom(32), 60).issue(KEY, 0, NOW)
    req = _req()
    reply = P.Reply(P.STATUS_FOUND, req.nonce, 7, 1000, "n1")
    frame = P.decode_frame(wire.seal_reply(reply, ReplyKey(KEY, 0, ticket=ticket)))
    got = []
    assert wire.open_reply(frame, ReplyKey(KEY, 0, on_ticket=got.append), req.nonce) == reply
    assert got == [ticket]
    blob = bytearray(frame.auth_blob)
    blob[-1] ^= 1                                       # another ticket in the same answer
    swapped = P.Frame(frame.type, frame.auth, frame.body, bytes(blob))
    got.clear()
    with pytest.raises(wire.ReplyRejected, match="bad-auth"):
        wire.open_reply(swapped, ReplyKey(KEY, 0, on_ticket=got.append), req.nonce)
    assert got == []


def test_a_kept_ticket_seals_the_next_requests_to_that_daemon_only():
    daemon = _daemon_auth()
    client = MungeAuth("/nonexistent/munge.socket", reply_uid=0)
    peer = ("10.0.0.5", 6820)
    assert client.sealer(peer) is client                 # nothing kept yet: munge
    client._keep_session(peer, KEY, daemon.tickets.issue(KEY, 0, int(NOW + 1e9)))
    assert client.sealer(("10.0.0.6", 6820)) is client and client.sealer(None) is client
    reqs = [_req(), _req()]
    raw, reply_auth = wire.seal_requests(reqs, client, peer)
    frame = P.decode_frame(raw)
    assert frame.auth == P.AUTH_MUNGE_SESSION and isinstance(reply_auth, SessionKey)
    got, uid, answer_auth = wire.open_requests(frame, daemon)
    assert got == reqs and uid == 0 and answer_auth.key == KEY
    replies = [P.Reply(P.STATUS_FOUND, r.nonce, 7, 1000, "n1") for r in reqs]
    answer = P.decode_frame(wire.seal_replies(replies, answer_auth))
    assert not reply_auth.answered
    assert wire.open_replies(answer, reply_auth, [r.nonce for r in reqs]) == replies
    assert reply_auth.answered
    client.forget_session(peer)
    assert client.sealer(peer) is client


def test_the_daemon_refuses_a_session_request_it_cannot_check():
    daemon = _daemon_auth()
    client = MungeAuth("/nonexistent/munge.socket", reply_uid=0)
    peer = ("10.0.0.5", 6820)
    cases = {"bad-ticket": Tickets(os.urandom(32), 60).issue(KEY, 0, int(NOW + 1e9)),  # restarted
             "bad-mac": daemon.tickets.issue(os.urandom(32), 0, int(NOW + 1e9))}        # not its key
    for reason, ticket in cases.items():
        client._keep_session(peer, KEY, ticket)
        frame = P.decode_frame(wire.seal_request(_req(), client, peer)[0])
        with pytest.raises(AuthError) as e:
            wire.open_requests(frame, daemon)
        assert e.value.reason == reason
    frame = P.decode_frame(wire.seal_request(_req(), client, peer)[0])
    with pytest.raises(AuthError, match="wrong-auth-scheme"):
        wire.open_requests(frame, MungeAuth("/nonexistent/munge.socket"))   # gives no tickets


def test_a_ticket_is_not_used_in_its_last_seconds_and_the_oldest_goes_first():
    client = MungeAuth("/nonexistent/munge.socket", reply_uid=0)
    now = int(__import__("time").time() * 1000)
    t = Tickets(os.urandom(32), 60)
    client._keep_session("near", KEY, t.issue(KEY, 0, now - 60_000 + MungeAuth.SESSION_MARGIN_MS - 500))
    assert client.sealer("near") is client
    client.MAX_SESSIONS = 3
    for peer in ("a", "b", "c", "d"):
        client._keep_session(peer, KEY, t.issue(KEY, 0, now))
    assert list(client._sessions) == ["b", "c", "d"]


def test_munge_session_lifetime_setting():
    assert parse_config("").munge_session_lifetime == 60.0
    assert parse_config("MungeSessionLifetime=0\n").munge_session_lifetime == 0
    for bad in ("5", "-1", "7200", "soon"):
        with pytest.raises(ConfigError, match="MungeSessionLifetime"):
            parse_config(f"MungeSessionLifetime={bad}\n")


def _peer(behaviour):
    """A hostile peer on loopback: accepts, then closes at once ("reset") or says nothing
    ("silent"); -> (port, accepted connections list, stop)."""
    lst = socket.create_server(("127.0.0.1", 0))
    seen, stop = [], threading.Event()

    def run():
        lst.settimeout(0.05)
        while not stop.is_set():
            try:
                c, _ = lst.accept()
            except TimeoutError:
                continue
            seen.append(c)
            if behaviour == "reset":
                c.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()

    def close():
        stop.set()
        t.join()
        for c in seen:
            c.close()
        lst.close()
    return lst.getsockname()[1], seen, close


def _ask_with_session(behaviour, timeout):
    """A client holding a ticket for a hostile peer asks it once -> (answer, connections the
    peer saw, what the client would sign its next request to it with)."""
    port, seen, close = _peer(behaviour)
    try:
        client = MungeAuth("/nonexistent/munge.socket", reply_uid=0)
        client._keep_session(("127.0.0.1", port), KEY,
                             Tickets(os.urandom(32), 60).issue(KEY, 0, int(1e13)))
        a = C.query("127.0.0.1", port, ("127.0.0.1", 1000), ("127.0.0.1", 22), auth=client,
                    timeout=timeout, reserved_port=False)
        return a, len(seen), client.sealer(("127.0.0.1", port))
    finally:
        close()


def test_a_daemon_that_drops_the_ticketed_request_is_asked_again_with_munge():
    a, connections, next_sealer = _ask_with_session("reset", timeout=2)
    # the second attempt needs a credential, and this client's munged is not there
    assert a.outcome == C.LOCAL_ERROR and "cannot sign" in a.detail, a
    assert connections == 1 and isinstance(next_sealer, MungeAuth)


def test_a_daemon_too_slow_for_the_deadline_keeps_the_ticket_and_is_not_asked_again():
    a, connections, next_sealer = _ask_with_session("silent", timeout=0.3)
    assert a.outcome == C.UNREACHABLE and a.detail == "timeout waiting for reply", a
    assert connections == 1 and isinstance(next_sealer, SessionKey)
