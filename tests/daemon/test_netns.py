"""End to end in network namespaces: the daemon runs in namespace A, a process in a synthetic
Slurm job cgroup in A holds a connection to namespace B, and `callerid query` runs in B."""
import os
import shutil
import tempfile
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import NOBODY, PY, ROOT

pytestmark = pytest.mark.root

HELPER = str(Path(__file__).with_name("nshelper.py"))
SVC_PORT = 2222
MUNGE_PORT = 6820
HMAC_PORT = 6821
JOB, JOB_UID = 4242, 1234
NOBODY_JOB = 4343


def _readline(p, prefix, timeout=10.0):
    import select
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([p.stdout], [], [], 0.2)
        if r:
            line = p.stdout.readline().decode()
            if line.startswith(prefix):
                return line.split()
            if not line and p.poll() is not None:
                break
    raise RuntimeError(f"no {prefix!r} from helper: rc={p.poll()} err={p.stderr.read().decode() if p.poll() is not None else ''}")


def _wait_log(path, text, timeout=10.0, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path) and text in Path(path).read_text():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not in {path}: {Path(path).read_text() if os.path.exists(path) else ''}")


class Env:
    pass


@pytest.fixture(scope="module")
def env(netpair, jobcg, munged, mprocs):
    e = Env()
    e.net, e.cg, e.munged, e.procs = netpair, jobcg, munged, mprocs
    d = Path(tempfile.mkdtemp(prefix="cidt-netns-"))  # 0755 path: `nobody` reads the config
    os.chmod(d, 0o755)
    e.dir = d
    try:
        yield from _setup(e, d, netpair, jobcg, munged, mprocs)
    finally:
        mprocs.stop_all()
        shutil.rmtree(d, ignore_errors=True)


def _setup(e, d, netpair, jobcg, munged, mprocs):
    # listener in B
    lst = mprocs.start(netpair.cmd(netpair.b, [PY, HELPER, "listen", str(SVC_PORT)]))
    _readline(lst, "READY")
    # HMAC key + configs
    from daemon.auth import write_key
    e.key = str(d / "callerid.key")
    write_key(e.key)
    e.badkey = str(d / "wrong.key")
    write_key(e.badkey)
    common = f"NodeName=nodeA\nLogLevel=debug\nCgroupRoots={jobcg.root}\nMungeSocket={munged.socket}\n"
    e.cfg_munge = d / "munge.conf"
    e.cfg_munge.write_text(common + f"AuthType=munge\nPort={MUNGE_PORT}\n")
    e.cfg_hmac = d / "hmac.conf"
    e.cfg_hmac.write_text(common + f"AuthType=hmac\nKeyFile={e.key}\nPort={HMAC_PORT}\n")
    e.cfg_hmac_bad = d / "hmac-bad.conf"
    e.cfg_hmac_bad.write_text(common + f"AuthType=hmac\nKeyFile={e.badkey}\nPort={HMAC_PORT}\n")
    for c in (e.cfg_munge, e.cfg_hmac, e.cfg_hmac_bad):
        os.chmod(c, 0o644)
    # daemons in A
    e.logs = {}
    for name, cfg in (("munge", e.cfg_munge), ("hmac", e.cfg_hmac)):
        log = str(d / f"daemon-{name}.log")
        with open(log, "wb") as lf:
            p = mprocs.start(netpair.cmd(netpair.a, [PY, "-m", "daemon.cli", "daemon", "--config", str(cfg)]),
                             stdout=subprocess.DEVNULL, stderr=lf)
        _wait_log(log, "event=listening", proc=p)
        e.logs[name] = log
    # job cgroups
    e.job_cg = jobcg.make(JOB)
    e.nobody_cg = jobcg.make(NOBODY_JOB)
    yield e


def hold(env, kind, host, cg=None, user=None):
    if user is None and cg is not None:
        user = NOBODY if cg == env.nobody_cg else JOB_UID
    p = env.procs.start(env.net.cmd(env.net.a, [PY, HELPER, "hold", kind, host, str(SVC_PORT)], user=user))
    _, ip, port = _readline(p, "LOCAL")
    if cg is not None:
        env.cg.add(cg, p.pid)
    return p, ip, int(port)


def query(env, src, dst, *, cfg=None, port=MUNGE_PORT, user=None, proto="tcp", host=None):
    host = host or env.net.A4
    argv = [PY, "-m", "daemon.cli", "query", "--config", str(cfg or env.cfg_munge), "--port", str(port),
            "--proto", proto, "--timeout", "5", host, src, dst]
    r = subprocess.run(env.net.cmd(env.net.b, argv, user=user), capture_output=True, text=True,
                       cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
    return r.returncode, r.stdout.strip() + r.stderr.strip()


def ep(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def test_ipv4_found_munge(env):
    _, ip, port = hold(env, "tcp", env.net.B4, env.job_cg)
    rc, out = query(env, ep(ip, port), ep(env.net.B4, SVC_PORT))
    assert rc == 0, out
    assert f"job_id={JOB}" in out and "node=nodeA" in out and f"uid={JOB_UID}" in out


def test_ipv6_found(env):
    _, ip, port = hold(env, "tcp", env.net.B6, env.job_cg)
    assert ip == env.net.A6
    rc, out = query(env, ep(ip, port), ep(env.net.B6, SVC_PORT), host=env.net.A6)
    assert rc == 0 and f"job_id={JOB}" in out, out


def test_ipv4_mapped_socket_found(env):
    # the source socket is AF_INET6 talking IPv4 (appears in tcp6 as ::ffff:a.b.c.d)
    _, ip, port = hold(env, "tcp6mapped", env.net.B4, env.job_cg)
    assert ip.startswith("::ffff:")
    rc, out = query(env, ep(env.net.A4, port), ep(env.net.B4, SVC_PORT))
    assert rc == 0 and f"job_id={JOB}" in out, out
    # and the asker may use the mapped form itself
    rc, out = query(env, ep(ip, port), ep("::ffff:" + env.net.B4, SVC_PORT))
    assert rc == 0 and f"job_id={JOB}" in out, out


def test_ipv4_plain_socket_asked_in_mapped_form(env):
    _, ip, port = hold(env, "tcp", env.net.B4, env.job_cg)
    rc, out = query(env, ep("::ffff:" + ip, port), ep("::ffff:" + env.net.B4, SVC_PORT))
    assert rc == 0 and f"job_id={JOB}" in out, out


def test_udp_found(env):
    _, ip, port = hold(env, "udp", env.net.B4, env.job_cg)
    rc, out = query(env, ep(ip, port), ep(env.net.B4, SVC_PORT), proto="udp")
    assert rc == 0 and f"job_id={JOB}" in out, out


def test_unknown_outside_job(env):
    _, ip, port = hold(env, "tcp", env.net.B4, None)
    rc, out = query(env, ep(ip, port), ep(env.net.B4, SVC_PORT))
    assert rc == 1 and out.startswith("unknown"), out


def test_unknown_no_such_connection(env):
    rc, out = query(env, ep(env.net.A4, 1), ep(env.net.B4, SVC_PORT))
    assert rc == 1 and out.startswith("unknown"), out


def test_refused_for_other_users_job(env):
    _, ip, port = hold(env, "tcp", env.net.B4, env.job_cg)
    rc, out = query(env, ep(ip, port), ep(env.net.B4, SVC_PORT), user=NOBODY)
    assert rc == 2 and out.startswith("refused"), out
    _wait_log(env.logs["munge"], "event=security-violation")


def test_user_may_ask_about_own_job(env):
    _, ip, port = hold(env, "tcp", env.net.B4, env.nobody_cg)
    rc, out = query(env, ep(ip, port), ep(env.net.B4, SVC_PORT), user=NOBODY)
    assert rc == 0 and f"job_id={NOBODY_JOB}" in out, out


def test_hmac_found(env):
    _, ip, port = hold(env, "tcp", env.net.B6, env.job_cg)
    rc, out = query(env, ep(ip, port), ep(env.net.B6, SVC_PORT), cfg=env.cfg_hmac, port=HMAC_PORT,
                    host=env.net.A6)
    assert rc == 0 and f"job_id={JOB}" in out, out


def test_hmac_wrong_key_rejected_both_ways(env):
    _, ip, port = hold(env, "tcp", env.net.B4, env.job_cg)
    rc, out = query(env, ep(ip, port), ep(env.net.B4, SVC_PORT), cfg=env.cfg_hmac_bad, port=HMAC_PORT)
    # the daemon refuses (and logs), its reply does not verify under our wrong key -> invalid
    assert rc == 4 and out.startswith("invalid"), out
    _wait_log(env.logs["hmac"], "event=security-auth-failure")


def test_wrong_scheme_rejected(env):
    _, ip, port = hold(env, "tcp", env.net.B4, env.job_cg)
    rc, out = query(env, ep(ip, port), ep(env.net.B4, SVC_PORT), cfg=env.cfg_munge, port=HMAC_PORT)
    assert rc == 4, out


def test_unreachable(env):
    rc, out = query(env, "10.199.77.1:5000", "10.199.77.2:22", port=6999)
    assert rc == 3 and out.startswith("unreachable"), out


def test_daemon_sigterm_clean_exit(env, procs):
    log = str(env.dir / "daemon-term.log")
    cfg = env.dir / "term.conf"
    cfg.write_text(f"AuthType=hmac\nKeyFile={env.key}\nPort=6830\nCgroupRoots={env.cg.root}\n")
    with open(log, "wb") as lf:
        p = procs.start(env.net.cmd(env.net.a, [PY, "-m", "daemon.cli", "daemon", "--config", str(cfg)]),
                        stdout=subprocess.DEVNULL, stderr=lf)
    _wait_log(log, "event=listening", proc=p)
    text = Path(log).read_text()
    assert "[::]:6830" in text and "0.0.0.0:6830" in text  # both families
    p.terminate()
    assert p.wait(5) == 0
    assert "event=stopped" in Path(log).read_text()


def test_daemon_used_sockdiag(env):
    _, ip, port = hold(env, "tcp", env.net.B4, env.job_cg)
    rc, out = query(env, ep(ip, port), ep(env.net.B4, SVC_PORT))
    assert rc == 0, out
    text = Path(env.logs["munge"]).read_text()
    line = [l for l in text.splitlines() if f"{ip}:{port}" in l and "event=answer" in l][-1]
    assert "via=sockdiag" in line and "status=found" in line, line
