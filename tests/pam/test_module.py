"""The built pam_callerid.so through real libpam (pamtester), without Slurm jobs."""
import json
import sys
import os
import shutil
import subprocess
import time

import pytest

from pamhelpers import REPO, _need_root, build_module, outcome, pamtester, stack

pytestmark = pytest.mark.root


def read_audit(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_exports_only_pam_sm(built_so):
    out = subprocess.run(["nm", "-D", "--defined-only", built_so], capture_output=True,
                         text=True, check=True).stdout
    syms = sorted(line.split()[-1] for line in out.splitlines() if line.strip())
    assert syms == sorted(["pam_sm_acct_mgmt", "pam_sm_authenticate", "pam_sm_close_session",
                           "pam_sm_open_session", "pam_sm_setcred"])
    dyn = subprocess.run(["readelf", "-d", built_so], capture_output=True, text=True).stdout
    assert "NODELETE" in dyn
    assert "libpython3.11.so.1.0" in dyn
    assert "RPATH" not in dyn and "RUNPATH" not in dyn


def test_root_is_ignored(built_so, services, tmp_path):
    audit = tmp_path / "a.jsonl"
    svc = services.make(stack(built_so, "audit=%s" % audit))
    rc, out = pamtester(svc, "root", "acct_mgmt")
    assert outcome(out) == "ignore", out
    recs = read_audit(audit)
    assert [r["path"] for r in recs] == ["root"]
    assert recs[0]["result"] == "PAM_IGNORE"


def test_root_with_broken_config_still_gets_in(built_so, services, tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("this is = = not a config\n")
    svc = services.make(stack(built_so, "config=%s action_generic_failure=deny "
                                        "action_unknown=deny audit=none" % bad))
    for cfg in (str(bad), "/nonexistent/callerid.conf"):
        rc, out = pamtester(svc, "root", "acct_mgmt", "open_session", "close_session")
        assert "Permission denied" not in out and "System error" not in out, out
    # and with pam_permit after us (a real stack), root logs in
    svc2 = services.make(["account required %s service={service} config=%s "
                          "action_generic_failure=deny audit=none" % (built_so, bad),
                          "account required pam_permit.so"])
    rc, out = pamtester(svc2, "root", "acct_mgmt")
    assert rc == 0, out


def test_other_service_ignored(built_so, services, cid_user):
    svc = services.make(["account [success=done ignore=ignore default=die] %s service=sshd "
                         "audit=none" % built_so, "account required pam_deny.so"])
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "ignore", out


def test_unknown_user(built_so, services):
    svc = services.make(stack(built_so, "audit=none"))
    rc, out = pamtester(svc, "cidt-no-such-user", "acct_mgmt")
    assert "Cannot make/remove" in out, out


@pytest.mark.parametrize("act,expect", [("ignore", "ignore"), ("allow", "success"),
                                        ("deny", "denied")])
def test_generic_failure_actions(built_so, services, cid_user, tmp_path, act, expect):
    """A configuration that cannot be read is a generic failure."""
    audit = tmp_path / "a.jsonl"
    svc = services.make(stack(built_so, "config=/nonexistent/callerid.conf "
                                        "action_generic_failure=%s audit=%s" % (act, audit)))
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == expect, out
    assert "No Slurm jobs found on node." in out
    rec = read_audit(audit)[-1]
    assert rec["path"] == "failure" and rec["user"] == cid_user[0] and rec["uid"] == cid_user[1]


def test_authenticate_and_setcred_ignore(built_so, services, cid_user):
    svc = services.make(["auth [success=done ignore=ignore default=die] %s" % built_so,
                         "auth required pam_deny.so",
                         "account required pam_permit.so"])
    rc, out = pamtester(svc, cid_user[0], "setcred")
    assert "Authentication failure" in out or "Failure setting user credentials" in out, out


# ------------------------------------------------------------------ robustness
@pytest.fixture(scope="module")
def broken_so(tmp_path_factory):
    """A module built against a copy of the project whose hook raises in dispatch()."""
    _need_root()
    d = tmp_path_factory.mktemp("broken")
    os.chmod(d, 0o755)
    proj = d / "proj"
    shutil.copytree(os.path.join(REPO, "pam_callerid"), proj / "pam_callerid",
                    ignore=shutil.ignore_patterns("__pycache__"))
    hook = proj / "pam_callerid" / "hook.py"
    hook.write_text(hook.read_text() + "\n\ndef dispatch(*a, **k):\n"
                    "    raise RuntimeError('injected failure')\n")
    return build_module(d, project=proj, name="pam_callerid_broken")


@pytest.fixture(scope="module")
def noimport_so(tmp_path_factory):
    """A module whose project package cannot even be imported."""
    _need_root()
    d = tmp_path_factory.mktemp("noimport")
    os.chmod(d, 0o755)
    proj = d / "proj"
    shutil.copytree(os.path.join(REPO, "pam_callerid"), proj / "pam_callerid",
                    ignore=shutil.ignore_patterns("__pycache__"))
    so = build_module(d, project=proj, name="pam_callerid_noimport")
    (proj / "pam_callerid" / "hook.py").write_text("raise ImportError('injected')\n")
    shutil.rmtree(proj / "pam_callerid" / "__pycache__", ignore_errors=True)
    return so


@pytest.mark.parametrize("which", ["broken_so", "noimport_so"])
def test_exception_denies_never_grants(request, which, services, cid_user):
    so = request.getfixturevalue(which)
    svc = services.make(["account required %s service={service} audit=none" % so,
                         "account required pam_permit.so",
                         "session required %s service={service} audit=none" % so,
                         "session required pam_permit.so"])
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert rc != 0 and "System error" in out, out
    rc, out = pamtester(svc, cid_user[0], "open_session")
    assert rc != 0 and "System error" in out, out
    # root still gets in, other services are left alone
    rc, out = pamtester(svc, "root", "acct_mgmt")
    assert rc == 0, out


def test_exception_with_onerror_ignore(broken_so, services, cid_user):
    svc = services.make(stack(broken_so, "onerror=ignore audit=none"))
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert outcome(out) == "ignore", out


def test_environment_injection_ignored(built_so, services, cid_user, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    for mod in ("sitecustomize", "usercustomize", "os", "pam_callerid", "_socket", "time"):
        (evil / (mod + ".py")).write_text("open(%r, 'a').write(%r)\n" % (str(marker), mod))
    audit = tmp_path / "a.jsonl"
    svc = services.make(stack(built_so, "config=/nonexistent action_generic_failure=deny "
                                        "audit=%s" % audit))
    for env in ({"PYTHONPATH": str(evil)}, {"PYTHONHOME": "/nonexistent"},
                {"PYTHONHOME": str(evil), "PYTHONPATH": str(evil), "PYTHONSTARTUP":
                 str(evil / "os.py"), "PYTHONINSPECT": "1", "PYTHONVERBOSE": "1"}):
        rc, out = pamtester(svc, cid_user[0], "acct_mgmt", env=env)
        assert outcome(out) == "denied", (env, out)
        assert "import " not in out, out          # PYTHONVERBOSE ignored
    assert not marker.exists()
    assert len(read_audit(audit)) == 3


def test_many_cycles_in_one_process(built_so, services, cid_user, tmp_path):
    """Many account calls on one handle in one process."""
    audit = tmp_path / "a.jsonl"
    svc = services.make(stack(built_so, "config=/nonexistent action_generic_failure=deny "
                                        "audit=%s" % audit))
    rc, out = pamtester(svc, cid_user[0], *(["acct_mgmt"] * 20))
    assert out.count("Permission denied") == 1      # pamtester stops at the first failure
    svc2 = services.make(stack(built_so, "config=/nonexistent action_generic_failure=allow "
                                         "audit=%s" % audit))
    rc, out = pamtester(svc2, cid_user[0], *(["acct_mgmt"] * 20))
    assert rc == 0 and out.count("account management done") == 20, out
    pids = {r["pid"] for r in read_audit(audit)}
    assert len(pids) == 2


def test_concurrent_audit_lines_never_interleave(built_so, services, cid_user, tmp_path):
    audit = tmp_path / "a.jsonl"
    svc = services.make(stack(built_so, "config=/nonexistent action_generic_failure=allow "
                                        "audit=%s" % audit))
    procs = [subprocess.Popen(["pamtester", svc, cid_user[0]] + ["acct_mgmt"] * 10,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(8)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    recs = read_audit(audit)          # json.loads would fail on an interleaved line
    assert len(recs) == 80


def test_messages_and_quiet(built_so, services, cid_user):
    svc = services.make(stack(built_so, "config=/nonexistent action_generic_failure=allow "
                                        "audit=none"))
    rc, out = pamtester(svc, cid_user[0], "acct_mgmt")
    assert "No Slurm jobs found on node." in out


def test_syslog_authpriv_ident(built_so, services, cid_user, tmp_path):
    """Log lines go to /dev/log with facility authpriv and ident pam_callerid. The machine has
    no /dev/log: a private mount namespace gets a tmpfs /dev with our own listener."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare")
    svc = services.make(stack(built_so, "config=/nonexistent action_generic_failure=deny "
                                        "frobnicate=1 audit=none"))
    got = tmp_path / "syslog.txt"
    listener = tmp_path / "listen.py"
    listener.write_text(
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.bind('/dev/log')\n"
        "open(sys.argv[1] + '.ready', 'w').close()\n"
        "s.settimeout(3)\n"
        "with open(sys.argv[1], 'w') as f:\n"
        "    try:\n"
        "        while True:\n"
        "            f.write(s.recv(4096).decode() + '\\n'); f.flush()\n"
        "    except OSError:\n"
        "        pass\n")
    script = ("mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && "
              "(%s %s %s >/dev/null 2>&1 &) && for i in $(seq 50); do [ -e %s.ready ] && break; sleep 0.05; "
              "done && pamtester %s %s acct_mgmt; sleep 0.2"
              % (sys.executable, listener, got, got, svc, cid_user[0]))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=30)
    assert "Permission denied" in r.stdout + r.stderr, r.stdout + r.stderr
    for _ in range(80):
        text = got.read_text() if got.exists() else ""
        if "cannot list the jobs" in text:
            break
        time.sleep(0.05)
    lines = [ln for ln in text.splitlines() if ln]
    assert lines, r.stdout + r.stderr
    # <PRI> = authpriv(10)*8 + severity; ident pam_callerid[pid]
    assert all(ln.startswith("<8") and " pam_callerid[" in ln for ln in lines), lines
    assert any("ignoring unrecognized option 'frobnicate=1'" in ln for ln in lines), lines
    assert any(ln.startswith("<83>") and "cannot list the jobs" in ln for ln in lines), lines


def test_build_install_step(tmp_path):
    """--install without --out (as packaging/run calls it) into a custom directory."""
    from pamhelpers import VENV, _need_root
    _need_root()
    dest = tmp_path / "security"
    r = subprocess.run([sys.executable, "-m", "pam_callerid.build", "--venv", VENV,
                        "--install", "--install-dir", str(dest)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    so = dest / "pam_callerid.so"
    assert so.is_file() and oct(so.stat().st_mode & 0o777) == oct(0o644)
    r = subprocess.run([sys.executable, "-m", "pam_callerid.build", "--venv", VENV],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "--out" in r.stderr


def _cgroup_writes(trace):
    """cgroup.procs files opened for writing in an strace -e openat log."""
    import re
    return [m.group(1) for m in re.finditer(r'openat\([^"]*"([^"]+/cgroup\.procs)", O_WRONLY', trace)]


@pytest.mark.parametrize("warmup", ["", "cgroup_warmup=no"])
def test_cgroup_warmup_writes_own_cgroup_never_memory(built_so, services, cid_user, tmp_path, warmup):
    """The shim's warm-up thread re-writes the process's pid into the cgroup it already is in
    (freezer, pids or v2; never memory) -- or nothing with cgroup_warmup=no."""
    if not shutil.which("strace"):
        pytest.skip("needs strace")
    svc = services.make(stack(built_so, "audit=none %s" % warmup))
    log = tmp_path / "trace"
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(log),
                        "pamtester", "-v", svc, cid_user[0], "acct_mgmt"],
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert outcome(r.stdout) in ("denied", "ignore"), r.stdout   # no jobs: nothing adopted
    writes = _cgroup_writes(log.read_text())
    assert not any("memory" in w for w in writes), writes
    if warmup:
        assert writes == [], writes
        return
    assert len(writes) == 1, writes
    own = {}
    for line in open("/proc/self/cgroup"):           # pamtester inherits pytest's cgroups
        hid, ctrls, path = line.rstrip("\n").split(":", 2)
        for c in (ctrls.split(",") if ctrls else [""]):
            own[c] = path
    expect = {f"/sys/fs/cgroup/freezer{own['freezer']}/cgroup.procs"} if "freezer" in own else \
        {f"/sys/fs/cgroup/pids{own['pids']}/cgroup.procs"} if "pids" in own else \
        {f"/sys/fs/cgroup{own['']}/cgroup.procs", f"/sys/fs/cgroup/unified{own['']}/cgroup.procs"}
    assert writes[0] in expect, (writes, expect)
