"""The caller-ID daemon: one authenticated request and reply per TCP connection.

Event loop (one thread): accept, admission (daemon.admission), read the request, write the
reply.  Worker threads: munge decode/encode (round trips to munged), the netlink + /proc
lookup.  Admission, in the order a connection meets it:

1. At `MaxConnections`, the oldest connection still waiting for its request, of the source
   holding the most such connections, is reset to make room (reclaimed); connections from
   reserved source ports (root's client) are reclaimed only when no other is left.  A new
   connection is refused only when every slot holds a complete request.
2. No byte within `FirstByteTimeout`, or no complete request within `RequestTimeout`:
   reset.  A connection lives at most `ConnectionTimeout`.
3. Complete requests wait in a FairQueue: round-robin by source address, with `RootShare`
   of the workers' picks for connections from reserved source ports.
4. After the credential is verified: requests of uids other than root and SlurmUser are
   rate-limited per uid (`RateLimit`/`RateBurst`); over the limit the signed answer is
   "busy".  Replayed and stale requests are refused.  A frame of several requests (a
   client's questions that waited for its previous answer: daemon.coalesce) is
   verified once; each request in it is checked, limited and answered as if it came alone.

SIGHUP re-reads the configuration and the key (connections in flight are kept); SIGTERM
and SIGINT stop after the answers in flight are written (at most 2 s).
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import gc
import logging
import math
import os
import resource
import signal
import socket
import struct
import sys
import threading
import time
from random import random as _random

from . import protocol as P
from . import wire
from .admission import FairQueue, Holders, TokenBuckets, hinted
from .auth import AuthError, AuthUnavailable, MungeAuth
from .lookup import HolderScan, Lookup
from .replay import ReplayCache
from .session import Tickets

log = logging.getLogger("callerid")
security = logging.getLogger("callerid.security")
# a session ticket this instance did not seal (another instance's: before a restart) or an
# expired one: the client asks again with munge (daemon.session); not a security event
SESSION_ENDED = ("bad-ticket", "expired-ticket")


class Handler:
    """Synchronous request processing (runs in a worker thread): auth, limits, lookup, authz,
    reply.  `auth`, `lookup` and the limits are replaced as a whole on reload."""

    def __init__(self, cfg, auth, lookup: Lookup, *, node: str, replay: ReplayCache | None = None,
                 processes: int = 1):
        """processes: how many serve the port; this one takes its share of the rate limit."""
        self.auth = auth
        self.lookup = lookup
        self.processes = processes
        self.replay = replay or ReplayCache(int(cfg.max_clock_skew * 1000))
        self.counts = collections.Counter()     # answers by status, admission events
        self.holder_scan = HolderScan()
        self.configure(cfg, node)

    def configure(self, cfg, node: str):
        self.node = node
        self.slurm_uid = cfg.slurm_uid()
        n = self.processes
        self.user_rate = TokenBuckets(cfg.rate_limit / n, max(1, per_process(cfg.rate_burst, n)))
        self.log_unknown_holder = cfg.log_unknown_holder
        self.replay.window_ms = int(cfg.max_clock_skew * 1000)
        if isinstance(self.auth, MungeAuth) and cfg.munge_session_lifetime > 0:
            self.auth.tickets = Tickets(self.replay.secret, cfg.munge_session_lifetime)
        self.debug = log.isEnabledFor(logging.DEBUG)

    def _reply(self, status, nonce, job=P.NO_JOB, uid=P.NO_UID) -> P.Reply:
        self.counts[_ANSWER_KEY[status]] += 1
        return P.Reply(status, nonce, job, uid, self.node)

    @staticmethod
    def _seal(auth, ftype, replies) -> bytes:
        """The answer frame to a request (one reply) or requests frame (the replies)."""
        if ftype == P.TYPE_REQUEST:
            return wire.seal_reply(replies[0], auth)
        return wire.seal_replies(replies, auth)

    def handle(self, frame: P.Frame, peer: str, hint: bool, arrived: float):
        """-> (reply bytes or None to reset, follow-up callable or None).  The follow-up
        (a log-only search) runs after the reply has been handed back.  A requests frame
        gets one replies frame: each request answered as if it came alone."""
        auth, counts = self.auth, self.counts
        try:
            reqs, uid, reply_auth = wire.open_requests(frame, auth)
        except P.ProtocolError as e:
            log.info("event=bad-request peer=%s reason=%s", peer, e)
            return None, None
        except AuthUnavailable as e:
            log.error("event=auth-unavailable peer=%s error=%s", peer, e)
            return None, None
        except AuthError as e:
            if e.reason in SESSION_ENDED:   # expected after a restart, or a skewed clock
                counts["sessions-refused"] += 1
                log.info("event=session-refused peer=%s reason=%s", peer, e.reason)
            else:
                counts["auth-failures"] += 1
                security.warning("event=security-auth-failure peer=%s reason=%s detail=%r",
                                 peer, e.reason, e.detail)
            try:
                return self._seal(auth, frame.type, [self._reply(P.STATUS_REFUSED, r.nonce)
                                                     for r in wire.requests_of(frame)]), None
            except Exception:
                return None, None
        privileged = uid == 0 or (self.slurm_uid is not None and uid == self.slurm_uid)
        if hint and uid != 0:
            counts["hinted-not-root"] += 1
            if counts["hinted-not-root"] % 100 == 1:
                log.info("event=reserved-port-not-root peer=%s uid=%d total=%d",
                         peer, uid, counts["hinted-not-root"])
        if len(reqs) > 1:
            counts["batched"] += len(reqs)
        replies, afters = [], []
        for req in reqs:
            reply, after = self._answer(req, uid, privileged, peer, hint, arrived, reply_auth.name)
            replies.append(reply)
            if after is not None:
                afters.append(after)
        follow = (lambda: [f() for f in afters]) if afters else None  # noqa: E731
        return self._seal(reply_auth, frame.type, replies), follow

    def _answer(self, req, uid, privileged, peer, hint, arrived, scheme):
        """One request of an authenticated frame (`scheme`: how, for the log) -> (P.Reply,
        log-only follow-up or None)."""
        counts = self.counts
        why = self.replay.check_and_add(req.nonce, req.timestamp_ms)
        if why is not None:
            counts["replays"] += 1
            security.warning("event=security-%s peer=%s uid=%d conn=%r", why, peer, uid, req.describe())
            return self._reply(P.STATUS_REFUSED, req.nonce), None
        if not privileged and not self.user_rate.allow(uid):
            counts["rate-limited"] += 1
            if counts["rate-limited"] % 100 == 1:
                log.warning("event=rate-limited uid=%d peer=%s total=%d", uid, peer,
                            counts["rate-limited"])
            return self._reply(P.STATUS_BUSY, req.nonce), None
        try:
            res = self.lookup.lookup(req, arrived)
        except Exception:  # a bug or an unexpected kernel answer: answer "error", keep serving
            log.exception("event=lookup-error peer=%s conn=%r", peer, req.describe())
            return self._reply(P.STATUS_ERROR, req.nonce), None
        if res.status == P.STATUS_FOUND and not privileged and res.job_uid != uid:
            counts["violations"] += 1
            security.warning("event=security-violation peer=%s uid=%d conn=%r job=%d job_uid=%d",
                             peer, uid, req.describe(), res.job_id, res.job_uid)
            return self._reply(P.STATUS_REFUSED, req.nonce), None
        if uid == 0:
            counts["answers-root"] += 1
        if self.debug:
            log.debug("event=answer peer=%s uid=%d auth=%s hint=%d conn=%r status=%s job=%s by=%s "
                      "pid=%s via=%s why=%s ms=%.2f", peer, uid, scheme, hint, req.describe(),
                      P.STATUS_NAMES[res.status], res.job_id or "-", res.by or "-", res.pid or "-",
                      res.sock.via if res.sock else "-", res.why or "-", res.elapsed_ms)
        after = None
        if self.log_unknown_holder and res.why == "not-in-job":
            after = lambda: self._log_holder(peer, req, res.sock)  # noqa: E731
        return self._reply(res.status, req.nonce, res.job_id, res.job_uid), after

    def _log_holder(self, peer, req, sock):
        found = self.holder_scan.find(sock.inode)
        if isinstance(found, tuple):
            pid, uid, comm = found
            log.info("event=unknown-holder peer=%s conn=%r pid=%d uid=%d comm=%r",
                     peer, req.describe(), pid, uid, comm)
        else:
            log.info("event=unknown-holder peer=%s conn=%r holder=%s", peer, req.describe(),
                     found or "not-found")


_ANSWER_KEY = {k: f"answers-{v}" for k, v in P.STATUS_NAMES.items()}


def per_process(total: int, processes: int) -> int:
    """One serving process's part of a limit: total / processes, rounded up."""
    return -(-total // processes)
_LINGER0 = struct.pack("ii", 1, 0)


def _abort(sock: socket.socket):
    """Close with a reset (no TIME_WAIT kept here for junk)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()


class _Conn:
    """One client connection on a raw non-blocking socket driven by the event loop's
    selector: read one frame, hand it to a worker thread, write the reply, close.

    No asyncio transport, task, future or timer per connection: at thousands of answers per
    second those cost more than the answer.  Deadlines are floats checked by the sweeper."""

    __slots__ = ("srv", "loop", "sock", "fd", "peer", "hint", "arrived", "dec", "first_by",
                 "read_by", "end_by", "done", "reading", "pending", "out")

    def __init__(self, srv: "Server", sock: socket.socket, peer: str, hint: bool, now: float):
        self.srv = srv
        self.loop = srv.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.hint = hint
        self.arrived = time.monotonic()       # for the lookup: the socket existed by then
        self.dec = P.FrameDecoder(max_frames=1)
        self.done = False
        self.reading = False
        self.pending = False                  # in the server's Holders (no request yet)
        self.out = b""
        cfg = srv.cfg
        # the first-byte and request deadlines get up to +50 % of jitter: junk that
        # reconnects when reset must not come back in synchronised waves
        j = 1.0 + 0.5 * _random()
        self.end_by = now + cfg.connection_timeout
        self.read_by = min(now + cfg.request_timeout * j, self.end_by)
        self.first_by = min(now + cfg.first_byte_timeout * j, self.read_by)

    def start(self):
        """The request is usually there already (the client sends right after connecting):
        try it before registering with the selector."""
        self._readable()
        if not self.done and self.read_by:
            self.loop.add_reader(self.fd, self._readable)
            self.reading = True
            self.pending = True
            srv = self.srv
            srv.holders[self.hint].add(self.peer, self)
            srv.unread[self] = None
            if self.first_by:
                srv.no_byte[self] = None

    def _unpend(self):
        if self.pending:
            self.pending = False
            srv = self.srv
            srv.holders[self.hint].discard(self.peer, self)
            srv.unread.pop(self, None)
            srv.no_byte.pop(self, None)

    def _finish(self, abort=False):
        if self.done:
            return
        self.done = True
        srv = self.srv
        srv.active -= 1
        srv.conns.pop(self, None)
        self._unpend()
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        if self.out:
            self.loop.remove_writer(self.fd)
        if abort:
            _abort(self.sock)
        else:
            self.sock.close()

    def expire(self, why: str):
        if not self.done:
            self.srv.stats[why] += 1
            if self.srv.debug:
                log.debug("event=%s peer=%s", why, self.peer)
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
        if self.first_by:
            self.first_by = 0.0
            if self.pending:
                self.srv.no_byte.pop(self, None)
        try:
            if not data:
                self.dec.eof()
                self.srv.stats["closed-early"] += 1
                self._finish(abort=True)
                return
            frames = self.dec.feed(data)
        except P.ProtocolError as e:
            self.srv.stats["protocol-errors"] += 1
            if self.srv.debug:
                log.debug("event=bad-frame peer=%s reason=%s", self.peer, e)
            self._finish(abort=True)
            return
        if not frames:
            return
        self.read_by = 0.0            # no more reads: the request is complete
        self._unpend()
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        self.srv.queue.put(self.peer, self.hint, (self, frames[0]))

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
        self.srv.latency.add(self.hint, time.monotonic() - self.arrived)
        self._finish()


class LatencyHistogram:
    """Time from accept to the reply written, by class (reserved source port or not):
    cumulative-ready bucket counts (seconds, upper bounds) and sums, for the stats and the
    metrics (daemon.metrics).  Written by the loop thread only."""

    BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    CLASSES = ("other", "reserved")          # index: hint

    def __init__(self):
        n = len(self.BOUNDS) + 1             # the last bucket is +Inf
        self.counts = ([0] * n, [0] * n)
        self.sums = [0.0, 0.0]

    def add(self, hint: bool, seconds: float):
        self.counts[hint][bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.sums[hint] += seconds

    def state(self) -> list:
        """[counts other, counts reserved, sums]: what a helper reports (daemon.group)."""
        return [self.counts[0], self.counts[1], self.sums]

    def merged(self, states) -> "LatencyHistogram":
        """This histogram plus other processes' states."""
        out = LatencyHistogram()
        for counts0, counts1, sums in [self.state(), *states]:
            for hint, counts in ((0, counts0), (1, counts1)):
                out.counts[hint][:] = [a + b for a, b in zip(out.counts[hint], counts)]
                out.sums[hint] += sums[hint]
        return out

    def quantile(self, hint: bool, q: float) -> float:
        """Upper bound (s) of the bucket holding quantile q (inf past the last bound)."""
        counts = self.counts[hint]
        total = sum(counts)
        if not total:
            return float("nan")
        seen = 0
        for bound, c in zip(self.BOUNDS + (float("inf"),), counts):
            seen += c
            if seen >= q * total:
                return bound
        return float("inf")


class _Workers:
    """Worker threads for the blocking part of an answer (munged round trips, /proc and
    netlink).  The loop thread puts (conn, frame) on the FairQueue; each worker answers what
    it gets and hands the reply back through one deque; the loop is woken by an eventfd
    write only when it is not already due to drain (one wake-up per batch, not per answer)."""

    def __init__(self, loop, handler: Handler, queue: FairQueue, n: int):
        self.loop = loop
        self.handler = handler
        self.q = queue
        self.results = collections.deque()
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wake_due = False
        self.threads = [threading.Thread(target=self._run, name=f"callerid-{i}", daemon=True)
                        for i in range(n)]
        loop.add_reader(self.efd, self._drain)
        for t in self.threads:
            t.start()

    def _run(self):
        q, results, handler = self.q, self.results, self.handler
        while True:
            item = q.get()
            if item is None:
                return
            conn, frame = item
            if conn.done:                 # timed out or reclaimed while queued
                continue
            after = None
            try:
                out, after = handler.handle(frame, conn.peer, conn.hint, conn.arrived)
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
            if after is not None:
                try:
                    after()
                except Exception:
                    log.exception("event=follow-up-error peer=%s", conn.peer)

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
        self.q.close(len(self.threads))
        self.loop.remove_reader(self.efd)
        os.close(self.efd)


def _raise_fd_limit(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `want`; the number of fds we may use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want and (hard == resource.RLIM_INFINITY or soft < hard):
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return soft


FD_RESERVE = 64       # fds kept for listeners, netlink, munge, /proc reads, logging


class Server:
    SWEEP = 0.1            # seconds between deadline sweeps
    STATS_EVERY = 60.0     # seconds between "event=stats" summaries (only when they changed)

    def __init__(self, cfg, auth, lookup: Lookup, *, node: str | None = None, clock=None,
                 processes: int = 1, replay: ReplayCache | None = None):
        """clock: the time source of the deadlines and the stats line (default: the event
        loop's monotonic clock); tests pass one they can move.  processes: how many serve
        the port (daemon.group); this one takes its share of the limits.  replay: the
        shared table (a helper's)."""
        self.cfg = cfg
        self._node_override = node
        self.processes = processes
        self.handler = Handler(cfg, auth, lookup, node=node or cfg.node(), replay=replay,
                               processes=processes)
        self.helpers = None           # daemon.group.Helpers, in the first of several processes
        self.link = None              # daemon.group.HelperLink, in a helper
        self.queue = FairQueue(cfg.root_share)
        self.holders = (Holders(), Holders())     # [hint]: False = other, True = reserved port
        self.workers: _Workers | None = None
        self.listeners: list[socket.socket] = []
        self.first_listeners: list[socket.socket] = []   # where reserved-port connections queue
        self.active = 0
        # every connection, and those still without a byte / without their whole request,
        # each in accept order, which is deadline order (within the jitter): a sweep looks
        # only at the fronts
        self.conns: dict[_Conn, None] = {}
        self.no_byte: dict[_Conn, None] = {}
        self.unread: dict[_Conn, None] = {}
        self.stats = collections.Counter()
        self.latency = LatencyHistogram()
        self.port = cfg.port
        self.stopping = False
        self.loop = None
        self._stop = None
        self._clock = clock
        self._stats_last = ""
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.max_connections = cfg.max_connections

    def now(self) -> float:
        return self._clock() if self._clock is not None else self.loop.time()

    LISTENERS = 4      # sockets per address (SO_REUSEPORT): 4 accept queues of somaxconn

    def _socket(self, addr: str, port: int, group: bool) -> socket.socket:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
        fam, st, pr, _, sa = infos[0]
        s = socket.socket(fam, st | socket.SOCK_CLOEXEC, pr)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if group:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(sa)
        except OSError:
            s.close()
            raise
        return s

    def _listen(self, addr: str, port: int) -> list[socket.socket]:
        """LISTENERS sockets on addr:port sharing it (SO_REUSEPORT).  A steering program
        (steer_reserved_ports) sends connections from reserved source ports to the first
        socket and spreads the others over the rest: root's connections never queue in the
        kernel behind junk, and a burst of junk overflows none of the accept queues as soon
        as one somaxconn-long queue would.  A plain bind first: a daemon already listening
        there makes this fail (EADDRINUSE) instead of sharing its port."""
        probe = self._socket(addr, port, group=False)
        port = probe.getsockname()[1]
        probe.close()
        out = []
        try:
            for _ in range(self.LISTENERS):
                s = self._socket(addr, port, group=True)
                # connections that send nothing stay in the kernel (SYN-ACKs resent) for
                # about FirstByteTimeout instead of costing an accept, a slot and a reset
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT,
                             max(1, math.ceil(self.cfg.first_byte_timeout)))
                s.listen(4096)       # the kernel caps it at net.core.somaxconn
                s.setblocking(False)
                out.append(s)
        except OSError:
            for s in out:
                s.close()
            raise
        try:
            steer_reserved_ports(out[0], len(out))
        except OSError as e:
            log.warning("event=steering-unavailable address=%s error=%r (reserved-port "
                        "connections share the accept queues)", addr, e.strerror)
            return out
        self.first_listeners.append(out[0])
        return out

    def _set_limits(self, cfg):
        mine = per_process(cfg.max_connections, self.processes)
        usable = _raise_fd_limit(mine + FD_RESERVE) - FD_RESERVE
        self.max_connections = max(1, min(mine, usable))
        if self.max_connections < mine:
            log.warning("event=max-connections-lowered configured=%d effective=%d reason=fd-limit",
                        mine, self.max_connections)

    # -- the periodic sweep ----------------------------------------------------------------------
    SWEEP_SLICE = 200      # connections closed per turn of the loop (accepts run in between)

    GC_FREEZE_EVERY = 1.0     # seconds
    GC_FULL_EVERY = 600.0

    def _sweep(self):
        """Every SWEEP seconds: log the traffic summary when due, keep the garbage
        collector's passes short, close the connections past a deadline."""
        now = self.now()
        if self.link is not None:
            self.link.tick(now)
        elif now >= self._stats_due:
            self._stats_due = now + self.STATS_EVERY
            self.log_stats()
        self._gc(now)
        self._expire(now)

    def _gc(self, now):
        """Thousands of live connections make a full collection stall the loop (~60 ms seen
        under junk load).  Our objects are freed by reference counting (no cycles), so
        survivors are moved out of the collector's sight every second (gc.freeze) and a
        full collection runs only every GC_FULL_EVERY seconds, for cycles anyone made."""
        if now >= self._gc_full_due:
            self._gc_full_due = now + self.GC_FULL_EVERY
            gc.unfreeze()
            gc.collect()
        if now >= self._gc_freeze_due:
            self._gc_freeze_due = now + self.GC_FREEZE_EVERY
            gc.freeze()

    def _expire(self, now):
        """Close up to SWEEP_SLICE expired connections; when more are due (a wave of junk
        expiring together), continue on the next turn of the loop, after its I/O."""
        budget = self.SWEEP_SLICE
        for table, attr, why in ((self.no_byte, "first_by", "first-byte-timeouts"),
                                 (self.unread, "read_by", "request-timeouts"),
                                 (self.conns, "end_by", "timeouts")):
            while table and budget:
                c = next(iter(table))
                if getattr(c, attr) > now:
                    break
                c.expire(why)
                table.pop(c, None)
                budget -= 1
        if self.stopping:
            return
        if budget:
            self.loop.call_later(self.SWEEP, self._sweep)
        else:
            self.loop.call_soon(self._expire, now)

    # -- statistics --------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Counters (monotonic, since start) and gauges, for the stats line and metrics.

        Counters: connections, answered, reclaimed (reset at the cap to make room),
        over-capacity (refused: every slot held a complete request), first-byte-timeouts,
        request-timeouts, timeouts (ConnectionTimeout), protocol-errors, closed-early,
        conn-errors, accept-errors, dropped, reloads, reload-failures; answers-<status>
        (replies sent: found, unknown, refused, error, busy), answers-root (found/unknown
        for root), rate-limited (uid over RateLimit), auth-failures, sessions-refused (a
        session ticket from before a restart, or expired), replays, violations (asked about
        another user's job), hinted-not-root, batched (requests that came
        several to a frame).  Gauges: active (connections), pending (connections without a
        complete request), queued (requests waiting for a worker)."""
        own = self.own_snapshot()
        if self.helpers is None:
            return own
        from .group import merge_snapshots
        return merge_snapshots(own, self.helpers.snapshots())

    def own_snapshot(self) -> dict:
        """This process's part of snapshot()."""
        snap = dict(self.stats)
        snap.update(self.handler.counts)
        snap["active"] = self.active
        snap["pending"] = len(self.holders[0]) + len(self.holders[1])
        snap["queued"] = self.queue.waiting
        return snap

    def latency_all(self) -> LatencyHistogram:
        """The latency histogram over every serving process."""
        if self.helpers is None:
            return self.latency
        return self.latency.merged(self.helpers.latencies())

    GAUGES = ("active", "pending", "queued")

    def stats_line(self) -> str:
        snap = self.snapshot()
        return " ".join(f"{k}={v}" for k, v in sorted(snap.items()) if k not in self.GAUGES)

    def log_stats(self):
        line = self.stats_line()
        if line != self._stats_last:
            self._stats_last = line
            log.info("event=stats %s", line)

    # -- start, accept, stop -----------------------------------------------------------------------
    async def start(self, inherited: dict | None = None) -> list[str]:
        """Listen (or, in a helper, take the first process's listeners: `inherited` is
        daemon.group.decode_fds's answer) and start the workers and the sweep."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._set_limits(self.cfg)
        self.workers = _Workers(self.loop, self.handler, self.queue, self.cfg.workers)
        self._stats_due = self.now() + self.STATS_EVERY
        self._gc_freeze_due = self.now()
        self._gc_full_due = self.now() + self.GC_FULL_EVERY
        self.loop.call_later(self.SWEEP, self._sweep)
        if inherited is not None:
            bound = self._adopt(inherited)
        else:
            bound = self._bind_all()
        for s in self.listeners:
            self.loop.add_reader(s.fileno(), self._accept, s)
        return bound

    def _bind_all(self) -> list[str]:
        bound = []
        errors = []
        port = self.cfg.port
        for addr in self.cfg.listen_addresses:
            try:
                group = self._listen(addr, port)
            except (OSError, socket.gaierror) as e:
                errors.append(f"{addr}:{port}: {getattr(e, 'strerror', None) or e}")
                continue
            self.listeners += group
            name = group[0].getsockname()
            if port == 0:
                port = name[1]
            bound.append(_sockname(group[0]))
        if not self.listeners:
            raise OSError(f"cannot listen: {'; '.join(errors)}")
        for e in errors:
            log.warning("event=listen-failed address=%s", e)
        self.port = port
        return bound

    def _adopt(self, inherited: dict) -> list[str]:
        first = set(inherited["first"])
        for fd in inherited["listen"]:
            s = socket.socket(fileno=fd)
            s.setblocking(False)
            self.listeners.append(s)
            if fd in first:
                self.first_listeners.append(s)
        self.port = self.listeners[0].getsockname()[1]
        return sorted({_sockname(s) for s in self.listeners})

    def _make_room(self) -> bool:
        """At the cap: reset the oldest pending connection of the biggest holder (reserved
        port connections last).  False when every connection has a complete request."""
        victim = self.holders[False].victim() or self.holders[True].victim()
        if victim is None:
            return False
        self.stats["reclaimed"] += 1
        victim._finish(abort=True)
        return True

    def _accept(self, lsock: socket.socket):
        """Accept up to 64 from `lsock`, after emptying the reserved-port queues."""
        if lsock not in self.first_listeners:
            for first in self.first_listeners:
                self._accept_from(first, 256)
        self._accept_from(lsock, 64)

    def _accept_from(self, lsock: socket.socket, most: int):
        now = self.now()
        stats = self.stats
        for _ in range(most):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS...: keep serving the rest
                stats["accept-errors"] += 1
                if stats["accept-errors"] % 100 == 1:
                    log.error("event=accept-failed error=%r total=%d", e.strerror, stats["accept-errors"])
                return
            stats["connections"] += 1
            if self.stopping:
                _abort(sock)
                continue
            if self.active >= self.max_connections and not self._make_room():
                stats["over-capacity"] += 1
                if stats["over-capacity"] % 100 == 1:
                    log.warning("event=over-capacity active=%d total=%d", self.active,
                                stats["over-capacity"])
                _abort(sock)
                continue
            sock.setblocking(False)
            self.active += 1
            conn = _Conn(self, sock, addr[0], hinted(addr[1]), now)
            self.conns[conn] = None
            conn.start()

    def request_stop(self):
        self._stop.set()

    async def serve_until_stopped(self):
        await self._stop.wait()
        self.stopping = True
        log.info("event=stopping active=%d", self.active)
        if self.helpers is not None:          # they finish their answers meanwhile
            self.helpers.signal(signal.SIGTERM)
        for s in self.listeners:
            self.loop.remove_reader(s.fileno())
            s.close()
        end = self.loop.time() + 2.0
        while self.conns and self.loop.time() < end:  # let in-flight answers finish
            for c in list(self.unread):                # nobody waits on a half-sent request
                c._finish(abort=True)
            await asyncio.sleep(0.02)
        for c in list(self.conns):
            c._finish(abort=True)
        self.workers.close()
        if self.link is not None:              # a helper: the first process logs the sum
            self.link.tick(self.now(), final=True)
            log.info("event=helper-stopped answered=%d", self.stats["answered"])
            return
        if self.helpers is not None:
            self.helpers.stop()
        lat = self.latency_all()
        log.info("event=stopped %s p50-ms-reserved<=%s p99-ms-reserved<=%s p99-ms-other<=%s",
                 self.stats_line(), *(lat.quantile(h, q) * 1e3 for h, q in
                                      ((True, 0.5), (True, 0.99), (False, 0.99))))

    # -- reload (SIGHUP) ---------------------------------------------------------------------------
    def apply(self, cfg, auth, lookup):
        """Take a reloaded configuration, key and lookup (on the loop thread).  Connections
        in flight keep their deadlines; requests still queued are answered with the new key.
        Port, ListenAddresses, Workers, Processes and the PAM service's socket and workers
        need a restart."""
        old = self.cfg
        for key, attr in (("Port", "port"), ("ListenAddresses", "listen_addresses"),
                          ("Workers", "workers"), ("Processes", "processes"),
                          ("PamSocket", "pam_socket"), ("PamWorkers", "pam_workers")):
            if getattr(cfg, attr) != getattr(old, attr):
                log.warning("event=reload-needs-restart key=%s running=%r file=%r", key,
                            getattr(old, attr), getattr(cfg, attr))
                setattr(cfg, attr, getattr(old, attr))
        set_log_level(cfg.log_level)
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.cfg = cfg
        self._set_limits(cfg)
        self.queue.share = cfg.root_share
        h = self.handler
        old_lookup = h.lookup
        h.auth = auth
        h.configure(cfg, self._node_override or cfg.node())
        h.lookup = lookup
        if old_lookup is not lookup:    # workers may still be inside it: close it later
            self.loop.call_later(cfg.connection_timeout + 1.0, old_lookup.close)
        self.stats["reloads"] += 1
        log.info("event=reloaded config=%s auth=%s max_connections=%d rate_limit=%s root_share=%s",
                 cfg.source, auth.name, self.max_connections, cfg.rate_limit, cfg.root_share)

    async def reload(self, load):
        """Run `load()` -> (cfg, auth, lookup) off the loop; keep the old ones on failure."""
        try:
            cfg, auth, lookup = await self.loop.run_in_executor(None, load)
        except Exception as e:
            self.stats["reload-failures"] += 1
            log.error("event=reload-failed error=%s", e)
            return False
        self.apply(cfg, auth, lookup)
        return True


SO_ATTACH_REUSEPORT_CBPF = 51      # <asm-generic/socket.h>
_SKF_NET_OFF = 0xFFF00000          # -0x100000: classic BPF offsets from the network header


def steer_reserved_ports(sock: socket.socket, n: int) -> None:
    """Attach a classic BPF program to sock's SO_REUSEPORT group of `n` sockets: a
    connection from a source port below 1024 goes to socket 0, any other to socket
    1 + port % (n - 1).  Raises OSError when the kernel refuses (then the kernel's hash
    decides, as without a program)."""
    import ctypes
    if sock.family == socket.AF_INET6:          # fixed 40-byte header (the port follows)
        load = [(0x28, 0, 0, (_SKF_NET_OFF + 40) & 0xFFFFFFFF)]     # ldh [net + 40]
    else:                                       # variable IHL
        load = [(0xB1, 0, 0, _SKF_NET_OFF),     # ldxb 4 * ([net + 0] & 0xf)
                (0x48, 0, 0, _SKF_NET_OFF)]     # ldh [x + net]
    prog = load + [(0x35, 1, 0, 1024),          # jge #1024, +1
                   (0x06, 0, 0, 0),             # ret #0
                   (0x94, 0, 0, max(1, n - 1)), # mod #(n - 1)
                   (0x04, 0, 0, 1),             # add #1
                   (0x16, 0, 0, 0)]             # ret a
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                    struct.pack("HL", len(prog), ctypes.addressof(buf)))


def _sockname(s: socket.socket) -> str:
    name = s.getsockname()
    return f"[{name[0]}]:{name[1]}" if s.family == socket.AF_INET6 else f"{name[0]}:{name[1]}"


def set_log_level(level: str):
    logging.getLogger("callerid").setLevel(getattr(logging, level.upper(), logging.INFO))


def make_auth_checked(cfg):
    """The authenticator the config asks for, proven to work now (munged reachable, key
    readable) rather than failing on every request later.  Raises auth.AuthError."""
    from .client import auth_from_config
    auth = auth_from_config(cfg)
    if cfg.auth_type == "munge":
        blob = auth.sign(P.TYPE_REPLY, b"callerid-selftest")
        auth.verify(P.TYPE_REPLY, b"callerid-selftest", blob)
    return auth


def make_lookup(cfg) -> Lookup:
    from .jobs import make_jobs
    return Lookup(make_jobs(cfg, log), sockdiag=cfg.sock_diag)


def reloader(path: str | None, overrides: dict | None = None):
    """The default SIGHUP action: re-read `path` (None: the default file), apply the command
    line's overrides, build and check the key, rebuild the lookup (layout re-discovered)."""
    def load():
        from .config import load_config
        cfg = load_config(path)
        for k, v in (overrides or {}).items():
            setattr(cfg, k, v)
        for k in cfg.unknown_keys:
            log.warning("event=config-unknown-key key=%s", k)
        return cfg, make_auth_checked(cfg), make_lookup(cfg)
    return load


SWITCH_INTERVAL = 0.0005


async def run(cfg, auth, lookup, *, ready=None, reload=None, inherited=None,
              helper_argv=None) -> int:
    """Serve until SIGTERM/SIGINT.  `reload`: callable -> (cfg, auth, lookup) run on SIGHUP
    (default: re-read cfg.source).  `ready(server)` is called once listening.  With
    Processes > 1 (daemon.group): `helper_argv(port)` is the command line of the other
    serving processes, which this one starts; in one of those, `inherited` holds the fds
    it was given."""
    # The loop thread and the workers share the GIL: a worker coming back from munged waits
    # for it up to the switch interval (5 ms by default), several times per answer while
    # the loop is busy (junk load).  0.5 ms keeps answers within their budget then.
    sys.setswitchinterval(SWITCH_INTERVAL)
    n = cfg.serving_processes()
    replay = None
    if inherited is not None:
        replay = ReplayCache(int(cfg.max_clock_skew * 1000), fd=inherited["replay"])
    srv = Server(cfg, auth, lookup, processes=n, replay=replay)
    bound = await srv.start(inherited)
    loop = asyncio.get_running_loop()
    if reload is None:
        reload = reloader(None if cfg.source == "<defaults>" else cfg.source)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, srv.request_stop)
    if inherited is not None:
        from .group import HelperLink
        srv.link = HelperLink(srv, inherited["control"])
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(srv.reload(reload)))
        log.info("event=helper-listening index=%d addresses=%s pid=%d", inherited["index"],
                 ",".join(bound), os.getpid())
        await srv.serve_until_stopped()
        return 0
    if n > 1:
        from .group import Helpers
        srv.handler.replay.share()
        srv.helpers = Helpers(srv, n, helper_argv(srv.port)).start()

    def hup():
        loop.create_task(srv.reload(reload))
        if srv.helpers is not None:
            srv.helpers.signal(signal.SIGHUP)
    loop.add_signal_handler(signal.SIGHUP, hup)
    log.info("event=listening node=%s addresses=%s auth=%s sockdiag=%s processes=%d "
             "max_connections=%d pid=%d", srv.handler.node, ",".join(bound), auth.name,
             lookup.sock_backend, n, srv.max_connections * n, os.getpid())
    if ready is not None:
        ready(srv)
    await srv.serve_until_stopped()
    return 0
