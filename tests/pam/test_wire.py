"""pam_callerid.wire: the local protocol v1, pure (no sockets)."""
import pytest
from hypothesis import given, strategies as st

from pam_callerid import wire
from pam_callerid.wire import Conn, Reply, Request, WireError

GOOD = (b"callerid-pam 1\nphase=account\nservice=sshd\nuser=alice\nrhost=10.199.3.254\n"
        b"tty=ssh\nconn=10.199.3.254 40022 10.199.3.2 22\n"
        b"ssh_connection=10.199.3.254 40022 10.199.3.2 22\nsilent=1\nmodule=0.1.0\n"
        b"arg=action_no_jobs=deny\narg=nodename=node2\n")


def test_parse_good_request():
    r = wire.parse_request(GOOD)
    assert r == Request("account", "sshd", "alice", "10.199.3.254", "ssh",
                        Conn("10.199.3.254", 40022, "10.199.3.2", 22),
                        "10.199.3.254 40022 10.199.3.2 22", True,
                        ("action_no_jobs=deny", "nodename=node2"), "0.1.0")


def test_minimal_request_and_empty_values():
    r = wire.parse_request(b"callerid-pam 1\nphase=session\nservice=\nuser=\nrhost=\n")
    assert (r.phase, r.service, r.user, r.rhost, r.conn, r.silent, r.args, r.module) == \
        ("session", "", "", "", None, False, (), None)


def test_ipv6_and_mapped_conn_kept_as_sent():
    r = wire.parse_request(b"callerid-pam 1\nphase=account\nservice=sshd\nuser=a\n"
                           b"conn=::ffff:10.1.2.3 5 fd42::2 22\n")
    assert r.conn == Conn("::ffff:10.1.2.3", 5, "fd42::2", 22)


BAD = {
    "empty": b"",
    "no newline at end (truncated)": GOOD[:-1],
    "cut in the middle": GOOD[:40],
    "wrong magic": GOOD.replace(b"callerid-pam 1", b"callerid-pam 2"),
    "NUL": GOOD.replace(b"alice", b"al\0ce"),
    "not UTF-8": GOOD.replace(b"alice", b"al\xffce"),
    "unknown key": GOOD + b"pid=1234\n",
    "duplicate user": GOOD + b"user=root\n",
    "no key=value": GOOD + b"garbage\n",
    "empty line": GOOD + b"\n",
    "empty key": GOOD + b"=x\n",
    "missing phase": b"callerid-pam 1\nservice=sshd\nuser=a\n",
    "missing user": b"callerid-pam 1\nphase=account\nservice=sshd\n",
    "bad phase": GOOD.replace(b"phase=account", b"phase=auth"),
    "bad silent": GOOD.replace(b"silent=1", b"silent=0"),
    "conn 3 fields": GOOD.replace(b"conn=10.199.3.254 40022 10.199.3.2 22",
                                  b"conn=10.199.3.254 40022 10.199.3.2"),
    "conn bad ip": GOOD.replace(b"conn=10.199.3.254", b"conn=10.199.3.999"),
    "conn port 0": GOOD.replace(b"40022 10.199.3.2 22\nssh", b"0 10.199.3.2 22\nssh"),
    "conn port too big": GOOD.replace(b"40022 10.199.3.2 22\nssh", b"65536 10.199.3.2 22\nssh"),
    "conn port sign": GOOD.replace(b"40022 10.199.3.2 22\nssh", b"+22 10.199.3.2 22\nssh"),
    "conn double space": GOOD.replace(b"conn=10.199.3.254 ", b"conn=10.199.3.254  "),
    "long user": GOOD.replace(b"user=alice", b"user=" + b"a" * 256),
    "long arg": GOOD + b"arg=" + b"x" * 1025 + b"\n",
    "long module": GOOD.replace(b"module=0.1.0", b"module=" + b"1" * 65),
    "duplicate module": GOOD + b"module=0.1.0\n",
    "too many args": GOOD + b"arg=x\n" * 63,
    "oversized": GOOD + b"arg=" + b"x" * 1000 + b"\n" + (b"arg=y\n" * 3000),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_requests(name):
    with pytest.raises(WireError):
        wire.parse_request(BAD[name])


def _padded(total):
    """GOOD plus arg= lines, exactly ``total`` bytes."""
    data = GOOD
    while total - len(data) > 1029:
        data += b"arg=" + b"x" * 1024 + b"\n"
    return data + b"arg=" + b"y" * (total - len(data) - 5) + b"\n"


def test_size_limit():
    exact = _padded(wire.MAX_MESSAGE)
    assert len(exact) == wire.MAX_MESSAGE
    assert wire.parse_request(exact).args[-1].startswith("y")
    with pytest.raises(WireError, match="more than 16384"):
        wire.parse_request(_padded(wire.MAX_MESSAGE + 1))


def test_errors_name_the_problem():
    with pytest.raises(WireError, match="unknown key 'pid'"):
        wire.parse_request(GOOD + b"pid=1\n")
    with pytest.raises(WireError, match="truncated"):
        wire.parse_request(GOOD[:-1])


# ------------------------------------------------------------------ round trips
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\0"),
                max_size=40)
_ip4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
_ip6 = st.sampled_from(["::1", "fd42:199:3::2", "::ffff:10.0.0.1", "fe80::1"])
_conn = st.builds(Conn, _ip4 | _ip6, st.integers(1, 65535), _ip4 | _ip6, st.integers(1, 65535))
_requests = st.builds(
    Request, st.sampled_from(wire.PHASES), _text.filter(lambda s: len(s.encode()) <= 255),
    _text.filter(lambda s: len(s.encode()) <= 255),
    st.none() | _text, st.none() | _text, st.none() | _conn, st.none() | _text,
    st.booleans(), st.lists(_text, max_size=8).map(tuple),
    st.none() | _text.filter(lambda s: len(s.encode()) <= 64))


@given(_requests)
def test_request_round_trip(req):
    assert wire.parse_request(wire.encode_request(req)) == req


@given(st.binary(max_size=300))
def test_parse_request_never_crashes(data):
    try:
        wire.parse_request(b"callerid-pam 1\n" + data)
    except WireError:
        pass


_env = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}=[ -~]{0,20}", fullmatch=True)
_replies = st.builds(
    Reply, st.sampled_from(wire.RCS),
    st.lists(_text.filter(lambda s: all(c >= " " and c != "\x7f" for c in s)), max_size=3).map(tuple),
    st.lists(_text.filter(lambda s: all(c >= " " and c != "\x7f" for c in s)), max_size=3).map(tuple),
    st.lists(_env, max_size=3).map(tuple))


@given(_replies, st.booleans(), st.none() | st.sampled_from(wire.RCS))
def test_reply_round_trip(rep, setns, fail):
    if setns:
        rep = Reply(rep.rc, rep.errors, rep.infos, rep.env, "mnt", fail)
    assert wire.parse_reply(wire.encode_reply(rep)) == rep


@given(_replies, st.integers(1, wire.MAX_ENTER), st.none() | st.sampled_from(wire.RCS),
       st.none() | _text.filter(lambda s: all(c >= " " and c != "\x7f" for c in s)))
def test_reply_with_enter_round_trip(rep, n, fail, msg):
    rep = Reply(rep.rc, rep.errors, rep.infos, rep.env, enter=n, enter_fail=fail,
                enter_error=msg, enter_info=msg)
    assert wire.parse_reply(wire.encode_reply(rep)) == rep


def test_ack():
    assert wire.encode_ack(None) == b"callerid-pam 1\nentered=ok\n"
    assert wire.parse_ack(wire.encode_ack(None)) is None
    assert wire.parse_ack(wire.encode_ack("Bad file\ndescriptor")) == "Bad file descriptor"
    for bad in (b"callerid-pam 1\nentered=yes\n", b"callerid-pam 1\n",
                b"callerid-pam 1\nentered=ok\nentered=ok\n", b"callerid-pam 1\nentered=ok"):
        with pytest.raises(WireError):
            wire.parse_ack(bad)


def test_reply_texts_are_sanitised_and_cut():
    data = wire.encode_reply(Reply("perm_denied", errors=("line1\nline2\0\x1b[31m",),
                                   infos=("x" * 5000,)))
    rep = wire.parse_reply(data)
    assert rep.errors == ("line1 line2  [31m",)
    assert rep.infos == ("x" * wire.MAX_TEXT,)


@pytest.mark.parametrize("rep", [Reply("ok"), Reply("success", env=("1X=2",)),
                                 Reply("success", env=("NOEQUALS",)),
                                 Reply("success", setns="net"),
                                 Reply("success", setns_fail="perm_denied"),
                                 Reply("success", enter=13), Reply("success", enter=-1),
                                 Reply("success", enter_fail="perm_denied"),
                                 Reply("success", enter_info="x"),
                                 Reply("success", errors=("e",) * 17)])
def test_encode_reply_refuses_our_own_mistakes(rep):
    with pytest.raises(ValueError):
        wire.encode_reply(rep)


@pytest.mark.parametrize("data", [b"callerid-pam 1\n", b"callerid-pam 1\nrc=maybe\n",
                                  b"callerid-pam 1\nrc=success\nrc=ignore\n",
                                  b"callerid-pam 1\nrc=success\nsetns_fail=perm_denied\n",
                                  b"callerid-pam 1\nrc=success\nfoo=bar\n",
                                  b"callerid-pam 1\nrc=success"])
def test_malformed_replies(data):
    with pytest.raises(WireError):
        wire.parse_reply(data)
