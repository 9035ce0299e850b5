"""The C client pam_callerid.so (pam_callerid/pam_callerid.c) through real libpam (pamtester)
against a forged daemon (forged_daemon.py, a hostile peer): the checks made before any I/O,
the bounds of the exchange, the server check, strict reply parsing, and what a reply does
(PAM code, messages, environment, mount namespace).  No cluster needed."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from daemon.version import VERSION
from forged_daemon import ForgedDaemon
from pamhelpers import USER_PREFIX, _need_root

pytestmark = pytest.mark.root

OK = "callerid-pam 1\nrc=success\n"
MAX_MSG = 16384
ERRORS = {"Permission denied": "perm_denied",
          "Cannot make/remove an entry for the specified session": "session_err",
          "System error": "system_err", "Authentication failure": "auth_err"}


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture(scope="module")
def so(tmp_path_factory):
    _need_root()
    from pam_callerid.build import build
    d = tmp_path_factory.mktemp("client")
    os.chmod(d, 0o755)
    return build(str(d))


@pytest.fixture
def sockdir():
    """A directory for the forged daemon's socket that any uid may use (the non-root
    daemon binds there too)."""
    d = tempfile.mkdtemp(prefix="cic-sock-", dir="/tmp")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def client_stack(so, args, phases=("account", "session"), service="service={service}"):
    """Our module's result visible through pamtester: SUCCESS -> success without the
    marker, IGNORE -> success with 'cid-ignored' printed, an error -> that error."""
    lines = []
    for ph in phases:
        lines += ["%s [success=done ignore=ignore default=die] %s %s %s"
                  % (ph, so, service, args),
                  "%s optional pam_echo.so cid-ignored" % ph,
                  "%s required pam_permit.so" % ph]
    return lines


class Run:
    def __init__(self, rc, out, elapsed, pid):
        self.rc, self.out, self.elapsed, self.pid = rc, out, elapsed, pid

    @property
    def outcome(self):
        if self.rc == 0:
            return "ignore" if "cid-ignored" in self.out else "success"
        last = [ln for ln in self.out.splitlines() if ln.startswith("pamtester: ")][-1]
        for text, word in ERRORS.items():
            if text in last:
                return word
        return last


def pamtester(service, user, *ops, items=(), pam_env=(), pass_fds=(), timeout=30,
              prefix=()):
    cmd = list(prefix) + ["pamtester", "-v"]
    for k, v in items:
        cmd += ["-I", "%s=%s" % (k, v)]
    for k, v in pam_env:
        cmd += ["-E", "%s=%s" % (k, v)]
    cmd += [service, user] + list(ops)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, pass_fds=pass_fds,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return Run(p.returncode, out.decode("utf-8", "replace"), time.monotonic() - t0, p.pid)


def svc_for(services, so, sock, args="", phases=("account", "session")):
    return services.make(client_stack(so, "socket=%s %s" % (sock, args), phases))


def baseline(svc, user):
    """pamtester's own time on the fast failure path (no daemon): the least of 3."""
    return min(pamtester(svc, user, "acct_mgmt").elapsed for _ in range(3))


def lines(record):
    return record["request"].split("\n")


# ------------------------------------------------------------------ the built module

def test_exports_links_and_imports(so):
    out = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True,
                         check=True).stdout
    assert sorted(ln.split()[-1] for ln in out.splitlines() if ln.strip()) == sorted(
        ["pam_sm_acct_mgmt", "pam_sm_authenticate", "pam_sm_close_session",
         "pam_sm_open_session", "pam_sm_setcred"])
    dyn = subprocess.run(["readelf", "-d", so], capture_output=True, text=True,
                         check=True).stdout
    assert sorted(re.findall(r"\(NEEDED\).*\[(.*)\]", dyn)) == ["libc.so.6", "libpam.so.0"]
    assert "RPATH" not in dyn and "RUNPATH" not in dyn
    undef = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True,
                           text=True, check=True).stdout
    names = {ln.split()[-1].split("@")[0] for ln in undef.splitlines() if ln.strip()}
    forbidden = {n for n in names if n.startswith(("pthread_", "Py", "dl", "f", "printf",
                                                   "sscanf", "popen", "system", "signal",
                                                   "sigaction", "fork"))}
    assert forbidden <= {"free", "fstat"}, forbidden
    assert {"setns", "recvmsg", "poll", "pam_syslog"} <= names


def test_version_is_built_in(so, tmp_path):
    """The version goes into the module (sent with each request, read by callerid check);
    the packages build it with theirs; a version that is not one is refused."""
    from pam_callerid.build import BuildError, build
    from pam_callerid.check import module_version
    with open(so, "rb") as f:
        assert module_version(f.read()) == VERSION
    other = build(str(tmp_path), version="9.8.7+site1")
    with open(other, "rb") as f:
        assert module_version(f.read()) == "9.8.7+site1"
    for bad in ("", "1.0\"", "1.0 -DX", "1/0"):
        with pytest.raises(BuildError, match="bad version"):
            build(str(tmp_path), version=bad)


def test_build_cli(tmp_path):
    _need_root()
    from pam_callerid.build import pam_module_dir
    py = [sys.executable, "-m", "pam_callerid.build"]
    r = subprocess.run(py + ["--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert oct((tmp_path / "o" / "pam_callerid.so").stat().st_mode & 0o777) == oct(0o644)
    r = subprocess.run(py + ["--install", "--install-dir", str(tmp_path / "sec")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert oct((tmp_path / "sec" / "pam_callerid.so").stat().st_mode & 0o777) == oct(0o644)
    assert not list(tmp_path.glob("sec/*.tmp*"))
    r = subprocess.run(py, capture_output=True, text=True)
    assert r.returncode != 0 and "--out" in r.stderr
    r = subprocess.run(py + ["--out", str(tmp_path / "x")], capture_output=True, text=True,
                       env={**os.environ, "CC": "/nonexistent/cc"})
    assert r.returncode == 1 and "/nonexistent/cc not found" in r.stderr
    assert os.path.isfile(os.path.join(pam_module_dir(), "pam_unix.so"))


# ------------------------------------------------------------------ before any I/O

def test_root_is_ignored_without_any_io(so, services, sockdir, tmp_path):
    """Root gets PAM_IGNORE before the module touches anything: no socket (only libpam's
    own audit netlink), no connect, no /proc/self/fd, no user database."""
    trace = tmp_path / "trace"
    with ForgedDaemon(sockdir, ["callerid-pam 1\nrc=perm_denied\n"]) as d:
        svc = svc_for(services, so, d.path, "action_generic_failure=deny")
        r = pamtester(svc, "root", "acct_mgmt", "open_session",
                      prefix=["strace", "-f", "-qq", "-o", str(trace), "-e",
                              "trace=socket,connect,openat,open,sendto,sendmsg"])
        assert r.rc == 0 and r.out.count("cid-ignored") == 2, r.out
        assert d.records() == []
    calls = trace.read_text()
    sockets = re.findall(r"socket\((.*?)\)", calls)
    assert sockets and all(s.startswith("AF_NETLINK") for s in sockets), calls
    assert "connect(" not in calls and "sendmsg(" not in calls
    assert "/proc/self/fd" not in calls and "passwd" not in calls and "nsswitch" not in calls


def test_uid0_alias_is_ignored(so, services, sockdir):
    name = USER_PREFIX + "0" + uuid.uuid4().hex[:7]
    subprocess.run(["useradd", "-o", "-u", "0", "-g", "0", "-M", "-d", "/nonexistent",
                    "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        with ForgedDaemon(sockdir, ["callerid-pam 1\nrc=perm_denied\n"]) as d:
            svc = svc_for(services, so, d.path, "action_generic_failure=deny")
            r = pamtester(svc, name, "acct_mgmt", "open_session")
            assert r.rc == 0 and r.out.count("cid-ignored") == 2, r.out
            assert d.records() == []
    finally:
        subprocess.run(["userdel", "-f", name], capture_output=True)


@pytest.mark.parametrize("args,asks", [
    ("", False),                              # default: sshd only
    ("service=", False),                      # empty: ignored, sshd stays (options.py)
    ("service={service} service=sshd", False),   # the last one wins
    ("service={service}", True),
    ("service={service} service=", True),     # empty: ignored, the earlier one stays
    ("SERVICE=*", True),                      # every service; names case-insensitive
    ("Service={service}x", False),            # services compare exactly
])
def test_service_filter(so, services, sockdir, cid_user, args, asks):
    with ForgedDaemon(sockdir, [OK]) as d:
        svc = services.make(client_stack(so, "socket=%s action_generic_failure=deny" % d.path,
                                         ("account",), service=args))
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        assert r.outcome == ("success" if asks else "ignore"), r.out
        assert len(d.records()) == (1 if asks else 0)


# ------------------------------------------------------------------ the request

def test_request_lines(so, services, sockdir, cid_user):
    with ForgedDaemon(sockdir, [OK]) as d:
        svc = svc_for(services, so, d.path, "action_no_jobs=ignore Quiet")
        r = pamtester(svc, cid_user[0], "acct_mgmt(PAM_SILENT)", "open_session",
                      items=[("rhost", "10.1.2.3"), ("tty", "ssh")],
                      pam_env=[("SSH_CONNECTION", "10.1.2.3 5555 10.9.9.9 22")])
        assert r.outcome == "success", r.out
        recs = d.records()
    head = ["callerid-pam 1", "service=%s" % svc, "user=%s" % cid_user[0], "rhost=10.1.2.3",
            "tty=ssh", "ssh_connection=10.1.2.3 5555 10.9.9.9 22"]
    args = ["arg=service=%s" % svc, "arg=socket=%s" % d.path, "arg=action_no_jobs=ignore",
            "arg=Quiet", ""]
    module = "module=" + VERSION
    assert lines(recs[0]) == head[:1] + ["phase=account"] + head[1:] + ["silent=1", module] + args
    assert lines(recs[1]) == head[:1] + ["phase=session"] + head[1:] + [module] + args
    assert [rec["peer"][:2] for rec in recs] == [[r.pid, 0], [r.pid, 0]]


def test_item_with_newline_is_sent_empty(so, services, sockdir, cid_user):
    with ForgedDaemon(sockdir, [OK]) as d:
        svc = svc_for(services, so, d.path, phases=("account",))
        r = pamtester(svc, cid_user[0], "acct_mgmt", items=[("rhost", "a\nrc=success")],
                      pam_env=[("SSH_CONNECTION", "1.2.3.4 1 5.6.7.8 22\nx=1")])
        assert r.outcome == "success", r.out
        req = lines(d.records()[0])
    assert "rhost=" in req and not any(ln.startswith(("rc=", "x=", "ssh_connection"))
                                       for ln in req), req


DRIVER = r"""
#include <security/pam_appl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
static volatile sig_atomic_t ticks;
static void tick(int s) { (void)s; ticks++; }
static int conv(int n, const struct pam_message **m, struct pam_response **r, void *d)
{
    (void)m; (void)d;
    *r = calloc(n, sizeof **r);
    return *r ? PAM_SUCCESS : PAM_BUF_ERR;
}
static struct pam_conv pc = { conv, NULL };
/* drv MODULE SERVICE USER ARG...; with CID_EINTR_US=N, SIGALRM (a handler without
   SA_RESTART) every N us while the module runs */
int main(int argc, char **argv)
{
    pam_handle_t *h = NULL;
    void *m = dlopen(argv[1], RTLD_NOW);
    int (*acct)(pam_handle_t *, int, int, const char **);
    struct timespec t0, t1;
    struct itimerval it, off;
    struct sigaction sa;
    int rc;
    if (!m || argc < 4 || pam_start(argv[2], argv[3], &pc, &h) != PAM_SUCCESS)
        return 2;
    *(void **)&acct = dlsym(m, "pam_sm_acct_mgmt");
    memset(&off, 0, sizeof off);
    if (getenv("CID_EINTR_US")) {
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = tick;
        sigaction(SIGALRM, &sa, NULL);
        it.it_interval.tv_sec = it.it_value.tv_sec = 0;
        it.it_interval.tv_usec = it.it_value.tv_usec = atoi(getenv("CID_EINTR_US"));
        setitimer(ITIMER_REAL, &it, NULL);
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = acct(h, 0, argc - 4, (const char **)argv + 4);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    setitimer(ITIMER_REAL, &off, NULL);
    printf("rc=%d ms=%.1f ticks=%d\n", rc,
           (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6, (int)ticks);
    pam_end(h, rc);
    return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """Calls pam_sm_acct_mgmt with any argv (a PAM file cannot hold a newline), optionally
    under a storm of signals."""
    d = tmp_path_factory.mktemp("drv")
    (d / "drv.c").write_text(DRIVER)
    subprocess.run(["gcc", "-O2", "-o", str(d / "drv"), str(d / "drv.c"), "-lpam", "-ldl"],
                   check=True)
    exe = str(d / "drv")

    def run(so, svc, user, args, env=None):
        r = subprocess.run([exe, so, svc, user] + list(args), capture_output=True,
                           timeout=30, env=env)
        m = re.fullmatch(rb"rc=(\d+) ms=([\d.]+) ticks=(\d+)\n", r.stdout)
        assert m, r
        return int(m[1]), float(m[2]), int(m[3])
    return run


def test_argument_with_newline_or_bad_utf8_is_dropped(so, driver, services, sockdir,
                                                      cid_user):
    with ForgedDaemon(sockdir, [OK]) as d:
        svc = services.make(["account required pam_permit.so"])
        args = [b"service=*", b"socket=" + d.path.encode(), b"evil=a\nrc=success",
                b"bad=\xff", b"x=1"]
        assert driver(so, svc, cid_user[0], args)[0] == 0          # PAM_SUCCESS
        req = lines(d.records()[0])
    assert [ln for ln in req if ln.startswith("arg=")] == [
        "arg=service=*", "arg=socket=%s" % d.path, "arg=x=1"]


def test_request_too_long_is_a_generic_failure(so, driver, services, sockdir, cid_user):
    with ForgedDaemon(sockdir, [OK]) as d:
        svc = services.make(["account required pam_permit.so"])
        args = ["service=*", "socket=" + d.path, "action_generic_failure=deny",
                "x=" + "y" * MAX_MSG]
        assert driver(so, svc, cid_user[0], args)[0] == 6          # PAM_PERM_DENIED
        assert d.records() == []


def test_signals_do_not_stretch_or_break_the_deadline(so, driver, services, sockdir,
                                                      cid_user):
    """poll() interrupted every millisecond (EINTR): the wait still ends at the one
    deadline."""
    with ForgedDaemon(sockdir, [{"do": "hang"}]) as d:
        svc = services.make(["account required pam_permit.so"])
        rc, ms, ticks = driver(so, svc, cid_user[0],
                               ["service=*", "socket=" + d.path, "daemon_timeout=0.5",
                                "action_generic_failure=deny"],
                               env={"CID_EINTR_US": "1000"})
    assert rc == 6, rc                                   # PAM_PERM_DENIED
    assert 500 <= ms <= 600 and ticks > 50, (ms, ticks)


def test_wire_compatibility(so, services, sockdir, cid_user):
    """The daemon's side of the protocol (pam_callerid/wire.py) reads what this client
    sends, and this client accepts what wire.encode_reply produces."""
    from pam_callerid import wire
    reply = wire.encode_reply(wire.Reply("perm_denied", errors=("no\tjobs",), infos=("i",),
                                         env=("SLURM_JOB_ID=7",), setns="mnt",
                                         setns_fail="session_err"))
    a = tcp_pair(socket.AF_INET6, "::", socket.AF_INET, "127.0.0.1")
    conn = conn_of(a[1])
    try:
        with ForgedDaemon(sockdir, [{"reply": reply.decode(), "fds": ["ns:self"]}]) as d:
            svc = svc_for(services, so, d.path, "action_generic_failure=allow",
                          phases=("account",))
            r = pamtester(svc, cid_user[0], "acct_mgmt(PAM_SILENT)", pass_fds=[a[1].fileno()],
                          items=[("rhost", "::1"), ("tty", "ssh")],
                          pam_env=[("SSH_CONNECTION", "127.0.0.1 1 127.0.0.1 2")])
            assert r.outcome == "perm_denied" and "no jobs" in r.out, r.out
            req = wire.parse_request(d.records()[0]["request"].encode())
    finally:
        for s in a:
            s.close()
    assert (req.phase, req.service, req.user, req.rhost, req.tty, req.silent, req.module) == (
        "account", svc, cid_user[0], "::1", "ssh", True, VERSION)
    assert str(req.conn) == conn and req.conn.src_ip == "::ffff:127.0.0.1"
    assert req.args == ("service=%s" % svc, "socket=%s" % d.path,
                        "action_generic_failure=allow")


# ------------------------------------------------------------------ the TCP connection

def tcp_pair(family, server_addr, client_family=None, client_addr=None):
    """A listener, and the server end of one accepted loopback connection (what sshd
    holds); returns (listener, accepted, client)."""
    ls = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind((server_addr, 0))
    ls.listen(4)
    c = socket.socket(client_family or family, socket.SOCK_STREAM)
    c.connect((client_addr or server_addr, ls.getsockname()[1]))
    a, _ = ls.accept()
    return ls, a, c


def conn_of(accepted):
    peer, local = accepted.getpeername(), accepted.getsockname()
    return "%s %d %s %d" % (peer[0], peer[1], local[0], local[1])


def conn_line(d):
    got = [ln for ln in lines(d.records()[-1]) if ln.startswith("conn=")]
    return got[0][5:] if got else None


@pytest.mark.parametrize("kind", ["ipv4", "ipv6", "ipv4-mapped"])
def test_conn_single(so, services, sockdir, cid_user, kind):
    if kind == "ipv4":
        socks = tcp_pair(socket.AF_INET, "127.0.0.1")
    elif kind == "ipv6":
        socks = tcp_pair(socket.AF_INET6, "::1")
    else:
        socks = tcp_pair(socket.AF_INET6, "::", socket.AF_INET, "127.0.0.1")
    try:
        want = conn_of(socks[1])
        if kind == "ipv4-mapped":
            assert want.startswith("::ffff:127.0.0.1 ")
        with ForgedDaemon(sockdir, [OK]) as d:
            svc = svc_for(services, so, d.path, phases=("account",))
            # the listener is passed too: a socket with no peer is not a connection
            r = pamtester(svc, cid_user[0], "acct_mgmt",
                          pass_fds=[s.fileno() for s in socks[:2]])
            assert r.outcome == "success", r.out
            assert conn_line(d) == want
    finally:
        for s in socks:
            s.close()


def test_conn_several_picks_ssh_connection(so, services, sockdir, cid_user):
    a = tcp_pair(socket.AF_INET, "127.0.0.1")
    b = tcp_pair(socket.AF_INET6, "::", socket.AF_INET, "127.0.0.1")
    fds = [a[1].fileno(), b[1].fileno()]
    try:
        with ForgedDaemon(sockdir, [OK]) as d:
            svc = svc_for(services, so, d.path, phases=("account",))
            for target in (a[1], b[1]):
                peer, local = target.getpeername(), target.getsockname()
                # sshd prints a mapped address as plain IPv4: it still matches
                ssh = "%s %d %s %d" % (peer[0].replace("::ffff:", ""), peer[1],
                                       local[0].replace("::ffff:", ""), local[1])
                r = pamtester(svc, cid_user[0], "acct_mgmt", pass_fds=fds,
                              pam_env=[("SSH_CONNECTION", ssh)])
                assert r.outcome == "success", r.out
                assert conn_line(d) == conn_of(target)
            # several and no SSH_CONNECTION (or one naming none of them): no guess
            for env in ([], [("SSH_CONNECTION", "10.0.0.1 1 10.0.0.2 22")]):
                r = pamtester(svc, cid_user[0], "acct_mgmt", pass_fds=fds, pam_env=env)
                assert r.outcome == "success", r.out
                assert conn_line(d) is None
    finally:
        for s in a + b:
            s.close()


# ------------------------------------------------------------------ failures and bounds

GENERIC = {("ignore", "acct_mgmt"): "ignore", ("allow", "acct_mgmt"): "success",
           ("deny", "acct_mgmt"): "perm_denied", ("ignore", "open_session"): "ignore",
           ("allow", "open_session"): "success", ("deny", "open_session"): "session_err"}


@pytest.mark.parametrize("act,op", sorted(GENERIC))
def test_daemon_absent(so, services, sockdir, cid_user, act, op):
    svc = svc_for(services, so, os.path.join(sockdir, "pam.sock"),
                  "action_generic_failure=%s" % act)
    r = pamtester(svc, cid_user[0], op)
    assert r.outcome == GENERIC[act, op], r.out
    assert r.elapsed < 1.0


def test_default_generic_failure_is_ignore(so, services, sockdir, cid_user):
    svc = svc_for(services, so, os.path.join(sockdir, "pam.sock"))
    assert pamtester(svc, cid_user[0], "acct_mgmt", "open_session").out.count(
        "cid-ignored") == 2


def test_stale_socket_refused_fast(so, services, sockdir, cid_user):
    path = os.path.join(sockdir, "pam.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)                      # bound, nobody listening: ECONNREFUSED
    try:
        svc = svc_for(services, so, path, "action_generic_failure=deny")
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        assert r.outcome == "perm_denied" and r.elapsed < 1.0, r.out
    finally:
        s.close()


@pytest.mark.parametrize("how,timeout", [("hang", "1"), ("sigstop", "1.0"),
                                         ("hang", "0.3"), ("hang", "0")])
def test_no_reply_is_bounded(so, services, sockdir, cid_user, how, timeout):
    """A daemon that takes the request and never answers (or is stopped): the login waits
    daemon_timeout (clamped to at least 0.05 s), at most 100 ms more than pamtester's own
    fast failure path, then action_generic_failure."""
    want = max(float(timeout), 0.05)
    with ForgedDaemon(sockdir, [{"do": "hang"}]) as d:
        svc = svc_for(services, so, d.path,
                      "daemon_timeout=%s action_generic_failure=deny" % timeout)
        base = baseline(services.make(client_stack(
            so, "socket=%s/absent action_generic_failure=deny" % sockdir)), cid_user[0])
        if how == "sigstop":
            d.signal(signal.SIGSTOP)
        for attempt in range(2):     # one retry: 2 shared cores
            r = pamtester(svc, cid_user[0], "acct_mgmt")
            assert r.outcome == "perm_denied", r.out
            extra = r.elapsed - base
            if want - 0.005 <= extra <= want + 0.1:
                break
        assert want - 0.005 <= extra <= want + 0.1, (r.elapsed, base)
        if how == "hang":
            assert d.records()[0]["request"].startswith("callerid-pam 1\n")


@pytest.mark.parametrize("do", ["kill", "close"])
def test_daemon_gone_mid_request_fails_fast(so, services, sockdir, cid_user, do):
    with ForgedDaemon(sockdir, [{"do": do}]) as d:
        svc = svc_for(services, so, d.path, "daemon_timeout=5 action_generic_failure=deny")
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        assert r.outcome == "perm_denied", r.out
        assert r.elapsed < 2.0
        assert d.records()[0]["request"].startswith("callerid-pam 1\nphase=account\n")
        if do == "kill":
            assert d.proc.wait(timeout=5) == -signal.SIGKILL


def test_full_backlog_fails_fast(so, services, sockdir, cid_user):
    """A daemon that accepts nothing: once its backlog is full, connect says EAGAIN and the
    login does not wait."""
    with ForgedDaemon(sockdir, [OK], backlog=0, accept=False) as d:
        fillers = []
        try:
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
                fillers.append(s)
                s.connect(d.path)
        except BlockingIOError:
            pass
        try:
            svc = svc_for(services, so, d.path, "daemon_timeout=5 action_generic_failure=deny")
            r = pamtester(svc, cid_user[0], "acct_mgmt")
            assert r.outcome == "perm_denied" and r.elapsed < 2.0, r.out
        finally:
            for s in fillers:
                s.close()


def test_server_not_root_is_refused(so, services, sockdir, cid_user):
    """A daemon listening as another uid (nobody) is refused before the request is sent."""
    with ForgedDaemon(sockdir, [OK], user="nobody") as d:
        svc = svc_for(services, so, d.path, "action_generic_failure=deny")
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        assert r.outcome == "perm_denied", r.out
        recs = d.records()
    assert all(rec["request"] is None for rec in recs), recs


# ------------------------------------------------------------------ the reply

def _hex(b):
    return {"reply_hex": b.hex()}


def _long(n):
    """A valid reply of exactly n bytes."""
    head = "callerid-pam 1\nrc=success\ninfo="
    return head + "x" * (n - len(head) - 1) + "\n"


MALFORMED = {
    "empty": {"reply": ""},
    "header only": {"reply": "callerid-pam 1\n"},
    "other version": {"reply": "callerid-pam 2\nrc=success\n"},
    "no header": {"reply": "rc=success\n"},
    "CRLF": {"reply": "callerid-pam 1\r\nrc=success\r\n"},
    "truncated": {"reply": "callerid-pam 1\nrc=succ"},
    "no final newline": {"reply": "callerid-pam 1\nrc=success"},
    "two rc": {"reply": OK + "rc=success\n"},
    "unknown rc": {"reply": "callerid-pam 1\nrc=yes\n"},
    "rc with a space": {"reply": "callerid-pam 1\nrc=success \n"},
    "unknown key": {"reply": OK + "log=x\n"},
    "empty line": {"reply": "callerid-pam 1\n\nrc=success\n"},
    "line without =": {"reply": OK + "info\n"},
    "NUL": _hex(b"callerid-pam 1\nrc=success\ninfo=a\x00b\n"),
    "invalid UTF-8": _hex(b"callerid-pam 1\nrc=success\ninfo=\xff\n"),
    "UTF-8 surrogate": _hex(b"callerid-pam 1\nrc=success\ninfo=\xed\xa0\x80\n"),
    "UTF-8 overlong": _hex(b"callerid-pam 1\nrc=success\ninfo=\xc0\xaf\n"),
    "env without =": {"reply": OK + "env=SLURM_JOB_ID\n"},
    "env bad name": {"reply": OK + "env=1A=b\n"},
    "env empty name": {"reply": OK + "env==b\n"},
    "setns other kind": {"reply": OK + "setns=net\n", "fds": ["pipe"]},
    "two setns": {"reply": OK + "setns=mnt\nsetns=mnt\n", "fds": ["pipe"]},
    "setns_fail unknown": {"reply": OK + "setns=mnt\nsetns_fail=maybe\n", "fds": ["pipe"]},
    "two setns_fail": {"reply": OK + "setns=mnt\nsetns_fail=ignore\nsetns_fail=ignore\n",
                       "fds": ["pipe"]},
    "setns_fail without setns": {"reply": OK + "setns_fail=perm_denied\n"},
    "setns without fd": {"reply": OK + "setns=mnt\n"},
    "fd without setns": {"reply": OK, "fds": ["pipe"]},
    "two fds": {"reply": OK + "setns=mnt\n", "fds": ["pipe", "pipe"]},
    "many fds": {"reply": OK + "setns=mnt\n", "fds": ["pipe"] * 8},
    "enter without fds": {"reply": OK + "enter=1\n"},
    "enter=0": {"reply": OK + "enter=0\n"},
    "enter=13": {"reply": OK + "enter=13\n", "fds": ["pipe"] * 13},
    "enter=01": {"reply": OK + "enter=01\n", "fds": ["pipe"]},
    "enter fewer fds": {"reply": OK + "enter=2\n", "fds": ["pipe"]},
    "two enter": {"reply": OK + "enter=1\nenter=1\n", "fds": ["pipe"]},
    "enter_fail without enter": {"reply": OK + "enter_fail=perm_denied\n"},
    "enter_error without enter": {"reply": OK + "enter_error=x\n"},
    "two enter_info": {"reply": OK + "enter=1\nenter_info=a\nenter_info=b\n",
                       "fds": ["pipe"]},
    "one byte too long": {"reply": _long(MAX_MSG + 1)},
    "far too long": {"reply": _long(100000)},
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_reply(so, services, sockdir, cid_user, name):
    with ForgedDaemon(sockdir, [MALFORMED[name]]) as d:
        svc = svc_for(services, so, d.path, "action_generic_failure=deny",
                      phases=("account",))
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        assert r.outcome == "perm_denied", r.out
        assert "xxxxxxxxxx" not in r.out          # nothing of a bad reply is shown


def test_longest_reply_is_accepted(so, services, sockdir, cid_user):
    with ForgedDaemon(sockdir, [{"reply": _long(MAX_MSG)}]) as d:
        svc = svc_for(services, so, d.path, "action_generic_failure=deny",
                      phases=("account",))
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        assert r.outcome == "success" and "x" * (MAX_MSG - 40) in r.out, r.out[:300]


@pytest.mark.parametrize("rc,want", [("success", "success"), ("ignore", "ignore"),
                                     ("perm_denied", "perm_denied"),
                                     ("session_err", "session_err"),
                                     ("system_err", "system_err"), ("auth_err", "auth_err")])
def test_rc(so, services, sockdir, cid_user, rc, want):
    with ForgedDaemon(sockdir, [{"reply": "callerid-pam 1\nrc=%s\n" % rc}]) as d:
        svc = svc_for(services, so, d.path, "action_generic_failure=allow")
        assert pamtester(svc, cid_user[0], "acct_mgmt").outcome == want
        assert pamtester(svc, cid_user[0], "open_session").outcome == want


def test_messages_and_silent(so, services, sockdir, cid_user):
    reply = ("callerid-pam 1\ninfo=first: héllo\nrc=perm_denied\nerror=Access denied by "
             "pam_callerid: you have no active jobs on this node\ninfo=last\n")
    with ForgedDaemon(sockdir, [{"reply": reply}]) as d:
        svc = svc_for(services, so, d.path, phases=("account",))
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        assert r.outcome == "perm_denied"
        # info on pamtester's stdout, error on its stderr: each in its order
        assert "Access denied by pam_callerid: you have no active jobs on this node" in r.out
        assert r.out.index("first: héllo") < r.out.index("last"), r.out
        r = pamtester(svc, cid_user[0], "acct_mgmt(PAM_SILENT)")
        assert r.outcome == "perm_denied"
        assert "no active jobs" in r.out and "héllo" not in r.out and "last" not in r.out
        assert "silent=1" in lines(d.records()[-1])


def test_env_reaches_the_pam_environment(so, services, sockdir, cid_user):
    reply = OK + "env=SLURM_JOB_ID=12\nenv=DISPLAY=localhost:10.0\nenv=CID_TEXT=a b=c é\n"
    with ForgedDaemon(sockdir, [{"reply": reply}]) as d:
        svc = services.make(["account required %s service={service} socket=%s" % (so, d.path),
                             "account required pam_exec.so stdout /usr/bin/env"])
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        assert r.rc == 0, r.out
    for want in ("SLURM_JOB_ID=12", "DISPLAY=localhost:10.0", "CID_TEXT=a b=c é"):
        assert want in r.out.splitlines(), r.out


@pytest.fixture
def other_mount_ns():
    """A process in its own mount namespace where a tmpfs with a marker file is mounted on
    a directory that is empty in ours; yields (pid, marker path)."""
    d = tempfile.mkdtemp(prefix="cic-ns-", dir="/tmp")
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          "mount -t tmpfs cic-ns %s && touch %s/marker && echo ready && "
                          "exec sleep 600" % (d, d)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        marker = os.path.join(d, "marker")
        assert not os.path.exists(marker)
        yield p.pid, marker
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        os.rmdir(d)


def test_setns_joins_the_mount_namespace(so, services, sockdir, cid_user, other_mount_ns):
    pid, marker = other_mount_ns
    steps = [{"reply": OK + "setns=mnt\n", "fds": ["ns:%d" % pid]},   # joins
             {"reply": OK}]                                            # control: stays
    with ForgedDaemon(sockdir, steps) as d:
        svc = services.make(["session required %s service={service} socket=%s" % (so, d.path),
                             "session required pam_exec.so quiet /usr/bin/test -e %s"
                             % marker])
        r = pamtester(svc, cid_user[0], "open_session")
        assert r.rc == 0, r.out
        r = pamtester(svc, cid_user[0], "open_session")
        assert r.rc != 0, r.out


@pytest.mark.parametrize("extra,want", [("setns_fail=perm_denied\n", "perm_denied"),
                                        ("", "success")])
def test_setns_failure(so, services, sockdir, cid_user, extra, want):
    """A pipe is no namespace: setns fails; setns_fail= decides, else rc= stands."""
    with ForgedDaemon(sockdir, [{"reply": OK + "setns=mnt\n" + extra, "fds": ["pipe"]}]) as d:
        svc = svc_for(services, so, d.path, "action_generic_failure=allow")
        assert pamtester(svc, cid_user[0], "open_session").outcome == want


@pytest.fixture
def freezer_cgroup():
    """A cgroup v1 freezer cgroup of our own (never memory), removed afterwards."""
    d = "/sys/fs/cgroup/freezer/cic-enter-%s" % os.urandom(4).hex()
    if not os.path.isdir("/sys/fs/cgroup/freezer"):
        pytest.skip("no cgroup v1 freezer hierarchy")
    os.mkdir(d)
    try:
        yield d
    finally:
        for _ in range(100):          # pamtester and its children have exited: empty
            try:
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.05)


def test_enter_moves_the_process_itself_and_acks(so, services, sockdir, cid_user,
                                                  freezer_cgroup):
    """enter=1: the client writes "0" into the tasks file it got, so pamtester (and what it
    starts afterwards) is in that cgroup; then it acknowledges."""
    step = {"reply": OK + "enter=1\n", "fds": ["write:%s/tasks" % freezer_cgroup], "ack": True}
    with ForgedDaemon(sockdir, [step]) as d:
        svc = services.make(["account required %s service={service} socket=%s" % (so, d.path),
                             "account required pam_exec.so stdout /bin/cat /proc/self/cgroup"])
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        assert r.rc == 0, r.out
        rec = d.records()[-1]
    name = "/" + os.path.basename(freezer_cgroup)
    assert any(ln.endswith(":freezer:" + name) for ln in r.out.splitlines()), r.out
    assert rec["ack"] == "callerid-pam 1\nentered=ok\n"


def test_enter_failure_applies_enter_fail_and_says_why(so, services, sockdir, cid_user):
    """A tasks file that cannot be written (here a pipe's read end): enter_fail= decides,
    enter_error= is shown, and the ack carries the reason."""
    step = {"reply": OK + "enter=1\nenter_fail=perm_denied\nenter_error=Access denied: "
            "adoption failed\nenter_info=not shown on failure with deny\n",
            "fds": ["pipe"], "ack": True}
    with ForgedDaemon(sockdir, [step]) as d:
        svc = svc_for(services, so, d.path, phases=("account",))
        r = pamtester(svc, cid_user[0], "acct_mgmt")
        rec = d.records()[-1]
    assert r.outcome == "perm_denied", r.out
    assert "Access denied: adoption failed" in r.out
    assert rec["ack"] == "callerid-pam 1\nentered=failed: Bad file descriptor\n", rec


def test_enter_messages_only_on_failure(so, services, sockdir, cid_user, freezer_cgroup):
    step = {"reply": OK + "enter=1\nenter_error=E-shown-on-failure\nenter_info=I-too\n",
            "fds": ["write:%s/tasks" % freezer_cgroup], "ack": True}
    with ForgedDaemon(sockdir, [step]) as d:
        svc = svc_for(services, so, d.path, phases=("account",))
        r = pamtester(svc, cid_user[0], "acct_mgmt")
    assert r.outcome == "success" and "shown-on-failure" not in r.out and "I-too" not in r.out


@pytest.mark.parametrize("first", [
    {"reply": OK, "fds": ["pipe"]},                          # unexpected fd (malformed)
    {"reply": OK + "setns=mnt\n", "fds": ["pipe"] * 8},      # too many (truncated)
    {"reply": OK + "setns=mnt\n", "fds": ["ns:self"]},       # used (joins its own ns)
    {"reply": OK + "setns=mnt\n", "fds": ["pipe"]},          # setns failed
], ids=["unexpected", "too-many", "used", "setns-failed"])
def test_received_fds_are_closed(so, services, sockdir, cid_user, first):
    """After the account call, none of the fds received with its reply (nor its socket) is
    left in the process: the daemon looks at the client's fds during the session call."""
    with ForgedDaemon(sockdir, [first, {"reply": OK}]) as d:
        svc = svc_for(services, so, d.path, "action_generic_failure=allow")
        r = pamtester(svc, cid_user[0], "acct_mgmt", "open_session")
        assert r.rc == 0, r.out
        one, two = d.records()
    assert one["sent"] and two["peer"][0] == one["peer"][0]
    held = set(two["peer_fds"].values())
    assert not held & set(one["sent"]), (held, one["sent"])
    assert sum(v.startswith("socket:") for v in held) == 1, held     # this call's only


# ------------------------------------------------------------------ syslog

LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind('/dev/log')
print('ready', flush=True)
s.settimeout(2)
with open(sys.argv[1], 'w') as f:
    try:
        while True:
            f.write(s.recv(8192).decode('utf-8', 'replace') + '\n')
            f.flush()
    except OSError:
        pass
"""


def syslog_of(svc, user, tmp_path):
    """pamtester in a private mount namespace whose /dev has our /dev/log listener (this
    machine has no /dev/log); returns the lines logged."""
    got = tmp_path / "syslog.txt"
    (tmp_path / "listen.py").write_text(LISTENER)
    script = ("mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && "
              "{ %s %s %s | { read r; pamtester %s %s acct_mgmt; }; }"
              % (sys.executable, tmp_path / "listen.py", got, svc, user))
    subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                   capture_output=True, text=True, timeout=30)
    return [ln for ln in got.read_text().splitlines() if ln]


@pytest.mark.parametrize("case", ["absent", "malformed", "timeout"])
def test_one_syslog_line_per_failure(so, services, sockdir, cid_user, tmp_path, case):
    script = {"absent": None, "malformed": [{"reply": OK + "rc=success\n"}],
              "timeout": [{"do": "hang"}]}[case]
    want = {"absent": "cannot connect: No such file or directory",
            "malformed": "malformed reply: two rc= lines",
            "timeout": "no reply in time"}[case]
    d = ForgedDaemon(sockdir, script)
    if script:
        d.start()
    try:
        svc = svc_for(services, so, d.path, "action_generic_failure=deny daemon_timeout=0.2",
                      phases=("account",))
        logged = syslog_of(svc, cid_user[0], tmp_path)
    finally:
        d.stop()
    # <83>: facility authpriv (10), severity err (3); pam_syslog names the module and phase
    assert len(logged) == 1, logged
    assert logged[0].startswith("<83>"), logged
    assert ("pam_callerid(%s:account): daemon at %s (daemon_timeout 0.200 s): %s; "
            "action_generic_failure=deny" % (svc, d.path, want)) in logged[0], logged


def test_bad_option_values_are_logged_and_defaulted(so, services, sockdir, cid_user,
                                                    tmp_path):
    svc = services.make(client_stack(so, "socket=relative.sock daemon_timeout=0,5 "
                                         "action_generic_failure=deny", ("account",)))
    logged = syslog_of(svc, cid_user[0], tmp_path)
    assert any("socket=relative.sock is not an absolute path shorter than 108 bytes; using "
               "/run/callerid/pam.sock" in ln for ln in logged), logged
    assert any("daemon_timeout=0,5 is not a number of seconds; using 2.000" in ln
               for ln in logged), logged
