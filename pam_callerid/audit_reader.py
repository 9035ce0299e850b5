"""`callerid audit`: read the audit trail the PAM decision service writes (pam_callerid/audit.py
writes it: one JSON object per line, one line per decision).

    callerid audit [--file PATH] [--since WHEN] [--until WHEN] [--job N] [--user U]
                   [--node N] [--phase P] [--path P] [--result R]
                   [--follow | --summary [--by node,user]] [--json]

* Rotated files are read too, oldest first: ``audit.jsonl.N[.gz]`` (logrotate's numbering,
  higher = older) and ``audit.jsonl-DATE[.gz]`` (``dateext``); with ``--since``, rotated
  files last written before it are not opened.
* ``--since`` / ``--until``: ``today``, ``yesterday`` (local midnight), an age (``90s``,
  ``30m``, ``2h``, ``7d``, ``1w``), an ISO time (local time unless it carries an offset or
  ``Z``), or a Unix time. ``--until`` is exclusive.
* ``--follow`` prints the matching records, then new ones as they are written, across
  rotation (the file is re-opened when it is replaced or truncated), until interrupted.
* The table shows local times, IPv6 sources as ``[ADDR]:PORT``, and sizes every column
  to its longest value (long node names stay aligned).
* ``--summary`` counts decisions by phase, path and result per node and user (``--by``
  chooses the grouping: ``node``, ``user``, ``node,user`` or ``none``), e.g.
  ``callerid audit --since 7d --summary --path newest``.

Every file is opened with O_NOFOLLOW|O_NONBLOCK and must be a regular file: a FIFO or
symlink planted next to the audit file is reported and skipped, never waited on.
"""
from __future__ import annotations

import argparse
import errno
import gzip
import json
import os
import re
import stat
import sys
import time
from datetime import datetime, timedelta

from .options import DEFAULT_AUDIT

EXIT_OK, EXIT_NOFILE, EXIT_USAGE = 0, 1, 64


# ------------------------------------------------------------------ time arguments (pure)
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """A Unix time from today | yesterday | an age | ISO (local unless offset) | Unix time.
    ValueError when it is none of these."""
    now = time.time() if now is None else now
    t = text.strip().lower()
    if t in ("today", "yesterday"):
        midnight = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0,
                                                       microsecond=0)
        if t == "yesterday":
            midnight -= timedelta(days=1)
        return midnight.timestamp()
    m = _AGE.match(t)
    if m:
        return now - float(m[1]) * _UNITS[m[2]]
    try:
        return float(t)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return dt.timestamp()            # naive = local time, as journalctl --since


# ------------------------------------------------------------------ files
_ROTATED = re.compile(r"\.(\d+)(\.gz)?\Z|-(\d{8,10})(\.gz)?\Z")


def rotated_files(path: str) -> list[str]:
    """The rotated files of ``path`` (not ``path`` itself), oldest first."""
    d, base = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(d)
    except OSError:
        return []
    found = []
    for name in names:
        if not name.startswith(base) or name == base:
            continue
        m = _ROTATED.match(name[len(base):])
        if not m:
            continue
        if m[1] is not None:
            key = (0, -int(m[1]))                 # .1 is the newest: larger number first
        else:
            key = (1, int(m[3]))                  # dateext: older date first
        found.append((key, os.path.join(d, name)))
    # dateext and numbered never mix in one setup; if they do, numbered ones go first
    return [p for _, p in sorted(found)]


class UnsafeFile(OSError):
    pass


def open_regular(path: str):
    """A binary file object for a regular file, opened without following a symlink or
    blocking on a FIFO (UnsafeFile otherwise); transparently gunzipped for ``*.gz``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile(errno.ELOOP, "is a symbolic link, not read", path) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(errno.EINVAL, "is not a regular file, not read", path)
    f = os.fdopen(fd, "rb")
    return gzip.GzipFile(fileobj=f, mode="rb") if path.endswith(".gz") else f


def parse_line(raw: bytes):
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def read_file(path: str):
    with open_regular(path) as f:
        for raw in f:
            rec = parse_line(raw)
            if rec is not None:
                yield rec


def files_to_read(path: str, since: float | None) -> list[str]:
    """Rotated files (oldest first) and the current one; with ``since``, rotated files
    whose last write is older are left out."""
    out = []
    for p in rotated_files(path):
        try:
            if since is not None and os.stat(p).st_mtime < since:
                continue
        except OSError:
            continue
        out.append(p)
    return out + [path]


def read_all(path: str, since=None, warn=None, current=True):
    """Every record of the audit trail (rotated files first; the current file too unless
    ``current`` is False). A missing current file is FileNotFoundError only when there is
    nothing at all to read."""
    files = files_to_read(path, since)
    if not current:
        files = files[:-1]
        if not any(os.path.lexists(p) for p in files):
            return
    readable = [p for p in files if os.path.lexists(p)]
    if not readable:
        raise FileNotFoundError(errno.ENOENT, "no audit file", path)
    for p in readable:
        try:
            yield from read_file(p)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            if warn is not None:
                warn(f"{p}: {getattr(e, 'strerror', None) or e}")


# ------------------------------------------------------------------ filtering (pure)
class Filter:
    def __init__(self, job=None, user=None, node=None, since=None, until=None, phase=None,
                 path=None, result=None):
        self.job, self.user, self.node, self.phase = job, user, node, phase
        self.since, self.until, self.path, self.result = since, until, path, result

    def __call__(self, rec) -> bool:
        if self.job is not None and rec.get("job") != self.job \
                and self.job not in (rec.get("jobs") or ()):
            return False
        if self.user is not None and rec.get("user") != self.user \
                and str(rec.get("uid")) != str(self.user):
            return False
        if self.node is not None and rec.get("node") != self.node:
            return False
        ts = rec.get("ts")
        ts = ts if isinstance(ts, (int, float)) else 0
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts >= self.until:
            return False
        for key in ("phase", "path", "result"):
            want = getattr(self, key)
            if want is not None and str(rec.get(key) or "").lower() != want.lower():
                return False
        return True


# ------------------------------------------------------------------ table (pure)
def endpoint(ip, port) -> str:
    if not ip:
        return ""
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return host if port in (None, "") else f"{host}:{port}"


def local_time(rec) -> str:
    ts = rec.get("ts")
    if isinstance(ts, (int, float)):
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    return str(rec.get("time") or "")


def _callerid(rec) -> str:
    cid = rec.get("callerid") or {}
    if not isinstance(cid, dict):
        return str(cid)
    status = cid.get("status") or ""
    if status == "found":
        return "job %s%s" % (cid.get("job"), "" if cid.get("authenticated", True) else
                             " (unauth)")
    return str(status)


COLUMNS = ("time", "node", "user", "phase", "source", "jobs", "callerid", "path", "job",
           "result", "ms")
MIN_WIDTH = {"time": 19, "node": 6, "user": 6, "phase": 7, "source": 15, "jobs": 4,
             "callerid": 8, "path": 8, "job": 4, "result": 7, "ms": 5}


def row(rec) -> dict:
    src = endpoint(rec.get("src_ip"), rec.get("src_port")) or str(rec.get("rhost") or "")
    lat = rec.get("latency_ms")
    return {"time": local_time(rec), "node": str(rec.get("node") or ""),
            "user": str(rec.get("user") or ""), "phase": str(rec.get("phase") or ""),
            "source": src, "jobs": ",".join(str(j) for j in rec.get("jobs") or ()),
            "callerid": _callerid(rec), "path": str(rec.get("path") or ""),
            "job": "" if rec.get("job") is None else str(rec.get("job")),
            "result": str(rec.get("result") or ""),
            "ms": "%.1f" % lat if isinstance(lat, (int, float)) else ""}


def widths_for(rows) -> dict:
    w = dict(MIN_WIDTH)
    for r in rows:
        for c in COLUMNS:
            w[c] = max(w[c], len(r[c]))
    return w


def format_row(r, widths) -> str:
    return "  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip()


def header(widths) -> str:
    return format_row({c: c.upper() for c in COLUMNS}, widths)


def format_table(records) -> str:
    rows = [row(r) for r in records]
    w = widths_for(rows)
    return "\n".join([header(w)] + [format_row(r, w) for r in rows])


# ------------------------------------------------------------------ summary (pure)
def summarize(records, by=("node", "user")):
    """{(group..., phase, path, result): count}."""
    counts = {}
    for rec in records:
        key = tuple(str(rec.get(k) or "") for k in by) + tuple(
            str(rec.get(k) or "") for k in ("phase", "path", "result"))
        counts[key] = counts.get(key, 0) + 1
    return counts


def format_summary(counts, by=("node", "user")) -> str:
    cols = [*by, "phase", "path", "result", "count"]
    rows = [[*key, str(n)] for key, n in sorted(counts.items())]
    total = sum(counts.values())
    w = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(v.rjust(w[i]) if cols[i] == "count" else v.ljust(w[i])  # noqa: E731
                              for i, v in enumerate(r)).rstrip()
    lines = [fmt([c.upper() for c in cols])] + [fmt(r) for r in rows]
    by_path = {}
    for key, n in counts.items():
        p = (key[-2], key[-1])
        by_path[p] = by_path.get(p, 0) + n
    lines.append("")
    lines.append(f"{total} decision{'s' if total != 1 else ''}: " + ", ".join(
        f"{path or '-'}/{res or '-'} {n}" for (path, res), n in sorted(
            by_path.items(), key=lambda kv: (-kv[1], kv[0]))))
    return "\n".join(lines)


# ------------------------------------------------------------------ follow
class Follower:
    """Yields records appended to ``path``; re-opens it when it is replaced (rotation) or
    truncated. ``poll`` seconds between looks; ``stop()`` (or ``deadline``) ends it."""

    def __init__(self, path, poll=0.5, start_at_end=True):
        self.path, self.poll = path, poll
        self.f = None
        self.ino = None
        self.pos = 0
        self.buf = b""
        self.stopped = False
        self._open(at_end=start_at_end)

    def _open(self, at_end):
        if self.f is not None:
            self.f.close()
            self.f = None
        try:
            self.f = open_regular(self.path)
        except OSError:
            self.ino, self.pos = None, 0
            return
        st = os.fstat(self.f.fileno())
        self.ino = (st.st_dev, st.st_ino)
        self.pos = st.st_size if at_end else 0
        self.f.seek(self.pos)
        self.buf = b""

    def _replaced(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False               # rotated away, not yet re-created: keep reading old
        return (st.st_dev, st.st_ino) != self.ino or st.st_size < self.pos

    def read_new(self):
        """The complete records appended since the last call."""
        out = []
        if self.f is None:
            self._open(at_end=False)
            if self.f is None:
                return out
        while True:
            chunk = self.f.read(65536)
            if not chunk:
                break
            self.pos += len(chunk)
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        out.extend(r for r in map(parse_line, lines) if r is not None)
        if self._replaced():
            self._open(at_end=False)        # the new file from its start
            out.extend(self.read_new())
        return out

    def __iter__(self):
        while not self.stopped:
            yield from self.read_new()
            time.sleep(self.poll)

    def stop(self):
        self.stopped = True


# ------------------------------------------------------------------ command line
def build_parser():
    ap = argparse.ArgumentParser(prog="callerid audit",
                                 description="Read pam_callerid's audit trail.")
    ap.add_argument("--file", default=DEFAULT_AUDIT, help="audit file (default %(default)s)")
    ap.add_argument("--since", help="today, yesterday, 2h, 7d, ISO time (local), Unix time")
    ap.add_argument("--until", help="same forms as --since (exclusive)")
    ap.add_argument("--job", type=int, help="records that chose or considered this job")
    ap.add_argument("--user", help="user name or uid")
    ap.add_argument("--node", help="node name")
    ap.add_argument("--phase", help="account or session")
    ap.add_argument("--path", help="decision path (single, caller-ID, newest, no-jobs, ...)")
    ap.add_argument("--result", help="PAM result (success, perm_denied, ...)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--follow", "-f", action="store_true", help="then wait for new records")
    mode.add_argument("--summary", action="store_true",
                      help="count decisions by phase, path and result per --by group")
    ap.add_argument("--by", default="node,user",
                    help="summary groups: node, user, node,user or none (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    return ap


def main(argv=None, out=None) -> int:
    out = out or sys.stdout
    ap = build_parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        since = parse_when(a.since) if a.since else None
        until = parse_when(a.until) if a.until else None
    except ValueError:
        print(f"callerid audit: cannot understand --since/--until "
              f"{a.since if a.since else a.until!r}", file=sys.stderr)
        return EXIT_USAGE
    by = () if a.by == "none" else tuple(x.strip() for x in a.by.split(",") if x.strip())
    if any(b not in ("node", "user") for b in by):
        print("callerid audit: --by takes node, user, node,user or none", file=sys.stderr)
        return EXIT_USAGE
    keep = Filter(a.job, a.user, a.node, since, until, a.phase, a.path, a.result)
    warn = lambda msg: print(f"callerid audit: {msg}", file=sys.stderr)  # noqa: E731
    # --follow: the current file is read by the follower from its start, so a record
    # written while the history is printed is neither lost nor printed twice
    follower = Follower(a.file, start_at_end=False) if a.follow else None
    try:
        records = [r for r in read_all(a.file, since, warn, current=follower is None)
                   if keep(r)]
        if follower is not None:
            records += [r for r in follower.read_new() if keep(r)]
    except FileNotFoundError:
        print(f"callerid audit: no audit file {a.file}", file=sys.stderr)
        return EXIT_NOFILE
    except OSError as e:
        print(f"callerid audit: {a.file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_NOFILE
    if a.summary:
        print(format_summary(summarize(records, by), by), file=out)
        return EXIT_OK
    emit = (lambda r: print(json.dumps(r, sort_keys=True), file=out, flush=True)) if a.json \
        else None
    if emit:
        for r in records:
            emit(r)
    else:
        rows = [row(r) for r in records]
        widths = widths_for(rows)
        print(header(widths), file=out)
        for r in rows:
            print(format_row(r, widths), file=out)
        out.flush()
    if not a.follow:
        return EXIT_OK
    try:
        for rec in follower:
            if not keep(rec):
                continue
            if emit:
                emit(rec)
            else:
                r = row(rec)
                widths = {c: max(widths[c], len(r[c])) for c in COLUMNS}
                print(format_row(r, widths), file=out, flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
