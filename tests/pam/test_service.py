"""The PAM decision service itself (pam_callerid/service.py, login.py, settings.py, peer.py):
its socket, who may talk to it, hostile and broken requests, the pid it adopts, its caches,
its audit writer and its logs. Real sockets, a real service, the real C client through
pamtester where a login is needed, the synthetic Slurm node of fakes.py."""
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from fakes import FakeDaemon, FakeSlurm, pamtester_conn
from pamhelpers import outcome, pamtester, stack

pytestmark = pytest.mark.root

GOOD = b"callerid-pam 1\nphase=account\nservice=sshd\nuser=%s\narg=config=/nonexistent\n"


@pytest.fixture
def slurm(tmp_path):
    s = FakeSlurm(tmp_path)
    yield s
    s.cleanup()


def exchange(path, data, timeout=5):
    """One raw request from this process: the reply's bytes, or None when the service
    closed the connection without one."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.send(data)
        return s.recv(65536) or None
    finally:
        s.close()


def reply_of(data):
    from pam_callerid import wire
    return wire.parse_reply(data)


def records(svc, path):
    svc.flush()
    with open(path) as f:
        return [json.loads(x) for x in f]


def make(services, built_so, svc, slurm, audit, args="", port=1, ttl=0):
    return services.make(stack(built_so, "socket=%s config=%s audit=%s %s"
                               % (svc.socket, slurm.conf(port, ttl), audit, args)))


# ------------------------------------------------------------------ the socket
def test_socket_modes_and_directory(pam_service):
    st = os.lstat(pam_service.socket)
    assert oct(st.st_mode & 0o777) == oct(0o600) and st.st_uid == 0
    assert oct(os.stat(pam_service.dir).st_mode & 0o777) == oct(0o755)


def test_non_root_client_is_refused(pam_service, cid_user):
    probe = textwrap.dedent("""
        import socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        try:
            s.connect(sys.argv[1])
        except OSError as e:
            print("connect:", e.errno); sys.exit(0)
        try:
            s.send(sys.argv[2].encode())
            print("reply:", s.recv(65536))
        except OSError as e:
            print("io:", e.errno)
        """)
    run = ["setpriv", "--reuid=%d" % cid_user[1], "--regid=65534", "--clear-groups",
           sys.executable, "-c", probe, pam_service.socket, (GOOD % b"x").decode()]
    r = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith("connect: 13"), r.stdout + r.stderr    # EACCES: mode 0600
    os.chmod(pam_service.socket, 0o666)        # even when the file lets it connect ...
    r = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() in ("reply: b''", "io: 104", "io: 32"), r.stdout + r.stderr
    assert pam_service.service.refused == 1    # ... the service refuses it (SO_PEERCRED)
    assert pam_service.service.served == 0


def test_stale_socket_replaced_live_one_refused(tmp_path):
    from pam_callerid.service import ServiceError, bind_socket
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    path = str(d / "pam.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(path)
    stale.close()                                  # a socket file nobody listens on
    live = bind_socket(path)
    try:
        with pytest.raises(ServiceError, match="another PAM service is running"):
            bind_socket(path)
    finally:
        live.close()
    os.unlink(path)
    (d / "pam.sock").write_text("not a socket")
    with pytest.raises(ServiceError, match="not a socket"):
        bind_socket(path)
    os.unlink(path)
    os.chmod(d, 0o777)
    with pytest.raises(ServiceError, match="writable by no one else"):
        bind_socket(path)


# ------------------------------------------------------------------ hostile requests
BAD = {
    "truncated": GOOD[:-1] % b"root",
    "cut short": (GOOD % b"root")[:30],
    "oversized": GOOD % b"root" + b"arg=" + b"x" * 1000 + b"\n" + b"arg=y\n" * 3000,
    "pid smuggled": GOOD % b"root" + b"pid=1\n",
    "not utf-8": b"callerid-pam 1\nphase=account\nservice=sshd\nuser=\xff\n",
    "NUL": b"callerid-pam 1\nphase=account\nservice=sshd\nuser=a\0b\n",
    "wrong version": b"callerid-pam 2\n",
    "binary noise": os.urandom(200),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_requests_get_system_err_and_service_goes_on(pam_service, name):
    rep = reply_of(exchange(pam_service.socket, BAD[name]))
    assert rep.rc == "system_err"
    assert pam_service.service.malformed == 1
    # the service still answers a good request
    rep = reply_of(exchange(pam_service.socket, GOOD % b"cidt-no-such-user"))
    assert rep.rc == "session_err"               # unknown user, as pam_slurm_adopt


def test_module_of_another_version_is_logged_once_per_version(pam_service, caplog):
    """A module older or newer than the daemon (an upgrade replaced only one of them) is
    named once per version in the log; the logins go on; a request without module= (a
    tool's) is not logged."""
    from daemon.version import VERSION
    caplog.set_level(logging.WARNING, logger="callerid.pam")
    base = GOOD % b"cidt-no-such-user"
    for module in (VERSION, "0.0.9", "0.0.9", None, "9.9", None, VERSION):
        data = base if module is None else base + b"module=%s\n" % module.encode()
        assert reply_of(exchange(pam_service.socket, data)).rc == "session_err"
    said = [r.getMessage() for r in caplog.records if "event=pam-module-version" in r.getMessage()]
    assert [m.split()[1] for m in said] == ["module=0.0.9", "module=9.9"], said
    assert all(f"daemon={VERSION}" in m for m in said)


def test_client_that_sends_nothing_does_not_block_others(pam_service):
    pam_service.service.recv_timeout = 1.0
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    for s in silent:
        s.connect(pam_service.socket)
    try:
        t0 = time.monotonic()
        rep = reply_of(exchange(pam_service.socket, GOOD % b"cidt-no-such-user"))
        assert rep.rc == "session_err" and time.monotonic() - t0 < 0.5
        silent[0].settimeout(5)
        assert silent[0].recv(100) == b""          # dropped after recv_timeout, no reply
    finally:
        for s in silent:
            s.close()


def test_internal_error_gets_the_generic_failure_action(pam_service):
    def boom(*a, **k):
        raise RuntimeError("injected")
    pam_service.logins.handle = boom
    for act, rc in (("deny", "perm_denied"), ("allow", "success"), ("ignore", "ignore")):
        req = GOOD % b"x" + b"arg=action_generic_failure=" + act.encode() + b"\n"
        assert reply_of(exchange(pam_service.socket, req)).rc == rc
    req = (GOOD % b"x").replace(b"phase=account", b"phase=session") + \
        b"arg=action_generic_failure=deny\n"
    assert reply_of(exchange(pam_service.socket, req)).rc == "session_err"


# ------------------------------------------------------------------ the pid adopted
SWAP = textwrap.dedent("""
    import os, socket, sys, time
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    if os.fork() == 0:                      # the child sends, after its parent is gone
        time.sleep(0.3)
        print(os.getpid(), flush=True)
        s.send(sys.argv[2].encode())
        print(s.recv(65536).decode().replace("\\n", "|"), flush=True)
        os._exit(0)
    os._exit(0)                             # the connecting process exits at once
    """)


@pytest.mark.parametrize("peerpidfd", [True, False], ids=["SO_PEERPIDFD", "pidfd_open"])
def test_pid_of_a_gone_connector_is_never_adopted(slurm, cid_user, tmp_path, peerpidfd):
    from conftest import RunningService
    svc = RunningService(use_peerpidfd=peerpidfd)
    try:
        slurm.add_job(cid_user[1], 81)
        audit = tmp_path / "a.jsonl"
        req = ("callerid-pam 1\nphase=session\nservice=sshd\nuser=%s\narg=config=%s\n"
               "arg=audit=%s\n" % (cid_user[0], slurm.conf(1), audit))
        p = subprocess.Popen([sys.executable, "-c", SWAP, svc.socket, req],
                             stdout=subprocess.PIPE, text=True)
        p.wait(10)                                  # reap the connector: its pid is free
        out = p.stdout.read().splitlines()
        child = int(out[0])
        if len(out) == 1:
            # pidfd_open only: the service accepted after the connector had exited, found the
            # pid gone and closed without a decision (the child's send hit EPIPE) -- the other
            # correct outcome of this race. Nothing may have been adopted either way.
            assert not peerpidfd
            assert slurm.procs(cid_user[1], 81) == []
            assert svc.service.refused == 1
            return
        assert "rc=success" in out[1]               # action_adopt_failure=allow (default)
        rec = records(svc, audit)[-1]
        assert (rec["path"], rec["reason"], rec["adopted_pid"]) == \
            ("single", "adopt-failure-allow", None)
        assert rec["pid"] not in (child, None)
        assert slurm.procs(cid_user[1], 81) == []   # neither the child nor a recycled pid
        assert any("exited before its adoption" in t for t in svc.syslog.texts())
    finally:
        svc.stop()


# ------------------------------------------------------------------ caches
def test_job_started_just_before_the_login_is_found(services, built_so, pam_service, slurm,
                                                     cid_user, tmp_path):
    audit = tmp_path / "a.jsonl"
    svc = make(services, built_so, pam_service, slurm, audit)
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "denied", out            # no job yet; settings now cached
    loads = pam_service.logins.settings.loads
    slurm.add_job(cid_user[1], 91)                  # the job starts ...
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")   # ... the very next login
    assert rc == 0, out
    assert records(pam_service, audit)[-1]["job"] == 91
    assert pam_service.logins.settings.loads == loads    # found without re-reading files


def test_settings_reloaded_when_a_file_changes(services, built_so, pam_service, slurm,
                                               cid_user, tmp_path):
    audit = tmp_path / "a.jsonl"
    conf = slurm.conf(1)
    svc = services.make(stack(built_so, "socket=%s config=%s audit=%s"
                              % (pam_service.socket, conf, audit)))
    pamtester(svc, cid_user[0], "acct_mgmt")
    pamtester(svc, cid_user[0], "acct_mgmt")
    loads = pam_service.logins.settings.loads
    with open(conf, "a") as f:
        f.write("NodeName=othernode\n")           # now the node is not found
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert pam_service.logins.settings.loads == loads + 1
    assert records(pam_service, audit)[-1]["node"] == "othernode"


def test_decision_reused_only_for_the_same_login(services, built_so, pam_service, slurm,
                                                 cid_user, tmp_path):
    old = slurm.add_job(cid_user[1], 95)
    slurm.add_job(cid_user[1], 96)
    d = FakeDaemon(slurm.key)
    try:
        d.mode = ("found", old, cid_user[1])
        audit = tmp_path / "a.jsonl"
        svc = make(services, built_so, pam_service, slurm, audit, port=d.port)
        for _ in range(2):                          # two logins (two TCP connections)
            rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt", "open_session")
            assert rc == 0, out
        assert len(d.requests) == 2                 # one query per login, not per phase
        recs = records(pam_service, audit)
        assert [r.get("reused", False) for r in recs] == [False, True, False, True]
        said = pam_service.syslog.texts()           # the decision is logged once per login,
        assert sum("member of job %d" % old in t for t in said) == 2     # the adoption too:
        assert sum("adopted into job %d" % old in t for t in said) == 2  # session finds it
        assert [r["how"] for r in recs][1::2] == ["already", "already"]  # in place already
    finally:
        d.close()


def test_timeout_after_connect_is_not_negative_cached(services, built_so, pam_service, slurm,
                                                      cid_user, tmp_path):
    slurm.add_job(cid_user[1], 97), slurm.add_job(cid_user[1], 98)
    d = FakeDaemon(slurm.key)
    try:
        d.mode = ("silent", 1.0)
        audit = tmp_path / "a.jsonl"
        svc = make(services, built_so, pam_service, slurm, audit, "rpc_timeout=0.2",
                   port=d.port, ttl=60)
        for _ in range(2):
            rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
            assert rc == 0, out
        assert [r["callerid"]["status"] for r in records(pam_service, audit)] == \
            ["timeout", "timeout"]                  # asked both times: a daemon is there
    finally:
        d.close()


def test_one_slow_source_does_not_delay_other_logins(services, built_so, pam_service, slurm,
                                                     cid_user, tmp_path):
    slurm.add_job(cid_user[1], 99), slurm.add_job(cid_user[1], 100)
    d = FakeDaemon(slurm.key)
    try:
        d.mode = ("silent", 3.0)
        audit = tmp_path / "a.jsonl"
        svc = make(services, built_so, pam_service, slurm, audit, "rpc_timeout=2",
                   port=d.port)
        slow = threading.Thread(target=pamtester_conn, args=(svc, cid_user[0], "acct_mgmt"))
        slow.start()
        time.sleep(0.3)                              # the slow login waits for its source
        t0 = time.monotonic()
        rc, out = pamtester(svc, "cidt-no-such-user", "acct_mgmt")
        fast = time.monotonic() - t0
        slow.join()
        assert "Cannot make/remove" in out or outcome(out) != "success"
        assert fast < 1.0, fast
    finally:
        d.close()


# ------------------------------------------------------------------ policy facts
def test_not_a_compute_node_says_so(services, built_so, pam_service, slurm, cid_user,
                                    tmp_path):
    (slurm.tmp / "slurm.conf").write_text("SlurmdSpoolDir=%s\nNodeName=node[1-3]\n"
                                          % slurm.spool)
    audit = tmp_path / "a.jsonl"
    svc = make(services, built_so, pam_service, slurm, audit, "action_generic_failure=deny")
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "denied", out
    assert "Access denied by pam_callerid: this host (cidnode) is not a compute node in " \
           "slurm.conf" in out
    assert "no active jobs" not in out
    assert records(pam_service, audit)[-1]["path"] == "not-a-node"


def test_allow_groups_exempt_and_audited(services, built_so, pam_service, slurm, cid_user,
                                         tmp_path):
    audit = tmp_path / "a.jsonl"
    svc = make(services, built_so, pam_service, slurm, audit,
               "allow_groups=wheel,%s" % cid_user[0])       # useradd made the user's group
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "ignore", out
    rec = records(pam_service, audit)[-1]
    assert (rec["path"], rec["reason"], rec["adopted_pid"]) == \
        ("exempt", "allow_groups=%s" % cid_user[0], None)


@pytest.mark.parametrize("act,expect", [("ignore", "ignore"), ("allow", "success"),
                                        ("deny", "denied")])
def test_generic_failure_actions(services, built_so, pam_service, cid_user, tmp_path, act,
                                 expect):
    """A configuration that cannot be read is a generic failure."""
    audit = tmp_path / "a.jsonl"
    svc = services.make(stack(built_so, "socket=%s config=/nonexistent/callerid.conf "
                                        "action_generic_failure=%s audit=%s"
                              % (pam_service.socket, act, audit)))
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == expect, out
    assert "No Slurm jobs found on node." in out
    rec = records(pam_service, audit)[-1]
    assert rec["path"] == "failure" and rec["user"] == cid_user[0] and rec["uid"] == cid_user[1]
    assert any("/nonexistent/callerid.conf" in t for t in pam_service.syslog.texts())


def test_planted_fifo_at_config_is_refused_at_once(services, built_so, pam_service, cid_user,
                                                   tmp_path):
    fifo = tmp_path / "callerid.conf"
    os.mkfifo(fifo)
    svc = services.make(stack(built_so, "socket=%s config=%s action_generic_failure=deny "
                                        "audit=none" % (pam_service.socket, fifo)))
    t0 = time.monotonic()
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "denied" and time.monotonic() - t0 < 1.5, out
    assert any("not a regular file" in t for t in pam_service.syslog.texts())


def test_argument_problems_logged_once(services, built_so, pam_service, slurm, cid_user,
                                       tmp_path):
    audit = tmp_path / "a.jsonl"
    svc = make(services, built_so, pam_service, slurm, audit, "frobnicate=1")
    for _ in range(3):
        pamtester(svc, cid_user[0], "acct_mgmt")
    said = [t for t in pam_service.syslog.texts() if "frobnicate" in t]
    assert said == ["ignoring unrecognized option 'frobnicate=1'"]


# ------------------------------------------------------------------ audit
def test_audit_order_and_no_interleaving_under_concurrent_logins(services, built_so,
                                                                 pam_service, slurm, cid_user,
                                                                 tmp_path):
    slurm.add_job(cid_user[1], 101)
    audit = tmp_path / "a.jsonl"
    svc = make(services, built_so, pam_service, slurm, audit, "messages=always")
    procs = [subprocess.Popen(["pamtester", svc, cid_user[0]] + ["acct_mgmt"] * 10,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(8)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    recs = records(pam_service, audit)              # an interleaved line would not parse
    assert len(recs) == 80
    by_pid = {}
    for r in recs:
        by_pid.setdefault(r["pid"], []).append(r["ts"])
    assert sorted(by_pid) == sorted(p.pid for p in procs)
    assert all(ts == sorted(ts) and len(ts) == 10 for ts in by_pid.values())


@pytest.mark.parametrize("plant", ["fifo", "symlink"])
def test_audit_path_planted_login_not_delayed_error_logged(services, built_so, pam_service,
                                                           slurm, cid_user, tmp_path, plant):
    slurm.add_job(cid_user[1], 102)
    audit = tmp_path / "a.jsonl"
    target = tmp_path / "elsewhere"
    if plant == "fifo":
        os.mkfifo(audit)
    else:
        audit.symlink_to(target)
    svc = make(services, built_so, pam_service, slurm, audit)
    t0 = time.monotonic()
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert rc == 0 and time.monotonic() - t0 < 1.5, out
    pam_service.flush()
    assert not target.exists()
    assert len(pam_service.daemon_log) == 1
    assert str(audit) in pam_service.daemon_log[0][1]


# ------------------------------------------------------------------ syslog
def test_syslog_lines_authpriv_ident(tmp_path):
    from pam_callerid.logsink import SyslogSink
    path = str(tmp_path / "log")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(2)
    try:
        sink = SyslogSink(path)
        sink("error", "bad\nthing", 3)
        sink("debug", "hidden", 3)              # above log_level=info
        sink("info", "shown", 3)
        a, b = rx.recv(4096).decode(), rx.recv(4096).decode()
        assert a.startswith("<83>") and " pam_callerid[%d]: bad thing" % os.getpid() in a
        assert b.startswith("<86>") and b.endswith("shown")
        sink.close()
    finally:
        rx.close()
    sink = SyslogSink(str(tmp_path / "nothing"))
    sink("error", "dropped")                    # no syslog: dropped, never an exception
    assert sink.dropped == 1


def test_many_cycles_in_one_process(services, built_so, pam_service, slurm, cid_user,
                                    tmp_path):
    """Many account calls on one PAM handle in one process: one decision each."""
    slurm.add_job(cid_user[1], 103)
    audit = tmp_path / "a.jsonl"
    svc = make(services, built_so, pam_service, slurm, audit)
    rc, out = pamtester(svc, cid_user[0], *(["acct_mgmt"] * 20))
    assert rc == 0 and out.count("account management done") == 20, out
    recs = records(pam_service, audit)
    assert len(recs) == 20 and len({r["pid"] for r in recs}) == 1
    assert all(r["adopted_pid"] == r["pid"] for r in recs)


def test_authenticate_and_setcred_are_ignored(services, built_so, pam_service, cid_user):
    svc = services.make(["auth [success=done ignore=ignore default=die] %s socket=%s"
                         % (built_so, pam_service.socket), "auth required pam_deny.so",
                         "account required pam_permit.so"])
    rc, out = pamtester(svc, cid_user[0], "setcred")
    assert "Authentication failure" in out or "Failure setting user credentials" in out, out
    assert pam_service.service.served == 0
