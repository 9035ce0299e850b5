"""Prometheus metrics of `callerid daemon`, written as a node_exporter textfile.

Why a textfile and not a port: the daemon runs as root on every node; a scrape port would be
one more listening socket in a root process, one more firewall rule and port number to
allocate on every node, and HTTP parsing in the daemon. HPC sites already run node_exporter
on every node and scrape it; its textfile collector (`--collector.textfile.directory`,
Debian's prometheus-node-exporter: /var/lib/prometheus/node-exporter) publishes any
``*.prom`` file there, and its ``node_textfile_mtime_seconds{file="callerid.prom"}`` tells
when the daemon stopped writing (alert on its age). The cost: values are at most
``MetricsInterval`` seconds old.

The file is written atomically: a new file (O_EXCL|O_NOFOLLOW, mode 0644, in the same
directory) renamed over the old one, so node_exporter never reads half a file and a
symlink or FIFO planted at either name is replaced, never followed (prometheus_client's own
``write_to_textfile`` opens a fixed temporary name without O_EXCL and would follow a
symlink planted there by whoever may write the directory).

One :class:`Metrics` per daemon process (:data:`METRICS`): the PAM decision service
(pam_callerid/service.py) counts into it, the caller-ID server's own counters
(daemon.server.Server.snapshot) are read at each export (:meth:`Metrics.watch_server`: no
work on the server's hot path), and the exporter writes it. Label values come from small fixed sets (paths, results, outcomes); anything that
does not look like one (free text, too long) is counted as ``other`` so a bug can never
explode the number of series.
"""
from __future__ import annotations

import os
import re
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .version import VERSION

__all__ = ["Metrics", "METRICS", "TextfileExporter", "write_textfile", "LATENCY_BUCKETS"]

# seconds: sub-millisecond answers up to the 10 s worst case of a client timeout
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
_LABEL_OK = re.compile(r"[A-Za-z0-9_.:-]{1,40}\Z")


def label(value) -> str:
    """A label value from a small fixed set, else "other" (bounded cardinality)."""
    s = "none" if value is None else str(value)
    return s if _LABEL_OK.match(s) else "other"


class Metrics:
    """The daemon's counters and histograms (thread-safe: prometheus_client locks)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        Gauge("callerid_build_info", "slurm-callerid version of the running daemon",
              ["version"], registry=r).labels(VERSION).set(1)
        Gauge("callerid_start_time_seconds", "Unix time the daemon started",
              registry=r).set(time.time())
        # the PAM decision service (logins on this node)
        self._decisions = Counter(
            "callerid_pam_decisions", "PAM decisions by phase, decision path and PAM result",
            ["phase", "path", "result"], registry=r)
        self._decision_seconds = Histogram(
            "callerid_pam_decision_seconds", "time from a PAM request to its reply",
            ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self._pam_rejected = Counter(
            "callerid_pam_requests_rejected",
            "PAM socket requests refused before a decision (non-root peer, malformed, "
            "oversized, busy)", ["reason"], registry=r)
        self._adoptions = Counter(
            "callerid_adoptions", "adoptions into a job's extern step by how they were done "
            "(stepd: slurmstepd added the pid; cgroup: direct cgroup.procs fallback; "
            "failed)", ["how"], registry=r)
        self._adoption_fallbacks = Counter(
            "callerid_adoption_fallbacks", "adoptions that fell back from slurmstepd to a "
            "direct cgroup write, by reason", ["reason"], registry=r)
        # the caller-ID questions this node's PAM service asked other nodes' daemons
        self._queries = Counter(
            "callerid_client_queries", "caller-ID questions to source hosts by outcome "
            "(found, unknown, refused, unreachable, invalid, error, local_error, "
            "negative_cached)", ["outcome"], registry=r)
        self._query_seconds = Histogram(
            "callerid_client_query_seconds", "duration of a caller-ID question to a source "
            "host", buckets=LATENCY_BUCKETS, registry=r)
        self._server = None
    # --- the PAM decision service
    def pam_decision(self, phase, path, result, seconds=None):
        self._decisions.labels(label(phase), label(path), label(result)).inc()
        if seconds is not None:
            self._decision_seconds.labels(label(phase)).observe(seconds)

    def pam_rejected(self, reason):
        self._pam_rejected.labels(label(reason)).inc()

    def adoption(self, how, fallback_reason=None):
        """how: stepd | cgroup | failed; fallback_reason: why stepd was not used (a short
        class such as stepd_timeout, no_stepd, stepd_refused), for how=cgroup."""
        self._adoptions.labels(label(how)).inc()
        if fallback_reason is not None:
            self._adoption_fallbacks.labels(label(fallback_reason)).inc()

    def callerid_query(self, outcome, seconds=None):
        self._queries.labels(label(outcome)).inc()
        if seconds is not None:
            self._query_seconds.observe(seconds)

    # --- the caller-ID server: its own counters (Server.snapshot), read at each export
    def watch_server(self, snapshot):
        """Export ``snapshot()`` (daemon.server.Server.snapshot: monotonic counters and
        three gauges) at every collection; replaces a previous server's (after a restart
        of the server object)."""
        if self._server is not None:
            self.registry.unregister(self._server)
        self._server = _ServerCollector(snapshot)
        self.registry.register(self._server)

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


# Server.snapshot() gauges -> (metric name, help)
_SERVER_GAUGES = {
    "active": ("callerid_server_connections_active", "caller-ID connections open now"),
    "pending": ("callerid_server_connections_pending",
                "caller-ID connections without a complete request now"),
    "queued": ("callerid_server_requests_queued", "caller-ID requests waiting for a worker"),
}


class _ServerCollector:
    """Turns Server.snapshot() into metric families: ``answers-<status>`` ->
    callerid_server_answers_total{status}; every other counter (admission and security
    events: reclaimed, over-capacity, first-byte-timeouts, request-timeouts, rate-limited,
    auth-failures, replays, violations, reloads, ...) ->
    callerid_server_events_total{event}; the gauges by name (_SERVER_GAUGES)."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def _snap(self):
        for _ in range(5):        # the event loop thread may add a key while we copy
            try:
                return dict(self.snapshot())
            except RuntimeError:
                continue
        return {}

    def collect(self):
        snap = self._snap()
        answers = CounterMetricFamily("callerid_server_answers", "caller-ID answers sent, by "
                                      "status (answers to root are also in events root)",
                                      labels=["status"])
        events = CounterMetricFamily("callerid_server_events", "caller-ID server admission "
                                     "and security events since start (see Server.snapshot)",
                                     labels=["event"])
        gauges = []
        for key, value in sorted(snap.items()):
            if key in _SERVER_GAUGES:
                name, doc = _SERVER_GAUGES[key]
                gauges.append(GaugeMetricFamily(name, doc, value=value))
            elif key.startswith("answers-") and key != "answers-root":
                answers.add_metric([label(key[len("answers-"):])], value)
            else:
                events.add_metric([label(key.replace("answers-", ""))], value)
        yield answers
        yield events
        yield from gauges


METRICS = Metrics()


def write_textfile(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring)."""
    d = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    for _ in range(16):
        tmp = os.path.join(d, ".%s.%d.%s" % (base, os.getpid(), os.urandom(4).hex()))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{d}: cannot create a temporary file for {base}")
    try:
        try:
            os.fchmod(fd, 0o644)             # whatever the umask: node_exporter must read it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class TextfileExporter:
    """Writes ``metrics`` to ``path`` every ``interval`` seconds from its own thread, and
    once more at :meth:`stop`. A failed write is logged (once per distinct error) and
    retried at the next interval; it never stops the daemon."""

    def __init__(self, metrics: Metrics, path: str, interval: float = 15.0, log=None):
        self.metrics, self.path, self.interval, self.log = metrics, path, interval, log
        self._stop = threading.Event()
        self._thread = None
        self._last_error = None

    def write_once(self) -> bool:
        try:
            write_textfile(self.path, self.metrics.text())
        except OSError as e:
            err = f"{type(e).__name__}: {e.strerror or e}"
            if err != self._last_error and self.log is not None:
                self.log.warning("event=metrics-write-failed file=%s error=%s", self.path, err)
            self._last_error = err
            return False
        self._last_error = None
        return True

    def start(self) -> "TextfileExporter":
        self.write_once()
        self._thread = threading.Thread(target=self._run, name="callerid-metrics", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.write_once()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.write_once()
