"""Sans-IO protocol: round trips and hostile input (pure unit tests, no sockets)."""
import ipaddress
import os

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from daemon import protocol as P
from daemon import wire
from daemon.auth import HmacAuth, AuthError

KEY = bytes(range(32))
AUTH = HmacAuth(KEY)
OTHER = HmacAuth(bytes(32))

v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)).filter(lambda a: a.ipv4_mapped is None)
ports = st.integers(1, 65535)


@st.composite
def requests(draw):
    fam = draw(st.sampled_from([4, 6]))
    a = draw(v4 if fam == 4 else v6)
    b = draw(v4 if fam == 4 else v6)
    return P.Request(a, draw(ports), b, draw(ports), draw(st.sampled_from([6, 17])),
                     draw(st.binary(min_size=16, max_size=16)), draw(st.integers(0, 2**64 - 1)))


@st.composite
def replies(draw):
    status = draw(st.sampled_from(list(P.STATUS_NAMES)))
    job = draw(st.integers(1 if status == P.STATUS_FOUND else 0, 2**32 - 1))
    name = draw(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=64))
    return P.Reply(status, draw(st.binary(min_size=16, max_size=16)), job,
                   draw(st.integers(0, 2**32 - 1)), name, draw(st.integers(0, 2**64 - 1)))


@given(requests())
def test_request_round_trip(req):
    data = wire.seal_request(req, AUTH)[0]
    assert len(data) <= P.MAX_FRAME
    frame = P.decode_frame(data)
    got, uid, _ = wire.open_request(frame, AUTH)
    assert got == req and uid == 0


@given(replies())
def test_reply_round_trip(rep):
    data = wire.seal_reply(rep, AUTH)
    got = wire.open_reply(P.decode_frame(data), AUTH, rep.nonce)
    assert got == rep


@given(requests(), st.data())
def test_streaming_decoder_any_split(req, data):
    raw = wire.seal_request(req, AUTH)[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    dec = P.FrameDecoder()
    frames = []
    prev = 0
    for c in cuts + [len(raw)]:
        frames += dec.feed(raw[prev:c])
        prev = c
    dec.eof()
    assert len(frames) == 1 and frames[0] == P.decode_frame(raw)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_garbage_never_crashes_and_is_bounded(blob):
    dec = P.FrameDecoder()
    try:
        for i in range(0, len(blob), 97):
            for f in dec.feed(blob[i:i + 97]):
                try:
                    wire.open_request(f, AUTH)
                except (P.ProtocolError, AuthError):
                    pass
            assert dec.buffered <= P.MAX_FRAME
        dec.eof()
    except P.ProtocolError as e:
        assert e.reason
    try:
        P.decode_frame(blob)
    except P.ProtocolError:
        pass


@given(requests(), st.integers(0, 200), st.binary(min_size=1, max_size=1))
def test_mutated_frames_rejected_cleanly(req, pos, byte):
    raw = bytearray(wire.seal_request(req, AUTH)[0])
    pos %= len(raw)
    if raw[pos:pos + 1] == byte:
        return
    raw[pos:pos + 1] = byte
    try:
        f = P.decode_frame(bytes(raw))
        wire.open_request(f, AUTH)
    except (P.ProtocolError, AuthError) as e:
        assert e.reason
    else:
        pytest.fail("mutated frame accepted")


def _req():
    return P.Request.make("10.0.0.1", 4000, "10.0.0.2", 22)


def test_truncated():
    raw = wire.seal_request(_req(), AUTH)[0]
    for n in (0, 5, 11, 12, 40, len(raw) - 1):
        with pytest.raises(P.ProtocolError) as ei:
            P.decode_frame(raw[:n])
        assert ei.value.reason == "truncated"
    dec = P.FrameDecoder()
    assert dec.feed(raw[:30]) == []
    with pytest.raises(P.ProtocolError) as ei:
        dec.eof()
    assert ei.value.reason == "truncated"


def test_oversized_rejected_from_header_alone():
    hdr = P.HEADER.pack(P.MAGIC, P.VERSION, P.TYPE_REQUEST, P.AUTH_HMAC, 0, 60000, 32)
    dec = P.FrameDecoder()
    with pytest.raises(P.ProtocolError) as ei:
        dec.feed(hdr)
    assert ei.value.reason == "oversized"
    with pytest.raises(P.ProtocolError):  # poisoned
        dec.feed(b"x")
    hdr = P.HEADER.pack(P.MAGIC, P.VERSION, P.TYPE_REQUEST, P.AUTH_HMAC, 0, 62, 5000)
    with pytest.raises(P.ProtocolError) as ei:
        P.FrameDecoder().feed(hdr)
    assert ei.value.reason == "oversized"


def test_wrong_version_and_magic():
    raw = bytearray(wire.seal_request(_req(), AUTH)[0])
    raw[4] = 2
    with pytest.raises(P.ProtocolError) as ei:
        P.decode_frame(bytes(raw))
    assert ei.value.reason == "unknown-version"
    raw[0:4] = b"SSH-"
    with pytest.raises(P.ProtocolError) as ei:
        P.FrameDecoder().feed(bytes(raw))
    assert ei.value.reason == "bad-magic"


def test_missing_and_bad_auth():
    req = _req()
    body = req.encode_body()
    with pytest.raises(P.ProtocolError) as ei:
        P.decode_frame(P.HEADER.pack(P.MAGIC, 1, 1, P.AUTH_HMAC, 0, len(body), 0) + body)
    assert ei.value.reason == "missing-auth"
    forged = wire.seal_request(req, OTHER)[0]
    with pytest.raises(AuthError) as ei:
        wire.open_request(P.decode_frame(forged), AUTH)
    assert ei.value.reason == "bad-mac"


def test_two_frames_on_one_connection_rejected():
    raw = wire.seal_request(_req(), AUTH)[0]
    dec = P.FrameDecoder(max_frames=1)
    with pytest.raises(P.ProtocolError) as ei:
        dec.feed(raw + raw)
    assert ei.value.reason == "too-many-frames"


def test_reply_wrong_nonce_forged_and_type_confusion():
    req = _req()
    good = P.Reply(P.STATUS_FOUND, req.nonce, 42, 1000, "node1")
    with pytest.raises(wire.ReplyRejected) as ei:
        wire.open_reply(P.decode_frame(wire.seal_reply(good, AUTH)), AUTH, os.urandom(16))
    assert ei.value.reason == "wrong-nonce"
    with pytest.raises(wire.ReplyRejected) as ei:
        wire.open_reply(P.decode_frame(wire.seal_reply(good, OTHER)), AUTH, req.nonce)
    assert ei.value.reason == "bad-auth"
    # a request echoed back as if it were a reply
    with pytest.raises(wire.ReplyRejected) as ei:
        wire.open_reply(P.decode_frame(wire.seal_request(req, AUTH)[0]), AUTH, req.nonce)
    assert ei.value.reason == "unexpected-type"
    # a reply frame relabelled as a request: the MAC covers the type
    raw = bytearray(wire.seal_reply(good, AUTH))
    raw[5] = P.TYPE_REQUEST
    with pytest.raises((P.ProtocolError, AuthError)):
        wire.open_request(P.decode_frame(bytes(raw)), AUTH)


@given(st.lists(requests(), min_size=2, max_size=P.MAX_BATCH), st.data())
def test_batch_round_trip_in_order(reqs, data):
    """Requests in one frame, their replies in one frame (the largest fit MAX_FRAME), bound
    to every nonce in order."""
    frame = P.decode_frame(wire.seal_requests(reqs, AUTH)[0])
    assert frame.type == P.TYPE_REQUESTS
    got, uid, _ = wire.open_requests(frame, AUTH)
    assert got == reqs and uid == 0
    reps = [data.draw(replies()) for _ in reqs]
    reps = [P.Reply(r.status, q.nonce, r.job_id, r.job_uid, "n" * P.MAX_NODE_NAME, r.timestamp_ms)
            for r, q in zip(reps, reqs)]
    raw = wire.seal_replies(reps, AUTH)
    assert len(raw) <= P.MAX_FRAME
    assert wire.open_replies(P.decode_frame(raw), AUTH, [q.nonce for q in reqs]) == reps


def test_batch_bounds_and_binding():
    reqs = [_req() for _ in range(3)]
    assert P.decode_frame(wire.seal_requests(reqs[:1], AUTH)[0]).type == P.TYPE_REQUEST  # one: alone
    with pytest.raises(ValueError):
        P.encode_batch([_req() for _ in range(P.MAX_BATCH + 1)])
    with pytest.raises(ValueError):
        P.encode_batch([])
    body = P.encode_batch(reqs)
    for bad in (bytes([0]) + body[1:], bytes([4]) + body[1:], body[:-1], body + b"x", b""):
        with pytest.raises(P.ProtocolError):
            P.decode_requests(bad)
    reps = [P.Reply(P.STATUS_UNKNOWN, q.nonce, node="n1") for q in reqs]
    frame = P.decode_frame(wire.seal_replies(reps, AUTH))
    nonces = [q.nonce for q in reqs]
    for wrong in (nonces[::-1], nonces[:2], nonces + [os.urandom(16)]):
        with pytest.raises(wire.ReplyRejected) as ei:
            wire.open_replies(frame, AUTH, wrong)
        assert ei.value.reason in ("wrong-nonce", "unexpected-type")
    # replies for several requests are not the reply to one of them, nor the other way round
    with pytest.raises(wire.ReplyRejected) as ei:
        wire.open_reply(frame, AUTH, nonces[0])
    assert ei.value.reason == "unexpected-type"
    one = P.decode_frame(wire.seal_reply(reps[0], AUTH))
    with pytest.raises(wire.ReplyRejected) as ei:
        wire.open_replies(one, AUTH, nonces)
    assert ei.value.reason == "unexpected-type"
    # a requests frame relabelled as replies: the MAC covers the type and the direction
    raw = bytearray(wire.seal_requests(reqs, AUTH)[0])
    raw[5] = P.TYPE_REPLIES
    with pytest.raises(wire.ReplyRejected):
        wire.open_replies(P.decode_frame(bytes(raw)), AUTH, nonces)


@given(st.binary(max_size=2000))
def test_batch_garbage_never_crashes(blob):
    for decode in (P.decode_requests, P.decode_replies):
        try:
            decode(blob)
        except P.ProtocolError:
            pass


def test_v4_mapped_normalised():
    r = P.Request.make("::ffff:10.1.2.3", 5000, "::ffff:10.1.2.4", 22)
    assert r.family == 4 and str(r.src) == "10.1.2.3"
    with pytest.raises(ValueError):
        P.Request.make("10.1.2.3", 5000, "fd00::1", 22)
    with pytest.raises(ValueError):
        P.Request.make("10.1.2.3", 0, "10.1.2.4", 22)


def test_bad_request_fields():
    req = _req()
    body = bytearray(req.encode_body())
    body[0] = 5
    with pytest.raises(P.ProtocolError):
        P.Request.decode_body(bytes(body))
    body = bytearray(req.encode_body())
    body[1] = 1
    with pytest.raises(P.ProtocolError):
        P.Request.decode_body(bytes(body))
    body = bytearray(req.encode_body())
    body[6 + 5] = 1  # non-zero IPv4 padding
    with pytest.raises(P.ProtocolError):
        P.Request.decode_body(bytes(body))
    with pytest.raises(P.ProtocolError):
        P.Request.decode_body(bytes(body[:-1]))


def test_reply_node_name_checks():
    n = os.urandom(16)
    body = P.Reply(P.STATUS_UNKNOWN, n, node="a b").encode_body()
    with pytest.raises(P.ProtocolError):
        P.Reply.decode_body(body)
    body = P.Reply(P.STATUS_FOUND, n, 0).encode_body()
    with pytest.raises(P.ProtocolError):
        P.Reply.decode_body(body)


# ---------------------------------------------------------------------------------------------
# The login path's light variants must match the full ones exactly.

def _make_or_error(fn, *a):
    try:
        r = fn(*a, nonce=bytes(range(16)), timestamp_ms=123)
    except (ValueError, KeyError) as e:
        return type(e), str(e)
    return r.encode_body()


_ADDR_EDGE = ["10.0.0.1", " 10.0.0.1 ", "[10.0.0.1]", "010.0.0.1", "10.0.0", "10.0.0.1.2",
              "256.0.0.1", "1.2.3.4:5", "", " ", "::", "::1", "[::1]", "fd00::1", "FD00::1",
              "::ffff:10.1.2.3", "[::ffff:10.1.2.3]", "::10.1.2.3", "::ffff:010.1.2.3",
              "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7::", "::1:2:3:4:5:6:7",
              "12345::1", "fe80::1%eth0", "a\0b", "١.2.3.4", "x.example", ":::", "1::2::3",
              "::ffff:1.2.3.4.5", "0.0.0.0", "255.255.255.255", "1.2.3.04"]


@pytest.mark.parametrize("addr", _ADDR_EDGE)
def test_pack_request_matches_make_edge(addr):
    for other in ("10.0.0.2", "fd00::2"):
        assert _make_or_error(P.pack_request, addr, 4000, other, 22) == \
            _make_or_error(P.Request.make, addr, 4000, other, 22)
        assert _make_or_error(P.pack_request, other, 4000, addr, 22, "udp") == \
            _make_or_error(P.Request.make, other, 4000, addr, 22, "udp")


@given(st.one_of(v4.map(str), v6.map(str), v4.map(lambda a: "::ffff:%s" % a),
                 st.text(alphabet="0123456789abcdefABCDEF:.[] %", max_size=45)),
       st.integers(-2, 70000), st.sampled_from(["tcp", "UDP", "sctp", 6, 17, 1]))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_pack_request_matches_make(addr, port, proto):
    for other in ("10.9.8.7", "fd00::7"):
        assert _make_or_error(P.pack_request, addr, port, other, 22, proto) == \
            _make_or_error(P.Request.make, addr, port, other, 22, proto)


def test_packed_request_round_trip():
    p = P.pack_request("::ffff:10.1.2.3", 5000, "10.1.2.4", 22)
    full = P.Request.decode_body(p.encode_body())
    assert full.nonce == p.nonce and str(full.src) == "10.1.2.3" and full.dst_port == 22
    assert p.describe() == full.describe() == "tcp 10.1.2.3:5000 -> 10.1.2.4:22"
    got, uid, _ = wire.open_request(P.decode_frame(wire.seal_request(p, AUTH)[0]), AUTH)
    assert got == full and uid == 0


@given(st.binary(min_size=0, max_size=200), st.binary(max_size=300))
def test_hmac_sha256_matches_stdlib(key, msg):
    import hashlib
    import hmac
    from daemon.auth import _HmacSha256
    assert _HmacSha256(key).mac(msg) == hmac.new(key, msg, hashlib.sha256).digest()


def test_hmac_rfc4231_case_2():
    from daemon.auth import _HmacSha256
    assert _HmacSha256(b"Jefe").mac(b"what do ya want for nothing?").hex() == \
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"


def test_records_behave_like_frozen_dataclasses():
    import copy
    import pickle
    from daemon.client import Answer
    a = P.Request.make("10.0.0.1", 4000, "10.0.0.2", 22, nonce=bytes(16), timestamp_ms=5)
    b = P.Request.make("10.0.0.1", 4000, "10.0.0.2", 22, nonce=bytes(16), timestamp_ms=5)
    assert a == b and hash(a) == hash(b) and a != P.Request.make("10.0.0.1", 4001, "10.0.0.2", 22)
    assert repr(a) == ("Request(src=IPv4Address('10.0.0.1'), src_port=4000, "
                       "dst=IPv4Address('10.0.0.2'), dst_port=22, proto=6, nonce=%r, "
                       "timestamp_ms=5)" % bytes(16))
    with pytest.raises(AttributeError):
        a.src_port = 1
    assert copy.copy(a) == a and pickle.loads(pickle.dumps(a)) == a
    r = P.Reply(P.STATUS_FOUND, bytes(16), 7, 1000, "n1", 9)
    assert r == P.Reply(P.STATUS_FOUND, bytes(16), 7, 1000, "n1", 9) and r.status_name == "found"
    assert repr(r) == ("Reply(status=1, nonce=%r, job_id=7, job_uid=1000, node='n1', "
                       "timestamp_ms=9)" % bytes(16))
    assert P.Reply(P.STATUS_UNKNOWN, bytes(16)).job_uid == P.NO_UID
    f = P.Frame(1, 2, b"b", b"a")
    assert f.version == P.VERSION and f == P.Frame(1, 2, b"b", b"a", P.VERSION)
    ans = Answer("found", 7, 1000, "n1", "", 1.5)
    assert ans.found and ans == Answer("found", 7, 1000, "n1", elapsed_ms=1.5)
    assert repr(ans) == ("Answer(outcome='found', job_id=7, job_uid=1000, node='n1', detail='', "
                         "elapsed_ms=1.5, cacheable=False)")
    assert not Answer("unknown").found and Answer("unknown").job_id is None
    with pytest.raises(AttributeError):
        ans.outcome = "x"
    assert a != ans and (a == 1) is False


def test_config_is_a_plain_record():
    from daemon.config import Config, config_field_names
    c = Config(port=1, listen_addresses=["127.0.0.1"])
    assert c.port == 1 and c.auth_type == "munge" and c.unknown_keys == []
    assert Config() == Config() and Config() != c
    assert Config().listen_addresses is not Config().listen_addresses
    assert Config().cgroup_roots is not Config().cgroup_roots
    assert config_field_names()[:3] == ["port", "listen_addresses", "auth_type"]
    assert config_field_names()[-1] == "unknown_keys" and len(set(config_field_names())) == len(config_field_names())
    assert repr(Config()).startswith("Config(port=6820, listen_addresses=['::', '0.0.0.0'], ")
    with pytest.raises(TypeError):
        Config(nope=1)
    with pytest.raises(TypeError):
        hash(Config())


def test_reply_key_answers_only_with_its_key_or_its_fallback():
    from daemon.auth import ReplyKey
    req = _req()
    key = os.urandom(32)
    rep = P.Reply(P.STATUS_FOUND, req.nonce, 5, 0, "n")
    keyed = P.decode_frame(wire.seal_reply(rep, ReplyKey(key, 0)))
    assert keyed.auth == P.AUTH_MUNGE_KEY
    assert wire.open_reply(keyed, ReplyKey(key, 0), req.nonce) == rep
    with pytest.raises(wire.ReplyRejected, match="untrusted-sender"):    # the uid munge vouched for
        wire.open_reply(keyed, ReplyKey(key, 1000), req.nonce)
    plain = P.decode_frame(wire.seal_reply(rep, AUTH))                   # hmac, scheme 2
    with pytest.raises(wire.ReplyRejected, match="wrong-auth-scheme"):
        wire.open_reply(plain, ReplyKey(key, 0), req.nonce)
    assert wire.open_reply(plain, ReplyKey(key, 0, fallback=AUTH), req.nonce) == rep
    # a daemon with hmac does not take a keyed-munge request (nor the reverse)
    frame = P.decode_frame(P.encode_frame(P.TYPE_REQUEST, P.AUTH_MUNGE_KEY, req.encode_body(), b"x"))
    with pytest.raises(AuthError, match="wrong-auth-scheme"):
        wire.open_request(frame, AUTH)


def test_munge_reply_key_setting():
    from daemon.config import parse_config
    assert parse_config("").munge_reply_key is True
    cfg = parse_config("MungeReplyKey=no\nReplyUser=0\n")
    assert cfg.munge_reply_key is False and cfg.reply_uid() == 0
