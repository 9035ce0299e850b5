"""Audit records of pam_callerid: one JSON object per line, one line per decision.

Writing (in the PAM module, every login): :func:`append` encodes the record itself (importing
``json`` would pull in ``re`` and cost ~9 ms per login) and appends it with ONE ``write()`` on
an ``O_APPEND`` descriptor, so concurrent logins never interleave or lose lines. The file is
created 0640 root; its directory is created 0750 if missing.

Reading (``callerid audit`` / ``python -m pam_callerid.audit``)::

    python -m pam_callerid.audit [--file PATH] [--job N] [--user NAME] [--node NAME]
                                 [--since WHEN] [--phase account|session] [--json]

``--since`` takes an ISO time (``2026-11-21T10:00``, UTC unless an offset is given), a Unix
time, or a relative age such as ``30s``, ``15m``, ``2h``, ``1d``.

Record fields: time (ISO UTC), ts (Unix), phase (account | session), node, service, user,
uid, pid, rhost, src_ip, src_port, dst_ip, dst_port, jobs (ids considered), callerid (the
daemon's answer: status, job, uid, node, authenticated, source, detail), path (root |
no-jobs | single | caller-ID | newest | allow | deny | user | failure | unknown-user), job
(chosen), target (job | user), adopted_pid, result (PAM code), reason, latency_ms.
"""
import os

from .options import DEFAULT_AUDIT

__all__ = ["append", "encode", "read", "matches", "main"]

MAX_LINE = 16384


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


def append(path, rec):
    """Append ``rec`` atomically (a single write on an O_APPEND descriptor)."""
    data = encode(rec).encode("ascii")
    if len(data) > MAX_LINE:
        slim = {k: rec.get(k) for k in ("time", "ts", "phase", "node", "service", "user", "uid",
                                        "pid", "path", "job", "result", "reason", "latency_ms")}
        slim["truncated"] = True
        data = encode(slim).encode("ascii")
    d = os.path.dirname(path)
    if d and not os.path.isdir(d):
        os.makedirs(d, mode=0o750, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o640)
    try:
        n = os.write(fd, data)
        if n != len(data):
            raise OSError("short write to %s (%d of %d bytes)" % (path, n, len(data)))
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ reading
def read(path):
    """Yield the records of an audit file; malformed lines are skipped."""
    import json
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def parse_since(text, now=None):
    """A Unix time from an ISO time, a Unix time or an age (``30s``, ``15m``, ``2h``, ``1d``)."""
    import time
    from datetime import datetime, timezone
    now = time.time() if now is None else now
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if t and t[-1] in units and t[:-1].replace(".", "", 1).isdigit():
        return now - float(t[:-1]) * units[t[-1]]
    try:
        return float(t)
    except ValueError:
        pass
    dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def matches(rec, job=None, user=None, node=None, since=None, phase=None):
    if job is not None and rec.get("job") != job and job not in (rec.get("jobs") or ()):
        return False
    if user is not None and rec.get("user") != user and str(rec.get("uid")) != str(user):
        return False
    if node is not None and rec.get("node") != node:
        return False
    if since is not None and (rec.get("ts") or 0) < since:
        return False
    if phase is not None and rec.get("phase") != phase:
        return False
    return True


_COLUMNS = (("time", 24), ("node", 10), ("user", 10), ("phase", 7), ("source", 21),
            ("jobs", 14), ("callerid", 14), ("path", 9), ("job", 7), ("result", 15),
            ("ms", 7))


def _row(rec):
    src = rec.get("src_ip")
    cid = rec.get("callerid") or {}
    cs = cid.get("status", "")
    if cs == "found":
        cs = "job %s%s" % (cid.get("job"), "" if cid.get("authenticated") else " (unauth)")
    return {"time": rec.get("time", ""), "node": rec.get("node") or "",
            "user": rec.get("user") or "", "phase": rec.get("phase") or "",
            "source": "%s:%s" % (src, rec.get("src_port")) if src else (rec.get("rhost") or ""),
            "jobs": ",".join(str(j) for j in rec.get("jobs") or ()),
            "callerid": cs, "path": rec.get("path") or "",
            "job": "" if rec.get("job") is None else str(rec.get("job")),
            "result": rec.get("result") or "",
            "ms": "" if rec.get("latency_ms") is None else "%.1f" % rec["latency_ms"]}


def format_table(records):
    lines = ["  ".join(name.upper().ljust(w) for name, w in _COLUMNS).rstrip()]
    for rec in records:
        r = _row(rec)
        lines.append("  ".join(str(r[name])[:max(w, 1) + 20].ljust(w)
                               for name, w in _COLUMNS).rstrip())
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import json
    import sys
    ap = argparse.ArgumentParser(prog="callerid audit",
                                 description="Query pam_callerid's audit records.")
    ap.add_argument("--file", default=DEFAULT_AUDIT, help="audit file (default %(default)s)")
    ap.add_argument("--job", type=int, help="records that chose or considered this job")
    ap.add_argument("--user", help="user name or uid")
    ap.add_argument("--node", help="node name")
    ap.add_argument("--since", help="ISO time, Unix time, or age like 30m / 2h / 1d")
    ap.add_argument("--phase", choices=("account", "session"))
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    a = ap.parse_args(argv)
    try:
        since = parse_since(a.since) if a.since else None
    except ValueError:
        ap.error("cannot understand --since %r" % a.since)
    try:
        recs = [r for r in read(a.file)
                if matches(r, a.job, a.user, a.node, since, a.phase)]
    except FileNotFoundError:
        print("no audit file %s" % a.file, file=sys.stderr)
        return 1
    except OSError as e:
        print("cannot read %s: %s" % (a.file, e.strerror), file=sys.stderr)
        return 1
    if a.json:
        for r in recs:
            print(json.dumps(r, sort_keys=True))
    else:
        print(format_table(recs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
