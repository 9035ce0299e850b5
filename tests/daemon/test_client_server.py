"""Client and server on loopback with real munge and HMAC: forged, replayed and mis-bound
replies; replayed and stale requests; hostile connections; limits; CLI and config errors."""
import asyncio
import os
import errno
import socket
import stat
import subprocess
import threading
import time

import pytest

from daemon import client as C
from daemon import protocol as P
from daemon import wire
from daemon.auth import HmacAuth, MungeAuth, load_key, AuthError
from daemon.config import Config, parse_config, ConfigError
from daemon.jobs import CgroupJobs
from daemon.lookup import Lookup
from daemon.admission import TokenBuckets
from daemon.server import Server
from daemon.replay import ReplayCache

from .conftest import NOBODY, PY, ROOT

KEY = bytes(range(32))


class ServerThread:
    def __init__(self, auth, clock=None, **cfgkw):
        self.clock = clock
        cfg = Config(port=0, listen_addresses=["127.0.0.1"], node_name="testnode",
                     cgroup_roots=["/nonexistent"], **cfgkw)
        self.lookup = Lookup(CgroupJobs(["/nonexistent"]))
        self.cfg = cfg
        self.auth = auth
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.srv = Server(self.cfg, self.auth, self.lookup, clock=self.clock)
        self.loop.run_until_complete(self.srv.start())
        self.port = self.srv.port
        self.ready.set()
        self.loop.run_until_complete(self.srv.serve_until_stopped())

    def __enter__(self):
        self.t.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *a):
        self.loop.call_soon_threadsafe(self.srv.request_stop)
        self.t.join(5)
        self.loop.close()
        self.lookup.close()


class FakeServer:
    """Accepts one connection at a time, reads a request frame, answers with respond(frame)."""

    def __init__(self, respond):
        self.respond = respond
        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        self.s.listen(8)
        self.port = self.s.getsockname()[1]
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while True:
            try:
                c, _ = self.s.accept()
            except OSError:
                return
            with c:
                dec = P.FrameDecoder()
                frames = []
                while not frames:
                    d = c.recv(4096)
                    if not d:
                        break
                    frames = dec.feed(d)
                if frames:
                    out = self.respond(frames[0])
                    if out:
                        c.sendall(out)
                    elif out is None:
                        time.sleep(10)

    def close(self):
        self.s.close()


def _q(port, auth, **kw):
    return C.query("127.0.0.1", port, ("127.0.0.1", 40000), ("127.0.0.1", 22), auth=auth,
                   timeout=kw.pop("timeout", 3.0), **kw)


# ---------------------------------------------------------------------------------------------
# replies the client must reject


def test_forged_reply_hmac_rejected():
    auth = HmacAuth(KEY)
    evil = HmacAuth(bytes(32))

    def respond(f):
        req = P.Request.decode_body(f.body)
        return wire.seal_reply(P.Reply(P.STATUS_FOUND, req.nonce, 666, 0, "evil"), evil)
    fs = FakeServer(respond)
    try:
        a = _q(fs.port, auth)
        assert a.outcome == C.INVALID and "bad-auth" in a.detail and a.job_id is None
    finally:
        fs.close()


def test_reply_with_wrong_nonce_rejected():
    auth = HmacAuth(KEY)
    fs = FakeServer(lambda f: wire.seal_reply(P.Reply(P.STATUS_FOUND, os.urandom(16), 666, 0, "x"), auth))
    try:
        a = _q(fs.port, auth)
        assert a.outcome == C.INVALID and "wrong-nonce" in a.detail
    finally:
        fs.close()


def test_batch_answered_out_of_order_or_partly_is_rejected_whole():
    """query_many: the replies must answer every request, in order; anything else is no
    answer for any of them (a forged or confused daemon)."""
    auth = HmacAuth(KEY)
    conns = [(("127.0.0.1", 40000 + i), ("127.0.0.1", 22)) for i in range(3)]

    def answer(how):
        def respond(frame):
            reqs, _, _ = wire.open_requests(frame, auth)
            reps = [P.Reply(P.STATUS_FOUND, r.nonce, 7, 0, "x") for r in reqs]
            return wire.seal_replies(how(reps), auth)
        return respond
    for how, ok in ((lambda r: r, True), (lambda r: r[::-1], False), (lambda r: r[:2], False)):
        fs = FakeServer(answer(how))
        try:
            got = C.query_many("127.0.0.1", fs.port, conns, auth=auth, timeout=3.0)
        finally:
            fs.close()
        assert len(got) == 3
        if ok:
            assert all(a.outcome == C.FOUND and a.job_id == 7 for a in got), got
        else:
            assert all(a.outcome == C.INVALID and "wrong-nonce" in a.detail for a in got), got


def test_unauthenticated_garbage_reply_rejected():
    auth = HmacAuth(KEY)
    fs = FakeServer(lambda f: b"HTTP/1.0 200 OK\r\n\r\njob 666\n")
    try:
        a = _q(fs.port, auth)
        assert a.outcome == C.INVALID and "bad-magic" in a.detail
    finally:
        fs.close()


@pytest.mark.root
def test_replayed_munge_reply_rejected(munged):
    auth = MungeAuth(munged.socket)
    captured = {}

    def respond(f):
        req = P.Request.decode_body(f.body)
        if "frame" not in captured:
            captured["frame"] = wire.seal_reply(P.Reply(P.STATUS_FOUND, req.nonce, 7, 0, "n"), auth)
        return captured["frame"]
    fs = FakeServer(respond)
    try:
        req = P.Request.make("127.0.0.1", 40000, "127.0.0.1", 22)
        a = _q(fs.port, auth, request=req)
        assert a.outcome == C.FOUND and a.job_id == 7
        # the very same (genuine) reply again, even for a request with the same nonce
        a = _q(fs.port, auth, request=req)
        assert a.outcome == C.INVALID and "replayed" in a.detail
        # and for any new request it is bound to the wrong nonce
        a = _q(fs.port, auth)
        assert a.outcome == C.INVALID
    finally:
        fs.close()


@pytest.mark.root
def test_munge_reply_from_non_root_rejected(munged):
    """Anyone can bind the port on a login node and get munged to sign: the uid tells."""
    auth = MungeAuth(munged.socket)
    req = P.Request.make("127.0.0.1", 40000, "127.0.0.1", 22)
    body = P.Reply(P.STATUS_FOUND, req.nonce, 666, 0, "evil").encode_body()
    signed = P.signed_bytes(P.TYPE_REPLY, P.AUTH_MUNGE, body)
    code = ("import sys; from daemon.auth import MungeAuth; "
            f"sys.stdout.buffer.write(MungeAuth({munged.socket!r}).sign(2, bytes.fromhex({signed.hex()!r})))")
    cred = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           PY, "-c", code], capture_output=True, cwd=str(ROOT),
                          env={"PYTHONPATH": str(ROOT)}, check=True).stdout
    frame = P.encode_frame(P.TYPE_REPLY, P.AUTH_MUNGE, body, cred)
    fs = FakeServer(lambda f: frame)
    try:
        a = _q(fs.port, auth, request=req)
        assert a.outcome == C.INVALID and "untrusted-sender" in a.detail and str(NOBODY) in a.detail
    finally:
        fs.close()


def test_client_deadline_when_server_never_answers():
    fs = FakeServer(lambda f: None)
    try:
        t = time.monotonic()
        a = _q(fs.port, HmacAuth(KEY), timeout=0.5)
        assert a.outcome == C.UNREACHABLE and time.monotonic() - t < 1.0
    finally:
        fs.close()


def test_client_unreachable_and_bad_args():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert _q(port, HmacAuth(KEY)).outcome == C.UNREACHABLE
    a = C.query("127.0.0.1", port, "1.2.3.4:0", "1.2.3.5:22", auth=HmacAuth(KEY))
    assert a.outcome == C.LOCAL_ERROR
    a = C.query("no-such-host.invalid", port, "1.2.3.4:5", "1.2.3.5:22", auth=HmacAuth(KEY), timeout=1)
    assert a.outcome == C.UNREACHABLE


@pytest.mark.root
def test_client_munged_down_is_local_error():
    a = _q(1, MungeAuth("/nonexistent/munge.socket"))
    assert a.outcome == C.LOCAL_ERROR and "munge" in a.detail


# ---------------------------------------------------------------------------------------------
# the real server on loopback


def _raw_exchange(port, data, timeout=3.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            return b""          # the server aborted while we were still sending
        except OSError as e:
            if e.errno == errno.ENOTCONN:   # ... and the RST arrived before our shutdown
                return b""
            raise
        out = b""
        while True:
            try:
                d = s.recv(4096)
            except ConnectionResetError:  # closed with RST (bad input is aborted)
                return out
            if not d:
                return out
            out += d


@pytest.mark.parametrize("scheme", ["hmac", pytest.param("munge", marks=pytest.mark.root)])
def test_replayed_request_refused(scheme, request):
    auth = HmacAuth(KEY) if scheme == "hmac" else MungeAuth(request.getfixturevalue("munged").socket)
    with ServerThread(auth) as st:
        req = P.Request.make("127.0.0.1", 40000, "127.0.0.1", 22)
        frame = wire.seal_request(req, auth)[0]
        r1 = wire.open_reply(P.decode_frame(_raw_exchange(st.port, frame)), auth, req.nonce)
        assert r1.status == P.STATUS_UNKNOWN and r1.node == "testnode"
        r2 = wire.open_reply(P.decode_frame(_raw_exchange(st.port, frame)), auth, req.nonce)
        assert r2.status == P.STATUS_REFUSED


def test_stale_request_refused():
    auth = HmacAuth(KEY)
    with ServerThread(auth) as st:
        req = P.Request.make("127.0.0.1", 40000, "127.0.0.1", 22,
                             timestamp_ms=int(time.time() * 1000) - 3600_000)
        a = C.query("127.0.0.1", st.port, None, None, auth=auth, request=req)
        assert a.outcome == C.REFUSED


def test_hostile_connections_do_not_hurt_server():
    auth = HmacAuth(KEY)
    with ServerThread(auth, first_byte_timeout=0.3, request_timeout=1.0, connection_timeout=1.5) as st:
        assert _raw_exchange(st.port, b"GET / HTTP/1.0\r\n\r\n") == b""
        hdr = P.HEADER.pack(P.MAGIC, P.VERSION, P.TYPE_REQUEST, P.AUTH_HMAC, 0, 65535, 65535)
        assert _raw_exchange(st.port, hdr + b"x" * 100000) == b""
        assert _raw_exchange(st.port, os.urandom(5000)) == b""
        frame = wire.seal_request(P.Request.make("127.0.0.1", 1, "127.0.0.1", 2), auth)[0]
        assert _raw_exchange(st.port, frame[:-3]) == b""  # truncated, then EOF
        # silent: connect and send nothing -> the kernel keeps it from us (TCP_DEFER_ACCEPT,
        # ~1 s), then it is reset at FirstByteTimeout
        with socket.create_connection(("127.0.0.1", st.port)) as s:
            s.settimeout(5)
            t = time.monotonic()
            with pytest.raises(ConnectionResetError):
                s.recv(10)
            assert 0.25 < time.monotonic() - t < 3.0
        # slow loris: partial frame, no EOF -> closed at RequestTimeout
        with socket.create_connection(("127.0.0.1", st.port)) as s:
            s.sendall(frame[:20])
            s.settimeout(3)
            t = time.monotonic()
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - t < 2
        # a reply frame sent as request
        rep = wire.seal_reply(P.Reply(P.STATUS_FOUND, os.urandom(16), 1, 0, "x"), auth)
        assert _raw_exchange(st.port, rep) == b""
        # trickle: a byte every 0.15 s; the whole request is due within RequestTimeout (1 s,
        # up to +50 % jitter, capped by ConnectionTimeout 1.5 s), seen by the next sweep
        # (0.1 s) and by our next send (<= 0.15 s later)
        with socket.create_connection(("127.0.0.1", st.port)) as s:
            t = time.monotonic()
            closed = False
            for b in frame[:40]:
                try:
                    s.sendall(bytes([b]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.15)
            assert closed and 0.9 < time.monotonic() - t < 1.5 + 0.1 + 0.15 + 0.1
        assert _q(st.port, auth).outcome == C.UNKNOWN
        assert st.srv.stats["protocol-errors"] >= 3 and st.srv.stats["request-timeouts"] >= 2
        assert st.srv.stats["first-byte-timeouts"] == 1
        end = time.monotonic() + 2        # the counter moves just after the reply is sent
        while "answered=1" not in st.srv.stats_line() and time.monotonic() < end:
            time.sleep(0.01)
        line = st.srv.stats_line()
        assert "answers-unknown=1" in line and "answered=1" in line and "dropped=1" in line, line


def test_connection_cap_reclaims_pending_connections():
    """At MaxConnections a new connection takes the place of the oldest connection that has
    not sent its request; it is refused only when every slot holds a complete request."""
    auth = HmacAuth(KEY)
    with ServerThread(auth, max_connections=2, request_timeout=5, connection_timeout=5,
                      first_byte_timeout=5) as st:
        idle = [socket.create_connection(("127.0.0.1", st.port)) for _ in range(2)]
        try:
            for s in idle:              # half-sent (silent ones are kept in the kernel first)
                s.sendall(b"CLID")
            time.sleep(0.2)
            assert _q(st.port, auth, timeout=2).outcome == C.UNKNOWN
            assert st.srv.stats["reclaimed"] == 1 and st.srv.stats["over-capacity"] == 0
            with pytest.raises(ConnectionResetError):   # the oldest idle one was reset
                idle[0].recv(1)
        finally:
            for s in idle:
                s.close()


def test_replay_cache_bounded():
    """A full table evicts and raises its floor: no request seen is ever accepted again,
    a newer fresh one is."""
    rc = ReplayCache(window_ms=60000, max_entries=16)
    now = 1_000_000
    for i in range(200):
        assert rc.check_and_add(i.to_bytes(16, "little"), now + i, now_ms=now + 200) is None
    assert os.fstat(rc.fd).st_size < 4096                    # bounded: 16 slots
    for i in range(200):
        assert rc.check_and_add(i.to_bytes(16, "little"), now + i, now_ms=now + 200) in \
            ("replayed", "stale-timestamp")
    assert rc.check_and_add(b"n" * 16, now + 201, now_ms=now + 201) is None
    assert rc.check_and_add(b"o" * 16, now - 70000, now_ms=now) == "stale-timestamp"
    rc.close()


def test_replay_cache_shared_between_processes():
    """A nonce recorded through one process's mapping is refused through another's."""
    rc = ReplayCache(window_ms=60000)
    rc.share()
    nonce, ts = os.urandom(16), int(time.time() * 1000)
    code = ("import sys; from daemon.replay import ReplayCache; "
            "rc = ReplayCache(60000, fd=int(sys.argv[1])); "
            "print(rc.check_and_add(bytes.fromhex(sys.argv[2]), int(sys.argv[3])))")
    out = subprocess.run([PY, "-c", code, str(rc.fd), nonce.hex(), str(ts)], pass_fds=[rc.fd],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "None", out.stderr
    assert rc.check_and_add(nonce, ts) == "replayed"
    rc.close()


def test_rate_limiter_table_bounded():
    rl = TokenBuckets(1, 1, max_keys=100)
    for i in range(1000):
        rl.allow(f"10.0.{i // 256}.{i % 256}", now=0.0)
    assert len(rl._t) == 100
    assert rl.allow("x", now=0.0) and not rl.allow("x", now=0.1) and rl.allow("x", now=1.2)


# ---------------------------------------------------------------------------------------------
# config, keys, CLI


def test_config_parse_and_errors():
    c = parse_config("Port=7000 AuthType=HMAC\nKeyFile=/k # comment\nLogUnknownHolder=no\n"
                     "ListenAddresses=127.0.0.1,::1\nPamOnlyKey=1\n", "t.conf")
    assert (c.port, c.auth_type, c.key_file, c.log_unknown_holder) == (7000, "hmac", "/k", False)
    assert c.listen_addresses == ["127.0.0.1", "::1"]
    assert c.unknown_keys == ["t.conf:5: PamOnlyKey"]
    with pytest.raises(ConfigError, match=r"t.conf:2: bad value for Port"):
        parse_config("\nPort=99999\n", "t.conf")
    with pytest.raises(ConfigError, match="AuthType"):
        parse_config("AuthType=none\n", "t.conf")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config("Prot=1\n", "t.conf", strict=True)
    assert Config().port == 6820


def test_key_file_checks(tmp_path):
    p = tmp_path / "k"
    from daemon.auth import write_key
    write_key(str(p))
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert len(load_key(str(p), require_root_owner=False)) == 32
    with pytest.raises(FileExistsError):
        write_key(str(p))
    os.chmod(p, 0o644)
    with pytest.raises(AuthError, match="mode 0644"):
        load_key(str(p), require_root_owner=False)
    os.chmod(p, 0o600)
    p.write_text("abcd\n")
    with pytest.raises(AuthError, match="need >= 32"):
        load_key(str(p), require_root_owner=False)
    with pytest.raises(AuthError, match="no such|No such"):
        load_key(str(tmp_path / "missing"))


def _cli(*args, **kw):
    return subprocess.run([PY, "-m", "daemon.cli", *args], capture_output=True, text=True,
                          cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30, **kw)


def test_cli_keygen_and_daemon_config_errors(tmp_path):
    key = tmp_path / "callerid.key"
    r = _cli("keygen", "-o", str(key))
    assert r.returncode == 0 and stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert _cli("keygen", "-o", str(key)).returncode == 1
    conf = tmp_path / "c.conf"
    conf.write_text("Port=abc\n")
    r = _cli("daemon", "--config", str(conf))
    assert r.returncode == 64 and "Port" in r.stderr and "c.conf:1" in r.stderr
    os.chmod(key, 0o640)
    conf.write_text(f"AuthType=hmac\nKeyFile={key}\n")
    r = _cli("daemon", "--config", str(conf))
    assert r.returncode == 65 and "mode 0640" in r.stderr
    conf.write_text("AuthType=munge\nMungeSocket=/nonexistent/sock\n")
    r = _cli("daemon", "--config", str(conf))
    assert r.returncode == 65 and "munge" in r.stderr
    r = _cli("daemon", "--config", str(tmp_path / "missing.conf"))
    assert r.returncode == 64 and "missing.conf" in r.stderr
    r = _cli("query", "--config", str(conf), "h", "1.2.3.4", "1.2.3.5:22")
    assert r.returncode in (64, 6)


def test_cli_query_exit_codes(tmp_path):
    key = tmp_path / "k"
    from daemon.auth import write_key
    write_key(str(key))
    conf = tmp_path / "c.conf"
    conf.write_text(f"AuthType=hmac\nKeyFile={key}\n")
    auth = HmacAuth.from_file(str(key), require_root_owner=False)
    with ServerThread(auth) as st:
        r = _cli("query", "--config", str(conf), "--port", str(st.port), "127.0.0.1",
                 "127.0.0.1:40000", "127.0.0.1:22")
        assert r.returncode == 1 and r.stdout.startswith("unknown"), r.stdout + r.stderr
    r = _cli("query", "--config", str(conf), "--port", str(st.port), "127.0.0.1",
             "127.0.0.1:40000", "127.0.0.1:22")
    assert r.returncode == 3 and r.stdout.startswith("unreachable")
    r = _cli("query", "--config", str(conf), "127.0.0.1", "fd00::1:22", "127.0.0.1:22")
    assert r.returncode == 64


def test_client_import_is_light():
    code = ("import sys, daemon.client; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('cffi', 'asyncio', 'pyroute2', 'psutil', 'hmac')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([PY, "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# What a caller-ID query needs (isolated, no site): none of these heavy stdlib modules may
# come with it (the `callerid query` command starts fast).
LOGIN_PATH = ("daemon.client", "daemon.config", "daemon.auth", "daemon.wire", "daemon.protocol")
HEAVY = ("dataclasses", "enum", "socket", "selectors", "ipaddress", "re", "inspect", "typing",
         "json", "hmac", "hashlib", "_hashlib", "threading", "ast", "collections", "functools",
         "importlib", "weakref", "cffi", "asyncio", "logging")


def test_login_path_imports_are_light():
    code = ("import sys; sys.path.insert(0, %r); before = set(sys.modules); "
            "[__import__(m) for m in %r]; "
            "from daemon import client, protocol as P; from daemon.auth import HmacAuth; "
            "a = client.query('127.0.0.1', 1, '127.0.0.1:40000', '127.0.0.1:22', "
            "auth=HmacAuth(bytes(32)), timeout=0.5); "
            "assert a.outcome == client.UNREACHABLE, a; "
            "P.Reply.decode_body(P.Reply(P.STATUS_UNKNOWN, bytes(16)).encode_body()); "
            "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in %r); "
            "print(bad); sys.exit(1 if bad else 0)") % (str(ROOT), LOGIN_PATH, HEAVY)
    r = subprocess.run([PY, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_config_from_parsed_entries_matches_file(tmp_path):
    """The PAM module hands the daemon client its already parsed callerid.conf: same Config."""
    from cgroups.conf import load_conf
    from daemon.config import config_from_entries, load_config
    p = tmp_path / "callerid.conf"
    p.write_text("# shared file\nPort=6999 AuthType=hmac\nKeyFile=/x/key  # comment\n"
                 "ReplyUser=root\nPamSpoolDir=/var/spool/slurmd\nQueryTimeout=0.5\n")
    a = load_config(str(p))
    b = config_from_entries(load_conf(str(p)).entries(), str(p))
    assert vars(a) == vars(b)
    assert b.port == 6999 and b.auth_type == "hmac" and b.query_timeout == 0.5


def test_pam_keys_are_part_of_the_one_schema():
    from daemon.config import ConfigError, parse_config
    cfg = parse_config("Port=6999\nPamSocket=/run/x/pam.sock\nPamWorkers=8\n"
                       "PamNegativeCacheTTL=0\nPamSpoolDir=/s\nPamCgroupPlugin=cgroup/V1\n",
                       "shared.conf")
    assert cfg.unknown_keys == []
    assert (cfg.pam_socket, cfg.pam_workers, cfg.pam_negative_cache_ttl, cfg.pam_spool_dir,
            cfg.pam_cgroup_plugin) == ("/run/x/pam.sock", 8, 0.0, "/s", "cgroup/v1")
    with pytest.raises(ConfigError, match="shared.conf:1: bad value for PamSocket"):
        parse_config("PamSocket=relative.sock\n", "shared.conf")
