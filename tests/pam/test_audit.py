"""pam_callerid.audit: encoding, the one hardened writer (order, no interleaving, planted
FIFO/symlink/foreign directory refused without blocking), the reader CLI."""
import json
import os
import threading

import pytest
from hypothesis import given, strategies as st

from pam_callerid import audit
from pam_callerid.audit_reader import read_file

pytestmark = pytest.mark.root       # the writer accepts only root-owned directories and files

REC = {"time": "2026-11-21T10:00:00.000Z", "ts": 1795255200.0, "phase": "account",
       "node": "node2", "service": "sshd", "user": "alice", "uid": 2001, "pid": 77,
       "src_ip": "10.199.0.1", "src_port": 40000, "jobs": [16, 17],
       "callerid": {"status": "found", "job": 16, "authenticated": True},
       "path": "caller-ID", "job": 16, "target": "job", "result": "PAM_SUCCESS",
       "latency_ms": 3.5}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(max_size=30)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_encode_is_json_one_line(rec):
    line = audit.encode(rec)
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert json.loads(line) == rec


def test_encode_odd_values():
    assert json.loads(audit.encode({"a": float("nan"), "b": (1, 2), "c": object}))["a"] is None


def test_append_and_read(tmp_path):
    p = tmp_path / "sub" / "audit.jsonl"
    audit.append(str(p), REC)
    audit.append(str(p), dict(REC, user="bob", job=17, node="node3", ts=REC["ts"] + 100))
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o640)
    recs = list(read_file(str(p)))
    assert [r["user"] for r in recs] == ["alice", "bob"]


class Logs(list):
    def __call__(self, level, text):
        self.append((level, text))


@pytest.fixture
def writer():
    log = Logs()
    w = audit.AuditWriter(log, quiet_for=3600)
    w.log = log
    yield w
    w.close()


def test_writer_keeps_submission_order_and_never_interleaves(tmp_path, writer):
    p = str(tmp_path / "a.jsonl")
    big = dict(REC, pad="x" * 3000)

    def submit(t):
        for i in range(200):
            writer.submit(p, dict(big, seq=(t, i)), writer.ticket())
    ts = [threading.Thread(target=submit, args=(t,)) for t in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert writer.flush()
    with open(p) as f:
        recs = [json.loads(x) for x in f]          # an interleaved line would not parse
    assert len(recs) == 1200 and all(r["pad"] == "x" * 3000 for r in recs)
    for t in range(6):                              # each thread's records in its order
        assert [r["seq"][1] for r in recs if r["seq"][0] == t] == list(range(200))
    assert (writer.written, writer.failed, writer.log) == (1200, 0, [])


def test_writer_orders_by_ticket(tmp_path, writer):
    """A record completed late (an entry the stepd registers after the reply) keeps its
    ticket's place; a ticket submitted with no path only releases the ones after it."""
    p = str(tmp_path / "a.jsonl")
    a, b, c, d = (writer.ticket() for _ in range(4))
    writer.submit(p, dict(REC, seq="d"), d)
    writer.submit(None, None, c)
    writer.submit(p, dict(REC, seq="b"), b)
    assert writer.flush() and not os.path.exists(p)          # all held behind a
    writer.submit(p, dict(REC, seq="a"), a)
    assert writer.flush()
    with open(p) as f:
        assert [json.loads(x)["seq"] for x in f] == ["a", "b", "d"]


def test_writer_gives_up_a_ticket_never_submitted(tmp_path, writer, monkeypatch):
    p = str(tmp_path / "a.jsonl")
    monkeypatch.setattr(writer, "GAP_AFTER", 0.0)
    lost, mine = writer.ticket(), writer.ticket()
    writer.submit(p, dict(REC, seq="mine"), mine)
    writer.submit(p, dict(REC, seq="next"), writer.ticket())
    assert writer.flush()
    with open(p) as f:
        assert [json.loads(x)["seq"] for x in f] == ["mine", "next"]
    assert any("never completed" in text for _, text in writer.log), writer.log
    assert lost < mine


def test_writer_none_path_writes_nothing(tmp_path, writer):
    writer.submit("none", REC, writer.ticket())
    writer.submit("", REC, writer.ticket())
    assert writer.flush() and writer.written == 0


def test_append_refuses_symlink(tmp_path):
    target = tmp_path / "target"
    target.write_text("")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symlink"):
        audit.append(str(link), REC)
    assert target.read_text() == ""


def test_planted_fifo_never_blocks(tmp_path, writer):
    import time
    fifo = tmp_path / "a.jsonl"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(OSError, match="FIFO"):         # no reader: ENXIO at once
        audit.append(str(fifo), REC)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # with a reader: opened, then refused
    try:
        with pytest.raises(OSError, match="not a regular file"):
            audit.append(str(fifo), REC)
        writer.submit(str(fifo), REC, writer.ticket())
        assert writer.flush(2)
        assert os.read(rfd, 100) == b""
    finally:
        os.close(rfd)
    assert time.monotonic() - t0 < 1.0
    assert writer.failed == 1 and "not a regular file" in writer.log[0][1]


def test_foreign_or_open_directory_refused(tmp_path, writer):
    d = tmp_path / "slurm"
    d.mkdir(mode=0o755)
    os.chown(d, 64000, 64000)                   # like Debian's /var/log/slurm (slurm:slurm)
    with pytest.raises(OSError, match="owned by uid 64000"):
        audit.append(str(d / "a.jsonl"), REC)
    os.chown(d, 0, 0)
    os.chmod(d, 0o777)
    with pytest.raises(OSError, match="mode 777"):
        audit.append(str(d / "a.jsonl"), REC)
    os.chmod(d, 0o750)
    audit.append(str(d / "a.jsonl"), REC)
    assert not os.path.islink(d / "a.jsonl")
    # a symlinked directory is refused too
    (tmp_path / "dirlink").symlink_to(d)
    with pytest.raises(OSError, match="not a directory"):
        audit.append(str(tmp_path / "dirlink" / "a.jsonl"), REC)


def test_file_not_owned_by_root_refused(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("")
    os.chown(p, 64000, 64000)
    with pytest.raises(OSError, match="owned by root"):
        audit.append(str(p), REC)


def test_writer_errors_are_logged_once_per_quiet_period(tmp_path, writer):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    for _ in range(5):
        writer.submit(str(link), REC, writer.ticket())
    assert writer.flush()
    assert writer.failed == 5 and len(writer.log) == 1
    assert writer.log[0][0] == "error" and str(link) in writer.log[0][1]
    assert not (tmp_path / "elsewhere").exists()


def test_oversized_record_is_slimmed(tmp_path):
    p = str(tmp_path / "a.jsonl")
    audit.append(p, dict(REC, huge="y" * (audit.MAX_LINE + 10)))
    r = list(read_file(p))[0]
    assert r["truncated"] is True and "huge" not in r and r["user"] == "alice"


def test_cli_table_and_json(tmp_path, capsys):
    p = str(tmp_path / "a.jsonl")
    audit.append(p, REC)
    audit.append(p, dict(REC, user="bob", job=None, path="deny", result="PAM_PERM_DENIED",
                         jobs=[20, 21], callerid={"status": "timeout"}))
    with open(p, "a") as f:
        f.write("garbage line\n")
    from pam_callerid.audit_reader import main
    assert main(["--file", p]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["TIME", "NODE", "USER"]
    assert len(out) == 3 and "caller-ID" in out[1] and "job 16" in out[1]
    assert "deny" in out[2] and "timeout" in out[2]
    assert main(["--file", p, "--json", "--user", "bob"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["path"] == "deny"
    assert main(["--file", p, "--json", "--job", "16", "--node", "node2",
                       "--since", "1970-01-02"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["--file", str(tmp_path / "none")]) == 1
