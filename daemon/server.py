"""The caller-ID daemon: asyncio server, one authenticated request and reply per connection.

Event loop: accept, rate-limit, read with timeouts, decode frames (sans-IO).  Worker threads:
munge encode/decode (blocking socket calls to munged) and the /proc + netlink lookup.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ipaddress
import logging
import os
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
        log.info("event=answer peer=%s uid=%d conn=%r status=%s job=%s pid=%s via=%s stage=%s why=%s ms=%.2f",
                 peer, uid, req.describe(), P.STATUS_NAMES[res.status], res.job_id or "-",
                 res.pid or "-", res.sock.via if res.sock else "-", res.stage or "-", res.why or "-",
                 res.elapsed_ms)
        return self._reply(res.status, req.nonce, res.job_id, res.job_uid)


_LINGER0 = struct.pack("ii", 1, 0)


class _Conn:
    """One client connection on a raw non-blocking socket driven by the event loop's
    selector: read one frame under a read timeout and a total deadline, hand it to a worker
    thread, write the reply, close.  (No asyncio transport, protocol or task per connection:
    at thousands of answers per second those cost more than the answer itself.)"""

    __slots__ = ("srv", "loop", "sock", "fd", "peer", "dec", "t_read", "t_total", "busy",
                 "done", "reading", "out")

    def __init__(self, srv: "Server", sock: socket.socket, peer: str):
        self.srv = srv
        self.loop = srv.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.dec = P.FrameDecoder(max_frames=1)
        self.busy = False
        self.done = False
        self.out = b""
        cfg = srv.cfg
        self.t_read = self.loop.call_later(cfg.read_timeout, self._timeout)
        self.t_total = self.loop.call_later(cfg.connection_timeout, self._timeout)
        self.loop.add_reader(self.fd, self._readable)
        self.reading = True

    def _finish(self, abort=False):
        if self.done:
            return
        self.done = True
        srv = self.srv
        srv.active -= 1
        srv.conns.discard(self)
        self.t_read.cancel()
        self.t_total.cancel()
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
        if self.done or self.busy:
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
        self.t_read.cancel()
        if not frames:
            self.t_read = self.loop.call_later(self.srv.cfg.read_timeout, self._timeout)
            return
        self.busy = True
        self.loop.remove_reader(self.fd)
        self.reading = False
        fut = self.loop.run_in_executor(self.srv.pool, self.srv.handler.handle, frames[0], self.peer)
        fut.add_done_callback(self._answered)

    def _answered(self, fut):
        if self.done:
            return
        try:
            out = fut.result()
        except BaseException:
            log.exception("event=handler-error peer=%s", self.peer)
            out = None
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


class Server:
    def __init__(self, cfg, auth, lookup: Lookup, *, node: str | None = None):
        self.cfg = cfg
        self.handler = Handler(auth, lookup, node=node or cfg.node(), slurm_uid=cfg.slurm_uid(),
                               max_clock_skew=cfg.max_clock_skew)
        self.rate = RateLimiter(cfg.rate_limit, cfg.rate_burst)
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.workers, thread_name_prefix="callerid")
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

    async def start(self) -> list[str]:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
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
            self.conns.add(_Conn(self, sock, peer))

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
        self.pool.shutdown(wait=False, cancel_futures=True)
        log.info("event=stopped %s", " ".join(f"{k}={v}" for k, v in sorted(self.stats.items())))


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
    log.info("event=listening node=%s addresses=%s auth=%s sockdiag=%s scan_all=%s pid=%d",
             srv.handler.node, ",".join(bound), auth.name, lookup.sock_backend,
             cfg.scan_all_processes, os.getpid())
    if ready is not None:
        ready(srv)
    await srv.serve_until_stopped()
    return 0
