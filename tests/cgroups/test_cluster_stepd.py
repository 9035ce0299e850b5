"""cgroups.stepd (REQUEST_STEP_UID) against the real slurmstepd of the Slurm 22.05 test bed,
and the owner listings whose owner comes from a stepd (a protocol fake here: the real stepd
is covered by the cluster test; the fake's own tests are in test_stepd.py)."""
import time

import pytest

import cgroups
from cgroups import stepd
from cgroups.conf import Conf
from cgroups.errors import StepdUnavailable

pytestmark = pytest.mark.root
EXTERN = 4294967292
NODE = "nodeA"


def extern_socket(c, node, job):
    return str(c.spool(node) / f"{node}_{job}.{EXTERN}")


def v1_layout(c, node):
    return cgroups.discover(Conf(), Conf(), nodename=node, spool_dir=str(c.spool(node)),
                            plugin="cgroup/v1", use_env=False)


# ---------------------------------------------------------------- the real slurmstepd

@pytest.mark.cluster
def test_real_extern_stepd_answers_alice_and_bob(p1):
    c = p1
    node = c.node_names[1]
    alice, bob = c.user("alice"), c.user("bob")
    ja = c.sbatch("alice", nodes=[node])
    jb = c.sbatch("bob", nodes=[node])
    sa, sb = extern_socket(c, node, ja), extern_socket(c, node, jb)
    t0 = time.monotonic()
    ra = stepd.query_step_uid(sa)
    took = time.monotonic() - t0
    assert ra.uid == alice.uid
    assert ra.protocol_version == 38 << 8          # Debian's Slurm 22.05 answers its version
    # (and accepted ours, 25.11's 11264: the stepd has no upper bound)
    assert ra.peer_uid == 0                        # slurmstepd listens as root
    assert took < stepd.DEFAULT_TIMEOUT
    assert cgroups.step_uid(sb) == bob.uid
    # repeated calls: no leak of connections or threads in the stepd, stable answer
    assert {cgroups.step_uid(sa) for _ in range(20)} == {alice.uid}
    # v1 cross-check with the stepds: both jobs kept, each for its owner
    L = v1_layout(c, node)
    mine = cgroups.user_jobs(L, alice.uid, verify_owner=True)
    assert [j.job_id for j in mine] == [ja] and not mine.problems
    theirs = cgroups.user_jobs(L, bob.uid, verify_owner=True)
    assert [j.job_id for j in theirs] == [jb]
    everyone = cgroups.list_jobs(L, verify_owner=True)
    assert sorted((j.job_id, j.uid) for j in everyone) == sorted([(ja, alice.uid),
                                                                   (jb, bob.uid)])
    # after scancel the socket is gone (or stale): a typed error, at once
    c.scancel("alice", str(ja))
    c.wait_job_gone(ja)
    t0 = time.monotonic()
    with pytest.raises(StepdUnavailable):
        stepd.step_uid(sa)
    assert time.monotonic() - t0 < 0.1


# ---------------------------------------------------------------- v2 listing, owner from a stepd

def test_v2_extern_only_job_owner_from_stepd(tree, fakes):
    tree.v2_job(NODE, 5)                           # extern step only: salloc + ssh
    tree.v2_job(NODE, 6)                           # another user's, extern only
    tree.v2_job(NODE, 7)                           # stepd hangs: owner unknown, bounded
    tree.v2_job(NODE, 8, steps=("extern", "0"))    # has a task: owner from its process
    fakes(f"{tree.spool}/{NODE}_5.{EXTERN}", uid=2001)
    f6 = fakes(f"{tree.spool}/{NODE}_6.{EXTERN}", "24.11", uid=2002)
    fakes(f"{tree.spool}/{NODE}_7.{EXTERN}", uid=2001, mode="hang")
    f8 = fakes(f"{tree.spool}/{NODE}_8.{EXTERN}", "25.11", uid=2001)
    p = tree.spawn(user=2001)
    task = tree.mk("unified", f"system.slice/{NODE}_slurmstepd.scope/job_8/step_0/user/task_0")
    with open(f"{task}/cgroup.procs", "w") as fh:
        fh.write(str(p.pid))
    L = cgroups.discover(Conf(), Conf(), nodename=NODE, spool_dir=tree.spool,
                         cgroup_root=tree.root, plugin="cgroup/v2", use_env=False)
    assert L.version == 2
    t0 = time.monotonic()
    mine = cgroups.user_jobs(L, 2001, stepd_timeout=0.2)
    took = time.monotonic() - t0
    assert sorted(j.job_id for j in mine) == [5, 8]
    assert all(j.uid == 2001 for j in mine)
    assert any("job 7" in m and "deadline" in m for m in mine.problems), mine.problems
    assert took < 0.2 + 0.25, took                 # one hanging stepd costs one timeout
    assert f8.requests == []                       # fallback: the task told the owner
    assert [j.job_id for j in cgroups.user_jobs(L, 2002, stepd_timeout=0.2)] == [6]
    assert f6.requests                             # asked its stepd
    everyone = cgroups.list_jobs(L, stepd_timeout=0.2)
    assert {(j.job_id, j.uid) for j in everyone} == {(5, 2001), (6, 2002), (7, None), (8, 2001)}
    # stepd="never": the old behaviour, extern-only jobs have no owner
    assert [j.job_id for j in cgroups.user_jobs(L, 2001, stepd="never")] == [8]
    # stepd="always": job 8's owner comes from its stepd as well
    n = len(f8.requests)
    assert sorted(j.job_id for j in cgroups.user_jobs(L, 2001, stepd="always",
                                                      stepd_timeout=0.2)) == [5, 8]
    assert len(f8.requests) == n + 1
    # the budget bounds the whole listing even with several hanging stepds
    t0 = time.monotonic()
    cgroups.list_jobs(L, stepd="always", stepd_timeout=0.3, stepd_budget=0.1)
    assert time.monotonic() - t0 < 0.25
    with pytest.raises(ValueError):
        cgroups.list_jobs(L, stepd="sometimes")


def test_v1_verify_owner_drops_a_disagreeing_job(tree, fakes):
    tree.v1_job(NODE, 2001, 5)
    tree.v1_job(NODE, 2001, 6)
    fakes(f"{tree.spool}/{NODE}_5.{EXTERN}", uid=2001)
    fakes(f"{tree.spool}/{NODE}_6.{EXTERN}", uid=2002)   # the stepd disagrees with uid_2001
    L = cgroups.discover(Conf(), Conf(), nodename=NODE, spool_dir=tree.spool,
                         cgroup_root=tree.root, plugin="cgroup/v1", use_env=False)
    assert sorted(j.job_id for j in cgroups.user_jobs(L, 2001)) == [5, 6]
    checked = cgroups.user_jobs(L, 2001, verify_owner=True)
    assert [j.job_id for j in checked] == [5]
    assert any("job 6" in m and "says 2002" in m for m in checked.problems)
