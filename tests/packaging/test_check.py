"""`callerid check` against each broken piece, without the cluster (tests/packaging/
test_package_cluster.py runs it against a healthy test-bed node and the installed package).

Real sockets, a real munged-less MungeSocket, real files; the PAM decision socket is served by
small fakes here (a root one that answers, a non-root one, a silent one)."""
import os
import socket
import threading
import time

import pytest

from pam_callerid import check as C
from pam_callerid import wire

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (file owners, setuid)")


@pytest.fixture
def d(tmp_path):
    os.chmod(tmp_path, 0o755)
    return tmp_path


def conf(d, text):
    p = d / "callerid.conf"
    p.write_text(text)
    return str(p)


def by_name(results):
    return {r.name: r for r in results}


# ---------------------------------------------------------------- files planted at the paths
def test_fifo_symlink_and_foreign_config_fail_without_blocking(d):
    real = d / "real.conf"
    real.write_text("Port=6820\n")
    for make, why in ((lambda p: os.mkfifo(p), "a FIFO"),
                      (lambda p: os.symlink(real, p), "a symbolic link"),
                      (lambda p: (p.write_text("Port=1\n"), os.chown(p, 65534, 0)), "uid 65534"),
                      (lambda p: (p.write_text("Port=1\n"), os.chmod(p, 0o666)), "every user")):
        p = d / "callerid.conf"
        make(p)
        t0 = time.monotonic()
        res, cfg = C.check_config(str(p))
        assert time.monotonic() - t0 < 1
        assert res.status == C.FAIL and why in res.detail and cfg is None, res
        p.unlink()


def test_broken_config_names_file_line_and_key(d):
    res, cfg = C.check_config(conf(d, "Port=6820\nAuthType=kerberos\n"))
    assert res.status == C.FAIL and "callerid.conf:2" in res.detail and "AuthType" in res.detail


def test_unknown_key_is_a_warning(d):
    res, cfg = C.check_config(conf(d, "Port=6820\nNoSuchKey=1\n"))
    assert res.status == C.WARN and "NoSuchKey" in res.detail and cfg.port == 6820


def test_no_config_file_means_defaults_with_a_warning(d, monkeypatch):
    monkeypatch.setenv("CALLERID_CONF", str(d / "absent.conf"))
    res, cfg = C.check_config(None)
    assert res.status == C.WARN and "absent.conf" in res.detail and cfg is not None


def test_whole_run_skips_what_a_broken_config_makes_meaningless(d, capsys):
    rc = C.main(["--config", conf(d, "Port=0\n"), "--audit-dir", str(d)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL  config" in out and "skip  daemon" in out and "1 problem:" in out


# ---------------------------------------------------------------- auth
def test_munge_down_is_reported(d):
    from daemon.config import parse_config
    cfg = parse_config(f"AuthType=munge\nMungeSocket={d}/no-munged.socket\n")
    res, auth = C.check_auth(cfg)
    assert res.status == C.FAIL and "munge round trip failed" in res.detail and auth is None


def test_hmac_key_must_be_roots_and_private(d):
    from daemon.auth import write_key
    from daemon.client import auth_from_config
    from daemon.config import parse_config
    key = d / "callerid.key"
    cfg = parse_config(f"AuthType=hmac\nKeyFile={key}\n")
    assert C.check_auth(cfg)[0].status == C.FAIL                     # missing
    write_key(str(key))
    res, auth = C.check_auth(cfg)
    assert res.status == C.OK and auth is not None
    os.chown(key, 65534, 0)
    res, auth = C.check_auth(cfg)
    assert res.status == C.FAIL and "uid 65534" in res.detail


# ---------------------------------------------------------------- the daemons
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_daemon_down_and_node_unreachable(d):
    from daemon.auth import write_key
    from daemon.client import auth_from_config
    from daemon.config import parse_config
    key = d / "callerid.key"
    write_key(str(key))
    port = free_port()
    cfg = parse_config(f"AuthType=hmac\nKeyFile={key}\nPort={port}\n")
    auth = auth_from_config(cfg)
    res = C.check_daemon(cfg, auth, 0.5)
    assert res.status == C.FAIL and "no answer" in res.detail and f"127.0.0.1:{port}" in res.detail
    t0 = time.monotonic()
    res = C.check_nodes(cfg, auth, {"node1": "127.0.0.1", "node2": "::1"}, 0.5)
    assert time.monotonic() - t0 < 3
    assert [r.name for r in res] == ["node node1", "node node2"]
    assert all(r.status == C.FAIL for r in res) and "[::1]" in res[1].detail


def serve_pam(path, reply: bytes | None, uid=0, mode=0o600):
    """A fake decision service in a child process (so it can run as another uid)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind(str(path))
            os.chmod(path, mode)
            if uid:
                os.setuid(uid)
            s.listen(4)
            os.write(w, b"x")
            while True:
                c, _ = s.accept()
                c.recv(20000)
                if reply is not None:
                    c.send(reply)
                else:
                    time.sleep(30)
                c.close()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid


@pytest.fixture
def pam_server(d):
    pids = []

    def start(*a, **kw):
        pids.append(serve_pam(d / "pam.sock", *a, **kw))
        return d / "pam.sock"
    yield start
    for pid in pids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def pam_cfg(path):
    from daemon.config import parse_config
    return parse_config(f"PamSocket={path}\n")


def test_pam_socket_healthy(pam_server):
    path = pam_server(wire.encode_reply(wire.Reply(rc="ignore")))
    res = C.check_pam_socket(pam_cfg(path), 1.0)
    assert res.status == C.OK and "rc=ignore" in res.detail, res


@pytest.mark.parametrize("kind", ["missing", "not-root-server", "world-writable", "silent",
                                  "garbage", "regular-file"])
def test_pam_socket_broken(d, pam_server, kind):
    path = d / "pam.sock"
    good = wire.encode_reply(wire.Reply(rc="ignore"))
    if kind == "not-root-server":
        pam_server(good, uid=65534)
    elif kind == "world-writable":
        pam_server(good, mode=0o666)
    elif kind == "silent":
        pam_server(None)
    elif kind == "garbage":
        pam_server(b"hello\n")
    elif kind == "regular-file":
        path.write_text("")
    t0 = time.monotonic()
    res = C.check_pam_socket(pam_cfg(path), 0.5)
    assert time.monotonic() - t0 < 2
    assert res.status == C.FAIL, res
    expect = {"missing": "does not exist", "not-root-server": "not root",
              "world-writable": "writable by every user", "silent": "no reply", "garbage": "malformed",
              "regular-file": "not a socket"}[kind]
    assert expect in res.detail, res


# ---------------------------------------------------------------- the audit directory
def test_audit_directory(d):
    a = d / "audit"
    assert C.check_audit(str(a)).status == C.FAIL                      # missing
    a.mkdir(mode=0o750)
    assert C.check_audit(str(a)).status == C.OK
    os.chown(a, 64030, 64030)                                           # e.g. the slurm account
    assert "uid 64030" in C.check_audit(str(a)).detail
    os.chown(a, 0, 0)
    os.mkfifo(a / "audit.jsonl")
    res = C.check_audit(str(a))
    assert res.status == C.FAIL and "FIFO" in res.detail


# ---------------------------------------------------------------- the installed module
def test_installed_module_and_its_version(d):
    """The module in the PAM directory: missing, planted or writable by others fails; one
    of another version, or with no version in it, is a warning naming both versions."""
    from pam_callerid.build import build
    pam = d / "security"
    pam.mkdir(mode=0o755)
    so = pam / "pam_callerid.so"
    res = C.check_module("1.2.3", str(pam))
    assert res.status == C.FAIL and "does not exist" in res.detail, res
    build(str(pam), version="1.2.3")
    res = C.check_module("1.2.3", str(pam))
    assert res.status == C.OK and res.detail == f"{so}: version 1.2.3", res
    res = C.check_module("1.2.4", str(pam))
    assert res.status == C.WARN and "version 1.2.3, the daemon's is 1.2.4" in res.detail, res
    os.chmod(so, 0o666)
    res = C.check_module("1.2.3", str(pam))
    assert res.status == C.FAIL and "writable by every user" in res.detail, res
    so.unlink()
    so.write_bytes(b"\x7fELF" + os.urandom(4096))
    res = C.check_module("1.2.3", str(pam))
    assert res.status == C.WARN and "version unknown" in res.detail, res
    so.unlink()
    os.mkfifo(so)
    t0 = time.monotonic()
    res = C.check_module("1.2.3", str(pam))
    assert res.status == C.FAIL and "FIFO" in res.detail and time.monotonic() - t0 < 1, res
