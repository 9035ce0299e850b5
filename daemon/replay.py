"""The nonce cache that refuses replayed and stale requests, shared by every serving process,
with the daemon instance's secret (random at start; daemon.session seals tickets with it).

A fixed table in a memfd mapped by each serving process (daemon.group passes the fd on), so
a request replayed to another process of the daemon is refused too.  Slots are grouped in
buckets of WAYS; a nonce goes to the bucket chosen by a keyed hash (the key is random and
lives in the table: a client cannot aim its nonces at one bucket).  A slot whose timestamp
left the window is free.  When a bucket has no free slot, its oldest entry is evicted and
every request not newer than the evicted one is refused from then on (the floor): the window
shrinks rather than the protection.
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time

_HEAD = struct.Struct("=q16s32s")     # floor (ms), hash key, instance secret
_SLOT = struct.Struct("=16sq")        # nonce, timestamp (ms); 0 = never used
WAYS = 8


class ReplayCache:
    """Nonces seen within the clock-skew window; bounded (about `max_entries`).

    `fd`: a table made by another process's ReplayCache (its `.fd`), to share it; then
    check_and_add also takes a lock on the file (threads of one process share the
    threading lock, processes the record lock)."""

    def __init__(self, window_ms: int, max_entries: int = 131072, fd: int | None = None):
        self.window_ms = window_ms
        self.shared = fd is not None
        if fd is None:
            self.buckets = max(1, -(-max_entries // WAYS))
            fd = os.memfd_create("callerid-replay", os.MFD_CLOEXEC)
            os.ftruncate(fd, _HEAD.size + self.buckets * WAYS * _SLOT.size)
            self._mm = mmap.mmap(fd, 0)
            _HEAD.pack_into(self._mm, 0, 0, os.urandom(16), os.urandom(32))
        else:
            self._mm = mmap.mmap(fd, 0)
            self.buckets = (len(self._mm) - _HEAD.size) // (WAYS * _SLOT.size)
        self.fd = fd
        _, self._key, self.secret = _HEAD.unpack_from(self._mm, 0)
        self._lock = threading.Lock()

    def share(self):
        """From now on other processes use the table too (take the file lock)."""
        self.shared = True

    def _bucket(self, nonce: bytes) -> int:
        h = hashlib.blake2b(nonce, digest_size=8, key=self._key).digest()
        return _HEAD.size + int.from_bytes(h, "little") % self.buckets * WAYS * _SLOT.size

    def check_and_add(self, nonce: bytes, ts_ms: int, now_ms: int | None = None) -> str | None:
        """None if fresh, else a reason token ("stale-timestamp", "replayed")."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now_ms - ts_ms) > self.window_ms:
            return "stale-timestamp"
        base = self._bucket(nonce)
        with self._lock:
            if self.shared:
                fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                return self._insert(base, nonce, ts_ms, now_ms - self.window_ms)
            finally:
                if self.shared:
                    fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _insert(self, base: int, nonce: bytes, ts_ms: int, oldest_ok: int) -> str | None:
        mm = self._mm
        floor = _HEAD.unpack_from(mm, 0)[0]
        if ts_ms <= floor:
            return "stale-timestamp"
        free = victim = None
        victim_ts = 0
        for off in range(base, base + WAYS * _SLOT.size, _SLOT.size):
            n, t = _SLOT.unpack_from(mm, off)
            if t < oldest_ok:                     # never used, or out of the window
                if free is None:
                    free = off
            elif n == nonce:
                return "replayed"
            elif victim is None or t < victim_ts:
                victim, victim_ts = off, t
        if free is None:
            _HEAD.pack_into(mm, 0, max(floor, victim_ts), self._key, self.secret)
            free = victim
        _SLOT.pack_into(mm, free, nonce, ts_ms)
        return None

    def close(self):
        self._mm.close()
        os.close(self.fd)
