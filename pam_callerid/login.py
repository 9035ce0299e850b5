"""One login's decision in the PAM service: request -> facts -> policy -> adoption -> reply.

:meth:`Logins.handle` is called by the service (pam_callerid/service.py) for every request of
the C client, with the peer process held by a pidfd (pam_callerid/peer.py). It

1. parses the module's arguments (options.py) and settles what needs no files: service
   filter, unknown user, root, exempt groups (policy.pre_decide);
2. reuses the decision already made for this login, keyed by (TCP connection, user,
   service, arguments) for :data:`DECISION_TTL` seconds: a keyboard-interactive login asks
   its account phase (in sshd's forked ``[pam]`` child) and its session phase (in
   ``[priv]``) and gets ONE decision, one caller-ID query;
3. otherwise lists the user's jobs on this node (every time: a job that started a moment ago
   is seen), asks the caller-ID daemon at the connection's source when several jobs qualify
   (daemon.client through daemon.coalesce: while a question to a daemon is out, the next
   ones to it wait and go together; bounded by ``rpc_timeout``; sources with no daemon are
   remembered in memory for ``PamNegativeCacheTTL`` seconds, and only when
   ``Answer.cacheable`` says so), and runs policy.decide;
4. adopts the process that will hold the session (the peer, or in the account phase its
   ``[priv]`` parent when the peer is the ``[pam]`` child) with ``cgroups.adopt`` -- the
   pidfd is checked before and after, so a pid that was recycled is never adopted -- and
   prepares the environment (SLURM_JOB_ID, X11) and the job's mount namespace fd.
   On cgroup v1 a single-threaded peer enters the job's cgroups itself (``enter=``: the
   tasks files go with the reply, the client writes "0" into each, which costs the kernel
   no RCU grace period); after its ack the stepd registers it (``cgroups.adopt``, whose
   writes are then no-ops) while the login goes on. Otherwise, in the account phase of a
   service whose session stack surely runs the module too (pamconf.py), the adoption runs
   after the reply, and the session phase of that process waits for it before it answers;
   else the adoption comes before the reply;
5. builds the reply (wire.Reply), logs to syslog (logsink) and hands one audit record to the
   one audit writer (for ``enter=``, after the stepd registered the process).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace

from daemon.coalesce import Coalescer

from . import policy
from .options import parse
from .pamconf import SessionStacks
from .peer import PeerError, proc_stat, session_holder
from .wire import Reply

DECISION_TTL = 60.0
NO_ACK = object()      # ``then``'s argument when the client sent no acknowledgement

_RC = {"PAM_SUCCESS": "success", "PAM_IGNORE": "ignore", "PAM_PERM_DENIED": "perm_denied",
       "PAM_SESSION_ERR": "session_err", "PAM_SYSTEM_ERR": "system_err",
       "PAM_AUTH_ERR": "auth_err"}
_GENERIC = {"ignore": "PAM_IGNORE", "allow": "PAM_SUCCESS", "deny": "PAM_PERM_DENIED"}
_STATUS = {"found": "found", "unknown": "unknown", "refused": "refused", "error": "error",
           "busy": "busy", "unreachable": "unreachable", "invalid": "error",
           "local-error": "error"}


def wire_rc(code, phase):
    """The protocol's rc for a PAM code name; a denial in the session phase is the session
    error open_session may return."""
    if phase == "session" and code == "PAM_PERM_DENIED":
        return "session_err"
    return _RC.get(code, "system_err")


def generic_failure_reply(args, phase):
    """The reply when the service itself failed: ``action_generic_failure`` of the module's
    arguments, as the C client applies it when there is no service at all."""
    code = _GENERIC[parse(args).action_generic_failure]
    return Reply(wire_rc(code, phase))


class TTLCache:
    """A small thread-safe map whose entries expire (monotonic clock), bounded in size."""

    def __init__(self, max_entries=4096, clock=time.monotonic):
        self._d = {}
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._d.get(key)
            if hit is None:
                return None
            if hit[0] <= self._clock():
                del self._d[key]
                return None
            return hit[1]

    def put(self, key, value, ttl):
        now = self._clock()
        with self._lock:
            if len(self._d) >= self._max:
                for k in [k for k, (exp, _) in self._d.items() if exp <= now]:
                    del self._d[k]
                while len(self._d) >= self._max:
                    self._d.pop(next(iter(self._d)))
            self._d[key] = (now + ttl, value)

    def __len__(self):
        return len(self._d)


def _unmap(ip):
    """IPv4-mapped IPv6 (``::ffff:a.b.c.d``) as IPv4: the caller-ID daemon is asked in IPv4."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def _ms(t):
    return round((time.monotonic() - t) * 1000, 3)


def _isotime(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def user_facts(user, allow_groups):
    """(uid or None, names of the user's groups -- only looked up when allow_groups= is set)."""
    import pwd
    try:
        pw = pwd.getpwnam(user) if user else None
    except (KeyError, ValueError):
        pw = None
    if pw is None:
        return None, ()
    if not allow_groups:
        return pw.pw_uid, ()
    import grp
    names = []
    for gid in os.getgrouplist(user, pw.pw_gid):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            pass
    return pw.pw_uid, tuple(names)


class Logins:
    """The decision pipeline with its in-memory caches (see the module docstring).

    settings  SettingsCache        log     callable(level, text, threshold) (syslog)
    audit     AuditWriter          metrics daemon.metrics.Metrics or None
    default_config  the daemon's own callerid.conf (used unless the module says config=)
    """

    def __init__(self, settings, log, audit, metrics=None, decision_ttl=DECISION_TTL,
                 clock=time.monotonic, warmup=None, sessions=None):
        self.settings = settings
        self.warmup = warmup              # warmup.Warmup: kicked as each v2 decision starts
        self.log = log
        self.audit = audit
        self.metrics = metrics
        self.decision_ttl = decision_ttl
        self.decisions = TTLCache(clock=clock)
        self.negative = TTLCache(clock=clock)
        self.x11 = TTLCache(clock=clock)     # (node, job, start) -> env items: asked once
        self.queries = 0                 # caller-ID queries sent (tests, stats)
        self.callerid = Coalescer()      # one request in flight per daemon; the rest wait
        self.pending = {}                # pid -> (Event, waits): an adoption after the reply
        #                                  (waits) or an entry being registered, not done
        self.sessions = sessions or SessionStacks()
        self._said = set()
        self._diag = None
        self._diag_lock = threading.Lock()

    # ------------------------------------------------------------------ the pipeline
    def handle(self, req, peer, t0):
        """-> (wire.Reply, fds to attach, ``then``). ``t0``: monotonic time the request
        arrived. ``then`` is None, or the callable the caller runs once the reply left, with
        the client's acknowledgement for a reply with ``enter=`` (wire.parse_ack's value, or
        NO_ACK): it has the stepd register the process, and writes the audit record."""
        rec = self._record(req, peer)
        ms = rec["ms"] = {"queue": _ms(t0)}            # accept -> a worker took it
        opts = parse(req.args)
        self._parse_logs(req.args, opts)
        uid, groups = user_facts(req.user, opts.allow_groups)
        rec["uid"] = uid
        pre = policy.pre_decide(req.service, req.user, uid, opts, groups)
        if pre is not None:
            reply, _ = self._finish(req, opts, pre, rec, t0, fresh=True,
                                    audit=pre.path != policy.SERVICE)
            return reply, [], None
        entering = self._await_pending(peer.pid, opts, t0)
        d, settings, said = self._decision(req, opts, uid, groups, rec)
        d, fd, env, entry, later = self._adopt(d, opts, settings, req, peer, uid, rec, t0,
                                               reused=said is not None, entering=entering)
        fds = ([fd] if fd is not None else []) + [f for _, f in entry]
        reply, ticket = self._finish(req, opts, d, rec, t0, fresh=said is None, env=env, fd=fd,
                                     said=said or 0, entry=entry, defer=later is not None)
        if not entry and later is None:
            return reply, fds, None
        return reply, fds, self._then(d, opts, settings.layout, peer, uid, rec, req,
                                      said or 0, ticket, later)

    def _decision(self, req, opts, uid, groups, rec):
        """(Decision, Settings, how many of its log lines went out before): the decision
        this login's earlier phase made (``said`` an int), else a new one (``said`` None)."""
        key = (str(req.conn), req.user, req.service, req.args) if req.conn else None
        hit = self.decisions.get(key) if key else None
        if hit is not None:
            d, facts = hit
            rec.update(facts, reused=True)
            settings, _ = self.settings.get(self._config(opts), opts.nodename)
            return d, settings, len(d.logs)
        d, settings, facts = self._decide(req, opts, uid, groups, rec["ms"])
        rec.update(facts)
        if key and d.path != policy.FAILURE:              # a failure is tried again
            self.decisions.put(key, (d, facts), self.decision_ttl)
        return d, settings, None

    def _then(self, d, opts, layout, peer, uid, rec, req, said, ticket, later):
        """The work after the reply: the entry's registration (``peer`` entered), or the
        adoption of ``later``; pending for its process until done."""
        pid = peer.pid if later is None else later.pid
        done = threading.Event()
        self.pending[pid] = (done, later is not None)

        def release():
            if self.pending.get(pid, (None,))[0] is done:
                del self.pending[pid]
            done.set()

        def then(ack):
            """After the reply left (with the client's ack for ``enter=``). A failed entry is
            released at once: the session phase must look at where the process really is."""
            try:
                if later is not None:
                    self._later(d, opts, layout, later, uid, rec, req, said, ticket)
                    return
                if ack is not None:
                    release()
                self._entered(ack, d, opts, layout, peer, rec, req, said, ticket)
            finally:
                release()
                if later is not None and later is not peer:
                    later.close()
        return then

    def _await_pending(self, pid, opts, t0):
        """For a request of a process whose adoption of an earlier phase is still pending:
        wait for an adoption the account phase left for after its reply (bounded by the
        client's deadline), so the session phase returns only once the process is in the
        job; return True for an entry still being registered (the process is in the job;
        /proc/PID/cgroup is not read then: the kernel would make that read wait for the
        stepd's cgroup write, grace period and all)."""
        p = self.pending.get(pid)
        if p is None:
            return False
        done, waits = p
        if waits:
            done.wait(max(0.0, opts.daemon_timeout - (time.monotonic() - t0) - 0.05))
            return False
        return True

    def flush(self, timeout=5.0):
        """Wait until every decision so far is in the audit file (tests, shutdown): the
        entries still being registered, then the audit writer's queue."""
        end = time.monotonic() + timeout
        for done, _ in list(self.pending.values()):
            done.wait(max(0.0, end - time.monotonic()))
        return self.audit.flush(max(0.0, end - time.monotonic()))

    def _config(self, opts):
        return opts.config if "config" in opts.given else None

    def _decide(self, req, opts, uid, groups, ms):
        """(Decision, Settings or None, facts for the audit); stage times into ``ms``."""
        facts = {}
        t = time.monotonic()
        settings, err = self.settings.get(self._config(opts), opts.nodename)
        ms["settings"] = _ms(t)
        if self.warmup is not None and settings is not None and settings.layout.version == 2:
            self.warmup.kick()       # not on v1: it would hold cgroup_mutex the client needs
        jobs = None
        if settings is not None:
            facts["node"] = settings.layout.nodename
            t = time.monotonic()
            jobs, err = self._jobs(settings, uid, opts)
            ms["jobs"] = _ms(t)
        facts["jobs"] = None if jobs is None else [j.job_id for j in jobs]
        cid = None
        if jobs is not None and policy.needs_rpc(jobs, opts):
            t = time.monotonic()
            cid = self._ask(settings, opts, req.conn)
            ms["callerid"] = _ms(t)
            facts["callerid"] = {k: getattr(cid, k) for k in cid.__slots__
                                 if getattr(cid, k) is not None}
        compute_node = True
        if jobs == []:
            compute_node = self._compute_node(settings, opts)
        d = policy.decide(req.service, req.user, uid, jobs, opts, callerid=cid, jobs_error=err,
                          groups=groups, compute_node=compute_node,
                          nodename=facts.get("node"))
        return d, settings, facts

    def _jobs(self, settings, uid, opts):
        import cgroups
        try:
            found = cgroups.user_jobs(settings.layout, uid)
        except Exception as e:          # CgroupError, OSError: an admin-readable error
            return None, "%s: %s" % (type(e).__name__, e)
        for p in getattr(found, "problems", ()):
            self.log("verbose", p, opts.log_level)
        return list(found), None

    def _compute_node(self, settings, opts):
        try:
            return settings.compute_node()
        except Exception as e:
            self.log("error", "cannot tell whether this host is a compute node: %s" % e,
                     opts.log_level)
            return True

    # ------------------------------------------------------------------ caller-ID
    def _ask(self, settings, opts, conn):
        """Ask the caller-ID daemon at the connection's source; a policy.CallerId."""
        if conn is None:
            return policy.CallerId("no-connection",
                                   detail="no TCP connection for this login")
        src_ip, dst_ip = _unmap(conn.src_ip), _unmap(conn.dst_ip)
        src = "%s:%d" % (src_ip, conn.src_port)
        cfg = settings.cfg
        port = opts.port or cfg.port
        key = (src_ip, port)
        if self.negative.get(key):
            return policy.CallerId("cached", source=src,
                                   detail="no caller-ID daemon at %s port %d (cached)"
                                          % (src_ip, port))
        try:
            auth = settings.auth()
        except Exception as e:
            return policy.CallerId("error", source=src, detail="caller-ID set-up failed: %s: %s"
                                   % (type(e).__name__, e))
        t = time.monotonic()
        self.queries += 1
        a = self.callerid.query(src_ip, port, (src_ip, conn.src_port), (dst_ip, conn.dst_port),
                                auth=auth, timeout=opts.rpc_timeout,
                                trusted_uids=cfg.reply_uids())
        if self.metrics is not None:
            self.metrics.callerid_query(a.outcome, time.monotonic() - t)
        if a.cacheable and cfg.pam_negative_cache_ttl > 0:
            self.negative.put(key, True, cfg.pam_negative_cache_ttl)
        status = _STATUS.get(a.outcome, "error")
        detail = a.detail or None
        if a.outcome == "invalid":
            detail = "reply rejected: %s" % a.detail
        elif status == "unreachable" and not a.cacheable and "timeout" in (a.detail or ""):
            status = "timeout"            # connected, but no reply in time
        # daemon.client says "found" only for a reply whose signature and nonce verified
        return policy.CallerId(status, job=a.job_id, uid=a.job_uid, node=a.node,
                               authenticated=a.outcome == "found", source=src, detail=detail)

    # ------------------------------------------------------------------ adoption
    def _conn_inode(self, conn):
        """Inode of this node's end of the TCP connection (sock_diag), or None."""
        if conn is None:
            return None
        import ipaddress
        with self._diag_lock:
            try:
                if self._diag is None:
                    from daemon.lookup import SockDiag
                    self._diag = SockDiag()
                info = self._diag.find(6, ipaddress.ip_address(conn.dst_ip), conn.dst_port,
                                       ipaddress.ip_address(conn.src_ip), conn.src_port)
            except (OSError, ValueError):
                return None
        return None if info is None else info.inode

    def _adopt(self, d, opts, settings, req, peer, uid, rec, t0, reused=False,
               entering=False):
        """(Decision after adoption, namespace fd or None, env items, entry). A reused
        decision (the session phase after account) does not move a process that is still in
        the job's extern step: only one moved away meanwhile (pam_systemd before us) is moved
        back. ``entering``: see _await_pending. The last item, ``later``: the process to
        adopt after the reply (the account phase of a service whose session phase surely
        runs the module and waits: pamconf.py), else None."""
        if d.code != "PAM_SUCCESS" or d.target is None:
            return d, None, (), (), None
        if settings is None:
            return policy.on_adopt_failure(d, opts, "no Slurm layout"), None, (), (), None
        if time.monotonic() - t0 > opts.daemon_timeout:
            rec["late"] = True             # the client gave up and applied its own failure
            return (policy.on_adopt_failure(d, opts, "the client stopped waiting"), None, (),
                    (), None)
        t = time.monotonic()
        target = session_holder(peer, self._conn_inode(req.conn)) \
            if req.phase == "account" else peer
        rec["ms"]["holder"] = _ms(t)
        t = time.monotonic()
        entry, later = (), None
        try:
            if reused and (entering and target is peer or
                           self._still_there(settings.layout, target, d)):
                rec["adopted_pid"], rec["adopted"], rec["how"] = target.pid, target.how, "already"
            elif target is peer and self._may_enter(settings.layout, peer, d):
                d, entry = self._open_entry(d, opts, settings.layout, rec)
            elif req.phase == "account" and d.target == "job" and \
                    self.sessions.reaches(req.service):
                later = target
            else:
                d = self._move(d, opts, settings.layout, target, uid, rec)
        finally:
            if target is not peer and target is not later:
                target.close()
        if later is None:                          # else ms.adopt comes with _later
            rec["ms"]["entry" if entry else "adopt"] = _ms(t)
        if d.code != "PAM_SUCCESS" or d.target != "job" or d.reason == "adopt-failure-allow":
            return d, None, (), (), None
        env = ["SLURM_JOB_ID=%d" % d.job_id]
        if not opts.disable_x11:
            t = time.monotonic()
            env += self._x11(settings.layout, d.job, opts)
            rec["ms"]["x11"] = _ms(t)
        fd = None
        if opts.join_container and target is peer:
            t = time.monotonic()
            d, fd = self._namespace(d, opts, settings.layout, peer, rec)
            rec["ms"]["ns"] = _ms(t)
        if d.code != "PAM_SUCCESS":                 # no namespace: no adoption either
            for _, f in entry:
                os.close(f)
            entry = ()
            if later is not None and later is not peer:
                later.close()
            later = None
        return d, fd, tuple(env), entry, later

    @staticmethod
    def _still_there(layout, target, d):
        """Whether the live process ``target`` sits in the decided job's extern step."""
        if d.target != "job" or not target.alive():
            return False
        import cgroups
        ref = cgroups.job_of_pid(target.pid, layout.nodename)
        return ref is not None and ref.job_id == d.job_id and ref.step == "extern"

    @staticmethod
    def _may_enter(layout, peer, d):
        """The requesting process may enter the job's cgroups itself (cgroups.open_entry):
        cgroup v1, a job, and a single-threaded process (writing "0" moves one thread; the
        only thread is the one waiting in the module, so none can appear meanwhile)."""
        if layout.version != 1 or d.target != "job" or not peer.alive():
            return False
        st = proc_stat(peer.pid)
        return st is not None and st.threads == 1

    def _open_entry(self, d, opts, layout, rec):
        """(Decision, [(Target, fd)]): the job's tasks files for the client to enter."""
        import cgroups
        try:
            entry = cgroups.open_entry(layout, d.job)
        except cgroups.CgroupError as e:
            return policy.on_adopt_failure(d, opts, str(e)), ()
        rec["entered"] = len(entry)
        return d, entry

    def _entered(self, ack, d, opts, layout, peer, rec, req, said, ticket):
        """After the client's ack. The record's result is what the client did: entered
        (then the stepd registers the process: its writes are no-ops now, its accounting is
        what it adds) or applied ``enter_fail``; then log and audit."""
        if ack is not None:
            if ack is NO_ACK:
                rec["late"] = True
            d = policy.on_adopt_failure(d, opts, "the module did not confirm entering the "
                                        "job's cgroups (gone or timed out)" if ack is NO_ACK
                                        else "the module could not enter the job's cgroups: "
                                        "%s" % ack)
        else:
            t = time.monotonic()
            rec["adopted_pid"], rec["adopted"], rec["how"] = peer.pid, peer.how, "entered"
            d = self._register(d, opts, layout, peer, rec)
            rec["ms"]["register"] = _ms(t)                 # after the reply
        self._conclude(req, opts, d, rec, ticket, said=said)

    def _later(self, d, opts, layout, target, uid, rec, req, said, ticket):
        """The account phase's adoption, after its reply (the session phase waits for it). The
        record's result stays what the client was told; a failure is logged and recorded,
        and the session phase, finding the process outside the job, applies
        action_adopt_failure."""
        t = time.monotonic()
        rec["after_reply"] = True
        moved = self._move(d, opts, layout, target, uid, rec)
        rec["ms"]["adopt"] = _ms(t)
        if moved.code != d.code or moved.reason != d.reason:
            rec["adopt_error"] = moved.logs[-1][1]
        self._conclude(req, opts, replace(d, logs=moved.logs), rec, ticket, said=said)

    def _register(self, d, opts, layout, peer, rec):
        """The stepd way for a process that entered the job's cgroups itself."""
        import cgroups
        try:
            if not peer.alive():
                raise PeerError("it exited first")
            result = cgroups.adopt(layout, peer.pid, d.job)
            rec["how"], rec["how_reason"] = result.how, result.reason
        except (cgroups.CgroupError, PeerError, OSError) as e:
            rec["how_reason"] = "entered; not registered with the stepd: %s" % e
        return self._adopted(d, peer, rec)

    def _move(self, d, opts, layout, target, uid, rec):
        import cgroups
        try:
            if not target.alive():
                raise PeerError("process %d exited before its adoption" % target.pid)
            if d.target == "job":
                result = cgroups.adopt(layout, target.pid, d.job)
                rec["how"], rec["how_reason"] = result.how, result.reason
            else:
                cgroups.adopt_user(layout, target.pid, uid)
                rec["how"] = "cgroup"
            if not target.alive():
                raise PeerError("security: process %d exited during its adoption: its pid may "
                                "have been reused by another process" % target.pid)
        except (cgroups.CgroupError, PeerError, OSError) as e:
            rec["adopted_pid"] = None
            return policy.on_adopt_failure(d, opts, str(e))
        rec["adopted_pid"], rec["adopted"] = target.pid, target.how
        return self._adopted(d, target, rec)

    def _adopted(self, d, target, rec):
        """``d`` with the adoption's log line; the adoption metric."""
        if self.metrics is not None:
            self.metrics.adoption(rec["how"], rec.get("how_reason"))
        what = "job %d" % d.job_id if d.target == "job" else "the user-level cgroup"
        how = rec["how"] + (" (%s)" % rec["how_reason"] if rec.get("how_reason") else "")
        return replace(d, logs=d.logs + (
            ("info", "Process %d adopted into %s via %s" % (target.pid, what, how)),))

    def _x11(self, layout, job, opts):
        """DISPLAY / XAUTHORITY of the job's X11 forwarding (its extern stepd, asked once per
        job and minute: a login's two phases ask once)."""
        key = (layout.nodename, job.job_id, getattr(job, "start_time", None))
        env = self.x11.get(key)
        if env is not None:
            return env
        import cgroups
        try:
            x = cgroups.x11_display(layout, job)
        except Exception as e:
            self.log("debug", "no X11 display for job %d: %s" % (job.job_id, e), opts.log_level)
            return []
        env = []
        if x:
            display, xauthority = x
            env = ["DISPLAY=localhost:%d.0" % display]
            env += ["XAUTHORITY=%s" % xauthority] if xauthority else []
        self.x11.put(key, env, self.decision_ttl)
        return env

    def _namespace(self, d, opts, layout, peer, rec):
        """(Decision, fd of the job's mount namespace or None): the client joins it with
        setns; a failure to get it is an adoption failure (pam_slurm_adopt's rule)."""
        import cgroups
        try:
            fd = cgroups.job_namespace_fd(layout, d.job)
        except Exception as e:
            return policy.on_adopt_failure(d, opts, "job container: %s" % e), None
        if fd is None:
            return d, None
        try:
            if os.fstat(fd).st_ino == os.stat("/proc/%d/ns/mnt" % peer.pid).st_ino:
                os.close(fd)                  # already there (the account phase joined it)
                return d, None
        except OSError:
            pass
        rec["setns"] = "mnt"
        return d, fd

    # ------------------------------------------------------------------ reply, logs, audit
    def _finish(self, req, opts, d, rec, t0, fresh, audit=True, env=(), fd=None, said=0,
                entry=(), defer=False):
        """(The reply for ``d``, its audit ticket); its logs, audit record and metrics now,
        or after the reply: for ``enter=`` once the client acknowledged (``_entered``), when
        ``defer`` after the adoption (``_later``)."""
        errors = (d.user_msg,) if d.user_msg and (fresh or d.code != "PAM_SUCCESS") else ()
        info = policy.info_line(d, opts) if fresh or d.reason == "adopt-failure-allow" else None
        rc = wire_rc(d.code, req.phase)
        setns_fail = None
        if fd is not None and opts.action_adopt_failure == "deny":
            setns_fail = wire_rc("PAM_PERM_DENIED", req.phase)
        enter_fail = enter_error = enter_info = None
        if entry:                             # what the client does if it cannot enter
            f = policy.on_adopt_failure(d, opts, "")
            enter_fail = wire_rc(f.code, req.phase)
            enter_error = f.user_msg if f.code != "PAM_SUCCESS" else None
            enter_info = policy.info_line(f, opts)
        reply = Reply(rc, errors, (info,) if info else (), env, "mnt" if fd is not None else None,
                      setns_fail, len(entry), enter_fail if enter_fail != rc else None,
                      enter_error, enter_info)
        rec["latency_ms"] = _ms(t0)
        ticket = self.audit.ticket()
        if not entry and not defer:
            self._conclude(req, opts, d, rec, ticket, audit, said)
        return reply, ticket

    def _conclude(self, req, opts, d, rec, ticket, audit=True, said=0):
        """The decision's logs, audit record (in its ticket's place) and metrics."""
        for level, text in d.logs[said:]:
            self.log(level, text, opts.log_level)
        rec.update(path=d.path, job=d.job_id, target=d.target, result=d.code, reason=d.reason)
        self.audit.submit(opts.audit if audit else None, rec, ticket)
        if self.metrics is not None:
            self.metrics.pam_decision(req.phase, d.path, d.code, rec["latency_ms"] / 1000)

    def _record(self, req, peer):
        t = time.time()
        rec = {"time": _isotime(t), "ts": round(t, 3), "phase": req.phase,
               "node": os.uname().nodename.split(".")[0], "service": req.service,
               "user": req.user, "uid": None, "pid": peer.pid, "rhost": req.rhost,
               "adopted_pid": None}
        if req.conn is not None:
            rec.update(src_ip=_unmap(req.conn.src_ip), src_port=req.conn.src_port,
                       dst_ip=_unmap(req.conn.dst_ip), dst_port=req.conn.dst_port)
        return rec

    def _parse_logs(self, args, opts):
        """Argument problems are logged once per distinct argument list, not per login."""
        if opts.logs and args not in self._said:
            if len(self._said) < 256:
                self._said.add(args)
            for level, text in opts.logs:
                self.log(level, text, opts.log_level)
