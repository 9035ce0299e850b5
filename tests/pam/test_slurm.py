"""Every policy branch through real libpam (pamtester) against the built module, with a
synthetic Slurm node (spool dir with extern stepd sockets + a cgroup/v1 freezer tree under a
unique test root; cpuset only to provoke an adoption failure; never memory) and a fake
caller-ID daemon speaking the project's authenticated protocol (HMAC) on 127.0.0.1.

pamtester gets a connected TCP socket (as sshd's [priv] has) so that the module finds the
connection 4-tuple with getpeername/getsockname and asks the fake daemon.
"""
import json
import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from pamhelpers import outcome, pamtester, stack

pytestmark = pytest.mark.root

NODE = "cidnode"
FREEZER = "/sys/fs/cgroup/freezer"
CPUSET = "/sys/fs/cgroup/cpuset"


class FakeSlurm:
    def __init__(self, tmp):
        self.tmp = tmp
        self.root = "/cidtest-" + uuid.uuid4().hex[:10]
        self.spool = tmp / "spool"
        self.spool.mkdir()
        self.socks = []
        self.dirs = []
        (tmp / "slurm.conf").write_text("SlurmdSpoolDir=%s\n" % self.spool)
        (tmp / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        self.key = tmp / "callerid.key"
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(32).hex().encode())
        os.close(fd)
        self._mk(FREEZER + self.root + "/slurm_" + NODE)

    def _mk(self, path):
        parts = path.split("/")
        for i in range(4, len(parts) + 1):
            p = "/".join(parts[:i])
            if not os.path.isdir(p):
                os.mkdir(p)
                self.dirs.append(p)

    def conf(self, port, ttl=0, extra=""):
        p = self.tmp / ("callerid-%d-%s.conf" % (port, uuid.uuid4().hex[:6]))
        p.write_text("PamSlurmConf=%s\nPamCgroupConf=%s\nPamCgroupRoot=%s\nNodeName=%s\n"
                     "AuthType=hmac\nKeyFile=%s\nPort=%d\nPamNegativeCacheTTL=%d\n%s"
                     % (self.tmp / "slurm.conf", self.tmp / "cgroup.conf", self.root, NODE,
                        self.key, port, ttl, extra))
        return str(p)

    def add_job(self, uid, job, cpuset=False):
        self._mk("%s%s/slurm_%s/uid_%d/job_%d/step_extern" % (FREEZER, self.root, NODE, uid, job))
        if cpuset:        # a cpuset cgroup without cpus: writing a pid into it fails
            self._mk("%s%s/slurm_%s/uid_%d/job_%d/step_extern" % (CPUSET, self.root, NODE, uid,
                                                                 job))
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.spool / ("%s_%d.4294967292" % (NODE, job))))
        s.close()
        time.sleep(0.02)                      # distinct ctimes: later job = newer
        return job

    def procs(self, uid, job):
        with open("%s%s/slurm_%s/uid_%d/job_%d/step_extern/cgroup.procs"
                  % (FREEZER, self.root, NODE, uid, job)) as f:
            return f.read().split()

    def cleanup(self):
        for d in sorted(self.dirs, key=len, reverse=True):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)       # a pamtester we started is still exiting


@pytest.fixture
def slurm(tmp_path):
    s = FakeSlurm(tmp_path)
    yield s
    s.cleanup()


class FakeDaemon:
    """Answers caller-ID requests on 127.0.0.1 as told by ``mode``."""

    def __init__(self, key_path, host="127.0.0.1", port=0):
        from daemon.auth import HmacAuth
        self.auth = HmacAuth.from_file(str(key_path))
        self.mode = ("unknown",)
        self.requests = []
        self.lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.lsock.bind((host, port))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        from daemon import protocol as P, wire
        from daemon.auth import HmacAuth
        while not self.stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                dec = P.FrameDecoder(max_frames=1)
                frames = []
                try:
                    while not frames:
                        data = c.recv(65536)
                        if not data:
                            break
                        frames = dec.feed(data)
                except OSError:
                    continue
                if not frames:
                    continue
                req, uid = wire.open_request(frames[0], self.auth)
                self.requests.append(req)
                kind = self.mode[0]
                if kind == "silent":
                    time.sleep(self.mode[1])
                    continue
                auth, nonce = self.auth, req.nonce
                if kind == "found":
                    rep = P.Reply(P.STATUS_FOUND, nonce, self.mode[1], self.mode[2], "cidsrc")
                elif kind == "forged":
                    auth = HmacAuth(os.urandom(32))
                    rep = P.Reply(P.STATUS_FOUND, nonce, self.mode[1], self.mode[2], "cidsrc")
                elif kind == "wrongnonce":
                    rep = P.Reply(P.STATUS_FOUND, os.urandom(len(nonce)), self.mode[1],
                                  self.mode[2], "cidsrc")
                else:
                    rep = P.Reply(P.STATUS_UNKNOWN, nonce)
                try:
                    c.sendall(wire.seal_reply(rep, auth))
                except OSError:
                    pass

    def close(self):
        self.stop = True
        self.lsock.close()


@pytest.fixture
def fake_daemon(slurm):
    d = FakeDaemon(slurm.key)
    yield d
    d.close()


def pamtester_conn(service, user, *ops, timeout=30, listen="127.0.0.1", connect=None):
    """pamtester holding the server side of a TCP connection (like sshd's [priv])."""
    lst = socket.socket(socket.AF_INET6 if ":" in listen else socket.AF_INET)
    if ":" in listen:
        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # dual-stack
    lst.bind((listen, 0))
    lst.listen(1)
    cli = socket.create_connection((connect or listen, lst.getsockname()[1]))
    srv, _ = lst.accept()
    try:
        t0 = time.monotonic()
        r = subprocess.run(["pamtester", "-v", service, user] + list(ops),
                           pass_fds=(srv.fileno(),), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        return r.returncode, r.stdout, time.monotonic() - t0, cli.getsockname(), \
            lst.getsockname()
    finally:
        for s in (srv, cli, lst):
            s.close()


def audit_of(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


@pytest.fixture
def env(built_so, services, slurm, cid_user, tmp_path):
    """Make a service: env(args, port=...) -> (service name, audit path)."""
    def make(args="", port=1, ttl=0):
        audit = tmp_path / ("audit-%s.jsonl" % uuid.uuid4().hex[:6])
        svc = services.make(stack(built_so, "config=%s audit=%s %s"
                                  % (slurm.conf(port, ttl), audit, args)))
        return svc, str(audit)
    return make


# ------------------------------------------------------------------ no jobs / single job
def test_no_jobs_denied_with_message(env, cid_user):
    svc, audit = env()
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "denied", out
    assert "Access denied by pam_callerid: you have no active jobs on this node" in out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["result"], rec["jobs"], rec["node"]) == \
        ("no-jobs", "PAM_PERM_DENIED", [], NODE)


def test_no_jobs_ignore(env, cid_user):
    svc, audit = env("action_no_jobs=ignore")
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "ignore", out


def test_other_users_job_is_not_mine(env, slurm, cid_user):
    slurm.add_job(cid_user[1] + 1000, 70)
    svc, audit = env()
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "denied", out


def test_single_job_adopted_without_rpc(env, slurm, cid_user, fake_daemon):
    slurm.add_job(cid_user[1], 41)
    svc, audit = env(port=fake_daemon.port)
    rc, out, el, _, _ = pamtester_conn(svc, cid_user[0], "acct_mgmt", "open_session")
    assert rc == 0, out
    assert "pam_callerid: adopted into job 41" in out
    acc, ses = audit_of(audit)
    assert (acc["path"], acc["job"], acc["result"]) == ("single", 41, "PAM_SUCCESS")
    assert acc["adopted_pid"] == acc["pid"]          # pamtester itself was moved (verified)
    assert (ses["phase"], ses["job"], ses["adopted_pid"], ses["stashed_from_pid"]) == \
        ("session", 41, ses["pid"], acc["pid"])
    assert "callerid" not in acc and fake_daemon.requests == []


def test_single_job_quiet(env, slurm, cid_user):
    slurm.add_job(cid_user[1], 42)
    svc, audit = env("quiet")
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert rc == 0 and "adopted into" not in out, out


def test_single_job_rpc_when_skip_disabled(env, slurm, cid_user, fake_daemon):
    slurm.add_job(cid_user[1], 43)
    fake_daemon.mode = ("found", 43, cid_user[1])
    svc, audit = env("single_job_skip_rpc=0", port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"]) == ("caller-ID", 43)


def test_session_only_decides_again(env, slurm, cid_user):
    """keyboard-interactive: account ran in another process; open_session decides again."""
    slurm.add_job(cid_user[1], 44)
    svc, audit = env()
    rc, out = pamtester(svc, cid_user[0], "open_session")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["phase"], rec["redecided"], rec["job"], rec["adopted_pid"]) == \
        ("session", True, 44, rec["pid"])


# ------------------------------------------------------------------ several jobs
@pytest.fixture
def two_jobs(slurm, cid_user):
    old = slurm.add_job(cid_user[1], 51)
    new = slurm.add_job(cid_user[1], 52)
    return old, new


def test_callerid_answer_adopts_that_job(env, two_jobs, cid_user, fake_daemon):
    old, new = two_jobs
    fake_daemon.mode = ("found", old, cid_user[1])
    svc, audit = env(port=fake_daemon.port)
    rc, out, el, cli, srv = pamtester_conn(svc, cid_user[0], "acct_mgmt", "open_session")
    assert rc == 0, out
    acc = audit_of(audit)[0]
    assert (acc["path"], acc["job"], acc["jobs"]) == ("caller-ID", old, [new, old])
    assert acc["callerid"]["authenticated"] is True
    # the daemon was asked about exactly this connection, from the client's side
    req = fake_daemon.requests[-1]
    assert (str(req.src), req.src_port, str(req.dst), req.dst_port) == \
        (cli[0], cli[1], srv[0], srv[1])
    assert (acc["src_ip"], acc["src_port"], acc["dst_port"]) == (cli[0], cli[1], srv[1])


@pytest.mark.parametrize("mode", ["other-user", "not-on-node", "forged", "wrongnonce",
                                  "unknown"])
def test_untrusted_or_useless_answers_fall_back_to_newest(env, two_jobs, cid_user,
                                                          fake_daemon, mode):
    old, new = two_jobs
    fake_daemon.mode = {"other-user": ("found", old, cid_user[1] + 1),
                        "not-on-node": ("found", 999, cid_user[1]),
                        "forged": ("forged", old, cid_user[1]),
                        "wrongnonce": ("wrongnonce", old, cid_user[1]),
                        "unknown": ("unknown",)}[mode]
    svc, audit = env(port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"]) == ("newest", new), rec
    if mode in ("forged", "wrongnonce"):
        assert rec["callerid"]["status"] == "error" and not rec["callerid"]["authenticated"]


def test_ipv6_connection(env, two_jobs, cid_user, slurm):
    old, new = two_jobs
    d = FakeDaemon(slurm.key, host="::1")
    try:
        d.mode = ("found", old, cid_user[1])
        svc, audit = env(port=d.port)
        rc, out, el, cli, srv = pamtester_conn(svc, cid_user[0], "acct_mgmt", listen="::1")
        assert rc == 0, out
        rec = audit_of(audit)[-1]
        assert (rec["path"], rec["job"], rec["src_ip"]) == ("caller-ID", old, "::1")
        assert str(d.requests[-1].src) == "::1" and d.requests[-1].src_port == cli[1]
    finally:
        d.close()


def test_ipv4_mapped_connection_is_normalised(env, two_jobs, cid_user, fake_daemon):
    """sshd on a dual-stack socket sees ::ffff:127.0.0.1; the daemon is asked in IPv4."""
    old, new = two_jobs
    fake_daemon.mode = ("found", old, cid_user[1])
    svc, audit = env(port=fake_daemon.port)
    rc, out, el, cli, srv = pamtester_conn(svc, cid_user[0], "acct_mgmt", listen="::",
                                           connect="127.0.0.1")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"], rec["src_ip"]) == ("caller-ID", old, "127.0.0.1")
    assert str(fake_daemon.requests[-1].src) == "127.0.0.1"


def test_no_connection_newest(env, two_jobs, cid_user):
    old, new = two_jobs
    svc, audit = env()
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert rc == 0 and "newest" in out, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"], rec["callerid"]["status"]) == \
        ("newest", new, "no-connection")


def test_action_unknown_deny(env, two_jobs, cid_user, fake_daemon):
    svc, audit = env("action_unknown=deny", port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "denied", out
    assert "Access denied by pam_callerid: unable to determine source job" in out


def test_action_unknown_allow(env, two_jobs, cid_user, fake_daemon):
    svc, audit = env("action_unknown=allow", port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt", "open_session")
    assert rc == 0, out
    acc = audit_of(audit)[-1]
    assert (acc["path"], acc["job"], acc["adopted_pid"]) == ("allow", None, None)


def test_action_unknown_user(env, two_jobs, cid_user, fake_daemon):
    svc, audit = env("action_unknown=user", port=fake_daemon.port)
    rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert rc == 0, out
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["target"], rec["adopted_pid"]) == ("user", "user", rec["pid"])


def test_silent_daemon_bounded_by_rpc_timeout(env, two_jobs, cid_user, fake_daemon):
    old, new = two_jobs
    fake_daemon.mode = ("silent", 3)
    svc, audit = env("rpc_timeout=0.3", port=fake_daemon.port)
    rc, out, el, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
    assert rc == 0, out
    assert el < 1.5, el
    rec = audit_of(audit)[-1]
    assert (rec["path"], rec["job"], rec["callerid"]["status"]) == ("newest", new, "timeout")


def test_no_daemon_negative_cache(env, two_jobs, cid_user):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                       # nothing listens there: connection refused
    svc, audit = env(port=port, ttl=30)
    for _ in range(2):
        rc, out, *_ = pamtester_conn(svc, cid_user[0], "acct_mgmt")
        assert rc == 0, out
    first, second = audit_of(audit)
    assert first["callerid"]["status"] == "unreachable"
    assert second["callerid"]["status"] == "cached"
    assert second["path"] == "newest"


# ------------------------------------------------------------------ adoption failure
@pytest.mark.parametrize("act,expect", [("allow", "success"), ("deny", "denied")])
def test_adoption_failure(env, slurm, cid_user, act, expect):
    slurm.add_job(cid_user[1], 61, cpuset=True)
    svc, audit = env("action_adopt_failure=" + act)
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == expect, out
    rec = audit_of(audit)[-1]
    assert rec["adopted_pid"] is None and rec["path"] == "single"
    if act == "deny":
        assert "Access denied by pam_callerid: adoption failure" in out
        assert rec["result"] == "PAM_PERM_DENIED"
