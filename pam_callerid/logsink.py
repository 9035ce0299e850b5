"""The decision log lines of the PAM service, as pam_slurm_adopt's go: syslog, facility
authpriv, ident ``pam_callerid``, filtered by the module's ``log_level=``.

Written straight to ``/dev/log`` (RFC 3164 framing, as glibc's syslog(3) does) from the
daemon process, without the process-wide state of the ``syslog`` module (the daemon logs its
own lines elsewhere). Never blocks a login: the socket is non-blocking and a message that
cannot be sent now (no syslog daemon, full buffer) is dropped and counted.
"""
from __future__ import annotations

import os
import socket
import threading
import time

FACILITY_AUTHPRIV = 10
PRIORITY = {"error": 3, "warning": 4, "info": 6, "verbose": 6, "debug": 7}
LEVEL = {"error": 2, "warning": 2, "info": 3, "verbose": 4, "debug": 5}   # vs log_level=
MAX_TEXT = 1800


class SyslogSink:
    def __init__(self, path="/dev/log", ident="pam_callerid"):
        self.path, self.ident = path, ident
        self._sock = None
        self._lock = threading.Lock()
        self.dropped = 0

    def __call__(self, level, text, threshold=LEVEL["info"]):
        """Send one line when ``level`` passes ``threshold`` (the module's log_level)."""
        if LEVEL.get(level, 5) > threshold:
            return
        text = "".join(c if c >= " " else " " for c in text)[:MAX_TEXT]
        msg = "<%d>%s %s[%d]: %s" % (FACILITY_AUTHPRIV * 8 + PRIORITY.get(level, 7),
                                     time.strftime("%b %d %H:%M:%S"), self.ident, os.getpid(),
                                     text)
        with self._lock:
            try:
                if self._sock is None:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    s.setblocking(False)
                    s.connect(self.path)
                    self._sock = s
                self._sock.send(msg.encode("utf-8", "replace"))
            except OSError:
                self.dropped += 1
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None

    def close(self):
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
