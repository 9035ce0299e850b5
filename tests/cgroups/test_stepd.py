"""cgroups.stepd against a protocol fake of slurmstepd (every supported release's layouts) and
hostile peers: refusal, wrong listener uid, truncated and garbage answers, slow and silent
peers (bounded), fds that are not mount namespaces. No cluster needed."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from cgroups import stepd
from cgroups.errors import (CgroupError, NamespaceError, StepdError, StepdProtocolError,
                            StepdRefused, StepdRequestFailed, StepdTimeout, StepdUnavailable)
from cgroups.namespace import check_mount_ns

RELEASES = [p.release for p in stepd.PROTOCOLS]


# ---------------------------------------------------------------- pure: the table

def test_protocol_table_facts():
    v = {p.release: (p.version, p.min_client) for p in stepd.PROTOCOLS}
    assert v["22.05"] == (9728, 9216) and v["24.11"] == (10752, 9984)
    assert v["25.05"] == (11008, 10240) and v["25.11"] == (11264, 10496)
    # the version we send is accepted by every known stepd (no upper bound in _handle_accept)
    assert all(p.min_client <= stepd.CLIENT_PROTOCOL_VERSION for p in stepd.PROTOCOLS)
    assert stepd.protocol_for(9728).release == "22.05"
    assert stepd.protocol_for(10752).release == "24.11"
    assert stepd.protocol_for(10800).release == "24.11"       # between rows: the older one
    assert stepd.protocol_for(45 << 8).release == "25.11"     # newer: the newest we know
    assert stepd.protocol_for(37 << 8).release == "22.05"     # older: 22.05's layouts
    assert [p.ns_request for p in stepd.PROTOCOLS].count(stepd.REQUEST_GET_NS_FDS) == 1


def test_pure_checks():
    with pytest.raises(StepdRefused, match="refused protocol version 9728") as ei:
        stepd.check_handshake(-1, 9728, "/s")
    assert ei.value.version == 9728 and isinstance(ei.value, StepdProtocolError)
    assert stepd.check_handshake(10752, 1, "/s") == 10752
    with pytest.raises(StepdProtocolError):
        stepd.check_handshake(0, 1, "/s")
    with pytest.raises(StepdRequestFailed, match="rc -1") as ei:
        stepd.check_add_pid_rc(-1, 5, "/s")
    assert ei.value.rc == -1
    assert stepd.check_add_pid_rc(0, 5, "/s") is None
    assert stepd.decode_xauthority(b"/home/a/.Xauthority\0", "/s") == "/home/a/.Xauthority"
    for bad in (b"/x", b"/x\0y\0", b"\0"):
        with pytest.raises(StepdProtocolError):
            stepd.decode_xauthority(bad, "/s")
    for display, length in ((-1, 0), (10, -1), (10, stepd.MAX_XAUTHORITY + 1)):
        with pytest.raises(StepdProtocolError):
            stepd.check_x11_header(display, length, "/s")
    with pytest.raises(StepdProtocolError):
        stepd.check_ns_count(stepd.MAX_NAMESPACES + 1, "/s")


# ---------------------------------------------------------------- every release's layouts

@pytest.mark.parametrize("release", RELEASES)
def test_each_release(tmp_path, fakes, release):
    sock = tmp_path / "s"
    added = []
    mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        f = fakes(sock, release, uid=2001, add_pid=lambda pid: added.append(pid) or 0,
                  x11=(12, b"/home/alice/.Xauthority\0"),
                  ns=[(0x40000000, net), (stepd.CLONE_NEWNS, mnt)])
        with stepd.connect(sock) as c:
            assert c.version == f.proto.version and c.protocol is f.proto
            assert (c.peer_uid, c.peer_pid) == (0, os.getpid())
            assert c.step_uid() == 2001
            assert c.add_extern_pid(4242) is None and added == [4242]
            assert c.x11_display() == (12, "/home/alice/.Xauthority")
            fd = c.namespace_fd()
        try:
            assert fd not in (mnt, net)
            assert os.fstat(fd).st_ino == os.fstat(mnt).st_ino      # the mount ns, not net
            assert os.get_inheritable(fd) is False                  # O_CLOEXEC
            check_mount_ns(fd, "fd")
        finally:
            os.close(fd)
        want = f.proto.ns_request
        assert [r for _, r in f.requests] == [20, 22, 23, want]
        assert {v for v, _ in f.requests} == {stepd.CLIENT_PROTOCOL_VERSION}
    finally:
        os.close(mnt)
        os.close(net)


@pytest.mark.parametrize("release", ["22.05", "25.11"])
def test_no_container_no_x11(tmp_path, fakes, release):
    fakes(tmp_path / "s", release)
    with stepd.connect(tmp_path / "s") as c:
        assert c.x11_display() is None
        assert c.namespace_fd() is None
    # x11 display set but no xauthority
    fakes(tmp_path / "t", release, x11=(3, b""))
    with stepd.connect(tmp_path / "t") as c:
        assert c.x11_display() == (3, None)


def test_stepd_failures_are_typed(tmp_path, fakes):
    fakes(tmp_path / "rc", "24.11", add_pid=lambda pid: -1, ns_rc=-1)
    with stepd.connect(tmp_path / "rc") as c:
        with pytest.raises(StepdRequestFailed, match="rc -1"):
            c.add_extern_pid(7)
        with pytest.raises(StepdRequestFailed, match=r"\.ns could not be opened"):
            c.namespace_fd()
    # 25.05+: the stepd closes instead of answering while its step is ending
    fakes(tmp_path / "ending", "25.05", add_pid=lambda pid: None)
    with stepd.connect(tmp_path / "ending") as c:
        with pytest.raises(StepdProtocolError, match="step is ending"):
            c.add_extern_pid(7)


# ---------------------------------------------------------------- hostile and broken peers

def test_refusal_reported_as_such(tmp_path, fakes):
    fakes(tmp_path / "old", "22.05")
    fakes(tmp_path / "r", "24.11", mode="refuse")
    t0 = time.monotonic()
    with pytest.raises(StepdRefused, match="refused protocol version 11264") as ei:
        stepd.step_uid(tmp_path / "r")
    assert time.monotonic() - t0 < 0.1
    assert ei.value.version == 11264 and ei.value.socket == str(tmp_path / "r")
    # a version below the stepd's minimum is refused by the fake like by the stepd
    with pytest.raises(StepdRefused, match="refused protocol version 9215"):
        stepd.connect(tmp_path / "old", protocol_version=9215)


def test_listener_not_root_is_not_trusted():
    """A real listener running as nobody (65534): its answer is never read."""
    d = tempfile.mkdtemp(prefix="cia-peer-")           # pytest's tmp dirs are root-only
    os.chmod(d, 0o777)
    path = os.path.join(d, "fake.sock")
    code = textwrap.dedent(f"""
        import socket, struct, time
        s = socket.socket(socket.AF_UNIX); s.bind({str(path)!r}); s.listen(4)
        print("ready", flush=True)
        while True:
            c, _ = s.accept()
            try:
                c.recv(4); c.sendall(struct.pack("=i", 9728)); c.recv(4)
                c.sendall(struct.pack("=I", 0))
            except OSError:
                pass
            c.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], user=65534, stdout=subprocess.PIPE,
                         text=True, cwd="/")
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(StepdProtocolError, match="uid 65534.*not trusted"):
            stepd.step_uid(path)
        assert stepd.step_uid(path, trusted_uids=None) == 0   # the check is what saves us
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d)


@pytest.mark.parametrize("mode,match", [
    ("close", "closed"),            # while sending the request, or before any answer byte
    ("truncate", "closed after 2 of 4 bytes"),
])
def test_truncated_answers(tmp_path, fakes, mode, match):
    fakes(tmp_path / "s", "22.05", mode=mode)
    with pytest.raises(StepdProtocolError, match=match):
        stepd.step_uid(tmp_path / "s")


@pytest.mark.parametrize("garbage,match", [
    (b"\xff\xff\xff\xff", r"uid_t\)-1"),                               # STEP_UID
])
def test_garbage_uid(tmp_path, fakes, garbage, match):
    fakes(tmp_path / "s", "22.05", mode="garbage", garbage=garbage)
    with pytest.raises(StepdProtocolError, match=match):
        stepd.step_uid(tmp_path / "s")


@pytest.mark.parametrize("x11,match", [
    ((-5, b""), "display -5"),
    ((1, b"x" * 5000), "length 5000"),
    ((1, b"/tmp/a"), "NUL-terminated"),
])
def test_bad_x11_answers(tmp_path, fakes, x11, match):
    fakes(tmp_path / "s", "24.11", x11=x11)
    with stepd.connect(tmp_path / "s") as c:
        with pytest.raises(StepdProtocolError, match=match):
            c.x11_display()


def test_ns_answer_without_fd_and_wrong_fd(tmp_path, fakes):
    # claims an fd (int > 0) and then closes: no SCM_RIGHTS
    fakes(tmp_path / "nofd", "22.05", mode="garbage", garbage=b"\x07\0\0\0")
    with stepd.connect(tmp_path / "nofd") as c:
        with pytest.raises(StepdProtocolError, match="namespace fd"):
            c.namespace_fd()
    # passes a regular file instead of a namespace: the transport works, the check refuses
    reg = os.open("/etc/hostname", os.O_RDONLY)
    try:
        fakes(tmp_path / "reg", "22.05", ns=[(stepd.CLONE_NEWNS, reg)])
        with stepd.connect(tmp_path / "reg") as c:
            fd = c.namespace_fd()
        try:
            with pytest.raises(NamespaceError, match="not a namespace"):
                check_mount_ns(fd, "the passed fd")
        finally:
            os.close(fd)
    finally:
        os.close(reg)


def test_too_many_namespaces(tmp_path, fakes):
    fakes(tmp_path / "s", "25.11", mode="garbage", garbage=b"\xff\0\0\0")
    with stepd.connect(tmp_path / "s") as c:
        with pytest.raises(StepdProtocolError, match="namespace count 255"):
            c.namespace_fd()


@pytest.mark.parametrize("mode", ["hang", "slow"])
def test_slow_or_silent_peer_is_bounded(tmp_path, fakes, mode):
    """One deadline covers connect, handshake and every request of the conversation."""
    fakes(tmp_path / "s", "24.11", mode=mode, delay=0.2)
    t0 = time.monotonic()
    with pytest.raises(StepdTimeout) as ei:
        with stepd.connect(tmp_path / "s", 0.3) as c:     # slow: handshake answered at once
            c.step_uid()                                   # 0.2 s
            c.x11_display()                                # 0.2 s more: past the deadline
    took = time.monotonic() - t0
    assert 0.29 <= took < 0.3 + 0.15, took
    assert isinstance(ei.value, TimeoutError) and isinstance(ei.value, CgroupError)


def test_listening_socket_that_never_accepts_times_out(tmp_path):
    path = str(tmp_path / "n")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        srv.listen(4)                              # connect() succeeds, nobody ever accepts
        for timeout in (0.2, 0.5):
            t0 = time.monotonic()
            with pytest.raises(StepdTimeout) as ei:
                stepd.step_uid(path, timeout=timeout)
            took = time.monotonic() - t0
            assert timeout - 0.01 <= took < timeout + 0.15, took
            assert ei.value.socket == path
    finally:
        srv.close()


def test_unavailable_fails_fast(tmp_path):
    path = str(tmp_path / "stale")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                                      # the file stays, nobody listens
    t0 = time.monotonic()
    with pytest.raises(StepdUnavailable, match="nobody listening"):
        stepd.step_uid(path, timeout=5)
    with pytest.raises(StepdUnavailable, match="does not exist"):
        stepd.step_uid(str(tmp_path / "missing"), timeout=5)
    open(tmp_path / "file", "w").close()
    with pytest.raises(StepdUnavailable):
        stepd.step_uid(str(tmp_path / "file"), timeout=5)
    assert time.monotonic() - t0 < 0.1
    assert all(issubclass(e, StepdError) for e in (StepdTimeout, StepdUnavailable,
                                                    StepdProtocolError, StepdRefused,
                                                    StepdRequestFailed))
