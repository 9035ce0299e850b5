"""The real daemon (`python -m daemon.cli daemon`, munge) on loopback under hostile load that
stops by itself: junk holding the connection cap, a user's flood from the PAM module's own
address, and SIGHUP reloads while connections are in flight.  The question asked is always
about a connection held by a process in a (synthetic) Slurm job, so a right answer is
"found" with that job."""
import base64
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from daemon import client as C
from daemon import protocol as P
from daemon import wire
from daemon.auth import HmacAuth, load_key, write_key
from daemon.config import parse_config

from .conftest import NOBODY, PY
from .test_netns import HELPER, _readline, _wait_log

pytestmark = pytest.mark.root

HOSTILE = str(Path(__file__).with_name("hostile.py"))
JOB = 5151


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Daemon:
    def __init__(self, procs, dir, conf_text):
        self.procs = procs
        self.dir = Path(dir)
        self.port = _free_port()
        self.conf = self.dir / f"callerid-{self.port}.conf"
        self.log = str(self.dir / f"daemon-{self.port}.log")
        self.write(conf_text)

    def write(self, conf_text):
        self.conf.write_text(f"Port={self.port}\nListenAddresses=127.0.0.1\nNodeName=hostile\n"
                             + conf_text)
        os.chmod(self.conf, 0o644)

    def start(self):
        with open(self.log, "wb") as lf:
            self.proc = self.procs.start([PY, "-m", "daemon.cli", "daemon", "--config", str(self.conf)],
                                         stdout=subprocess.DEVNULL, stderr=lf)
        _wait_log(self.log, "event=listening", proc=self.proc)
        return self

    def text(self):
        return Path(self.log).read_text()

    def stop_stats(self) -> dict:
        self.proc.terminate()
        assert self.proc.wait(10) == 0
        line = [l for l in self.text().splitlines() if "event=stopped" in l][-1]
        fields = (f.split("=", 1) for f in line.split("event=stopped", 1)[1].split())
        return {k: int(v) for k, v in fields if v.isdigit()}


@pytest.fixture(scope="module")
def target(jobcg, mprocs):
    """A process in job 5151 holding a loopback TCP connection: (src, dst) as the peer asks."""
    port = _free_port()
    lst = mprocs.start([PY, HELPER, "listen", str(port)])
    _readline(lst, "READY")
    holder = mprocs.start([PY, HELPER, "hold", "tcp", "127.0.0.1", str(port)])
    _, ip, lport = _readline(holder, "LOCAL")
    jobcg.add(jobcg.make(JOB), holder.pid)
    return f"{ip}:{lport}", f"127.0.0.1:{port}"


@pytest.fixture
def munge_daemon(munged, jobcg, procs, tmp_root_dir):
    def make(extra=""):
        return Daemon(procs, tmp_root_dir, f"AuthType=munge\nMungeSocket={munged.socket}\n"
                      f"CgroupRoots={jobcg.root}\n{extra}").start()
    return make


def _run(procs, argv, user=None, timeout=60):
    pre = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    return procs.start(pre + [PY, HOSTILE, *argv], stderr=subprocess.PIPE)


def _result(p, timeout=60):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


def _ask(procs, d, target, rate, seconds, user=None, srcs=("127.0.0.1",)):
    argv = ["ask", "--port", str(d.port), "--config", str(d.conf), "--target", ",".join(target),
            "--rate", str(rate), "--seconds", str(seconds), "--job", str(JOB)]
    for s in srcs:
        argv += ["--src", s]
    return _run(procs, argv, user=user)


def _p(lat, q):
    lat = sorted(lat)
    return lat[min(len(lat) - 1, int(len(lat) * q))]


def test_cap_held_by_junk_root_query_answered(munge_daemon, target, procs):
    """Three hosts keep 300 connections each open (idle or half-sent, re-opened at once when
    reset) against MaxConnections=200; root's queries are all answered, none cacheable."""
    d = munge_daemon("MaxConnections=200\n")
    junk = [_run(procs, ["hold", "--src", f"127.0.1.{i}", "--port", str(d.port), "--count", "300",
                         "--seconds", "6"]) for i in (1, 2, 3)]
    time.sleep(1.5)                                   # the cap is full of junk by now
    legit = _result(_ask(procs, d, target, rate=25, seconds=3))
    held = [_result(j) for j in junk]
    stats = d.stop_stats()
    assert legit["outcomes"] == {"found": 75} and legit["wrong_job"] == 0, legit
    assert legit["cacheable"] == 0 and max(legit["lat"]) < 1000, legit
    assert stats["reclaimed"] > 100 and stats.get("over-capacity", 0) == 0, stats
    assert sum(h["reset"] for h in held) > 100, held


def test_user_flood_does_not_change_root_answers(munge_daemon, target, procs):
    """A user floods from the PAM module's own address (same host) with valid munge
    credentials; the user gets 'busy' (per-uid limit), root's answers do not change."""
    d = munge_daemon("RateLimit=20\nRateBurst=20\n")
    flood = _ask(procs, d, target, rate=300, seconds=4, user=NOBODY)
    time.sleep(0.5)
    legit = _result(_ask(procs, d, target, rate=25, seconds=3))
    flooded = _result(flood)
    stats = d.stop_stats()
    assert legit["outcomes"] == {"found": 75} and legit["cacheable"] == 0, legit
    assert _p(legit["lat"], 0.99) < 500, legit
    assert flooded["outcomes"].get("busy", 0) > 500, flooded       # limited by uid, not address
    # what got through the limit (burst 20 + 20/s over ~4.5 s) is refused: not nobody's job
    assert 20 <= flooded["outcomes"].get("refused", 0) <= 115, flooded
    assert flooded["cacheable"] == 0
    assert stats["rate-limited"] == flooded["outcomes"]["busy"], stats


def test_sighup_reloads_config_and_key_keeping_connections(procs, tmp_root_dir, jobcg, target):
    key = str(tmp_root_dir / "k1")
    write_key(key)
    d = Daemon(procs, tmp_root_dir, f"AuthType=hmac\nKeyFile={key}\nCgroupRoots={jobcg.root}\n"
               "RequestTimeout=10\n").start()
    k1 = HmacAuth(load_key(key))
    src, dst = target

    def ask(auth):
        return C.query("127.0.0.1", d.port, src, dst, auth=auth, timeout=3)
    assert ask(k1).job_id == JOB
    # a request in flight: half of it sent before the reload, the rest after
    req = P.Request.make(*C.parse_endpoint(src), *C.parse_endpoint(dst))
    frame = wire.seal_request(req, k1)[0]
    s = socket.create_connection(("127.0.0.1", d.port))
    s.sendall(frame[:30])
    d.write(f"AuthType=hmac\nKeyFile={key}\nCgroupRoots={jobcg.root}\nRequestTimeout=10\n"
            "LogLevel=debug\nRateLimit=7\n")
    d.proc.send_signal(signal.SIGHUP)
    _wait_log(d.log, "event=reloaded", proc=d.proc)
    assert "rate_limit=7.0" in d.text()
    s.sendall(frame[30:])
    s.settimeout(3)
    reply = wire.open_reply(P.decode_frame(s.recv(4096)), k1, req.nonce)
    s.close()
    assert reply.status == P.STATUS_FOUND and reply.job_id == JOB
    assert "event=answer" in d.text()                 # LogLevel=debug took effect
    # a new key: the old one no longer works, the new one does; same process
    os.unlink(key)
    write_key(key)
    k2 = HmacAuth(load_key(key))
    d.proc.send_signal(signal.SIGHUP)
    end = time.monotonic() + 5
    while d.text().count("event=reloaded") < 2 and time.monotonic() < end:
        time.sleep(0.05)
    assert ask(k2).job_id == JOB
    assert ask(k1).outcome == C.INVALID
    # a broken file: the reload fails, the daemon keeps serving with what it had
    d.write("Port=notanumber\n")
    d.proc.send_signal(signal.SIGHUP)
    _wait_log(d.log, "event=reload-failed", proc=d.proc)
    assert ask(k2).job_id == JOB and d.proc.poll() is None
    stats = d.stop_stats()
    assert stats["reloads"] == 2 and stats["reload-failures"] == 1


def _exchange(port, frame):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(frame)
        dec = P.FrameDecoder()
        while True:
            data = s.recv(P.MAX_FRAME)
            assert data, "closed without a reply"
            got = dec.feed(data)
            if got:
                return got[0]


def test_munge_reply_key_answer_replay_and_forgery(munged, munge_daemon, target):
    """A munge request carrying a reply key is answered with that key (one munge decode on
    the daemon, no encode); the same credential again is refused by munged's replay check,
    and that refusal, which the daemon cannot sign with the key, comes with its own munge
    signature and is accepted as a refusal; an answer signed with any other key is not."""
    from daemon.auth import MungeAuth, ReplyKey
    d = munge_daemon()
    req = P.Request.make(*C.parse_endpoint(target[0]), *C.parse_endpoint(target[1]))
    frame, reply_auth = wire.seal_request(req, MungeAuth(munged.socket, reply_uid=0))
    assert P.decode_frame(frame).auth == P.AUTH_MUNGE_KEY and isinstance(reply_auth, ReplyKey)
    first = _exchange(d.port, frame)
    assert first.auth == P.AUTH_MUNGE_KEY
    reply = wire.open_reply(first, reply_auth, req.nonce)
    assert (reply.status, reply.job_id) == (P.STATUS_FOUND, JOB)
    again = _exchange(d.port, frame)
    assert again.auth == P.AUTH_MUNGE
    assert wire.open_reply(again, reply_auth, req.nonce).status == P.STATUS_REFUSED
    assert "reason=replayed" in d.text()
    with pytest.raises(wire.ReplyRejected, match="bad-auth"):
        wire.open_reply(first, ReplyKey(os.urandom(32), 0), req.nonce)
    # the client's own query path, default settings: keyed, answered right
    cfg_auth = C.auth_from_config(parse_config(f"MungeSocket={munged.socket}\n"))
    assert cfg_auth.request_scheme == P.AUTH_MUNGE_KEY
    assert C.query("127.0.0.1", d.port, *target, auth=cfg_auth, timeout=3).job_id == JOB


def test_munge_session_ticket_reuse_replay_and_restart(munged, munge_daemon, target, tmp_root_dir):
    """The keyed answer carries a session ticket, which the client keeps for that daemon:
    its next query sends the ticket, not a credential (it works with the client's munged
    gone), and is answered with the ticket's key; the same ticketed request again is refused
    by the nonce cache.  A restarted daemon (a new secret) refuses the ticket with its munge
    signature, and the client asks again with munge within the same query."""
    from daemon.auth import SessionKey
    d = munge_daemon()
    link = tmp_root_dir / "client-munge.socket"            # the client's munged, while it is there
    link.symlink_to(munged.socket)
    auth = C.auth_from_config(parse_config(f"MungeSocket={link}\n"))
    peer = ("127.0.0.1", d.port)
    assert C.query(*peer, *target, auth=auth, timeout=3).job_id == JOB
    assert isinstance(auth.sealer(peer), SessionKey)
    link.unlink()
    assert C.query(*peer, *target, auth=auth, timeout=3).job_id == JOB      # no munge here
    req = P.Request.make(*C.parse_endpoint(target[0]), *C.parse_endpoint(target[1]))
    frame, session = wire.seal_request(req, auth, peer)
    answer = _exchange(d.port, frame)
    assert answer.auth == P.AUTH_MUNGE_SESSION
    assert wire.open_reply(answer, session, req.nonce).job_id == JOB
    again = _exchange(d.port, frame)
    assert wire.open_reply(again, session, req.nonce).status == P.STATUS_REFUSED
    assert "event=security-replayed" in d.text()
    old = auth.sealer(peer).ticket
    d.proc.terminate()
    assert d.proc.wait(10) == 0
    d.start()
    link.symlink_to(munged.socket)
    ans = C.query(*peer, *target, auth=auth, timeout=3)
    assert ans.job_id == JOB, ans
    assert "event=session-refused peer=127.0.0.1 reason=bad-ticket" in d.text()
    assert "security-auth-failure" not in d.text()
    assert auth.sealer(peer).ticket != old                  # the new instance's ticket
    stats = d.stop_stats()
    assert stats["sessions-refused"] == 1 and stats.get("auth-failures", 0) == 0, stats


def test_munge_sessions_off(munged, munge_daemon, target):
    """MungeSessionLifetime=0: keyed answers carry no ticket; every query is munge."""
    d = munge_daemon("MungeSessionLifetime=0\n")
    auth = C.auth_from_config(parse_config(f"MungeSocket={munged.socket}\n"))
    peer = ("127.0.0.1", d.port)
    for _ in range(2):
        assert C.query(*peer, *target, auth=auth, timeout=3).job_id == JOB
        assert auth.sealer(peer) is auth


def test_munge_reply_key_readable_only_by_the_daemons_uid(munged, procs):
    """The reply key travels inside the credential, encrypted; munged decodes it only for
    the uid the client names (root is the daemon here): another user cannot read it."""
    from daemon.auth import MungeAuth
    req = P.Request.make("127.0.0.1", 40000, "127.0.0.1", 22)
    frame, reply_auth = wire.seal_request(req, MungeAuth(munged.socket, reply_uid=0))
    cred = P.decode_frame(frame).auth_blob
    payload, uid = MungeAuth(munged.socket)._decode(cred)
    assert uid == 0 and payload.endswith(reply_auth.key)
    assert reply_auth.key not in base64.b64decode(cred.split(b":")[1])      # encrypted
    frame, _ = wire.seal_request(req, MungeAuth(munged.socket, reply_uid=0))
    code = ("import sys; from daemon.auth import MungeAuth, AuthError\n"
            f"try: MungeAuth({munged.socket!r})._decode(bytes.fromhex(sys.argv[1]))\n"
            "except AuthError as e: print(e.reason)")
    p = procs.start(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                     PY, "-c", code, P.decode_frame(frame).auth_blob.hex()])
    out, err = p.communicate(timeout=30)
    assert out.decode().strip() == "unauthorized", err.decode()
