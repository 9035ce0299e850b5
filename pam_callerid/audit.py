"""Audit records of pam_callerid: one JSON object per line, one line per decision.

Writing (in the PAM service of ``callerid daemon``): the service hands every record to ONE
:class:`AuditWriter`, whose thread writes them in the order they were submitted (the decision
order), each with ONE ``write()`` on an ``O_APPEND`` descriptor, so lines never interleave and
logins never wait for the disk. The file must live in a root-owned directory that no one else
can write (default /var/log/slurm-callerid/, created 0750); it is opened with
``O_NOFOLLOW|O_NONBLOCK`` and used only when it is a regular file owned by root. A planted
symlink, FIFO or device, or a directory another account owns (Debian's /var/log/slurm belongs
to ``slurm``), is refused with an error in the daemon's log: it can neither hang a login nor
redirect the trail. Encoding needs no ``json`` import (:func:`encode`).

Reading: ``callerid audit`` (pam_callerid/audit_reader.py: rotated files, --follow,
--since/--until, --summary).

Record fields: time (ISO UTC), ts (Unix), phase (account | session), node, service, user,
uid, pid (the peer: the client process in sshd), rhost, src_ip, src_port, dst_ip, dst_port,
jobs (ids considered), callerid (the daemon's answer: status, job, uid, node, authenticated,
source, detail), path (root | exempt | no-jobs | not-a-node | single | caller-ID | newest |
allow | deny | user | failure | unknown-user | malformed), job (chosen), target (job | user),
reused (the decision of this login's account phase, not asked again), adopted_pid, how
(stepd | cgroup), how_reason (why not the stepd), result (PAM code), reason, ms (stages),
latency_ms (from the request's arrival to the reply).
"""
import errno
import os
import stat


__all__ = ["AuditWriter", "AuditError", "append", "encode"]

MAX_LINE = 16384


class AuditError(OSError):
    """The audit file cannot be written safely; the text says why."""


def _enc(v):
    import _json
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(int(v))
    if isinstance(v, float):
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else "null"
    if isinstance(v, str):
        return _json.encode_basestring_ascii(v)
    if isinstance(v, dict):
        return "{" + ",".join(_json.encode_basestring_ascii(str(k)) + ":" + _enc(x)
                              for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_enc(x) for x in v) + "]"
    return _json.encode_basestring_ascii(str(v))


def encode(rec):
    """One JSON line (str, ends with a newline, no other newline inside)."""
    return _enc(rec) + "\n"


def _line(rec):
    data = encode(rec).encode("ascii")
    if len(data) > MAX_LINE:
        slim = {k: rec.get(k) for k in ("time", "ts", "phase", "node", "service", "user", "uid",
                                        "pid", "path", "job", "result", "reason", "latency_ms")}
        slim["truncated"] = True
        data = encode(slim).encode("ascii")
    return data


def _check_dir(d):
    """The audit directory: created 0750 if missing; must be a real directory owned by root
    and writable by no one else."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        os.makedirs(d, mode=0o750, exist_ok=True)
        st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise AuditError("%s is not a directory (a symlink?)" % d)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise AuditError("directory %s is owned by uid %d with mode %o: another account could "
                         "plant a FIFO or replace the trail there; use a root-owned directory "
                         "writable only by root, such as /var/log/slurm-callerid"
                         % (d, st.st_uid, stat.S_IMODE(st.st_mode)))


def _open(path):
    """An O_APPEND descriptor of the regular root-owned file ``path`` (never blocks, never
    follows a symlink)."""
    _check_dir(os.path.dirname(path) or "/")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW |
                     os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, 0o640)
    except OSError as e:
        raise AuditError("cannot open %s: %s%s" % (
            path, e.strerror, " (a symlink there?)" if e.errno == errno.ELOOP else
            " (a FIFO without a reader there?)" if e.errno == errno.ENXIO else "")) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
        os.close(fd)
        raise AuditError("%s is not a regular file owned by root (mode %o, uid %d): refused"
                         % (path, st.st_mode, st.st_uid))
    return fd


def append(path, rec):
    """Append ``rec`` to ``path`` now, with one write (AuditError / OSError on failure).
    The service goes through :class:`AuditWriter`; this is its unit of work."""
    data = _line(rec)
    fd = _open(path)
    try:
        n = os.write(fd, data)
        if n != len(data):
            raise AuditError("short write to %s (%d of %d bytes)" % (path, n, len(data)))
    finally:
        os.close(fd)


class AuditWriter:
    """The one writer of audit records: ``submit(path, record, ticket)`` never blocks (a
    full queue drops the record and says so in the log); a thread writes them in the order
    of their tickets -- taken when each decision is made (``ticket()``), so a record
    completed later (an adoption the stepd registers after the reply) keeps its place.

    ``log(level, text)`` receives the errors, at most one line per path and error per
    ``quiet_for`` seconds (a broken path must not flood the log at every login)."""

    def __init__(self, log, max_queue=10000, quiet_for=60.0):
        import queue
        import threading
        self._q = queue.Queue(max_queue)
        self._log = log
        self._quiet_for = quiet_for
        self._said = {}
        self.written = self.dropped = self.failed = 0
        self._order = threading.Lock()
        self._issued = self._released = 0
        self._held = {}                  # ticket -> (path, record) waiting for earlier ones
        self._t = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._t.start()

    GAP_AFTER = 5.0      # s a record waits behind a missing one before that one is given up
    MAX_HELD = 1000      # records held behind a missing one, at most

    def ticket(self):
        """The next place in the records' order; every ticket must be submitted (with
        ``path`` None when there is nothing to write)."""
        with self._order:
            self._issued += 1
            return self._issued

    def submit(self, path, rec, ticket):
        """Queue ``rec`` for ``path`` (None: nothing to write) in ``ticket``'s place."""
        import time
        now = time.monotonic()
        with self._order:
            self._held[ticket] = (path, rec, now)
            first = min(self._held)
            if first != self._released + 1 and (len(self._held) > self.MAX_HELD or
                                                now - self._held[first][2] > self.GAP_AFTER):
                self._say("", "gap", "audit: record %d never completed; writing on"
                          % (self._released + 1))         # a ticket never submitted (a bug)
                self._released = first - 1
            while self._released + 1 in self._held:
                self._released += 1
                path, rec, _ = self._held.pop(self._released)
                self._queue(path, rec)

    def _queue(self, path, rec):
        if not path or path.lower() == "none":
            return
        import queue
        try:
            self._q.put_nowait((path, rec))
        except queue.Full:
            self.dropped += 1
            self._say(path, "queue full", "audit queue full: record dropped (%d so far)"
                      % self.dropped)

    def flush(self, timeout=5.0):
        """Wait until every record submitted so far is written (tests, shutdown)."""
        import threading
        done = threading.Event()
        self._q.put((None, done))
        return done.wait(timeout)

    def close(self, timeout=5.0):
        self.flush(timeout)
        self._q.put(None)
        self._t.join(timeout)

    def _say(self, path, key, text):
        import time
        now = time.monotonic()
        if now - self._said.get((path, key), -1e9) >= self._quiet_for:
            self._said[(path, key)] = now
            self._log("error", "audit %s: %s" % (path, text))

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            path, rec = item
            if path is None:
                rec.set()
                continue
            try:
                append(path, rec)
                self.written += 1
            except OSError as e:
                self.failed += 1
                self._say(path, type(e).__name__ + str(getattr(e, "errno", "")),
                          "record not written: %s" % e)
            except Exception as e:                    # never let the writer die
                self.failed += 1
                self._say(path, "bug", "record not written: %s: %s" % (type(e).__name__, e))
