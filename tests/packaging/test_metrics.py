"""daemon/metrics.py: the metric objects and the atomic node_exporter textfile (no cluster)."""
import os
import stat
import threading

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import Metrics, TextfileExporter, label, write_textfile
from daemon.version import VERSION


def samples(data: bytes):
    out = {}
    for fam in text_string_to_metric_families(data.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def fresh():
    return Metrics(CollectorRegistry())


def test_counts_every_kind_of_event():
    m = fresh()
    m.pam_decision("account", "caller-ID", "success", 0.004)
    m.pam_decision("account", "caller-ID", "success", 0.006)
    m.pam_decision("account", "newest", "success", 1.2)
    m.pam_rejected("not-root")
    m.adoption("stepd")
    m.adoption("cgroup", "stepd_timeout")
    m.callerid_query("found", 0.003)
    m.callerid_query("negative_cached")
    s = samples(m.text())
    assert s[("callerid_build_info", (("version", VERSION),))] == 1
    key = (("path", "caller-ID"), ("phase", "account"), ("result", "success"))
    assert s[("callerid_pam_decisions_total", key)] == 2
    assert s[("callerid_pam_decision_seconds_count", (("phase", "account"),))] == 3
    assert s[("callerid_pam_decision_seconds_bucket", (("le", "0.01"), ("phase", "account")))] == 2
    assert s[("callerid_pam_requests_rejected_total", (("reason", "not-root"),))] == 1
    assert s[("callerid_adoptions_total", (("how", "cgroup"),))] == 1
    assert s[("callerid_adoption_fallbacks_total", (("reason", "stepd_timeout"),))] == 1
    assert s[("callerid_client_queries_total", (("outcome", "negative_cached"),))] == 1
    assert s[("callerid_client_query_seconds_count", ())] == 1


def test_server_counters_come_from_its_snapshot():
    m = fresh()
    snap = {"answers-found": 4, "answers-unknown": 2, "answers-root": 5, "rate-limited": 3,
            "reclaimed": 1, "active": 7, "pending": 2, "queued": 0}
    m.watch_server(lambda: snap)
    s = samples(m.text())
    assert s[("callerid_server_answers_total", (("status", "found"),))] == 4
    assert s[("callerid_server_answers_total", (("status", "unknown"),))] == 2
    assert s[("callerid_server_events_total", (("event", "rate-limited"),))] == 3
    assert s[("callerid_server_events_total", (("event", "root"),))] == 5
    assert s[("callerid_server_connections_active", ())] == 7
    assert s[("callerid_server_requests_queued", ())] == 0
    snap["answers-found"] = 9
    assert samples(m.text())[("callerid_server_answers_total", (("status", "found"),))] == 9
    m.watch_server(lambda: {"answers-found": 1})           # a new server object (restart)
    assert samples(m.text())[("callerid_server_answers_total", (("status", "found"),))] == 1


def test_a_snapshot_racing_with_the_event_loop_is_retried():
    m = fresh()
    calls = []

    def snap():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return {"answers-found": 1}
    m.watch_server(snap)
    assert samples(m.text())[("callerid_server_answers_total", (("status", "found"),))] == 1


def test_free_text_labels_are_bounded():
    assert label("caller-ID") == "caller-ID"
    assert label(None) == "none"
    assert label("stepd said: no such job 12") == "other"
    assert label("x" * 41) == "other"
    m = fresh()
    for i in range(100):
        m.adoption("cgroup", f"stepd error {i}")
    s = samples(m.text())
    assert s[("callerid_adoption_fallbacks_total", (("reason", "other"),))] == 100


def test_textfile_is_replaced_atomically(tmp_path):
    path = tmp_path / "callerid.prom"
    write_textfile(str(path), b"a 1\n")
    write_textfile(str(path), b"a 2\n")
    assert path.read_bytes() == b"a 2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["callerid.prom"]      # no temporary left


def test_planted_symlink_or_fifo_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "callerid.prom"
    path.symlink_to(victim)
    write_textfile(str(path), b"a 1\n")
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and path.read_bytes() == b"a 1\n"
    path.unlink()
    os.mkfifo(path)
    done = threading.Event()
    threading.Thread(target=lambda: (write_textfile(str(path), b"a 2\n"), done.set()),
                     daemon=True).start()
    assert done.wait(5), "writing over a FIFO blocked"
    assert path.is_file() and path.read_bytes() == b"a 2\n"


def test_exporter_writes_periodically_and_at_stop(tmp_path):
    m = fresh()
    path = tmp_path / "callerid.prom"
    ex = TextfileExporter(m, str(path), interval=0.05).start()
    try:
        assert path.exists()
        m.callerid_query("found", 0.001)
        for _ in range(100):
            if b'callerid_client_queries_total{outcome="found"} 1.0' in path.read_bytes():
                break
            threading.Event().wait(0.02)
        else:
            pytest.fail("the exporter did not rewrite the file")
    finally:
        ex.stop()
    m.callerid_query("found", 0.001)
    assert b'outcome="found"} 1.0' in path.read_bytes()        # stopped: no more writes


def test_exporter_survives_an_unwritable_directory(tmp_path):
    logs = []

    class Log:
        def warning(self, fmt, *a):
            logs.append(fmt % a)

    ex = TextfileExporter(fresh(), str(tmp_path / "missing" / "callerid.prom"), 0.05, Log())
    assert ex.write_once() is False and ex.write_once() is False
    assert len(logs) == 1 and "metrics-write-failed" in logs[0]
