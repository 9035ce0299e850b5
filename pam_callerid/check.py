"""`callerid check`: is this node ready for the PAM line? (the ``sshd -t`` / ``slurmd -C``
of this project; an admin runs it on every node before enabling pam_callerid.so).

    callerid [--config FILE] check [--nodes HOSTLIST | --all-nodes] [--timeout S] [--quiet]

Checks, in order (each prints one line; a later check that needs an earlier one's result is
skipped when that one failed):

config      callerid.conf parses; it is a regular file owned by root and writable by root
            only (a FIFO, device or symlink planted there, or a file another account may
            rewrite, fails)
layout      slurm.conf found, this node's NodeName, the cgroup version, the Slurm version
            (``slurmd -V``); a host that is not a NodeName in slurm.conf is a warning (right
            for a login node; a compute node's logins would be denied as "not a compute node")
auth        AuthType=munge: a credential encoded and decoded through munged; hmac: the key
            file is usable (root, 0600)
daemon      this node's daemon answers an authenticated caller-ID question on Port
pam-socket  the PAM decision socket exists, is root's, accepts a connection from root, its
            server runs as root, and it answers a request that decides nothing
audit       the audit directory is root's and not writable by others; the file, if present,
            is a regular root-owned file
module      pam_callerid.so is in the system's PAM module directory, root's and writable by
            root only, and built from this version (a module from another version is a
            warning: an upgrade replaced one of the two)
nodes       (--nodes/--all-nodes) each listed node's daemon answers an authenticated
            caller-ID question (firewall, AuthType, key and munge realm all agree)

Exit status: 0 every check passed (warnings allowed), 1 at least one failed, 64 usage.
"""
from __future__ import annotations

import argparse
import os
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 64


class Result:
    __slots__ = ("name", "status", "detail")

    def __init__(self, name, status, detail):
        self.name, self.status, self.detail = name, status, detail

    def __repr__(self):
        return f"Result({self.name!r}, {self.status!r}, {self.detail!r})"


# ------------------------------------------------------------------ file ownership (pure)
def unsafe_reason(st, *, want="file", allow_group_read=True) -> str | None:
    """Why an lstat() result is not a safe root-owned file/dir/socket for the login path,
    or None. ``want``: file | dir | socket."""
    kinds = {"file": stat.S_ISREG, "dir": stat.S_ISDIR, "socket": stat.S_ISSOCK}
    if not kinds[want](st.st_mode):
        return f"not a {'regular file' if want == 'file' else want} ({_kind(st.st_mode)})"
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & stat.S_IWOTH and not (want == "dir" and st.st_mode & stat.S_ISVTX):
        return "writable by every user"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return f"writable by group {st.st_gid}"
    return None


def _kind(mode) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "of an unknown type"


def path_problem(path, want="file") -> str | None:
    """The path itself and every directory above it must be root's (else whoever owns a
    directory on the way can swap what is below)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return e.strerror
    why = unsafe_reason(st, want=want)
    if why:
        return why
    d = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            why = unsafe_reason(os.lstat(d), want="dir")
        except OSError as e:
            why = e.strerror
        if why:
            return f"directory {d}: {why}"
        if d == "/":
            return None
        d = os.path.dirname(d)


# ------------------------------------------------------------------ the checks
def check_config(path):
    """(Result, Config or None)."""
    from daemon.config import DEFAULT_PATH, ConfigError, load_config
    shown = path or os.environ.get("CALLERID_CONF") or DEFAULT_PATH
    if os.path.lexists(shown):
        why = path_problem(shown)
        if why:
            return Result("config", FAIL, f"{shown}: {why}"), None
    try:
        cfg = load_config(path)
    except ConfigError as e:
        return Result("config", FAIL, str(e)), None
    if cfg.source == "<defaults>":
        return Result("config", WARN, f"no {shown}: every setting is its default"), cfg
    extra = f"; unknown keys: {', '.join(cfg.unknown_keys)}" if cfg.unknown_keys else ""
    return Result("config", WARN if extra else OK,
                  f"{cfg.source}: AuthType={cfg.auth_type} Port={cfg.port}{extra}"), cfg


SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin"


def slurm_version() -> str | None:
    """From ``slurmd -V`` (or scontrol/sinfo on a login node), looked up in $PATH and the
    system's sbin/bin directories."""
    import shutil
    path = os.environ.get("PATH", "") + ":" + SBIN_PATH
    for argv in (["slurmd", "-V"], ["scontrol", "-V"], ["sinfo", "-V"]):
        exe = shutil.which(argv[0], path=path)
        if exe is None:
            continue
        try:
            out = subprocess.run([exe] + argv[1:], capture_output=True, text=True,
                                 timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        words = out.split()
        if len(words) >= 2 and words[0].lower().startswith("slurm"):    # Debian: slurm-wlm
            return words[1]
    return None


def slurm_conf_path(cfg):
    """The slurm.conf this node uses: SlurmConf when that file exists, else where a
    configless slurmd keeps it (cgroups.layout's search order)."""
    from cgroups.layout import find_slurm_conf, slurm_conf_candidates
    if cfg.slurm_conf and os.path.isfile(cfg.slurm_conf):
        return cfg.slurm_conf
    return find_slurm_conf(slurm_conf_candidates(cfg.pam_spool_dir))


def discover_layout(cfg):
    """The layout the PAM service uses (the same Pam* overrides)."""
    import cgroups
    return cgroups.discover(
        slurm_conf=slurm_conf_path(cfg), cgroup_conf=cfg.pam_cgroup_conf, nodename=cfg.node_name,
        spool_dir=cfg.pam_spool_dir, cgroup_root=cfg.pam_cgroup_root,
        plugin=cfg.pam_cgroup_plugin, prefix=cfg.pam_v1_prefix, v2_scope=cfg.pam_v2_scope,
        v2_user_cgroup=cfg.pam_user_cgroup)


def slurm_nodes(slurm_conf):
    """{NodeName: address} of every node in slurm.conf (NodeAddr, else NodeHostname, else
    the name, as Slurm resolves a node's address)."""
    from cgroups.conf import load_conf
    from cgroups.paths import expand_hostlist
    nodes = {}
    for cl in load_conf(slurm_conf).lines("NodeName"):
        d = cl.as_dict()
        names = expand_hostlist(d.get("nodename", ""))
        if any(n.lower() == "default" for n in names):
            continue
        addrs = expand_hostlist(d.get("nodeaddr") or d.get("nodehostname") or d["nodename"])
        for i, n in enumerate(names):
            nodes[n] = addrs[i] if i < len(addrs) else addrs[-1]
    return nodes


def check_layout(cfg):
    """(Result, Layout or None)."""
    from cgroups import CgroupError
    try:
        layout = discover_layout(cfg)
    except CgroupError as e:
        return Result("layout", FAIL, f"Slurm cgroup layout not found: {e}"), None
    version = slurm_version()
    slurm = f"Slurm {version}" if version else "Slurm version unknown (no slurmd/scontrol)"
    base = f"{slurm}, cgroup v{layout.version}, node {layout.nodename}"
    try:
        known = layout.nodename in slurm_nodes(slurm_conf_path(cfg))
    except Exception as e:          # noqa: BLE001 - reported, never fatal here
        return Result("layout", WARN, f"{base}; cannot list slurm.conf's nodes: {e}"), layout
    if not known:
        return Result("layout", WARN, f"{base}: {layout.nodename} is not a NodeName in "
                      "slurm.conf (right for a login node; on a compute node every login "
                      "would be told it is not a compute node)"), layout
    return Result("layout", OK, base), layout


def check_auth(cfg):
    """(Result, auth or None)."""
    from daemon import protocol as P
    from daemon.auth import AuthError
    from daemon.client import auth_from_config
    if cfg.auth_type == "hmac":
        why = path_problem(cfg.key_file)
        if why:
            return Result("auth", FAIL, f"HMAC key {cfg.key_file}: {why}"), None
    try:
        auth = auth_from_config(cfg)
        blob = auth.sign(P.TYPE_REPLY, b"callerid-check")
        uid = auth.verify(P.TYPE_REPLY, b"callerid-check", blob)
    except AuthError as e:
        what = "munge round trip" if cfg.auth_type == "munge" else f"HMAC key {cfg.key_file}"
        return Result("auth", FAIL, f"{what} failed: {e}"), None
    if cfg.auth_type == "munge":
        return Result("auth", OK, f"munge credential encoded and decoded (uid {uid})"), auth
    return Result("auth", OK, f"HMAC key {cfg.key_file} usable"), auth


def local_target(cfg) -> str:
    """Where this node's daemon can be reached from here: loopback when it binds a
    wildcard address, else its first listen address."""
    addrs = cfg.listen_addresses or []
    if "0.0.0.0" in addrs:
        return "127.0.0.1"
    if "::" in addrs:
        return "::1"
    return addrs[0] if addrs else "127.0.0.1"


def ask_daemon(cfg, auth, host, timeout):
    """An authenticated caller-ID question about a connection that does not exist: a
    working daemon answers "unknown". Returns (status, detail)."""
    from daemon import client as C
    fam6 = ":" in host
    lo = "::1" if fam6 else "127.0.0.1"
    ans = C.query(host, cfg.port, f"[{lo}]:1" if fam6 else f"{lo}:1",
                  f"[{lo}]:2" if fam6 else f"{lo}:2", auth=auth, timeout=timeout,
                  proto="tcp", trusted_uids=cfg.reply_uids())
    where = f"[{host}]:{cfg.port}" if fam6 else f"{host}:{cfg.port}"
    if ans.outcome in (C.UNKNOWN, C.FOUND):
        return OK, f"{where} answered ({ans.node or '?'}, {ans.elapsed_ms:.1f} ms)"
    why = {C.UNREACHABLE: "no answer (daemon not running, firewall, or wrong Port)",
           C.INVALID: "reply rejected (AuthType, key or munge realm differ, or ReplyUser)",
           C.REFUSED: "refused us (it does not take this node's root for root)",
           C.LOCAL_ERROR: "could not sign the question here",
           C.ERROR: "the daemon failed to look the connection up"}.get(ans.outcome,
                                                                       ans.outcome)
    return FAIL, f"{where}: {why}" + (f": {ans.detail}" if ans.detail else "")


def check_daemon(cfg, auth, timeout):
    status, detail = ask_daemon(cfg, auth, local_target(cfg), timeout)
    return Result("daemon", status, detail)


def _peer_uid(sock) -> int:
    import struct
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


PROBE_SERVICE = "callerid-check"


def check_pam_socket(cfg, timeout):
    """The decision socket answers a request that decides nothing: a PAM service the module
    is not configured for (``service=sshd`` among its arguments, PAM service
    ``callerid-check``) is ignored, as in the C client, before any lookup."""
    from . import wire
    path = cfg.pam_socket
    why = path_problem(path, want="socket")
    if why:
        return Result("pam-socket", FAIL, f"{path}: {why}"
                      + (" (is `callerid daemon` running?)" if why == "does not exist" else ""))
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        return Result("pam-socket", FAIL, f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, "
                      "expected 0600 (only root may ask for decisions)")
    req = wire.Request(phase="account", service=PROBE_SERVICE, user="root",
                       args=["service=sshd"])
    t0 = time.monotonic()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.connect(path)
            uid = _peer_uid(s)
            if uid != 0:
                return Result("pam-socket", FAIL, f"{path}: the server runs as uid {uid}, "
                              "not root (the module refuses it)")
            s.sendall(wire.encode_request(req))
            data = s.recv(wire.MAX_MESSAGE + 1)
    except socket.timeout:
        return Result("pam-socket", FAIL, f"{path}: no reply within {timeout:g} s")
    except OSError as e:
        return Result("pam-socket", FAIL, f"{path}: {e.strerror or e}")
    try:
        rep = wire.parse_reply(data)
    except wire.WireError as e:
        return Result("pam-socket", FAIL, f"{path}: malformed reply: {e}")
    ms = (time.monotonic() - t0) * 1000
    return Result("pam-socket", OK, f"{path}: answered rc={rep.rc} in {ms:.1f} ms")


def check_audit(audit_dir=None, name=None):
    from .options import DEFAULT_AUDIT
    audit_dir = audit_dir or os.path.dirname(DEFAULT_AUDIT)
    name = name or os.path.basename(DEFAULT_AUDIT)
    why = path_problem(audit_dir, want="dir")
    if why:
        return Result("audit", FAIL, f"{audit_dir}: {why}")
    st = os.lstat(audit_dir)
    if stat.S_IMODE(st.st_mode) & 0o007:
        return Result("audit", WARN, f"{audit_dir}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                      "every user read the audit trail (0750 expected)")
    path = os.path.join(audit_dir, name)
    if os.path.lexists(path):
        why = path_problem(path)
        if why:
            return Result("audit", FAIL, f"{path}: {why}")
    return Result("audit", OK, f"{audit_dir}: root's, mode {stat.S_IMODE(st.st_mode):04o}")


MAX_MODULE = 16 << 20        # bytes read from pam_callerid.so when looking for its version


def module_version(data: bytes) -> str | None:
    """The version built into a pam_callerid.so's bytes (pamconf.IDENT + version), or None."""
    from .pamconf import IDENT
    at = data.find(IDENT.encode())
    if at < 0:
        return None
    start = at + len(IDENT)
    end = data.find(b"\0", start, start + 65)
    return data[start:end].decode("ascii", "replace") if end > start else None


def check_module(version, pam_dir=None):
    """The installed module: there, safe, and from `version`."""
    from .pamconf import MODULE, module_dir
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    pam_dir = pam_dir or module_dir(multiarch)
    if pam_dir is None:
        return Result("module", FAIL, "cannot find the PAM module directory (no pam_unix.so)")
    path = os.path.join(os.path.realpath(pam_dir), MODULE)    # Debian 12: /lib -> usr/lib
    why = path_problem(path)
    if why:
        return Result("module", FAIL, f"{path}: {why}")
    try:
        with open(path, "rb") as f:
            built = module_version(f.read(MAX_MODULE))
    except OSError as e:
        return Result("module", FAIL, f"{path}: {e.strerror}")
    if built == version:
        return Result("module", OK, f"{path}: version {built}")
    return Result("module", WARN, f"{path}: version {built or 'unknown'}, the daemon's is "
                  f"{version}: install the module of this version")


def check_nodes(cfg, auth, nodes, timeout, workers=32):
    """One Result per node: {name: address}."""
    def one(item):
        name, addr = item
        try:
            status, detail = ask_daemon(cfg, auth, addr, timeout)
        except Exception as e:          # noqa: BLE001 - a resolver error is this node's fail
            status, detail = FAIL, f"{addr}: {e}"
        return Result(f"node {name}", status, detail)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(nodes)))) as ex:
        return list(ex.map(one, sorted(nodes.items())))


# ------------------------------------------------------------------ driver
def run_checks(config_path=None, *, nodes=None, all_nodes=False, timeout=2.0,
               audit_dir=None, pam_dir=None):
    """Every check, in order; returns the list of Results."""
    from daemon.version import VERSION
    results = []
    res, cfg = check_config(config_path)
    results.append(res)
    if cfg is None:
        return results + [Result(n, SKIP, "needs a readable configuration")
                          for n in ("layout", "auth", "daemon", "pam-socket")]
    res, layout = check_layout(cfg)
    results.append(res)
    res, auth = check_auth(cfg)
    results.append(res)
    if auth is None:
        results.append(Result("daemon", SKIP, "needs working authentication"))
    else:
        results.append(check_daemon(cfg, auth, timeout))
    results.append(check_pam_socket(cfg, timeout))
    results.append(check_audit(audit_dir))
    results.append(check_module(VERSION, pam_dir))
    if nodes is not None or all_nodes:
        from cgroups.paths import expand_hostlist
        try:
            known = slurm_nodes(slurm_conf_path(cfg))
        except Exception:           # noqa: BLE001 - only needed for addresses
            known = {}
        if all_nodes:
            targets = known
        else:
            targets = {n: known.get(n, n) for n in expand_hostlist(nodes)}
        if auth is None:
            results.append(Result("nodes", SKIP, "needs working authentication"))
        elif not targets:
            results.append(Result("nodes", FAIL, "no nodes to ask"))
        else:
            results.extend(check_nodes(cfg, auth, targets, timeout))
    return results


def format_results(results, version, node) -> str:
    lines = [f"callerid check (slurm-callerid {version}) on {node}"]
    width = max(len(r.name) for r in results)
    for r in results:
        lines.append(f"  {r.status:<4}  {r.name:<{width}}  {r.detail}")
    bad = [r for r in results if r.status == FAIL]
    warn = [r for r in results if r.status == WARN]
    if bad:
        lines.append(f"{len(bad)} problem{'s' if len(bad) > 1 else ''}:")
        lines.extend(f"  - {r.name}: {r.detail}" for r in bad)
    else:
        lines.append("ready" + (f" ({len(warn)} warning{'s' if len(warn) > 1 else ''})"
                                if warn else ""))
    return "\n".join(lines)


def main(argv=None, config=None) -> int:
    from daemon.version import VERSION
    ap = argparse.ArgumentParser(prog="callerid check",
                                 description="Check this node before enabling pam_callerid.")
    ap.add_argument("--config", "-c", default=config, help="config file")
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--nodes", metavar="HOSTLIST",
                     help="also ask these nodes' daemons (Slurm hostlist, e.g. n[01-64])")
    who.add_argument("--all-nodes", action="store_true",
                     help="also ask the daemon of every node in slurm.conf")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds per question")
    ap.add_argument("--audit-dir", default=None, help=argparse.SUPPRESS)
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    results = run_checks(a.config, nodes=a.nodes, all_nodes=a.all_nodes, timeout=a.timeout,
                         audit_dir=a.audit_dir)
    print(format_results(results, VERSION, os.uname().nodename))
    return EXIT_FAIL if any(r.status == FAIL for r in results) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
