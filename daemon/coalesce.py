"""One request in flight per caller-ID daemon; the questions that wait for it go together.

Used by the PAM decision service (pam_callerid/login.py), where every login asks the
daemon at its source.  Idle, a question goes at once, alone, exactly as client.query sends
it.  While a request to a daemon is out, questions for that daemon queue; when it returns,
the queued ones (at most protocol.MAX_BATCH to a frame) go in one request: one connection,
one credential, one munged round trip on each end for all of them.  So the cost per
question falls exactly when a daemon is slow to answer -- a launcher ssh-ing to a thousand
nodes at once makes a thousand nodes ask its node's daemon about ten thousand connections
within a fraction of a second -- and nothing waits when it is not.

Bounds: no question waits past its own deadline (it leaves the queue with the answer a
timed-out query gets: "unreachable", not cacheable), the request that carries a batch is
bounded by the deadline of the question that sends it, and a daemon whose queued questions
all left does not stay "busy".
"""
from __future__ import annotations

import collections
import threading
import time

from . import client
from .protocol import MAX_BATCH


class _Batch:
    __slots__ = ("members", "turn", "claimed", "answers")

    def __init__(self):
        self.members = []          # [(src, dst)] or None for a question that left
        self.turn = False          # the previous request returned: a member may send it
        self.claimed = False       # a member is sending it
        self.answers = None        # {index: Answer} once sent

    def live(self) -> bool:
        return any(m is not None for m in self.members)


class _Peer:
    __slots__ = ("busy", "queue")

    def __init__(self):
        self.busy = False
        self.queue = collections.deque()    # _Batch, oldest first


class Coalescer:
    """``query(host, port, src, dst, timeout=..., auth=..., **kw)``: client.query's answer,
    with the questions to one daemon (same port, auth and trusted uids) coalesced as the
    module docstring says.  ``ask``: client.query_many (tests give another)."""

    def __init__(self, ask=client.query_many, clock=time.monotonic):
        self._ask = ask
        self._clock = clock
        self._cond = threading.Condition()
        self._peers: dict = {}

    def query(self, host, port, src, dst, *, timeout, auth, trusted_uids=frozenset({0}),
              **kw) -> client.Answer:
        t0 = self._clock()
        deadline = t0 + timeout
        key = (host, port, auth, frozenset(trusted_uids), tuple(sorted(kw.items())))
        kw = dict(kw, auth=auth, trusted_uids=trusted_uids)
        with self._cond:
            peer = self._peers.setdefault(key, _Peer())
            if peer.busy:
                batch, index = self._join(peer, (src, dst))
            else:
                peer.busy, batch = True, None
        if batch is None:                       # nothing in flight: go now, alone
            try:
                return self._ask(host, port, [(src, dst)], timeout=timeout, **kw)[0]
            finally:
                self._done(key, peer)
        return self._wait(key, peer, batch, index, host, port, t0, deadline, kw)

    def _join(self, peer, conn):
        last = peer.queue[-1] if peer.queue else None
        if last is None or len(last.members) == MAX_BATCH:
            last = _Batch()
            peer.queue.append(last)
        last.members.append(conn)
        return last, len(last.members) - 1

    def _wait(self, key, peer, batch, index, host, port, t0, deadline, kw):
        with self._cond:
            while batch.answers is None and (batch.claimed or not batch.turn):
                left = deadline - self._clock()
                if left <= 0:
                    return self._leave(key, peer, batch, index, t0)
                self._cond.wait(left)
            if batch.answers is not None:            # another member sent it
                return _since(batch.answers.get(index), t0, self._clock())
            batch.claimed = True                     # its turn came: this member sends it
            live = [(i, m) for i, m in enumerate(batch.members) if m is not None]
        answers = {}
        try:
            got = self._ask(host, port, [m for _, m in live],
                            timeout=max(0.0, deadline - self._clock()), **kw)
            answers = {i: a for (i, _), a in zip(live, got)}
        finally:
            with self._cond:
                batch.answers = answers
                self._cond.notify_all()
            self._done(key, peer)
        return _since(answers.get(index), t0, self._clock())

    def _leave(self, key, peer, batch, index, t0):
        """A question whose deadline passed in the queue (the lock is held)."""
        batch.members[index] = None
        if batch.turn and not batch.claimed and not batch.live():
            self._next(key, peer)               # its turn came, and nobody is left to send it
        return client.Answer(client.UNREACHABLE, detail="timeout waiting for reply",
                             elapsed_ms=(self._clock() - t0) * 1e3)

    def _done(self, key, peer):
        with self._cond:
            self._next(key, peer)

    def _next(self, key, peer):
        """The request to this daemon returned: the oldest batch with a question left gets
        its turn, or the daemon is idle (the lock is held)."""
        while peer.queue:
            batch = peer.queue.popleft()
            if batch.live():
                batch.turn = True
                self._cond.notify_all()
                return
        peer.busy = False
        if self._peers.get(key) is peer:
            del self._peers[key]


def _since(answer: client.Answer, t0: float, now: float) -> client.Answer:
    """The batch's answer, timed from this question's start; a question whose batch never
    got an answer (the sender failed) is unreachable."""
    if answer is None:
        return client.Answer(client.UNREACHABLE, detail="no answer (the request failed)",
                             elapsed_ms=(now - t0) * 1e3)
    return client.Answer(answer.outcome, answer.job_id, answer.job_uid, answer.node,
                         answer.detail, (now - t0) * 1e3, answer.cacheable)
