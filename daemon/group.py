"""Several processes serving one caller-ID port (`Processes`).

One process answers at most one core's worth (≈ 150-400 µs of CPU per answer, under one
GIL); a launcher fanning out to thousands of nodes asks faster than that.  The first process
(the one `callerid daemon` started: it also runs the PAM service and the metrics) binds the
listeners and starts the others (helper_argv: `python -c <daemon.cli.main> daemon --serve-fds
...`; fork and exec: the first process may already run threads).  Each helper gets:

* the listening sockets (every process accepts from the same accept queues, emptying the
  reserved-port queue first, so the kernel's steering keeps working in every process);
* the replay table (daemon.replay, a shared memfd): a request replayed to another process
  is refused too;
* a control socket: the helper writes its counters there every REPORT_EVERY seconds (the
  first process sums them into its stats, stats line and metrics); end of file on it means
  the first process is gone, and the helper stops.

Per-process shares of the limits: MaxConnections and RateLimit/RateBurst are divided by the
number of processes (the kernel spreads connections over them).  SIGHUP and SIGTERM given
to the first process are passed on; a helper that dies is started again.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("callerid")

REPORT_EVERY = 0.5        # seconds between a helper's reports
RESTART_DELAY = 1.0       # seconds before a dead helper is started again


def encode_fds(listen: list[int], first: list[int], replay: int, control: int, index: int) -> str:
    return (f"listen={','.join(map(str, listen))};first={','.join(map(str, first))};"
            f"replay={replay};control={control};index={index}")


def decode_fds(spec: str) -> dict:
    """The --serve-fds value -> {listen: [fd], first: [fd], replay: fd, control: fd, index}.
    Raises ValueError."""
    ints = lambda v: [int(x) for x in v.split(",") if x]   # noqa: E731
    try:
        parts = dict(p.split("=", 1) for p in spec.split(";"))
        return {"listen": ints(parts["listen"]), "first": ints(parts["first"]),
                "replay": int(parts["replay"]), "control": int(parts["control"]),
                "index": int(parts["index"])}
    except (KeyError, ValueError) as e:
        raise ValueError(f"bad --serve-fds value {spec!r}") from e


def merge_snapshots(own: dict, others) -> dict:
    """Counters and gauges summed over the processes.  `reloads` and `reload-failures` are
    the first process's (every process reloads on one SIGHUP)."""
    out = dict(own)
    for snap in others:
        for k, v in snap.items():
            if k not in ("reloads", "reload-failures"):
                out[k] = out.get(k, 0) + v
    return out


class HelperLink:
    """In a helper: the control socket to the first process."""

    def __init__(self, srv, fd: int):
        self.srv = srv
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        srv.loop.add_reader(fd, self._readable)
        self._due = 0.0

    def _readable(self):
        data = _recv(self.sock, 64)
        if data is None:
            return
        if not data:                          # the first process is gone: stop too
            self.srv.loop.remove_reader(self.sock.fileno())
            self.srv.request_stop()

    def tick(self, now: float, final: bool = False):
        """Send the counters when due (or now, when final)."""
        if not final and now < self._due:
            return
        self._due = now + REPORT_EVERY
        msg = {"snap": self.srv.own_snapshot(), "lat": self.srv.latency.state()}
        try:
            self.sock.setblocking(final)
            self.sock.send(json.dumps(msg).encode() + b"\n")
        except OSError:                      # full (the first process is busy): next time
            pass
        finally:
            self.sock.setblocking(False)


class _Helper:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.buf = b""
        self.snap: dict = {}           # its latest counters (plus those of earlier instances)
        self.base: dict = {}           # the counters of earlier instances (it died)
        self.lat = None


class Helpers:
    """In the first process: start, watch, signal and stop the other serving processes."""

    def __init__(self, srv, n: int, argv: list[str]):
        """argv: how to start one (helper_argv);
        --serve-fds is appended."""
        self.srv = srv
        self.loop = srv.loop
        self.argv = argv
        self.helpers = [_Helper(i) for i in range(1, n)]
        self.stopping = False

    def start(self):
        for h in self.helpers:
            self._spawn(h)
        return self

    def _spawn(self, h: _Helper):
        if self.stopping:
            return
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        srv = self.srv
        listen = [s.fileno() for s in srv.listeners]
        first = [s.fileno() for s in srv.first_listeners]
        spec = encode_fds(listen, first, srv.handler.replay.fd, theirs.fileno(), h.index)
        try:
            h.proc = subprocess.Popen(self.argv + ["--serve-fds", spec],
                                      pass_fds=listen + [srv.handler.replay.fd, theirs.fileno()],
                                      stdin=subprocess.DEVNULL)
        except OSError as e:
            log.error("event=helper-start-failed index=%d error=%r", h.index, e.strerror)
            mine.close()
            theirs.close()
            self.loop.call_later(RESTART_DELAY, self._spawn, h)
            return
        theirs.close()
        mine.setblocking(False)
        h.sock, h.buf = mine, b""
        self.loop.add_reader(mine.fileno(), self._readable, h)
        log.info("event=helper-started index=%d pid=%d", h.index, h.proc.pid)

    def _readable(self, h: _Helper):
        data = _recv(h.sock, 65536)
        if data is None:
            return
        if data:
            self._take(h, data)
            return
        self._closed(h)
        if not self.stopping:
            try:
                rc = h.proc.wait(2.0)         # it closed the socket: it is exiting
            except subprocess.TimeoutExpired:
                h.proc.kill()
                rc = h.proc.wait()
            log.error("event=helper-exited index=%d pid=%d status=%d (starting another)",
                      h.index, h.proc.pid, rc)
            self.loop.call_later(RESTART_DELAY, self._spawn, h)

    def _take(self, h: _Helper, data: bytes):
        *lines, h.buf = (h.buf + data).split(b"\n")
        for line in lines[-1:]:                 # the latest report is the whole state
            msg = json.loads(line)
            h.snap = {k: v + h.base.get(k, 0) for k, v in msg["snap"].items()}
            h.lat = msg["lat"]

    def _closed(self, h: _Helper):
        """A helper's counters survive it: the next instance counts on top of them."""
        self.loop.remove_reader(h.sock.fileno())
        h.sock.close()
        h.sock = None
        gauges = set(self.srv.GAUGES)
        h.base = {k: v for k, v in h.snap.items() if k not in gauges}

    def snapshots(self):
        return [h.snap for h in self.helpers]

    def latencies(self):
        return [h.lat for h in self.helpers if h.lat is not None]

    def signal(self, sig: int):
        for h in self.helpers:
            if h.proc is not None and h.proc.poll() is None:
                try:
                    h.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self, timeout: float = 5.0):
        """SIGTERM every helper, collect its final report, wait for it (kill at timeout)."""
        self.stopping = True
        self.signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for h in self.helpers:
            if h.sock is not None:
                self.loop.remove_reader(h.sock.fileno())
                h.sock.setblocking(True)
                while True:
                    h.sock.settimeout(max(0.01, end - time.monotonic()))
                    try:
                        data = h.sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        break
                    self._take(h, data)
                h.sock.close()
                h.sock = None
            if h.proc is not None:
                try:
                    h.proc.wait(max(0.01, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.error("event=helper-killed index=%d pid=%d", h.index, h.proc.pid)
                    h.proc.kill()
                    h.proc.wait()


def helper_argv(config: str | None, port: int, log_level: str | None) -> list[str]:
    """The command line of a helper: this interpreter with its isolation flags (the package
    runs `python3 -IB`: no PYTHON* variables, not the current directory), importing this
    very copy of the daemon package; the same config file and port."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = (["-I"] if sys.flags.isolated else []) + (["-B"] if sys.flags.dont_write_bytecode else [])
    argv = [sys.executable, *flags, "-c",
            f"import sys; sys.path.insert(0, {here!r}); from daemon.cli import main; "
            "sys.exit(main())"]
    if config:
        argv += ["--config", config]
    argv += ["daemon", "--port", str(port)]
    if log_level:
        argv += ["--log-level", log_level]
    return argv


def _recv(sock, n: int):
    """sock.recv(n) on a non-blocking socket: None when nothing is there yet, b"" when the
    other end is gone."""
    try:
        return sock.recv(n)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
