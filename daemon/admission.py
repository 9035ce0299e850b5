"""Admission of caller-ID requests: pure bookkeeping, no sockets (the server drives it).

Who is asking is known for certain only after the request's credential is verified (munge
or HMAC), and verifying costs a round trip to munged.  Until then the server has two facts:
the peer's address and its source port.  A port below 1024 can only be bound by root on
the peer (the caller-ID client binds one when it runs as root, `ReservedSourcePort`), so
it marks the request as *probably root's*: a scheduling hint that lets the PAM module's
questions go first, never a credential (every request is still verified, and a hinted
request signed by another uid is logged).

* `Holders`: connections still waiting for their request, by source.  When the server is
  at `MaxConnections`, the victim is the oldest such connection of the source holding the
  most of them: junk from a few hosts is reclaimed before a legitimate client that sent
  its request at once is ever refused.
* `FairQueue`: requests waiting for a worker, one FIFO per source served round-robin, in
  two classes (hinted and other); the hinted class gets `share` of the picks while both
  wait (`RootShare`), so a flood from one address neither delays other addresses nor, on
  its own address, the hinted requests of the PAM module.
* `TokenBuckets`: rate limit keyed by the *authenticated* uid (root and SlurmUser are not
  limited): a user flooding from node A slows down that user only, not node A.
"""
from __future__ import annotations

import collections
import threading
import time
from _queue import SimpleQueue

RESERVED_PORTS = 1024          # source ports below this can only be bound by root


def hinted(port: int) -> bool:
    """A connection from a reserved source port (a hint that root on the peer made it)."""
    return 0 < port < RESERVED_PORTS


class Holders:
    """Connections without a complete request yet, grouped by source; O(1) per operation.

    victim() returns the oldest connection of the source that holds the most (ties: the
    source that reached that count first)."""

    def __init__(self):
        self._by_src: dict[str, dict] = {}            # src -> {conn: None}, oldest first
        self._with: dict[int, dict[str, None]] = {}   # count -> {src: None}
        self._max = 0
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _move(self, src: str, old: int, new: int):
        if old:
            bucket = self._with[old]
            del bucket[src]
            if not bucket:
                del self._with[old]
        if new:
            self._with.setdefault(new, {})[src] = None
            if new > self._max:
                self._max = new
        while self._max and self._max not in self._with:
            self._max -= 1

    def add(self, src: str, conn) -> None:
        conns = self._by_src.setdefault(src, {})
        if conn in conns:
            return
        conns[conn] = None
        self._n += 1
        self._move(src, len(conns) - 1, len(conns))

    def discard(self, src: str, conn) -> None:
        conns = self._by_src.get(src)
        if conns is None or conn not in conns:
            return
        del conns[conn]
        self._n -= 1
        self._move(src, len(conns) + 1, len(conns))
        if not conns:
            del self._by_src[src]

    def victim(self):
        """The connection to reclaim (removed from the table), or None when empty."""
        if not self._max:
            return None
        src = next(iter(self._with[self._max]))
        conn = next(iter(self._by_src[src]))
        self.discard(src, conn)
        return conn

    def count(self, src: str) -> int:
        return len(self._by_src.get(src, ()))


class FairQueue:
    """Work items for the worker threads: per-source FIFOs served round-robin, two classes.

    put() never blocks; get() blocks until an item is there (None after close()).  While
    both classes wait, the hinted class gets `share` of the picks (a deficit counter, so the
    other class is served every 1/(1-share) picks and never starved unless share == 1)."""

    def __init__(self, share: float = 0.75):
        self.share = share
        self._cls = (collections.OrderedDict(), collections.OrderedDict())  # hinted, other
        self._lock = threading.Lock()
        self._tokens = SimpleQueue()     # one token per item: workers sleep in C, not in Python
        self._deficit = 0.0
        self._closed = False
        self.waiting = 0

    def put(self, src: str, hint: bool, item) -> None:
        with self._lock:
            d = self._cls[0 if hint else 1]
            q = d.get(src)
            if q is None:
                d[src] = q = collections.deque()
            q.append(item)
            self.waiting += 1
        self._tokens.put(1)

    def _pick(self):
        hinted_q, other_q = self._cls
        if hinted_q and other_q:
            self._deficit += 1.0 - self.share
            if self._deficit >= 1.0:
                self._deficit -= 1.0
                d = other_q
            else:
                d = hinted_q
        else:
            d = hinted_q or other_q
        src, q = next(iter(d.items()))
        item = q.popleft()
        if q:
            d.move_to_end(src)
        else:
            del d[src]
        self.waiting -= 1
        return item

    def get(self):
        if self._tokens.get() is None:
            return None
        with self._lock:
            if self._closed:
                return None
            return self._pick()

    def close(self, nworkers: int) -> None:
        with self._lock:
            self._closed = True
        for _ in range(nworkers):
            self._tokens.put(None)


class TokenBuckets:
    """Token bucket per key; the table is bounded (least recently seen key evicted)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 4096):
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._t: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._t.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            if ok:
                tokens -= 1.0
            self._t[key] = (tokens, now)
            while len(self._t) > self.max_keys:
                self._t.popitem(last=False)
        return ok

    def __len__(self):
        return len(self._t)
