"""The PAM decision service: the server side of pam_callerid.so, inside ``callerid daemon``.

    sshd --PAM--> pam_callerid.so (C) --SOCK_SEQPACKET, one request, one reply--> here

Architecture (the sssd_pam / logind pattern): the C client in sshd only finds the connection,
sends its PAM items and module arguments, and applies the reply; everything else -- options,
policy, job listing, the caller-ID query, adoption, audit, caches -- runs here, in a long-lived
root process, once per node.

* Socket: ``PamSocket`` (default /run/callerid/pam.sock) in a root-owned directory (0755,
  created if missing), the socket itself 0600 root (bound under a temporary name, chmod-ed,
  then renamed into place: never reachable with looser permissions). A socket left by a
  previous run is replaced only when nothing answers on it; a live service there is an error.
* Threads: one accept thread takes the peer's credentials and pidfd right at ``accept()``
  (peer.py) and refuses any client that is not root; a bounded pool of ``PamWorkers`` threads
  (default 32) serves the requests, so one slow caller-ID source (bounded by ``rpc_timeout``)
  holds one worker, never the other logins. One audit writer thread (audit.AuditWriter)
  writes records in decision order.
* Every accepted root client gets a reply when at all possible: a malformed, oversized or
  truncated request gets ``rc=system_err`` (and a log line); an internal error gets the
  module's ``action_generic_failure``. A client that sends nothing is dropped after
  ``recv_timeout``.

The decision pipeline itself is pam_callerid/login.py; the protocol pam_callerid/wire.py.
"""
from __future__ import annotations

import array
import logging
import os
import select
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from daemon.version import VERSION

from .login import NO_ACK, generic_failure_reply
from .peer import PeerError, peer_of
from .wire import MAX_MESSAGE, Reply, WireError, encode_reply, parse_ack, parse_request

log = logging.getLogger("callerid.pam")


class ServiceError(Exception):
    """The service cannot start (socket directory unsafe, socket in use); the text says why."""


def _check_dir(d):
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        os.makedirs(d, mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)
        st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise ServiceError(f"{d} must be a directory owned by root and writable by no one "
                           f"else (it is mode {stat.filemode(st.st_mode)}, uid {st.st_uid})")


def _clear_stale(path):
    """Remove a socket left by a previous run; ServiceError if a service answers there or
    something else than a socket is in the way."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServiceError(f"{path} exists and is not a socket: remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)                    # nobody listens: stale
        return
    finally:
        probe.close()
    raise ServiceError(f"{path}: another PAM service is running (it accepted a connection)")


def bind_socket(path, backlog=128):
    """A listening SOCK_SEQPACKET socket at ``path``, mode 0600, in a checked directory."""
    _check_dir(os.path.dirname(path) or "/")
    _clear_stale(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        s.bind(tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        s.listen(backlog)
    except BaseException:
        s.close()
        for p in (tmp,):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        raise
    return s


class Service:
    """The listener and its workers around a :class:`login.Logins`.

    ``start()`` binds and returns; ``stop()`` stops accepting, lets the requests in flight
    finish, removes the socket. ``use_peerpidfd=False`` forces the pidfd_open fallback
    (tests of kernels before 6.5)."""

    def __init__(self, path, logins, *, workers=32, recv_timeout=2.0, use_peerpidfd=True,
                 metrics=None):
        self.path = path
        self.logins = logins
        self.recv_timeout = recv_timeout
        self.use_peerpidfd = use_peerpidfd
        self.metrics = metrics
        self.workers = workers
        self._sock = None
        self._pool = None
        self._thread = None
        self._wake_r = self._wake_w = None
        self.served = self.refused = self.malformed = 0
        self.other_modules = set()       # module versions other than ours, logged once each

    def start(self):
        self._sock = bind_socket(self.path)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pam")
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._accept_loop, name="pam-accept",
                                        daemon=True)
        self._thread.start()
        log.info("event=pam-listening socket=%s workers=%d", self.path, self.workers)
        return self

    def stop(self, timeout=5.0):
        if self._thread is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        self._pool.shutdown(wait=True)
        try:
            if os.lstat(self.path).st_ino == os.fstat(self._sock.fileno()).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._thread = None
        self.logins.audit.close()
        log.info("event=pam-stopped served=%d refused=%d malformed=%d", self.served,
                 self.refused, self.malformed)

    # ------------------------------------------------------------------ accepting
    def _accept_loop(self):
        p = select.poll()
        p.register(self._sock, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(p.poll())
            if self._wake_r in events:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                log.warning("event=pam-accept-error error=%s", e)
                time.sleep(0.01)
                continue
            t0 = time.monotonic()
            try:
                peer = peer_of(conn, time.clock_gettime(time.CLOCK_BOOTTIME),
                               self.use_peerpidfd)
            except (PeerError, OSError) as e:
                self.refused += 1
                log.warning("event=pam-refused reason=%r", str(e))
                if self.metrics is not None:
                    self.metrics.pam_rejected("not-root" if "not root" in str(e) else "peer")
                conn.close()
                continue
            try:
                self._pool.submit(self._serve, conn, peer, t0)
            except RuntimeError:                   # shutting down
                peer.close()
                conn.close()

    # ------------------------------------------------------------------ one request
    def _serve(self, conn, peer, t0):
        fds, then = [], None
        req = None
        try:
            conn.settimeout(self.recv_timeout)
            try:
                data, _, flags, _ = conn.recvmsg(MAX_MESSAGE + 1)
            except TimeoutError:
                log.warning("event=pam-no-request pid=%d", peer.pid)
                return
            if not data:
                return                              # the client closed without a request
            try:
                if flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE:
                    raise WireError(f"request: longer than {MAX_MESSAGE} bytes")
                req = parse_request(data)
            except WireError as e:
                self.malformed += 1
                log.warning("event=pam-malformed pid=%d error=%r", peer.pid, str(e))
                if self.metrics is not None:
                    self.metrics.pam_rejected("malformed")
                self._send(conn, encode_reply(Reply("system_err")), None)
                return
            self._note_module(req.module, peer)
            enter = None                           # the reply's enter=, None: not sent
            try:
                reply, fds, then = self.logins.handle(req, peer, t0)
                data = encode_reply(reply)
                enter = reply.enter
            except Exception:
                log.exception("event=pam-internal-error pid=%d phase=%s user=%r", peer.pid,
                              req.phase, req.user)
                data = encode_reply(generic_failure_reply(req.args, req.phase))
                _close(fds)
                fds = []
            self._send(conn, data, fds)
            self.served += 1
            _close(fds)
            fds = []
            if then is not None:
                run, then = then, None
                if enter is None:                  # the generic failure went instead
                    ack = NO_ACK
                elif enter:                        # the client acknowledges entering
                    ack = self._ack(conn, peer)
                else:                              # no entry: an adoption after the reply
                    ack = None
                run(ack)
        except OSError as e:
            log.warning("event=pam-io-error pid=%d error=%s", peer.pid, e)
        finally:
            _close(fds)
            if then is not None:                   # the reply did not leave: no ack
                then(NO_ACK)
            peer.close()
            conn.close()

    MAX_OTHER_MODULES = 16

    def _note_module(self, version, peer):
        """Log once per version a module built from another version than this daemon (an
        upgrade that replaced one of the two); the login goes on.  A request without a
        version (a tool's, e.g. callerid check's probe) is not a module's."""
        if version is None or version == VERSION or version in self.other_modules or \
                len(self.other_modules) >= self.MAX_OTHER_MODULES:
            return
        self.other_modules.add(version)
        log.warning("event=pam-module-version module=%s daemon=%s pid=%d: pam_callerid.so and "
                    "the daemon come from different versions; install the module of this "
                    "version (callerid check shows both)", version, VERSION, peer.pid)

    def _ack(self, conn, peer):
        """The client's acknowledgement of ``enter=`` (wire.parse_ack's value), or NO_ACK."""
        try:
            conn.settimeout(self.recv_timeout)
            data = conn.recv(MAX_MESSAGE + 1)
        except OSError as e:                           # TimeoutError included
            log.warning("event=pam-no-ack pid=%d error=%s", peer.pid, e)
            return NO_ACK
        try:
            return parse_ack(data) if data else NO_ACK
        except WireError as e:
            log.warning("event=pam-malformed pid=%d error=%r", peer.pid, str(e))
            return NO_ACK

    def _send(self, conn, data, fds):
        anc = [] if not fds else \
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        conn.sendmsg([data], anc)


def _close(fds):
    for fd in fds:
        os.close(fd)


def start(cfg, config_path, metrics=None):
    """The service of ``callerid daemon``: settings from ``config_path`` (the daemon's
    callerid.conf; a module's ``config=`` may name another), decision lines to syslog, the
    audit writer, listening on ``PamSocket``. Raises ServiceError / OSError."""
    from .audit import AuditWriter
    from .login import Logins
    from .logsink import SyslogSink
    from .settings import SettingsCache
    from .warmup import Warmup

    def daemon_log(level, text):
        log.log(logging.ERROR if level == "error" else logging.INFO, "%s", text)

    logins = Logins(SettingsCache(config_path), SyslogSink(), AuditWriter(daemon_log), metrics,
                    warmup=Warmup())
    return Service(cfg.pam_socket, logins, workers=cfg.pam_workers, metrics=metrics).start()
