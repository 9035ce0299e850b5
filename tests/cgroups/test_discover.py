"""discover() from configuration files and a synthetic mount table (no cgroup writes)."""
import os

import pytest

import cgroups
from cgroups.conf import ConfError
from cgroups.errors import LayoutNotFound

HYBRID = """tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/devices cgroup rw,relatime,devices 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
UNIFIED = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n"

SLURM_CONF = """# like the minicluster
SlurmdSpoolDir=/srv/state/%n/spool
NodeName=node[1-3] NodeAddr=10.199.0.[1-3] CPUs=2
NodeName=big[01-02] NodeHostname=bighost[01-02]
"""


def write(tmp_path, slurm=SLURM_CONF, cgroup=None):
    (tmp_path / "slurm.conf").write_text(slurm)
    if cgroup is not None:
        (tmp_path / "cgroup.conf").write_text(cgroup)
    return str(tmp_path / "slurm.conf")


def test_minicluster_v1(tmp_path):
    sc = write(tmp_path, cgroup="CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup/\n"
                                "ConstrainCores=yes\n")
    L = cgroups.discover(sc, mounts=HYBRID, hostname="node2.cluster", use_env=False,
                         cgroup_root="/nonexistent-root-for-probe")
    assert (L.version, L.nodename, L.spool_dir) == (1, "node2", "/srv/state/node2/spool")
    # memory is listed (adoption writes it where the job has a step there), name= is not
    assert set(L.v1_mounts) == {"cpuset", "devices", "freezer", "memory"}
    assert L.track == "freezer"
    assert L.v1_prefix == "/nonexistent-root-for-probe/slurm_node2"    # Debian default
    assert L.v1_step_dir("freezer", 2001, 16) == \
        "/sys/fs/cgroup/freezer/nonexistent-root-for-probe/slurm_node2/uid_2001/job_16/step_extern"
    L = cgroups.discover(sc, mounts=HYBRID, hostname="node2", use_env=False,
                         multiple_slurmd=False)
    assert L.v1_prefix == "/slurm"
    assert "node name 'node2'" in " ".join(L.notes)


def test_nodehostname_and_explicit(tmp_path):
    sc = write(tmp_path, cgroup="")
    L = cgroups.discover(sc, mounts=HYBRID, hostname="bighost02", use_env=False, plugin="cgroup/v1")
    assert L.nodename == "big02" and L.spool_dir == "/srv/state/big02/spool"
    L = cgroups.discover(sc, mounts=HYBRID, hostname="bighost02", nodename="node3", use_env=False)
    assert L.nodename == "node3"


def test_autodetect_and_v2(tmp_path):
    sc = write(tmp_path, cgroup="CgroupPlugin=autodetect\n")
    assert cgroups.discover(sc, mounts=HYBRID, hostname="node1", use_env=False).version == 1
    L = cgroups.discover(sc, mounts=UNIFIED, hostname="node1", use_env=False,
                         cgroup_root="/nonexistent")
    assert L.version == 2 and L.v2_mount == "/sys/fs/cgroup"
    assert L.v2_scope == "/nonexistent/system.slice/node1_slurmstepd.scope"
    write(tmp_path, cgroup="CgroupPlugin=cgroup/v2\nCgroupSlice=slurm.slice\n")
    L = cgroups.discover(sc, mounts=HYBRID, hostname="node1", use_env=False,
                         multiple_slurmd=False)
    assert L.v2_mount == "/sys/fs/cgroup/unified"
    assert L.v2_scope_dir() == "/sys/fs/cgroup/unified/slurm.slice/slurmstepd.scope"
    assert L.v2_job_dir(5) == "/sys/fs/cgroup/unified/slurm.slice/slurmstepd.scope/job_5"
    L = cgroups.discover(sc, mounts=HYBRID, hostname="node1", use_env=False,
                         v2_scope="/x/%n.scope")
    assert L.v2_scope == "/x/node1.scope"


def test_missing_cgroup_conf_means_defaults(tmp_path):
    sc = write(tmp_path)
    L = cgroups.discover(sc, mounts=HYBRID, hostname="node1", use_env=False)
    assert L.version == 1 and any("defaults" in n for n in L.notes)


def test_config_errors_name_file_and_line(tmp_path):
    sc = write(tmp_path, cgroup="ConstrainCores=yes\nCgroupPlugin=cgroup/v3\n")
    with pytest.raises(ConfError) as ei:
        cgroups.discover(sc, mounts=HYBRID, hostname="node1", use_env=False)
    assert ei.value.filename.endswith("cgroup.conf") and ei.value.lineno == 2
    sc = write(tmp_path, slurm="SlurmdSpoolDir=/x\nNodeName=n[1-\n", cgroup="")
    with pytest.raises(ConfError) as ei:
        cgroups.discover(sc, mounts=HYBRID, hostname="node1", use_env=False)
    assert ei.value.lineno == 2 and "hostlist" in str(ei.value)
    sc = write(tmp_path, slurm="SlurmdSpoolDir=/x\nthis line is broken\n", cgroup="")
    with pytest.raises(ConfError) as ei:
        cgroups.discover(sc, mounts=HYBRID, hostname="node1", use_env=False)
    assert ei.value.lineno == 2
    with pytest.raises(ConfError, match="does not exist"):
        cgroups.discover(str(tmp_path / "nope.conf"), mounts=HYBRID, use_env=False)


def test_no_cgroup_fs(tmp_path):
    sc = write(tmp_path, cgroup="CgroupPlugin=cgroup/v2\n")
    with pytest.raises(LayoutNotFound, match="cgroup2"):
        cgroups.discover(sc, mounts="proc /proc proc rw 0 0\n", hostname="n", use_env=False)
    sc = write(tmp_path, cgroup="")
    with pytest.raises(LayoutNotFound):
        cgroups.discover(sc, mounts="", hostname="n", use_env=False)


def test_env_nodename(tmp_path, monkeypatch):
    sc = write(tmp_path, cgroup="")
    monkeypatch.setenv("SLURMD_NODENAME", "node3")
    assert cgroups.discover(sc, mounts=HYBRID, hostname="node1").nodename == "node3"
    assert cgroups.discover(sc, mounts=HYBRID, hostname="node1", use_env=False).nodename == "node1"


def test_real_machine_discovers():
    L = cgroups.discover(cgroups.Conf(), cgroups.Conf(), nodename="nodeQ", use_env=False)
    assert L.version in (1, 2) and L.track != "memory"


# ---------------------------------------------------------------- configless slurmd

def test_slurm_conf_candidates_order():
    from cgroups.layout import slurm_conf_candidates
    assert slurm_conf_candidates() == ["/run/slurm/conf/slurm.conf",
                                       "/var/spool/slurmd/conf-cache/slurm.conf",
                                       "/etc/slurm/slurm.conf"]
    assert slurm_conf_candidates("/srv/spool/", "/x/slurm.conf") == [
        "/x/slurm.conf", "/run/slurm/conf/slurm.conf", "/srv/spool/conf-cache/slurm.conf",
        "/var/spool/slurmd/conf-cache/slurm.conf", "/etc/slurm/slurm.conf"]
    assert slurm_conf_candidates("/var/spool/slurmd") == slurm_conf_candidates()


def test_configless_cache_found_with_its_cgroup_conf(tmp_path, monkeypatch):
    """slurmd --conf-server keeps slurm.conf, cgroup.conf, job_container.conf in
    <SlurmdSpoolDir>/conf-cache; nothing in /etc/slurm."""
    cache = tmp_path / "spool/conf-cache"
    cache.mkdir(parents=True)
    (cache / "slurm.conf").write_text(SLURM_CONF + "JobContainerType=job_container/tmpfs\n")
    (cache / "cgroup.conf").write_text("CgroupPlugin=cgroup/v2\n")
    (cache / "job_container.conf").write_text("BasePath=/run/jc\n")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    L = cgroups.discover(spool_dir=str(tmp_path / "spool"), mounts=HYBRID, hostname="node2",
                         cgroup_root="/nonexistent")
    assert L.version == 2 and L.nodename == "node2" and L.jc_basepath == "/run/jc/node2"
    assert f"slurm.conf found at {cache}/slurm.conf" in L.notes
    # $SLURM_CONF (honoured with use_env) comes first
    other = tmp_path / "other.conf"
    other.write_text(SLURM_CONF)
    monkeypatch.setenv("SLURM_CONF", str(other))
    L = cgroups.discover(spool_dir=str(tmp_path / "spool"), mounts=HYBRID, hostname="node2",
                         cgroup_root="/nonexistent")
    assert L.version == 1 and L.container is None          # no cgroup.conf next to it


def test_no_slurm_conf_anywhere_is_one_clear_error(tmp_path, monkeypatch):
    from cgroups import layout
    monkeypatch.delenv("SLURM_CONF", raising=False)
    places = layout.slurm_conf_candidates(str(tmp_path))
    if any(os.path.exists(p) for p in places):
        pytest.skip("this machine has a slurm.conf in a standard place")
    with pytest.raises(ConfError) as ei:
        cgroups.discover(spool_dir=str(tmp_path), mounts=HYBRID)
    msg = str(ei.value)
    assert msg.startswith("slurm.conf: not found; looked at ")
    assert all(p in msg for p in places) and "configless" in msg
