"""Slurm accounting for the test bed: a real MariaDB and slurmdbd, both on the `ctl` host.

Everything lives in the cluster's state dir (datadir, socket, pid files, logs) and runs as
test-bed daemons inside ctl's namespaces (`Cluster.start_daemon`), so teardown stops them by
pid and its namespace sweep catches anything left; MariaDB listens on ctl's own loopback.
Debian's mariadb-server and slurmdbd are installed by the install step and never started as
services. Facts (measured, ../shared/reference/platforms/REPORT.md "Accounting"):
- clients towards slurmdbd (slurmctld, sacct, sacctmgr) do not use AuthInfo's munge socket:
  for accounting_storage/slurmdbd, AccountingStoragePass names it;
- slurmdbd refuses a slurmdbd.conf not owned by SlurmUser or readable by others;
- innodb_buffer_pool_size below 256M makes slurmdbd warn ("not recommended values").
"""
from __future__ import annotations

import os
import time
from pathlib import Path

DBD_PORT = 6819
DB_PASSWORD = "cid-testbed-slurmdbd-pw"    # test-only; in the state dir and ctl's private /etc
ACCOUNT = "cidtest"

MY_CNF = """\
# MariaDB for the test bed's slurmdbd; the only file it reads (--defaults-file)
[mysqld]
user=mysql
datadir={db}/data
socket={db}/mysqld.sock
pid-file={db}/mysqld.pid
bind-address=127.0.0.1
port=3306
skip-log-bin
innodb_buffer_pool_size=256M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
innodb_flush_log_at_trx_commit=2
innodb_doublewrite=0
max_allowed_packet=16M
[client]
socket={db}/mysqld.sock
"""

SLURMDBD_CONF = """\
# slurmdbd of the test bed (ctl only; 0600, owned by SlurmUser)
AuthType=auth/munge
AuthInfo=socket={munge}
DbdHost=ctl
DbdPort={port}
SlurmUser=slurm
DebugLevel=info
LogFile={st}/logs/slurmdbd.log
PidFile={st}/dbd/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass={pw}
StorageLoc=slurm_acct_db
"""

GRANTS = """\
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '{pw}';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
"""


def slurm_conf_lines(munge_socket: Path) -> str:
    return ("AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=ctl\n"
            f"AccountingStoragePort={DBD_PORT}\nAccountingStoragePass={munge_socket}\n")


def write_files(c) -> None:
    """slurmdbd.conf into ctl's private /etc/slurm, my.cnf and the DB dirs into the state dir."""
    from .cluster import _gid, _uid
    st = c.state
    slurm = (_uid("slurm"), _gid("slurm"))
    conf = c.hostdir("ctl") / "etc.upper/slurm/slurmdbd.conf"
    conf.write_text(SLURMDBD_CONF.format(munge=c.munge_socket, port=DBD_PORT, st=st, pw=DB_PASSWORD))
    os.chown(conf, *slurm)
    os.chmod(conf, 0o600)
    (st / "dbd").mkdir(exist_ok=True)
    os.chown(st / "dbd", *slurm)
    log = c.logs / "slurmdbd.log"
    log.touch()
    os.chown(log, *slurm)
    db = database_dir(c)
    (db / "data").mkdir(parents=True, exist_ok=True)
    (db / "my.cnf").write_text(MY_CNF.format(db=db))
    os.chmod(db / "my.cnf", 0o644)
    for p in (db, db / "data"):
        os.chown(p, _uid("mysql"), _gid("mysql"))
        os.chmod(p, 0o750)


def database_dir(c) -> Path:
    return c.state / "mysql"


def start(c) -> dict[str, float]:
    """MariaDB, slurmdbd and the cluster's association records, before slurmctld starts.
    Returns the seconds each part took."""
    times = {}
    t = time.monotonic()
    _start_mariadb(c)
    times["mariadb"] = time.monotonic() - t
    t = time.monotonic()
    log = c.logs / "slurmdbd.log"
    c.start_daemon("ctl", "slurmdbd", ["/usr/sbin/slurmdbd", "-D"],
                   wait_for=lambda: "slurmdbd version" in log.read_text() and " started" in log.read_text(),
                   timeout=120)
    times["slurmdbd"] = time.monotonic() - t
    t = time.monotonic()
    name = c.cluster_name
    users = ",".join(u.name for u in c.users)
    for args in (["add", "cluster", name],
                 ["add", "account", ACCOUNT, f"Cluster={name}", "Description=test bed", "Organization=cid"],
                 ["add", "user", users, f"Account={ACCOUNT}", f"Cluster={name}"]):
        c.exec("ctl", ["sacctmgr", "-i", *args], check=True, timeout=120)
    times["sacctmgr"] = time.monotonic() - t
    return times


def _start_mariadb(c) -> None:
    db = database_dir(c)
    cnf = f"--defaults-file={db / 'my.cnf'}"
    c.exec("ctl", ["mariadb-install-db", cnf, "--user=mysql", "--auth-root-authentication-method=socket",
                   "--skip-test-db"], check=True, timeout=120)
    c.start_daemon("ctl", "mariadb", ["/usr/sbin/mariadbd", cnf],
                   wait_for=lambda: (db / "mysqld.sock").is_socket() and
                   "ready for connections" in c.daemon_log("ctl", "mariadb"), timeout=120)
    # root@localhost authenticates by unix_socket: we are root in ctl
    c.exec("ctl", ["mariadb", cnf, "-u", "root"], input=GRANTS.format(pw=DB_PASSWORD), check=True)
