"""The caller-ID daemon: asyncio server, one authenticated request and reply per connection.

Event loop: accept, rate-limit, read with timeouts, decode frames (sans-IO).  Worker threads:
munge encode/decode (blocking socket calls to munged) and the /proc + netlink lookup.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import signal
import socket
import struct
import threading
import time

from . import protocol as P
from . import wire
from .auth import AuthError, AuthUnavailable
from .lookup import Lookup

log = logging.getLogger("callerid")
security = logging.getLogger("callerid.security")


class RateLimiter:
    """Token bucket per source address; the table is bounded (least recently seen evicted)."""

    def __init__(self, rate: float, burst: int, max_sources: int = 4096):
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._t: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._t.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._t[key] = (tokens, now)
        while len(self._t) > self.max_sources:
            self._t.popitem(last=False)
        return ok


class ReplayCache:
    """Request nonces seen within the clock-skew window; bounded.

    When full, the oldest entry is evicted and every request not newer than the evicted one is
    refused from then on (the window shrinks rather than the protection)."""

    def __init__(self, window_ms: int, max_entries: int = 131072):
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._d: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._floor = 0
        self._lock = threading.Lock()

    def check_and_add(self, nonce: bytes, ts_ms: int, now_ms: int | None = None) -> str | None:
        """None if fresh, else a reason token."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now_ms - ts_ms) > self.window_ms:
            return "stale-timestamp"
        with self._lock:
            while self._d:
                k, t = next(iter(self._d.items()))
                if t < now_ms - self.window_ms:
                    self._d.popitem(last=False)
                else:
                    break
            if ts_ms <= self._floor:
                return "stale-timestamp"
            if nonce in self._d:
                return "replayed"
            self._d[nonce] = ts_ms
            while len(self._d) > self.max_entries:
                _, t = self._d.popitem(last=False)
                self._floor = max(self._floor, t)
        return None


class Handler:
    """Synchronous request processing (runs in a worker thread): auth, lookup, authz, reply."""

    def __init__(self, auth, lookup: Lookup, *, node: str, slurm_uid: int | None,
                 max_clock_skew: float = 60.0):
        self.auth = auth
        self.lookup = lookup
        self.node = node
        self.slurm_uid = slurm_uid
        self.replay = ReplayCache(int(max_clock_skew * 1000))
        self.counts = collections.Counter()     # answers by status (summarised at info level)
        self.debug = log.isEnabledFor(logging.DEBUG)

    def _reply(self, status, nonce, job=P.NO_JOB, uid=P.NO_UID) -> bytes:
        return wire.seal_reply(P.Reply(status, nonce, job, uid, self.node), self.auth)

    def handle(self, frame: P.Frame, peer: str) -> bytes | None:
        try:
            req, uid = wire.open_request(frame, self.auth)
        except P.ProtocolError as e:
            log.info("event=bad-request peer=%s reason=%s", peer, e)
            return None
        except AuthUnavailable as e:
            log.error("event=auth-unavailable peer=%s error=%s", peer, e)
            return None
        except AuthError as e:
            security.warning("event=security-auth-failure peer=%s reason=%s detail=%r",
                             peer, e.reason, e.detail)
            try:
                nonce = P.Request.decode_body(frame.body).nonce
                return self._reply(P.STATUS_REFUSED, nonce)
            except Exception:
                return None
        why = self.replay.check_and_add(req.nonce, req.timestamp_ms)
        if why is not None:
            security.warning("event=security-%s peer=%s uid=%d conn=%r", why, peer, uid, req.describe())
            return self._reply(P.STATUS_REFUSED, req.nonce)
        try:
            res = self.lookup.lookup(req)
        except Exception as e:  # a bug or an unexpected kernel answer: answer "error", keep serving
            log.exception("event=lookup-error peer=%s conn=%r", peer, req.describe())
            return self._reply(P.STATUS_ERROR, req.nonce)
        privileged = uid == 0 or (self.slurm_uid is not None and uid == self.slurm_uid)
        if res.status == P.STATUS_FOUND and not privileged and res.job_uid != uid:
            security.warning("event=security-violation peer=%s uid=%d conn=%r job=%d job_uid=%d",
                             peer, uid, req.describe(), res.job_id, res.job_uid)
            return self._reply(P.STATUS_REFUSED, req.nonce)
        self.counts[res.status] += 1
        if self.debug:
            log.debug("event=answer peer=%s uid=%d conn=%r status=%s job=%s pid=%s via=%s stage=%s "
                      "why=%s ms=%.2f", peer, uid, req.describe(), P.STATUS_NAMES[res.status],
                      res.job_id or "-", res.pid or "-", res.sock.via if res.sock else "-",
                      res.stage or "-", res.why or "-", res.elapsed_ms)
        return self._reply(res.status, req.nonce, res.job_id, res.job_uid)


_LINGER0 = struct.pack("ii", 1, 0)


class _Conn:
    """One client connection on a raw non-blocking socket driven by the event loop's
    selector: read one frame, hand it to a worker thread, write the reply, close.

    No asyncio transport, protocol, task, future or timer per connection: at thousands of
    answers per second those cost more than the answer.  Deadlines (per read and total) are
    two floats checked by the server's sweeper."""

    __slots__ = ("srv", "loop", "sock", "fd", "peer", "dec", "read_by", "end_by", "done",
                 "reading", "out")

    def __init__(self, srv: "Server", sock: socket.socket, peer: str, now: float):
        self.srv = srv
        self.loop = srv.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.dec = P.FrameDecoder(max_frames=1)
        self.done = False
        self.reading = False
        self.out = b""
        cfg = srv.cfg
        self.end_by = now + cfg.connection_timeout
        self.read_by = min(now + cfg.request_timeout, self.end_by)

    def start(self):
        """The request is usually there already (the client sends right after connecting):
        try it before registering with the selector."""
        self._readable()
        if not self.done and self.read_by:
            self.loop.add_reader(self.fd, self._readable)
            self.reading = True

    def _finish(self, abort=False):
        if self.done:
            return
        self.done = True
        srv = self.srv
        srv.active -= 1
        srv.conns.discard(self)
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        if self.out:
            self.loop.remove_writer(self.fd)
        try:
            if abort:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
        self.sock.close()

    def _timeout(self):
        if not self.done:
            self.srv.stats["timeouts"] += 1
            log.info("event=timeout peer=%s", self.peer)
            self._finish(abort=True)

    def _bad(self, e):
        self.srv.stats["protocol-errors"] += 1
        log.info("event=bad-frame peer=%s reason=%s", self.peer, e)
        self._finish(abort=True)

    def _readable(self):
        if self.done or not self.read_by:
            return
        try:
            data = self.sock.recv(P.MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.srv.stats["conn-errors"] += 1
            self._finish(abort=True)
            return
        try:
            if not data:
                self.dec.eof()
                self.srv.stats["closed-early"] += 1
                self._finish(abort=True)
                return
            frames = self.dec.feed(data)
        except P.ProtocolError as e:
            self._bad(e)
            return
        if not frames:
            return
        self.read_by = 0.0            # no more reads: the request is complete
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        self.srv.submit(self, frames[0])

    def answered(self, out):
        if self.done:
            return
        if out is None:
            self.srv.stats["dropped"] += 1
            self._finish(abort=True)
            return
        self.out = out
        self._writable(first=True)

    def _writable(self, first=False):
        if self.done:
            return
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.srv.stats["conn-errors"] += 1
            self._finish(abort=True)
            return
        rest = self.out[n:]
        if rest:
            if first:
                self.loop.add_writer(self.fd, self._writable)
            self.out = rest
            return
        if not first:
            self.loop.remove_writer(self.fd)
        self.out = b""
        self.srv.stats["answered"] += 1
        self._finish()


class _Workers:
    """Worker threads for the blocking part of an answer (munged round trips, /proc and
    netlink).  The loop thread puts (conn, frame) on a queue; each worker takes whatever is
    queued, answers it, and hands the replies back through one deque; the loop is woken by
    an eventfd write only when it is not already due to drain (one wake-up per batch, not
    per answer)."""

    def __init__(self, loop, handle, n: int):
        self.loop = loop
        self.handle = handle
        self.q = queue.SimpleQueue()
        self.results = collections.deque()
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wake_due = False
        self.threads = [threading.Thread(target=self._run, name=f"callerid-{i}", daemon=True)
                        for i in range(n)]
        loop.add_reader(self.efd, self._drain)
        for t in self.threads:
            t.start()

    def _run(self):
        q, results, handle = self.q, self.results, self.handle
        while True:
            item = q.get()
            if item is None:
                return
            conn, frame = item
            if conn.done:                 # timed out while queued: nobody is waiting
                continue
            try:
                out = handle(frame, conn.peer)
            except BaseException:
                log.exception("event=handler-error peer=%s", conn.peer)
                out = None
            results.append((conn, out))
            if not self.wake_due:
                self.wake_due = True
                try:
                    os.eventfd_write(self.efd, 1)
                except OSError:
                    pass

    def _drain(self):
        try:
            os.eventfd_read(self.efd)
        except OSError:
            pass
        self.wake_due = False
        results = self.results
        while results:
            conn, out = results.popleft()
            conn.answered(out)

    def close(self):
        for _ in self.threads:
            self.q.put(None)
        self.loop.remove_reader(self.efd)
        os.close(self.efd)


class Server:
    def __init__(self, cfg, auth, lookup: Lookup, *, node: str | None = None):
        self.cfg = cfg
        self.handler = Handler(auth, lookup, node=node or cfg.node(), slurm_uid=cfg.slurm_uid(),
                               max_clock_skew=cfg.max_clock_skew)
        self.rate = RateLimiter(cfg.rate_limit, cfg.rate_burst)
        self.workers: _Workers | None = None
        self.listeners: list[socket.socket] = []
        self.active = 0
        self.conns: set[_Conn] = set()
        self.stats = collections.Counter()
        self.port = cfg.port
        self.stopping = False
        self.loop = None
        self._stop = None

    def _listen(self, addr: str, port: int) -> socket.socket:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
        fam, st, pr, _, sa = infos[0]
        s = socket.socket(fam, st | socket.SOCK_CLOEXEC, pr)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(sa)
            s.listen(1024)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    def submit(self, conn: _Conn, frame: P.Frame):
        self.workers.q.put((conn, frame))

    SWEEP = 0.1            # seconds between deadline sweeps
    STATS_EVERY = 60.0     # seconds between "event=stats" summaries (only after traffic)

    def _sweep(self):
        """Close connections past their read or total deadline (every SWEEP seconds); log the
        traffic summary every STATS_EVERY seconds."""
        now = self.loop.time()
        for c in [c for c in self.conns if now >= c.end_by or (c.read_by and now >= c.read_by)]:
            c._timeout()
        if now >= self._stats_due:
            self._stats_due = now + self.STATS_EVERY
            self.log_stats()
        if not self.stopping:
            self._stats_due = self.loop.time() + self.STATS_EVERY
        self._stats_last = ""
        self.loop.call_later(self.SWEEP, self._sweep)

    def stats_line(self) -> str:
        counts = {f"answers-{P.STATUS_NAMES.get(k, k)}": v for k, v in self.handler.counts.items()}
        return " ".join(f"{k}={v}" for k, v in sorted({**self.stats, **counts}.items()))

    def log_stats(self):
        line = self.stats_line()
        if line != self._stats_last:
            self._stats_last = line
            log.info("event=stats %s", line)

    async def start(self) -> list[str]:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.workers = _Workers(self.loop, self.handler.handle, self.cfg.workers)
        self._stats_due = self.loop.time() + self.STATS_EVERY
        self._stats_last = ""
        self.loop.call_later(self.SWEEP, self._sweep)
        bound = []
        errors = []
        port = self.cfg.port
        for addr in self.cfg.listen_addresses:
            try:
                s = self._listen(addr, port)
            except (OSError, socket.gaierror) as e:
                errors.append(f"{addr}:{port}: {getattr(e, 'strerror', None) or e}")
                continue
            self.listeners.append(s)
            name = s.getsockname()
            if port == 0:
                port = name[1]
            bound.append(f"[{name[0]}]:{name[1]}" if s.family == socket.AF_INET6 else f"{name[0]}:{name[1]}")
            self.loop.add_reader(s.fileno(), self._accept, s)
        if not self.listeners:
            raise OSError(f"cannot listen: {'; '.join(errors)}")
        for e in errors:
            log.warning("event=listen-failed address=%s", e)
        self.port = port
        return bound

    def _accept(self, lsock: socket.socket):
        now = self.loop.time()
        for _ in range(64):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS...: keep serving the rest
                self.stats["accept-errors"] += 1
                if self.stats["accept-errors"] % 100 == 1:
                    log.error("event=accept-failed error=%r total=%d", e.strerror, self.stats["accept-errors"])
                return
            self.stats["connections"] += 1
            try:
                peer = P.normalise_addr(addr[0]).compressed
            except ValueError:
                peer = str(addr[0])
            if self.active >= self.cfg.max_connections or self.stopping:
                self.stats["over-capacity"] += 1
                _abort(sock)
                continue
            if not self.rate.allow(peer):
                self.stats["rate-limited"] += 1
                if self.stats["rate-limited"] % 100 == 1:
                    log.warning("event=rate-limited peer=%s total=%d", peer, self.stats["rate-limited"])
                _abort(sock)
                continue
            sock.setblocking(False)
            self.active += 1
            conn = _Conn(self, sock, peer, now)
            self.conns.add(conn)
            conn.start()

    def request_stop(self):
        self._stop.set()

    async def serve_until_stopped(self):
        await self._stop.wait()
        self.stopping = True
        log.info("event=stopping active=%d", self.active)
        for s in self.listeners:
            self.loop.remove_reader(s.fileno())
            s.close()
        end = self.loop.time() + 2.0
        while self.conns and self.loop.time() < end:  # let in-flight answers finish
            await asyncio.sleep(0.02)
        for c in list(self.conns):
            c._finish(abort=True)
        self.workers.close()
        log.info("event=stopped %s", self.stats_line())


def _abort(sock: socket.socket):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()


async def run(cfg, auth, lookup, *, ready=None) -> int:
    srv = Server(cfg, auth, lookup)
    bound = await srv.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, srv.request_stop)
    log.info("event=listening node=%s addresses=%s auth=%s sockdiag=%s pid=%d",
             srv.handler.node, ",".join(bound), auth.name, lookup.sock_backend, os.getpid())
    if ready is not None:
        ready(srv)
    await srv.serve_until_stopped()
    return 0
