"""The I/O edge of pam_callerid: called by the C shim for account / open_session.

Account phase (the decision): service filter and root come first (no configuration is read
for them); then this user's jobs on this node (``cgroups``), the caller-ID daemon at the
connection's source when needed (``daemon`` client, bounded by ``rpc_timeout``, with a
negative cache under /run for sources without a daemon), :func:`policy.decide`, the
adoption of ``getpid()`` (harmless if sshd adopts again later), ``SLURM_JOB_ID``, messages,
syslog and one audit record.  The decision is stashed with ``pam_set_data``.

Session phase (the adoption): ``getpid()`` of open_session -- sshd's ``[priv]`` process for
every authentication method -- is adopted into the chosen job's extern step. When account ran
in another process (keyboard-interactive / password logins run it in a forked ``[pam]``
child), nothing was stashed in this handle and the decision is made again here.

Imports are kept minimal: every millisecond here is paid by every ssh login.
"""
import os
import time

from . import options as _options
from . import policy

DATA_KEY = b"pam_callerid.decision"
NEGCACHE_DIR = "/run/pam_callerid"
NEGCACHE_FILE = NEGCACHE_DIR + "/unreachable"
NEGCACHE_TTL = 60.0
_first_call = True
_LOG_PRIO = {"error": 3, "warning": 4, "info": 6, "verbose": 6, "debug": 7}
_LOG_LEVEL = {"error": 2, "warning": 2, "info": 3, "verbose": 4, "debug": 5}


class Pam:
    """The few libpam calls the hook needs, on one handle."""

    def __init__(self, ffi, lib, pamh, flags):
        self.ffi, self.lib, self.h, self.flags = ffi, lib, pamh, flags

    def item(self, which):
        pp = self.ffi.new("const void **")
        if self.lib.pam_get_item(self.h, which, pp) != self.lib.PAM_SUCCESS or \
                pp[0] == self.ffi.NULL:
            return None
        return self.ffi.string(self.ffi.cast("const char *", pp[0])).decode("utf-8", "replace")

    def getenv(self, name):
        p = self.lib.pam_getenv(self.h, name.encode())
        return None if p == self.ffi.NULL else self.ffi.string(p).decode("utf-8", "replace")

    def putenv(self, name_value):
        return self.lib.pam_putenv(self.h, name_value.encode())

    def say(self, text, error=False):
        if self.flags & self.lib.PAM_SILENT and not error:
            return
        style = self.lib.PAM_ERROR_MSG if error else self.lib.PAM_TEXT_INFO
        resp = self.ffi.new("char **")
        self.lib.pam_prompt(self.h, style, resp, b"%s", self.ffi.new("char[]", text.encode()))
        if resp[0] != self.ffi.NULL:        # a conversation may return a response: drop it
            self.lib.free(resp[0])

    def set_data(self, value):
        return self.lib.cid_set_data(self.h, DATA_KEY, value.encode())

    def get_data(self):
        p = self.lib.cid_get_data(self.h, DATA_KEY)
        return None if p == self.ffi.NULL else self.ffi.string(p).decode("utf-8", "replace")


class Log:
    """syslog (authpriv, ident pam_callerid) through the shim, filtered by log_level."""

    def __init__(self, lib, level):
        self.lib, self.level = lib, level

    def __call__(self, level, text):
        if _LOG_LEVEL.get(level, 5) <= self.level:
            self.lib.cid_syslog(_LOG_PRIO.get(level, 7), text.encode("utf-8", "replace")[:1800])

    def many(self, lines):
        for level, text in lines:
            self(level, text)


# ------------------------------------------------------------------------------ facts
def user_uid(user):
    if not user:
        return None
    import pwd
    try:
        return pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):
        return None


def _norm_ip(ip):
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


class Conn:
    """The sshd TCP connection: ``src`` is the client (remote) end, ``dst`` ours."""

    __slots__ = ("src_ip", "src_port", "dst_ip", "dst_port", "family")

    def __init__(self, src_ip, src_port, dst_ip, dst_port, family):
        self.src_ip, self.src_port = _norm_ip(src_ip), int(src_port)
        self.dst_ip, self.dst_port = _norm_ip(dst_ip), int(dst_port)
        self.family = 4 if ":" not in self.src_ip else 6

    def as_dict(self):
        return {"src_ip": self.src_ip, "src_port": self.src_port, "dst_ip": self.dst_ip,
                "dst_port": self.dst_port}


def find_connection(ssh_connection=None):
    """The connected TCP socket among this process's fds (getpeername/getsockname on a dup).
    With ``SSH_CONNECTION`` ("cip cport sip sport") the matching socket is preferred."""
    import _socket
    want = ssh_connection.split() if ssh_connection else None
    found = None
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in fds:
        try:
            if not os.readlink("/proc/self/fd/" + name).startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except (OSError, ValueError):
            continue
        try:
            s = _socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if s.family not in (_socket.AF_INET, _socket.AF_INET6) or \
                    s.type != _socket.SOCK_STREAM:
                continue
            peer, local = s.getpeername(), s.getsockname()
        except OSError:
            continue
        finally:
            s.close()
        c = Conn(peer[0], peer[1], local[0], local[1], s.family)
        if want is None or len(want) != 4:
            return c
        if _norm_ip(want[0]) == c.src_ip and want[1] == str(c.src_port):
            return c
        found = found or c
    return found


# ------------------------------------------------------------------------------ negative cache
def negcache_hit(key, now):
    try:
        with open(NEGCACHE_FILE) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == key:
                    return float(parts[1]) > now
    except (OSError, ValueError):
        pass
    return False


def negcache_add(key, now, ttl=NEGCACHE_TTL):
    """Remember (root-owned file, atomic rename) that ``key`` ("ip,port") had no reachable
    daemon."""
    try:
        os.makedirs(NEGCACHE_DIR, mode=0o700, exist_ok=True)
        st = os.lstat(NEGCACHE_DIR)
        if st.st_uid != os.geteuid() or (st.st_mode & 0o022):
            return
        keep = []
        try:
            with open(NEGCACHE_FILE) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[0] != key and float(parts[1]) > now:
                        keep.append(line if line.endswith("\n") else line + "\n")
        except (OSError, ValueError):
            pass
        keep = keep[-255:] + ["%s %.3f\n" % (key, now + ttl)]
        tmp = "%s.%d" % (NEGCACHE_FILE, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, "".join(keep).encode())
        finally:
            os.close(fd)
        os.replace(tmp, NEGCACHE_FILE)
    except OSError:
        pass


# ------------------------------------------------------------------------------ backends
# The cgroups/ and daemon/ packages are imported lazily, only on the paths that need them.
from . import backend  # noqa: E402  (small, itself lazy)


def query_callerid(ctx, conn, now):
    """Ask the caller-ID daemon at the connection's source; a typed policy.CallerId."""
    if conn is None:
        return policy.CallerId("no-connection", detail="no TCP connection on this PAM handle")
    src = "%s:%d" % (conn.src_ip, conn.src_port)
    key = "%s,%d" % (conn.src_ip, ctx.port)
    if negcache_hit(key, now):
        return policy.CallerId("cached", source=src,
                               detail="no caller-ID daemon at %s port %d (cached)"
                                      % (conn.src_ip, ctx.port))
    out = backend.callerid(ctx, conn)
    if out.status == "unreachable" and ctx.negcache_ttl > 0:
        negcache_add(key, now, ctx.negcache_ttl)
    return out


# ------------------------------------------------------------------------------ audit
def audit_write(path, rec, log):
    if not path or path.lower() == "none":
        return
    from . import audit
    try:
        audit.append(path, rec)
    except OSError as e:
        log("error", "cannot write audit record to %s: %s" % (path, e))


# ------------------------------------------------------------------------------ phases
def _decide(pam, opts, log, service, user, uid, rec):
    """Full decision with I/O. Fills ``rec`` (the audit record)."""
    t = time.monotonic()
    ctx, err = backend.load_config(opts)
    jobs = None
    t_conf = time.monotonic()
    if err is None:
        jobs, err = backend.user_jobs(ctx, uid)
    t_jobs = time.monotonic()
    rec["ms"] = {"config": round((t_conf - t) * 1000, 3),
                 "jobs": round((t_jobs - t_conf) * 1000, 3)}
    rec["node"] = ctx.node_name
    rec["jobs"] = None if jobs is None else [j.id for j in jobs]
    for p in ctx.problems:
        log("verbose", p)
    cid = None
    conn = find_connection(pam.getenv("SSH_CONNECTION"))     # ~0.1 ms; also for the audit
    if conn is not None:
        rec.update(conn.as_dict())
    rec["ms"]["conn"] = round((time.monotonic() - t_jobs) * 1000, 3)
    if jobs is not None and policy.needs_rpc([j for j in jobs if j.uid in (None, uid)], opts):
        t = time.monotonic()
        cid = query_callerid(ctx, conn, time.time())
        rec["ms"]["callerid"] = round((time.monotonic() - t) * 1000, 3)
        rec["ms"].update(ctx.timings)
        rec["callerid"] = {k: v for k, v in cid.as_dict().items() if v is not None}
        if cid.detail:
            log("info" if cid.status in ("found", "unknown") else "error",
                "caller-ID %s: %s" % (cid.status, cid.detail))
    d = policy.decide(service, user, uid, jobs, opts, callerid=cid, jobs_error=err)
    return d, ctx


def _adopt(d, opts, ctx, uid, log):
    """Adopt getpid() as decided; returns (decision, adopted pid or None)."""
    if d.code != "PAM_SUCCESS" or d.target is None:
        return d, None
    pid = os.getpid()
    t = time.monotonic()
    err = backend.adopt(ctx, pid, d, uid)
    ms = round((time.monotonic() - t) * 1000, 3)
    log("debug", "adoption took %.3f ms" % ms)
    if err is None:
        log("info", "Process %d adopted into %s" % (
            pid, "job %d" % d.job_id if d.target == "job" else "the user-level cgroup"))
        return d, pid
    return policy.on_adopt_failure(d, opts, err), None


def _serialize(d, pid):
    return "%d %s %s %s %s" % (pid, d.path, d.code, d.target or "-",
                               d.job_id if d.job_id is not None else "-")


def _deserialize(s):
    try:
        pid, path, code, target, job = s.split()
        return {"pid": int(pid), "path": path, "code": code,
                "target": None if target == "-" else target,
                "job": None if job == "-" else int(job)}
    except ValueError:
        return None


def _finish(pam, opts, log, d, rec, t0, phase, show_info=True):
    log.many(d.logs)
    if d.user_msg:
        pam.say(d.user_msg, error=True)
    elif d.info and show_info and not opts.quiet:
        pam.say(d.info)
    if d.code == "PAM_SUCCESS" and d.job_id is not None and d.target == "job":
        pam.putenv("SLURM_JOB_ID=%d" % d.job_id)
    rec.update(path=d.path, job=d.job_id, target=d.target, result=d.code, reason=d.reason,
               latency_ms=round((time.monotonic() - t0) * 1000, 3))
    audit_write(opts.audit, rec, log)
    return d.code


def account(pam, opts, log, t0):
    service, user = pam.item(pam.lib.PAM_SERVICE), pam.item(pam.lib.PAM_USER)
    uid = user_uid(user)
    rec = _record("account", service, user, uid, pam, opts)
    global _first_call
    if _first_call:
        _first_call = False
        rec["py_init_ms"] = round(pam.lib.cid_init_ms(), 3)   # this process's interpreter start
    pre = policy.pre_decide(service, user, uid, opts)
    if pre is not None:
        log.many(pre.logs)
        if pre.path != policy.SERVICE:
            rec.update(path=pre.path, result=pre.code, reason=pre.reason,
                       latency_ms=round((time.monotonic() - t0) * 1000, 3))
            audit_write(opts.audit, rec, log)
        return pre.code
    t1 = time.monotonic()
    d, ctx = _decide(pam, opts, log, service, user, uid, rec)
    _remember(opts, ctx)
    t2 = time.monotonic()
    d, adopted = _adopt(d, opts, ctx, uid, log)
    rec["ms"]["before"] = round((t1 - t0) * 1000, 3)      # options, user, record
    rec["ms"]["adopt"] = round((time.monotonic() - t2) * 1000, 3)
    rec["adopted_pid"] = adopted
    pam.set_data(_serialize(d, os.getpid()))
    return _finish(pam, opts, log, d, rec, t0, "account")


def open_session(pam, opts, log, t0):
    service, user = pam.item(pam.lib.PAM_SERVICE), pam.item(pam.lib.PAM_USER)
    uid = user_uid(user)
    pre = policy.pre_decide(service, user, uid, opts)
    if pre is not None:
        return pre.code
    rec = _record("session", service, user, uid, pam, opts)
    stash = _deserialize(pam.get_data() or "")
    if stash is not None:
        rec["stashed_from_pid"] = stash["pid"]
        if stash["code"] != "PAM_SUCCESS" or stash["target"] is None:
            # account already answered (ignore / allow without adoption / deny): nothing to do
            return stash["code"]
        job = None if stash["job"] is None else policy.Job(stash["job"], uid)
        d = policy.Decision(stash["path"], "PAM_SUCCESS", job=job, target=stash["target"],
                            reason="stashed")
        ctx, err = _recall(opts), None
        if ctx is None:
            ctx, err = backend.load_config(opts)
        rec["node"] = ctx.node_name
        if err:
            d, adopted = policy.on_adopt_failure(d, opts, err), None
        else:
            d, adopted = _adopt(d, opts, ctx, uid, log)
    else:
        # account ran in another process (keyboard-interactive / password): decide again
        rec["redecided"] = True
        d, ctx = _decide(pam, opts, log, service, user, uid, rec)
        d, adopted = _adopt(d, opts, ctx, uid, log)
    rec["adopted_pid"] = adopted
    # the info line was sent in the account phase (shown as a banner); only errors here
    return _finish(pam, opts, log, d, rec, t0, "session", show_info=stash is None)


_ctx_memo = None     # (pid, time, key, Context) of this process's last account decision
_CTX_MEMO_TTL = 30.0


def _remember(opts, ctx):
    """Keep the account phase's configuration and discovered layout for the session phase of
    the same login (same process, moments later): it then adopts without re-reading them."""
    global _ctx_memo
    _ctx_memo = (os.getpid(), time.monotonic(), (opts.config, opts.nodename), ctx)


def _recall(opts):
    m = _ctx_memo
    if m is None or m[0] != os.getpid() or m[2] != (opts.config, opts.nodename) \
            or time.monotonic() - m[1] > _CTX_MEMO_TTL or m[3].layout is None:
        return None
    return m[3]


def _record(phase, service, user, uid, pam, opts):
    return {"time": _isotime(), "ts": round(time.time(), 3), "phase": phase,
            "node": opts.nodename or os.uname().nodename.split(".")[0],
            "service": service, "user": user, "uid": uid, "pid": os.getpid(),
            "rhost": pam.item(pam.lib.PAM_RHOST)}


def _isotime():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def dispatch(ffi, lib, phase, pamh, flags, args):
    """Entry point from the C shim. Returns an int PAM code; an exception fails closed."""
    t0 = time.monotonic()
    opts = _options.parse(args)
    log = Log(lib, opts.log_level)
    log.many(opts.logs)
    pam = Pam(ffi, lib, pamh, flags)
    try:
        if phase == "account":
            code = account(pam, opts, log, t0)
        elif phase == "open_session":
            code = open_session(pam, opts, log, t0)
        else:
            code = "PAM_IGNORE"
    except BaseException as e:
        log("error", "internal error in %s: %s: %s; failing closed"
            % (phase, type(e).__name__, e))
        raise
    return getattr(lib, code)
