"""Pure tests: /proc/PID/cgroup variants, socket names, mounts, hostlists, newest, node names."""
import pytest
from hypothesis import given, settings, strategies as st

from cgroups import paths as P
from cgroups.conf import Conf, ConfError, parse_conf_lines
from cgroups.errors import LayoutNotFound
from cgroups.layout import choose_v2_mount, choose_version, resolve_nodename

ADOPTED_V1 = """9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/slurm_node2/uid_2001/job_16/step_extern
5:devices:/slurm_node2/uid_2001/job_16/step_extern
4:memory:/process_api/1ac9998356bf6489186138e495d352fb
3:cpuset:/slurm_node2/uid_2001/job_16/step_extern
2:cpuacct:/
1:cpu:/
0::/
"""


def v1(path, ctrl="freezer"):
    return f"9:name=systemd:/\n6:{ctrl}:{path}\n4:memory:/process_api/x\n0::/\n"


def v2(path):
    return f"0::{path}\n"


@pytest.mark.parametrize("text,job,step,task,uid,node,version", [
    (ADOPTED_V1, 16, "extern", None, 2001, "node2", 1),
    (v1("/slurm_node2/uid_2001/job_10/step_0"), 10, "0", None, 2001, "node2", 1),
    (v1("/slurm_node2/uid_2001/job_10/step_0/task_0", "devices"), 10, "0", "0", 2001, "node2", 1),
    (v1("/slurm_node2/uid_2001/job_11/step_batch"), 11, "batch", None, 2001, "node2", 1),
    (v1("/slurm/uid_5/job_12/step_interactive"), 12, "interactive", None, 5, None, 1),
    (v1("/slurm/uid_5/job_12/step_3+1"), 12, "3+1", None, 5, None, 1),
    (v1("/slurm_node2/uid_2001/job_11"), 11, None, None, 2001, "node2", 1),   # stepd level
    (v1("/slurm_a_b/uid_1/job_2/step_extern"), 2, "extern", None, 1, "a_b", 1),
    (v1("/cidtest-1-x/slurm_n1/uid_1/job_2/step_extern"), 2, "extern", None, 1, "n1", 1),
    (v1("/slurm_node2/uid_2001/job_4294967290/step_4294967289"), 4294967290, "4294967289", None, 2001, "node2", 1),
    (v2("/system.slice/slurmstepd.scope/job_7/step_extern/user/task_special"), 7, "extern", "special", None, None, 2),
    (v2("/system.slice/node1_slurmstepd.scope/job_7/step_extern/slurm"), 7, "extern", "slurm", None, "node1", 2),
    (v2("/system.slice/node1_slurmstepd.scope/job_7/step_batch/user/task_0"), 7, "batch", "0", None, "node1", 2),
    (v2("/system.slice/slurmstepd.scope/job_8/step_2+0/user/task_12"), 8, "2+0", "12", None, None, 2),
    (v2("/docker.slice/docker-abc.scope/system.slice/slurmstepd.scope/job_9/step_0/user/task_1"), 9, "0", "1", None, None, 2),
    (v2("/system.slice/my_node_slurmstepd.scope/job_9/step_interactive/user/task_0"), 9, "interactive", "0", None, "my_node", 2),
])
def test_job_from_proc_cgroup(text, job, step, task, uid, node, version):
    r = P.job_from_proc_cgroup(text)
    assert (r.job_id, r.step, r.task, r.uid, r.node, r.version) == (job, step, task, uid, node, version)
    assert r.sluid is None
    assert str(r).startswith(f"job {job}")


@pytest.mark.parametrize("text", [
    "0::/\n", ADOPTED_V1.replace("slurm_node2", "other"), "",
    v2("/system.slice/slurmstepd.scope/system"),            # stepds waiting for a job dir
    v2("/system.slice/slurmd.service"),
    v2("/system.slice/slurmstepd.scope/job_x/step_0"),
    v2("/system.slice/slurmstepd.scope/job_1/stepx"),
    v1("/slurm_node2/uid_abc/job_1/step_0"),
    v1("/slurm_node2/uid_1/job_1/step_"),
    v1("/slurm_node2/uid_1/job_１/step_0"),                 # non-ASCII digit
    v1("/slurm_node2/uid_1/job_1/step_1+"),
    v1("/slurm/uid_1"),
    v2("/user.slice/user-1000.slice/session-3.scope"),
])
def test_not_a_job(text):
    assert P.job_from_proc_cgroup(text) is None


def test_sluid_recognised_not_misparsed():
    r = P.job_from_proc_cgroup(v2("/system.slice/node1_slurmstepd.scope/sEKNKTV3WPV500/step_extern/user/task_special"))
    assert r.job_id is None and r.sluid == "sEKNKTV3WPV500" and r.step == "extern"
    assert "SLUID sEKNKTV3WPV500" in str(r) and "CgroupJobIdPaths" in str(r)


def test_freezer_wins_and_node_filter():
    text = ("6:freezer:/slurm_n1/uid_1/job_5/step_extern\n3:cpuset:/slurm_n1/uid_1/job_6/step_0\n"
            "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n")
    assert P.job_from_proc_cgroup(text).job_id == 5
    assert P.job_from_proc_cgroup(text, node="n2").job_id == 7   # v2 line names no node
    text2 = "3:cpuset:/slurm_n1/uid_1/job_6/step_0\n6:freezer:/\n"
    assert P.job_from_proc_cgroup(text2).job_id == 6
    assert P.job_from_proc_cgroup(text2, node="n9") is None


@pytest.mark.parametrize("bad", ["garbage", "6:freezer", "x:freezer:/a", "6:freezer:relative",
                                 "0::/ok\n\x00bad", ":::", "6:freezer:/a\nnonsense line\n"])
def test_malformed_proc_cgroup(bad):
    with pytest.raises(P.CgroupParseError) as ei:
        P.job_from_proc_cgroup(bad)
    assert "/proc/PID/cgroup" in str(ei.value)


def test_huge_proc_cgroup():
    with pytest.raises(P.CgroupParseError, match="too large"):
        P.parse_proc_cgroup("0::/" + "a" * (P.MAX_PROC_CGROUP_CHARS + 1))
    long_ok = "0::/" + "/".join(["d"] * 10000) + "/system.slice/slurmstepd.scope/job_1/step_0\n"
    assert P.job_from_proc_cgroup(long_ok).job_id == 1


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=400))
def test_hypothesis_garbage(text):
    try:
        r = P.job_from_proc_cgroup(text)
    except P.CgroupParseError:
        return
    assert r is None or isinstance(r, P.JobRef)


_comp = st.sampled_from(["slurm", "slurm_n1", "uid_3", "job_4", "step_extern", "step_0+1",
                         "task_0", "user", "slurmstepd.scope", "n_slurmstepd.scope", "system",
                         "sABCDEFGHJK", "x", "job_", "step_", "task_special", "slurm"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_comp, max_size=9), st.sampled_from(["freezer", ""]))
def test_hypothesis_structured_paths(comps, ctrl):
    path = "/" + "/".join(comps)
    r = P.job_from_proc_cgroup(f"{0 if not ctrl else 6}:{ctrl}:{path}\n")
    if r is not None:
        assert r.job_id == 4 or r.sluid == "sABCDEFGHJK"
        assert ("job_4" in comps) or ("sABCDEFGHJK" in comps)


@pytest.mark.parametrize("name,node,want", [
    ("node2_16.4294967292", "node2", 16),
    ("a_b_5.4294967292", "a_b", 5),
    ("node2_16.0", "node2", None),                 # a numbered step's socket
    ("node2_16.0.1", "node2", None),               # a het step's socket
    ("node2_16.4294967291", "node2", None),        # batch
    ("node22_16.4294967292", "node2", None),       # another node's
    ("a_b_5.4294967292", "a", None),               # node "a" next to node "a_b"
    ("node2_16", "node2", None),
    ("node2_x.4294967292", "node2", None),
    ("node2_.4294967292", "node2", None),
    ("node2_12345678901.4294967292", "node2", None),
    ("node2_\u0661.4294967292", "node2", None),    # a non-ASCII digit
    ("node2_16.4294967292.ALT", "node2", None),
    ("cred_state", "node2", None),
])
def test_extern_socket_names(tmp_path, name, node, want):
    """The login path's string-only listing of extern stepd sockets."""
    from cgroups.jobs import extern_socket_names
    (tmp_path / name).touch()
    got = extern_socket_names(str(tmp_path), node)
    assert got == ({want: f"{tmp_path}/{name}"} if want is not None else {})


def test_parse_mounts():
    text = """tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,xattr,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime,nsdelegate 0 0
cgroup /weird\\040dir/devices cgroup rw,devices 0 0
proc /proc proc rw 0 0
"""
    m = P.parse_mounts(text)
    assert m.v1["cpu"] == m.v1["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert m.v1["freezer"] == "/sys/fs/cgroup/freezer" and m.v1["name=systemd"] == "/sys/fs/cgroup/systemd"
    assert m.v1["devices"] == "/weird dir/devices"
    assert m.v2 == ["/sys/fs/cgroup/unified"]
    assert "rw" not in m.v1 and "relatime" not in m.v1
    with pytest.raises(P.CgroupParseError, match="line 1"):
        P.parse_mounts("cgroup /x cgroup\n")
    with open("/proc/self/mounts") as f:
        P.parse_mounts(f.read())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_hypothesis_mounts(text):
    try:
        P.parse_mounts(text)
    except P.CgroupParseError:
        pass


@pytest.mark.parametrize("expr,want", [
    ("node1", ["node1"]), ("node[1-3]", ["node1", "node2", "node3"]),
    ("n[01-03,7]", ["n01", "n02", "n03", "n7"]), ("a,b[1-2]", ["a", "b1", "b2"]),
    ("r[1-2]c[1-2]", ["r1c1", "r1c2", "r2c1", "r2c2"]), ("", []),
])
def test_hostlist(expr, want):
    assert P.expand_hostlist(expr) == want


@pytest.mark.parametrize("bad", ["n[1-", "n]", "n[a-b]", "n[3-1]", "n[1-999999999]"])
def test_hostlist_bad(bad):
    with pytest.raises(ValueError):
        P.expand_hostlist(bad)


def test_expand_node_pattern():
    assert P.expand_node_pattern("/var/spool/%n/x%%y%h%q", "n1", "host") == "/var/spool/n1/x%yhost%q"
    assert P.expand_node_pattern("/s/%h", "n1") == "/s/n1"


class J:
    def __init__(self, job_id, start_time):
        self.job_id, self.start_time = job_id, start_time


def test_newest():
    assert P.newest([]) is None
    js = [J(5, 100.0), J(9, 50.0), J(7, 100.0), J(6, 99.9)]
    assert P.newest(js).job_id == 7          # same start -> larger id
    assert P.newest(reversed(js)).job_id == 7
    assert P.newest([J(1, 200.0), J(99, 100.0)]).job_id == 1


def _conf(text):
    return Conf(parse_conf_lines(text, "slurm.conf"), ["slurm.conf"])


def test_resolve_nodename():
    c = _conf("NodeName=DEFAULT CPUs=2\nNodeName=node[1-3] NodeHostname=h[1-3] CPUs=2\n"
              "NodeName=login1\n")
    assert resolve_nodename(c, "h2", "h2.example.org")[0] == "node2"
    assert resolve_nodename(c, "login1")[0] == "login1"
    assert resolve_nodename(c, "other")[0] == "other"
    assert resolve_nodename(c, "h2", explicit="nodeX")[0] == "nodeX"
    assert resolve_nodename(c, "h2", env="fromenv")[0] == "fromenv"
    assert resolve_nodename(c, "x", "h3")[0] == "node3"
    with pytest.raises(ConfError) as ei:
        resolve_nodename(_conf("A=1\nNodeName=n[1-\n"), "h")
    assert ei.value.lineno == 2


def test_choose_version():
    hybrid = P.parse_mounts(open("/proc/self/mounts").read()) if False else P.Mounts(
        {"freezer": "/sys/fs/cgroup/freezer", "cpuset": "/sys/fs/cgroup/cpuset"},
        ["/sys/fs/cgroup/unified"])
    unified = P.Mounts({}, ["/sys/fs/cgroup"])
    mp = "/sys/fs/cgroup"
    assert choose_version(None, mp, hybrid) == 1
    assert choose_version(2, mp, hybrid) == 2 and choose_v2_mount(mp, hybrid) == "/sys/fs/cgroup/unified"
    assert choose_version(None, mp, unified) == 2 and choose_v2_mount(mp, unified) == mp
    assert choose_version(None, mp, P.Mounts({"name=systemd": "/x"}, ["/sys/fs/cgroup/systemd"])) == 2
    with pytest.raises(LayoutNotFound, match="v1"):
        choose_version(1, mp, unified)
    with pytest.raises(LayoutNotFound):
        choose_version(2, mp, P.Mounts({"freezer": "/sys/fs/cgroup/freezer"}, []))
    with pytest.raises(LayoutNotFound):
        choose_version(None, mp, P.Mounts())
