"""`callerid audit` (pam_callerid/audit_reader.py): rotated files, --since/--until, --follow
across rotation, IPv6 sources, aligned long node names, --summary, planted FIFO/symlink."""
import gzip
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from pam_callerid import audit_reader as A

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0


def rec(ts, **kw):
    r = {"time": datetime.utcfromtimestamp(ts).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "ts": ts,
         "phase": "account", "node": "node1", "user": "alice", "uid": 2001, "path": "single",
         "job": 12, "jobs": [12], "result": "success", "latency_ms": 1.5,
         "src_ip": "10.199.3.254", "src_port": 40000}
    r.update(kw)
    return r


def lines(recs):
    return "".join(json.dumps(r) + "\n" for r in recs).encode()


def write(p, recs, gz=False, mtime=None):
    data = lines(recs)
    p.write_bytes(gzip.compress(data) if gz else data)
    if mtime is not None:
        os.utime(p, (mtime, mtime))


@pytest.fixture
def trail(tmp_path):
    """audit.jsonl with three rotations (logrotate numbering, delaycompress)."""
    base = tmp_path / "audit.jsonl"
    write(tmp_path / "audit.jsonl.3.gz", [rec(NOW - 30 * 86400, job=1)], gz=True,
          mtime=NOW - 30 * 86400)
    write(tmp_path / "audit.jsonl.2.gz", [rec(NOW - 20 * 86400, job=2)], gz=True,
          mtime=NOW - 20 * 86400)
    write(tmp_path / "audit.jsonl.1", [rec(NOW - 10 * 86400, job=3)], mtime=NOW - 10 * 86400)
    write(base, [rec(NOW - 60, job=4), rec(NOW - 1, job=5, path="newest")])
    return base


def test_rotated_files_are_read_oldest_first(trail):
    assert [r["job"] for r in A.read_all(str(trail))] == [1, 2, 3, 4, 5]


def test_dateext_rotation(tmp_path):
    base = tmp_path / "audit.jsonl"
    write(tmp_path / "audit.jsonl-20261101.gz", [rec(NOW - 2, job=1)], gz=True)
    write(tmp_path / "audit.jsonl-20261108", [rec(NOW - 1, job=2)])
    write(base, [rec(NOW, job=3)])
    (tmp_path / "audit.jsonl.bak").write_text("not ours\n")
    assert [r["job"] for r in A.read_all(str(base))] == [1, 2, 3]


def test_since_skips_rotated_files_written_before_it(trail, monkeypatch):
    opened = []
    real = A.open_regular
    monkeypatch.setattr(A, "open_regular", lambda p: (opened.append(os.path.basename(p)),
                                                      real(p))[1])
    since = NOW - 15 * 86400
    got = [r["job"] for r in A.read_all(str(trail), since) if A.Filter(since=since)(r)]
    assert got == [3, 4, 5]
    assert opened == ["audit.jsonl.1", "audit.jsonl"]


def test_parse_when():
    now = datetime(2026, 11, 28, 15, 30).timestamp()
    midnight = datetime(2026, 11, 28).timestamp()
    assert A.parse_when("today", now) == midnight
    assert A.parse_when("Yesterday", now) == (datetime(2026, 11, 28) - timedelta(days=1)).timestamp()
    assert A.parse_when("2h", now) == now - 7200
    assert A.parse_when("1w", now) == now - 7 * 86400
    assert A.parse_when("90s", now) == now - 90
    assert A.parse_when("2026-11-28T10:00:00Z") == datetime.fromisoformat(
        "2026-11-28T10:00:00+00:00").timestamp()
    assert A.parse_when("2026-11-28 10:00") == datetime(2026, 11, 28, 10).timestamp()   # local
    assert A.parse_when("1800000000") == 1800000000.0
    with pytest.raises(ValueError):
        A.parse_when("last tuesday")


def test_until_is_exclusive_and_filters_combine():
    f = A.Filter(since=NOW - 10, until=NOW, path="NEWEST")
    assert f(rec(NOW - 5, path="newest")) and not f(rec(NOW, path="newest"))
    assert not f(rec(NOW - 5)) and not f(rec(NOW - 11, path="newest"))
    assert A.Filter(job=7)(rec(NOW, job=None, jobs=[7, 8]))
    assert A.Filter(user="2001")(rec(NOW)) and not A.Filter(user="bob")(rec(NOW))


def test_table_ipv6_brackets_and_alignment():
    long = "gpu-node-with-a-very-long-name-0001.cluster.example.org"
    out = A.format_table([rec(NOW, src_ip="fd42:199:3::fe", src_port=51000),
                          rec(NOW, node=long, src_ip="10.199.3.2", src_port=22),
                          rec(NOW, src_ip=None, rhost="login1")]).splitlines()
    assert "[fd42:199:3::fe]:51000" in out[1] and "10.199.3.2:22" in out[2]
    assert "login1" in out[3]
    col = out[0].index("USER")
    assert all(line[col:].startswith(u) for line, u in zip(out[1:], ("alice",) * 3))
    assert long in out[2]


def test_summary_counts_paths_and_results_per_node_and_user():
    recs = [rec(NOW), rec(NOW), rec(NOW, path="newest"), rec(NOW, node="node2", user="bob"),
            rec(NOW, path="no-jobs", result="perm_denied", user="bob")]
    counts = A.summarize(recs)
    assert counts[("node1", "alice", "account", "single", "success")] == 2
    assert counts[("node1", "alice", "account", "newest", "success")] == 1
    text = A.format_summary(counts)
    assert text.splitlines()[0].split() == ["NODE", "USER", "PHASE", "PATH", "RESULT", "COUNT"]
    assert "5 decisions: single/success 3" in text
    assert "newest/success 1" in text and "no-jobs/perm_denied 1" in text
    only = A.summarize(recs, by=())
    assert only[("account", "single", "success")] == 3


def test_cli_summary_of_the_week(trail):
    buf = io.StringIO()
    assert A.main(["--file", str(trail), "--since", str(NOW - 7 * 86400), "--summary",
                   "--path", "newest"], out=buf) == 0
    assert "1 decision: newest/success 1" in buf.getvalue()


def test_missing_file_and_bad_arguments(tmp_path, capsys):
    assert A.main(["--file", str(tmp_path / "none.jsonl")]) == 1
    assert A.main(["--since", "whenever"]) == 64
    assert A.main(["--by", "job"]) == 64


def test_planted_fifo_and_symlink_are_skipped_not_waited_on(tmp_path, capsys):
    base = tmp_path / "audit.jsonl"
    write(base, [rec(NOW, job=9)])
    os.mkfifo(tmp_path / "audit.jsonl.1")
    secret = tmp_path / "secret"
    secret.write_text(json.dumps(rec(NOW, job=666)) + "\n")
    os.symlink(secret, tmp_path / "audit.jsonl.2")
    t0 = time.monotonic()
    buf = io.StringIO()
    assert A.main(["--file", str(base), "--json"], out=buf) == 0
    assert time.monotonic() - t0 < 2
    assert [json.loads(x)["job"] for x in buf.getvalue().splitlines()] == [9]
    err = capsys.readouterr().err
    assert "audit.jsonl.1" in err and "not a regular file" in err
    assert "audit.jsonl.2" in err and "symbolic link" in err


def test_follow_across_rotation(tmp_path):
    base = tmp_path / "audit.jsonl"
    write(base, [rec(NOW, job=1)])
    p = subprocess.Popen([sys.executable, "-m", "pam_callerid.audit_reader", "--file",
                          str(base), "--follow", "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    import threading
    watchdog = threading.Timer(30, p.kill)          # a missed record fails, never hangs
    watchdog.start()
    try:
        assert json.loads(p.stdout.readline())["job"] == 1
        with open(base, "ab") as f:
            f.write(lines([rec(NOW, job=2)]))
        assert json.loads(p.stdout.readline())["job"] == 2
        os.rename(base, tmp_path / "audit.jsonl.1")               # logrotate: rename + create
        with open(tmp_path / "audit.jsonl.1", "ab") as f:         # a late write to the old one
            f.write(lines([rec(NOW, job=3)]))
        write(base, [rec(NOW, job=4)])
        got = {json.loads(p.stdout.readline())["job"] for _ in range(2)}
        assert got == {3, 4}
        with open(base, "ab") as f:
            f.write(lines([rec(NOW, job=5)]))
        assert json.loads(p.stdout.readline())["job"] == 5
    finally:
        watchdog.cancel()
        p.kill()
        p.wait()
