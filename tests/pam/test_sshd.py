"""End to end with a real OpenSSH sshd (private instance on 127.0.0.1, its own PAM service via
the program-name trick), the built C client, a real PAM service and the synthetic Slurm node
of fakes.py: the session lands in the job's extern step for publickey AND keyboard-interactive
logins, SLURM_JOB_ID is set, one decision per login (keyboard-interactive asks the caller-ID
source once), the module in account only still adopts, and a user without a job is refused
with pam_slurm_adopt's message."""
import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest

from fakes import NODE, FakeDaemon, FakeSlurm

pytestmark = pytest.mark.root
SSHD = "/usr/sbin/sshd"


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture
def shell_user():
    from pamhelpers import USER_PREFIX, _need_root
    _need_root()
    name = USER_PREFIX + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", name], check=True,
                   capture_output=True)
    pw = uuid.uuid4().hex
    subprocess.run(["chpasswd"], input="%s:%s\n" % (name, pw), text=True, check=True)
    import pwd
    yield name, pwd.getpwnam(name).pw_uid, pw
    subprocess.run(["userdel", name], capture_output=True)


def start_sshd(built_so, services, tmp_path, shell_user, pam_service, mover=False,
               session=True):
    if not os.path.exists(SSHD):
        pytest.skip("needs openssh-server")
    os.chmod(tmp_path, 0o755)
    slurm = FakeSlurm(tmp_path)
    daemon = FakeDaemon(slurm.key)
    audit = tmp_path / "audit.jsonl"
    args = "socket=%s config=%s audit=%s" % (pam_service.socket, slurm.conf(daemon.port), audit)
    lines = ["auth required pam_unix.so", "account required pam_unix.so",
             "account required %s service={service} %s" % (built_so, args)]
    if mover:
        # like pam_systemd: a session module before ours moves the session elsewhere
        other = "/sys/fs/cgroup/freezer%s/elsewhere" % slurm.root
        slurm._mk(other)
        mover = tmp_path / "mover.sh"
        mover.write_text("#!/bin/sh\necho $PPID > %s/cgroup.procs\n" % other)
        os.chmod(mover, 0o755)
        lines.append("session required pam_exec.so %s" % mover)
    if session:
        lines.append("session required %s service={service} %s" % (built_so, args))
    svc = services.make(lines)
    prog = tmp_path / svc                       # sshd uses its program name as PAM service
    prog.symlink_to(SSHD)
    hostkey = tmp_path / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
                   check=True)
    ukey = tmp_path / "ukey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ukey)], check=True)
    # sshd reads the keys file as the user: it must be outside pytest's 0700 tmp tree
    import tempfile
    kdir = tempfile.mkdtemp(prefix="cidtest-ssh-")
    os.chmod(kdir, 0o755)
    keys = os.path.join(kdir, "authorized_keys")
    shutil.copy(str(ukey) + ".pub", keys)
    os.chmod(keys, 0o644)
    port = _free_port()
    cfg = tmp_path / "sshd_config"
    cfg.write_text("\n".join([
        "ListenAddress 127.0.0.1", "Port %d" % port, "HostKey %s" % hostkey,
        "UsePAM yes", "StrictModes no", "AuthorizedKeysFile %s" % keys,
        "PasswordAuthentication no", "KbdInteractiveAuthentication yes",
        "PubkeyAuthentication yes", "PermitRootLogin no", "PrintMotd no",
        "PidFile none", "LogLevel ERROR", "AllowUsers %s" % shell_user[0], ""]))
    made_run = not os.path.isdir("/run/sshd")
    if made_run:
        os.makedirs("/run/sshd", mode=0o755)
    proc = subprocess.Popen([str(prog), "-D", "-e", "-f", str(cfg)], env={"PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sshd.log", "w"))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield {"port": port, "ukey": ukey, "slurm": slurm, "audit": audit, "user": shell_user,
           "tmp": tmp_path, "daemon": daemon, "service": pam_service, "mover": bool(mover)}
    daemon.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    time.sleep(0.2)
    slurm.cleanup()
    shutil.rmtree(kdir, ignore_errors=True)
    if made_run:
        shutil.rmtree("/run/sshd", ignore_errors=True)


@pytest.fixture(params=[False, True], ids=["plain", "mover-before-us"])
def sshd(request, built_so, services, tmp_path, shell_user, pam_service):
    yield from start_sshd(built_so, services, tmp_path, shell_user, pam_service,
                          mover=request.param)


@pytest.fixture
def sshd_account_only(built_so, services, tmp_path, shell_user, pam_service):
    """pam_slurm_adopt's documented placement: the module in the account stack only."""
    yield from start_sshd(built_so, services, tmp_path, shell_user, pam_service,
                          session=False)


def records(s):
    import json
    s["service"].flush()
    return [json.loads(x) for x in open(s["audit"])]


def ssh(s, cmd, method="publickey"):
    base = ["ssh", "-p", str(s["port"]), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=INFO",
            "-o", "PreferredAuthentications=" + method, "-o", "BatchMode=" +
            ("yes" if method == "publickey" else "no"), "-o", "ConnectTimeout=10"]
    env = {"PATH": "/usr/bin:/bin"}
    if method == "publickey":
        base += ["-i", str(s["ukey"]), "-o", "IdentitiesOnly=yes"]
    else:
        askpass = s["tmp"] / "askpass.sh"
        askpass.write_text("#!/bin/sh\necho %s\n" % s["user"][2])
        os.chmod(askpass, 0o755)
        env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        base += ["-o", "NumberOfPasswordPrompts=1"]
    r = subprocess.run(base + ["%s@127.0.0.1" % s["user"][0], cmd], capture_output=True,
                       text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("method", ["publickey", "keyboard-interactive"])
def test_login_adopted_into_job(sshd, method):
    s = sshd
    job = s["slurm"].add_job(s["user"][1], 4242)
    rc, out, err = ssh(s, "cat /proc/self/cgroup; echo JOB=$SLURM_JOB_ID", method)
    assert rc == 0, (out, err)
    want = "freezer:%s/slurm_%s/uid_%d/job_%d/step_extern" % (s["slurm"].root, NODE,
                                                              s["user"][1], job)
    assert want in out, out
    assert "JOB=%d" % job in out
    assert "pam_callerid" not in err                              # silent on success
    recs = records(s)
    acc = [r for r in recs if r["phase"] == "account"][-1]
    ses = [r for r in recs if r["phase"] == "session"][-1]
    assert acc["src_ip"] == "127.0.0.1" and acc["dst_port"] == s["port"]   # sshd's socket
    assert ses["adopted_pid"] == ses["pid"] and ses["job"] == job and ses["reused"] is True
    # the module is in this service's session stack, so on this v1 layout the account
    # phase either let [priv] enter the job itself (publickey) or adopted it after its
    # reply, the session phase waiting for that (keyboard-interactive: [priv] is the
    # [pam] child's parent)
    assert acc.get("entered") if method == "publickey" else acc["after_reply"], acc
    if s["mover"] and acc.get("after_reply"):
        # a session module before ours (like pam_systemd) moved [priv] while the account's
        # adoption ran: whichever came last, the session phase left it in the job (checked
        # above); the account's record says what its own move found
        assert acc.get("adopted") == "[priv] parent" or "adopt_error" in acc, acc
    else:   # moved away by a session module before ours: moved back; else in place
        assert (ses["how"] == "already") is (s["mover"] is False)
    if method == "publickey":      # account and session in the same [priv] process
        assert acc["pid"] == ses["pid"] and acc["adopted"] == "peer"
    else:                          # account ran in the forked [pam] child: its [priv] parent
        assert acc["pid"] != ses["pid"]                             # was adopted there
        assert acc["adopted_pid"] in (ses["pid"], None), acc


@pytest.mark.parametrize("method", ["publickey", "keyboard-interactive"])
def test_one_decision_per_login_asks_the_source_once(sshd, method):
    s = sshd
    old = s["slurm"].add_job(s["user"][1], 4301)
    s["slurm"].add_job(s["user"][1], 4302)
    s["daemon"].mode = ("found", old, s["user"][1])
    rc, out, err = ssh(s, "cat /proc/self/cgroup", method)
    assert rc == 0, (out, err)
    assert "/job_%d/step_extern" % old in out, out
    assert len(s["daemon"].requests) == 1                  # account asked, session reused
    acc, ses = [r for r in records(s) if r["phase"] in ("account", "session")][-2:]
    assert (acc["path"], ses["path"], ses["reused"]) == ("caller-ID", "caller-ID", True)


@pytest.mark.parametrize("method", ["publickey", "keyboard-interactive"])
def test_module_in_account_only_still_adopts(sshd_account_only, method):
    s = sshd_account_only
    job = s["slurm"].add_job(s["user"][1], 4401)
    rc, out, err = ssh(s, "cat /proc/self/cgroup; echo JOB=$SLURM_JOB_ID", method)
    assert rc == 0, (out, err)
    assert "/job_%d/step_extern" % job in out, out
    assert "JOB=%d" % job in out
    acc = records(s)[-1]
    assert acc["phase"] == "account" and acc["adopted_pid"]
    assert acc["adopted"] == ("peer" if method == "publickey" else "[priv] parent")


def test_no_job_refused_with_message(sshd):
    rc, out, err = ssh(sshd, "true")
    assert rc != 0
    assert "Access denied by pam_callerid: you have no active jobs on this node" in err, err
