"""A forged PAM decision daemon for the C client's tests: a hostile (or just scripted) peer on
the local protocol's unix SOCK_SEQPACKET socket.

It runs as its own process (so a test can SIGSTOP or kill it, or run it as another uid):

    with ForgedDaemon(sock_dir, [{"reply": "callerid-pam 1\\nrc=success\\n"}]) as d:
        ... pamtester ...
        d.records()      # one dict per connection: request, peer creds, peer fds, ...

The script is a list of per-connection steps, used in order (the last one repeats); a
plain string is a step that replies with it.  A step:

    reply: str          the reply message (UTF-8), or
    reply_hex: str      the reply as hex bytes (for invalid UTF-8, NUL, ...)
    fds: [spec]         fds attached to the reply (SCM_RIGHTS): "null" (/dev/null), "pipe"
                        (a pipe's read end), "ns:PID" (/proc/PID/ns/mnt), "write:PATH"
                        (PATH opened for writing: a cgroup's tasks file)
    ack: true           after the reply, wait (2 s) for the client's acknowledgement
    do: "reply"         (default) read the request, send the reply, close
        "hang"          read the request, never answer (the connection stays open)
        "close"         read the request, close without a reply
        "kill"          read the request, then SIGKILL this process (killed mid-request)
    delay: seconds      before replying

Options: ``user`` (run as that user: setresuid before bind, so SO_PEERCRED shows it),
``backlog`` (listen backlog), ``accept=False`` (never accept: connections stay queued).
Each record: ``request`` (text, None when the client sent nothing), ``size``, ``truncated``,
``peer`` ([pid, uid, gid]), ``peer_fds`` (readlink of every fd of the peer, taken before
replying), ``sent`` (readlink of the fds attached), ``t_accept`` (CLOCK_MONOTONIC), ``ack``
(the acknowledgement's text, None when none came).
"""
import array
import json
import os
import pwd
import signal
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _open_spec(spec, keep):
    if spec == "null":
        return os.open("/dev/null", os.O_RDONLY)
    if spec == "pipe":
        r, w = os.pipe()
        keep.append(w)
        return r
    if spec.startswith("ns:"):
        return os.open("/proc/%s/ns/mnt" % spec[3:], os.O_RDONLY)
    if spec.startswith("write:"):
        return os.open(spec[6:], os.O_WRONLY)
    raise ValueError("unknown fd spec %r" % spec)


def _links(pid):
    d = "/proc/%d/fd" % pid
    out = {}
    try:
        for name in os.listdir(d):
            try:
                out[name] = os.readlink(os.path.join(d, name))
            except OSError:
                pass
    except OSError:
        pass
    return out


def _handle(conn, step, log, n):
    rec = {"n": n, "t_accept": time.monotonic()}
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        12))
    rec["peer"] = [pid, uid, gid]
    data, _, flags, _ = conn.recvmsg(65536)
    rec["size"] = len(data)
    rec["truncated"] = bool(flags & socket.MSG_TRUNC)
    rec["request"] = data.decode("utf-8", "replace") if data else None
    rec["peer_fds"] = _links(pid)
    do = step.get("do", "reply")
    if do == "kill":
        log.write(json.dumps(rec) + "\n")
        log.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if do == "hang":
        log.write(json.dumps(rec) + "\n")
        log.flush()
        return conn                       # kept open by the caller, never answered
    if step.get("delay"):
        time.sleep(step["delay"])
    if do == "reply":
        if "reply_hex" in step:
            msg = bytes.fromhex(step["reply_hex"])
        else:
            msg = step.get("reply", "").encode()
        keep = []
        fds = [_open_spec(s, keep) for s in step.get("fds", ())]
        rec["sent"] = [os.readlink("/proc/self/fd/%d" % fd) for fd in fds]
        # the record is on disk before the reply leaves: a test that reads the records as soon
        # as the client returned sees every exchange (a send error follows as a second line)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        try:
            if fds:
                conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", fds).tobytes())])
            else:
                conn.send(msg)
        except OSError as e:
            log.write(json.dumps({"n": n, "send_error": str(e)}) + "\n")
            log.flush()
        for fd in fds + keep:
            os.close(fd)
        if step.get("ack"):
            conn.settimeout(2.0)
            try:
                ack = conn.recv(65536).decode("utf-8", "replace") or None
            except OSError:
                ack = None
            log.write(json.dumps({"n": n, "ack": ack}) + "\n")
            log.flush()
    else:
        log.write(json.dumps(rec) + "\n")
        log.flush()
    conn.close()
    return None


def serve(path, script, log_path, user=None, backlog=16, accept=True):
    log = open(log_path, "a")                 # opened before dropping privileges
    if user:
        pw = pwd.getpwnam(user)
        os.setgroups([])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen(backlog)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if not accept:
        while True:
            time.sleep(3600)
    script = [{"reply": st} if isinstance(st, str) else st for st in script]
    hung = []
    n = 0
    while True:
        conn, _ = s.accept()
        kept = _handle(conn, script[min(n, len(script) - 1)], log, n)
        if kept is not None:
            hung.append(kept)
        n += 1


class ForgedDaemon:
    """The forged daemon as a child process; a context manager that always cleans up."""

    def __init__(self, sock_dir, script, user=None, backlog=16, accept=True):
        self.dir = str(sock_dir)
        self.path = os.path.join(self.dir, "pam.sock")
        self.log = os.path.join(self.dir, "forged.jsonl")
        self.args = {"script": script, "user": user, "backlog": backlog, "accept": accept}
        self.proc = None

    def start(self):
        for p in (self.path, self.log):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path,
                                      self.log, json.dumps(self.args)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line != "ready\n":
            self.stop()
            raise RuntimeError("forged daemon did not start: %r" % line)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            os.kill(self.proc.pid, signal.SIGCONT)
        if self.proc is not None:
            self.proc.wait()
            self.proc.stdout.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def records(self):
        if not os.path.exists(self.log):
            return []
        recs = {}
        with open(self.log) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    recs.setdefault(rec["n"], {}).update(rec)
        return [recs[n] for n in sorted(recs)]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    _args = json.loads(sys.argv[3])
    serve(sys.argv[1], _args["script"], sys.argv[2], user=_args["user"],
          backlog=_args["backlog"], accept=_args["accept"])
