"""On the real Slurm test bed: the daemon on every node and the login node; from inside a job
on node1 an ssh connection to node2 is resolved to that job by `callerid query` on node2."""
import subprocess
import time

import pytest

from .conftest import PY, ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.root]


def _conf(cluster, host):
    path = cluster.state / f"callerid-{host}.conf"
    path.write_text(f"AuthType=munge\nMungeSocket={cluster.munge_socket}\nPort=6820\n"
                    f"NodeName={host}\nSlurmConf=/etc/slurm/slurm.conf\n")
    return str(path)


@pytest.fixture
def daemons(fresh):
    c = fresh
    c.use_no_adoption()
    started = []
    try:
        for h in c.node_names + ["login"]:
            conf = _conf(c, h)
            c.start_daemon(h, "callerid", ["env", f"PYTHONPATH={ROOT}", PY, "-m", "daemon.cli", "daemon",
                                           "--config", conf],
                           wait_for=lambda h=h: "event=listening" in c.daemon_log(h, "callerid"))
            started.append(h)
        yield c
    finally:
        for h in started:
            c.stop_daemon(h, "callerid")


def _query(c, on, host_ip, src, dst, user=None):
    conf = str(c.state / f"callerid-{on}.conf")
    return c.exec(on, ["env", f"PYTHONPATH={ROOT}", PY, "-m", "daemon.cli", "query", "--config", conf,
                       host_ip, src, dst], user=user, timeout=30)


def _ssh_tuple(c, node, peer_ip, timeout=15):
    """(src, dst) of the established ssh connection from peer_ip into `node`, seen on node."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = c.exec(node, ["ss", "-Htn", "state", "established", "( sport = :22 )"])
        for line in r.out.splitlines():
            f = line.split()
            local, remote = f[-2], f[-1]
            if remote.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:") == peer_ip:
                return remote, local
        time.sleep(0.1)
    raise AssertionError(f"no ssh connection from {peer_ip} on {node}: {r.out}")


def test_ssh_from_job_resolved_on_node2(daemons):
    c = daemons
    job = c.sbatch("alice", nodes=["node1"])
    n1 = c.hosts["node1"].ip4
    ssh = c.popen("login", ["srun", f"--jobid={job}", "--overlap", "-w", "node1", "-N1", "-n1",
                            "ssh", "-o", "BatchMode=yes", "node2", "sleep", "30"],
                  user="alice", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        src, dst = _ssh_tuple(c, "node2", n1)
        r = _query(c, "node2", n1, src, dst)
        assert r.rc == 0, (r.out, r.err, c.daemon_log("node1", "callerid")[-2000:])
        assert f"job_id={job}" in r.out and "node=node1" in r.out and "uid=2001" in r.out
        # bob may not learn about alice's job; alice may
        r = _query(c, "node2", n1, src, dst, user="bob")
        assert r.rc == 2 and r.out.startswith("refused"), (r.out, r.err)
        r = _query(c, "node2", n1, src, dst, user="alice")
        assert r.rc == 0 and f"job_id={job}" in r.out, (r.out, r.err)
    finally:
        ssh.kill()
        ssh.wait()


def test_ssh_from_login_node_unknown(daemons):
    c = daemons
    lg = c.hosts["login"].ip4
    ssh = c.popen("login", ["ssh", "-o", "BatchMode=yes", "node2", "sleep", "30"], user="alice",
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        src, dst = _ssh_tuple(c, "node2", lg)
        r = _query(c, "node2", lg, src, dst)
        assert r.rc == 1 and r.out.startswith("unknown"), (r.out, r.err)
    finally:
        ssh.kill()
        ssh.wait()


# ---------------------------------------------------------------------------------------------
# the whole login path (C client + `callerid daemon` on every host) under a user's flood

HOSTILE = str(ROOT / "tests" / "daemon" / "hostile.py")


def test_a_users_flood_does_not_change_another_users_login(fresh):
    """bob floods node1's daemon from node2 with valid munge credentials (node2 is where the
    PAM service asks from); alice's logins from inside her job on node1 into node2 are still
    resolved by caller-ID to that job, not to her newer job there (the 'newest' fallback)."""
    import json
    from testbed.adopters import stop_pam_callerid, use_pam_callerid
    c = fresh
    audit = use_pam_callerid(c, rpc_timeout=1, extra_conf="RateLimit=20\nRateBurst=20\n")
    try:
        a = c.sbatch("alice", nodes=["node1", "node2"])
        time.sleep(1.1)
        newer = c.sbatch("alice", nodes=["node2"])
        conf = c.state / "callerid" / "flood.conf"
        conf.write_text(f"Port=6820\nAuthType=munge\nMungeSocket={c.munge_socket}\n")
        conf.chmod(0o644)
        flood = c.popen("node2", ["env", f"PYTHONPATH={ROOT}", PY, HOSTILE, "ask", "--host",
                                  c.hosts["node1"].ip4, "--port", "6820", "--config", str(conf),
                                  "--target", "10.199.9.9:1000,10.199.9.8:22", "--rate", "300",
                                  "--seconds", "8", "--threads", "32", "--no-reserved"],
                        user="bob", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(1.5)
            for _ in range(4):
                r = c.ssh("alice", "node1", "node2", "cat /proc/self/cgroup", job=a)
                assert r.rc == 0, r.err
                assert f"/job_{a}/step_extern" in r.out and f"job_{newer}" not in r.out, r.out
            out, err = flood.communicate(timeout=60)
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        flooded = json.loads(out.decode().splitlines()[-1])
        assert flooded["outcomes"].get("busy", 0) > 1000, (flooded, err.decode()[-500:])
        assert "found" not in flooded["outcomes"] and flooded["cacheable"] == 0, flooded
        end = time.monotonic() + 5          # the audit writer is asynchronous
        while True:
            recs = [json.loads(x) for x in audit.read_text().splitlines()]
            acc = [x for x in recs if x["node"] == "node2" and x["phase"] == "account"]
            if len(acc) >= 4 or time.monotonic() > end:
                break
            time.sleep(0.1)
        assert len(acc) == 4 and all(x["path"] == "caller-ID" and x["job"] == a for x in acc), acc
    finally:
        stop_pam_callerid(c)
