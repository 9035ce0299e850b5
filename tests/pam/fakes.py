"""Fakes for the pam_callerid tests: a synthetic Slurm node and a scripted caller-ID daemon.

FakeSlurm: a spool dir with extern stepd socket files (no stepd listens: adoption falls back
to the direct cgroup write) and a cgroup/v1 freezer tree under a unique test root (cpuset
only to provoke an adoption failure; never memory), a slurm.conf naming the node, and a
callerid.conf (``conf()``) pointing the service at all of it.

FakeDaemon: answers caller-ID requests on a loopback address with the project's
authenticated protocol (HMAC), as told by ``mode``.

pamtester_conn: pamtester holding the server side of a TCP connection (like sshd's [priv]),
so that the module finds the connection's 4-tuple.
"""
import os
import socket
import subprocess
import threading
import time
import uuid

NODE = "cidnode"
FREEZER = "/sys/fs/cgroup/freezer"
CPUSET = "/sys/fs/cgroup/cpuset"


class FakeSlurm:
    def __init__(self, tmp):
        self.tmp = tmp
        self.root = "/cidtest-" + uuid.uuid4().hex[:10]
        self.spool = tmp / "spool"
        self.spool.mkdir()
        self.socks = []
        self.dirs = []
        (tmp / "slurm.conf").write_text("SlurmdSpoolDir=%s\nNodeName=%s CPUs=1\n"
                                        % (self.spool, NODE))
        (tmp / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        self.key = tmp / "callerid.key"
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(32).hex().encode())
        os.close(fd)
        self._mk(FREEZER + self.root + "/slurm_" + NODE)

    def _mk(self, path):
        parts = path.split("/")
        for i in range(4, len(parts) + 1):
            p = "/".join(parts[:i])
            if not os.path.isdir(p):
                os.mkdir(p)
                self.dirs.append(p)

    def conf(self, port, ttl=0, extra=""):
        p = self.tmp / ("callerid-%d-%s.conf" % (port, uuid.uuid4().hex[:6]))
        p.write_text("SlurmConf=%s\nPamCgroupConf=%s\nPamCgroupRoot=%s\nNodeName=%s\n"
                     "AuthType=hmac\nKeyFile=%s\nPort=%d\nPamNegativeCacheTTL=%d\n%s"
                     % (self.tmp / "slurm.conf", self.tmp / "cgroup.conf", self.root, NODE,
                        self.key, port, ttl, extra))
        return str(p)

    def add_job(self, uid, job, cpuset=False):
        self._mk("%s%s/slurm_%s/uid_%d/job_%d/step_extern" % (FREEZER, self.root, NODE, uid, job))
        if cpuset:        # a cpuset cgroup without cpus: writing a pid into it fails
            self._mk("%s%s/slurm_%s/uid_%d/job_%d/step_extern" % (CPUSET, self.root, NODE, uid,
                                                                 job))
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.spool / ("%s_%d.4294967292" % (NODE, job))))
        s.close()
        time.sleep(0.02)                      # distinct ctimes: later job = newer
        return job

    def procs(self, uid, job):
        with open("%s%s/slurm_%s/uid_%d/job_%d/step_extern/cgroup.procs"
                  % (FREEZER, self.root, NODE, uid, job)) as f:
            return f.read().split()

    def cleanup(self):
        for d in sorted(self.dirs, key=len, reverse=True):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)       # a pamtester we started is still exiting


class FakeDaemon:
    """Answers caller-ID requests on 127.0.0.1 as told by ``mode``."""

    def __init__(self, key_path, host="127.0.0.1", port=0):
        from daemon.auth import HmacAuth
        self.auth = HmacAuth.from_file(str(key_path))
        self.mode = ("unknown",)
        self.requests = []
        self.lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.lsock.bind((host, port))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        from daemon import protocol as P, wire
        from daemon.auth import HmacAuth
        while not self.stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                dec = P.FrameDecoder(max_frames=1)
                frames = []
                try:
                    while not frames:
                        data = c.recv(65536)
                        if not data:
                            break
                        frames = dec.feed(data)
                except OSError:
                    continue
                if not frames:
                    continue
                req, uid, _ = wire.open_request(frames[0], self.auth)
                self.requests.append(req)
                kind = self.mode[0]
                if kind == "silent":
                    time.sleep(self.mode[1])
                    continue
                auth, nonce = self.auth, req.nonce
                if kind == "found":
                    rep = P.Reply(P.STATUS_FOUND, nonce, self.mode[1], self.mode[2], "cidsrc")
                elif kind == "forged":
                    auth = HmacAuth(os.urandom(32))
                    rep = P.Reply(P.STATUS_FOUND, nonce, self.mode[1], self.mode[2], "cidsrc")
                elif kind == "wrongnonce":
                    rep = P.Reply(P.STATUS_FOUND, os.urandom(len(nonce)), self.mode[1],
                                  self.mode[2], "cidsrc")
                else:
                    rep = P.Reply(P.STATUS_UNKNOWN, nonce)
                try:
                    c.sendall(wire.seal_reply(rep, auth))
                except OSError:
                    pass

    def close(self):
        self.stop = True
        self.lsock.close()


def pamtester_conn(service, user, *ops, timeout=30, listen="127.0.0.1", connect=None):
    """pamtester holding the server side of a TCP connection (like sshd's [priv])."""
    lst = socket.socket(socket.AF_INET6 if ":" in listen else socket.AF_INET)
    if ":" in listen:
        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # dual-stack
    lst.bind((listen, 0))
    lst.listen(1)
    cli = socket.create_connection((connect or listen, lst.getsockname()[1]))
    srv, _ = lst.accept()
    try:
        t0 = time.monotonic()
        r = subprocess.run(["pamtester", "-v", service, user] + list(ops),
                           pass_fds=(srv.fileno(),), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        return r.returncode, r.stdout, time.monotonic() - t0, cli.getsockname(), \
            lst.getsockname()
    finally:
        for s in (srv, cli, lst):
            s.close()
