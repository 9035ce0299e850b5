"""A protocol fake of slurmstepd's unix-socket side, for unit tests and hostile peers.

It speaks the layouts of cgroups.stepd's facts (src/slurmd/slurmstepd/req.c at the release
tags listed in cgroups.stepd.PROTOCOLS): the handshake (refusal = int -1 then close),
REQUEST_STEP_UID, REQUEST_ADD_EXTERN_PID, REQUEST_X11_DISPLAY, REQUEST_GET_NS_FD (22.05..25.05)
and REQUEST_GET_NS_FDS (25.11). Unknown requests close the connection, as the stepd does.
Written from the facts, not from Slurm's code. One thread serves all connections in turn.
"""
import socket
import struct
import threading
import time

from cgroups import stepd

_I = struct.Struct("=i")


class FakeStepd:
    """Listen at ``path`` and answer like a stepd of protocol ``release`` ("22.05".."25.11").

    uid         REQUEST_STEP_UID answer
    add_pid     callable(pid) -> rc for REQUEST_ADD_EXTERN_PID (default: rc 0)
    x11         (display, xauthority bytes incl. NUL, or b"") for REQUEST_X11_DISPLAY
    ns          list of (CLONE_NEW* type, fd to pass) the job has (empty: no container);
                ``ns_rc`` < 0 makes GET_NS_FD answer that (.ns could not be opened)
    mode        "ok" | "refuse" (handshake -1) | "hang" (never answer) | "close" (close
                after the handshake) | "slow" (sleep ``delay`` before each answer) |
                "truncate" (send half of each answer, then close) | "garbage" (answer every
                request with ``garbage`` bytes, then close)
    Records ``requests`` as (client version, request number).
    """

    def __init__(self, path, release="22.05", *, uid=2001, add_pid=None, x11=(0, b""),
                 ns=(), ns_rc=None, mode="ok", delay=0.0, garbage=b""):
        self.path = str(path)
        self.proto = next(p for p in stepd.PROTOCOLS if p.release == release)
        self.uid, self.add_pid, self.x11, self.ns = uid, add_pid, x11, list(ns)
        self.ns_rc, self.mode, self.delay, self.garbage = ns_rc, mode, delay, garbage
        self.requests = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(16)
        self.srv.settimeout(0.05)
        self.stop = threading.Event()
        self.conns = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    # -- serving ------------------------------------------------------------------------
    def _run(self):
        while not self.stop.is_set():
            try:
                c, _ = self.srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(c)
            c.settimeout(5)
            try:
                self._serve(c)
            except OSError:
                pass
            finally:
                c.close()

    def _recv(self, c, n):
        buf = b""
        while len(buf) < n:
            chunk = c.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def _send(self, c, data, fd=None):
        if self.mode == "slow":
            time.sleep(self.delay)
        if self.mode == "truncate":
            c.sendall(data[:max(1, len(data) // 2)])
            raise OSError("truncated on purpose")
        if fd is None:
            c.sendall(data)
        else:
            c.sendall(data)
            c.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _I.pack(fd))])

    def _serve(self, c):
        hello = self._recv(c, 4)
        if hello is None:
            return
        version = _I.unpack(hello)[0]
        if self.mode == "hang":
            self.stop.wait(30)
            return
        if self.mode == "refuse" or version < self.proto.min_client:
            c.sendall(_I.pack(-1))
            c.close()
            return
        c.sendall(_I.pack(self.proto.version))
        if self.mode == "close":
            c.close()
            return
        while True:
            req = self._recv(c, 4)
            if req is None:
                break
            num = _I.unpack(req)[0]
            self.requests.append((version, num))
            if self.mode == "garbage":
                c.sendall(self.garbage)
                break
            if not self._answer(c, num):
                break
        c.close()

    def _answer(self, c, num):
        """Answer one request like the stepd of ``self.proto``; False = close."""
        if num == stepd.REQUEST_STEP_UID:
            self._send(c, struct.pack("=I", self.uid))
        elif num == stepd.REQUEST_ADD_EXTERN_PID:
            pid = self._recv(c, 4)
            if pid is None:
                return False
            rc = self.add_pid(_I.unpack(pid)[0]) if self.add_pid else 0
            if rc is None:
                return False                      # 25.05+: step ending, no answer
            self._send(c, _I.pack(rc))
        elif num == stepd.REQUEST_X11_DISPLAY:
            display, xauth = self.x11
            self._send(c, _I.pack(display) + _I.pack(len(xauth)) + xauth)
        elif num == stepd.REQUEST_GET_NS_FD and self.proto.ns_request == num:
            return self._get_ns_fd(c)
        elif num == stepd.REQUEST_GET_NS_FDS and self.proto.ns_request == num:
            self._send(c, _I.pack(len(self.ns)))
            for kind, fd in self.ns:
                self._send(c, _I.pack(kind), fd)
        elif num == stepd.REQUEST_GET_NS_FD:
            # 25.11: writes an answer only for a mount namespace, nothing otherwise
            for kind, fd in self.ns:
                if kind == stepd.CLONE_NEWNS:
                    self._send(c, _I.pack(fd), fd)
        else:
            return False                          # unknown request: close
        return True

    def _get_ns_fd(self, c):
        if self.ns_rc is not None:
            self._send(c, _I.pack(self.ns_rc))
            return True
        mnt = [fd for kind, fd in self.ns if kind == stepd.CLONE_NEWNS]
        if not mnt:
            self._send(c, _I.pack(0))
        else:
            self._send(c, _I.pack(mnt[0]), mnt[0])
        return True

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.srv.close()
        for c in self.conns:
            c.close()
