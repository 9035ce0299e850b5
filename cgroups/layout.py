"""Layout discovery: where this node's Slurm keeps its stepd sockets and job cgroups.

Resolved the way slurmd does it (see the package docstring for the sources):

* node name: explicit ``nodename=`` > ``$SLURMD_NODENAME`` > the ``NodeName`` whose
  ``NodeHostname`` (or, if none, whose name) equals this host's short or full name >
  the short host name.
* spool dir: ``SlurmdSpoolDir`` (default /var/spool/slurmd) with ``%n``/``%h`` expanded.
* cgroup version: ``CgroupPlugin`` = cgroup/v1 | cgroup/v2 | autodetect (default). Autodetect
  follows Slurm: the mountpoint itself is cgroup2 -> v2; ``<mountpoint>/systemd`` is cgroup2
  -> v2; v1 controllers mounted under the mountpoint -> v1; any cgroup2 mount -> v2.
* v1 prefix (not a cgroup.conf option; compiled into slurmd): ``/slurm`` upstream,
  ``/slurm_<NodeName>`` when built with --enable-multiple-slurmd (Debian). Rule here:
  explicit ``prefix=`` > ``multiple_slurmd=True/False`` > whichever of ``slurm_<node>`` /
  ``slurm`` exists in the tracking hierarchy > ``DEFAULT_MULTIPLE_SLURMD`` (True, Debian).
* v2 scope: ``<CgroupSlice or system.slice>/[<node>_]slurmstepd.scope`` under the cgroup2
  mount (``<mountpoint>`` if it is cgroup2, else ``<mountpoint>/unified`` for hybrid, else
  the first cgroup2 mount), same multiple-slurmd rule; ``v2_scope=`` overrides.
* ``cgroup_root=`` ("/" by default) is a directory inside every hierarchy under which the
  Slurm tree lives (containers; tests use a unique ``/cidtest-...``).
"""
import os

from .errors import ConfError, LayoutNotFound
from . import paths as _p

DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"
DEFAULT_SPOOL_DIR = "/var/spool/slurmd"
DEFAULT_MOUNTPOINT = "/sys/fs/cgroup"
DEFAULT_SLICE = "system.slice"
DEFAULT_MULTIPLE_SLURMD = True     # Debian's slurm-wlm is built with --enable-multiple-slurmd
TRACK_PREFERENCE = ("freezer", "cpuset", "devices", "cpuacct", "pids")


class Layout:
    """One node's Slurm cgroup layout. Pure path building; no I/O in methods.

    version      1 or 2
    nodename     this node's NodeName
    spool_dir    SlurmdSpoolDir (expanded)
    v1_mounts    {controller: mountpoint} usable for Slurm (memory only if allow_memory)
    v1_prefix    path inside each v1 hierarchy, e.g. "/slurm_node2" (includes cgroup_root)
    track        the v1 controller used to list jobs (freezer if mounted)
    v2_mount     cgroup2 mountpoint
    v2_scope     path inside the cgroup2 mount, e.g. "/system.slice/node2_slurmstepd.scope"
    v2_user_cgroup  v2 user-level fallback cgroup (path inside the mount, "%u" = uid) or None
    """

    __slots__ = ("version", "nodename", "spool_dir", "v1_mounts", "v1_prefix", "track",
                 "v2_mount", "v2_scope", "v2_user_cgroup", "allow_memory", "notes")

    def __init__(self, version, nodename, spool_dir, v1_mounts=None, v1_prefix=None,
                 v2_mount=None, v2_scope=None, v2_user_cgroup=None, allow_memory=False,
                 notes=()):
        self.version = version
        self.nodename = nodename
        self.spool_dir = spool_dir
        v1 = dict(v1_mounts or {})
        # named hierarchies (name=systemd) are not controllers Slurm uses
        v1 = {c: m for c, m in v1.items()
              if not c.startswith("name=") and (allow_memory or c != "memory")}
        self.v1_mounts = v1
        self.v1_prefix = _norm(v1_prefix) if v1_prefix else None
        self.track = next((c for c in TRACK_PREFERENCE if c in v1), next(iter(v1), None))
        self.v2_mount = v2_mount
        self.v2_scope = _norm(v2_scope) if v2_scope else None
        self.v2_user_cgroup = v2_user_cgroup
        self.allow_memory = allow_memory
        self.notes = list(notes)
        if version == 1 and (not self.v1_mounts or not self.v1_prefix):
            raise LayoutNotFound("cgroup/v1 layout needs at least one mounted controller "
                                 "(memory is never used) and a prefix")
        if version == 2 and (not v2_mount or not self.v2_scope):
            raise LayoutNotFound("cgroup/v2 layout needs a cgroup2 mount and a stepd scope")

    # -- v1 -------------------------------------------------------------------------------
    def v1_base(self, ctrl):
        return self.v1_mounts[ctrl] + self.v1_prefix

    def v1_uid_dir(self, ctrl, uid):
        return f"{self.v1_mounts[ctrl]}{self.v1_prefix}/uid_{uid}"

    def v1_job_dir(self, ctrl, uid, job_id):
        return f"{self.v1_mounts[ctrl]}{self.v1_prefix}/uid_{uid}/job_{job_id}"

    def v1_step_dir(self, ctrl, uid, job_id, step="extern"):
        return f"{self.v1_mounts[ctrl]}{self.v1_prefix}/uid_{uid}/job_{job_id}/step_{step}"

    def v1_rel_step(self, uid, job_id, step="extern"):
        """The path /proc/PID/cgroup shows for a pid in that step (any v1 controller)."""
        return f"{self.v1_prefix}/uid_{uid}/job_{job_id}/step_{step}"

    # -- v2 -------------------------------------------------------------------------------
    def v2_scope_dir(self):
        return self.v2_mount + self.v2_scope

    def v2_job_dir(self, job_id):
        return f"{self.v2_mount}{self.v2_scope}/job_{job_id}"

    def v2_rel_task_special(self, job_id, step="extern"):
        return f"{self.v2_scope}/job_{job_id}/step_{step}/user/task_special"

    def v2_user_dir(self, uid):
        if not self.v2_user_cgroup:
            return None
        return self.v2_mount + _norm(self.v2_user_cgroup.replace("%u", str(uid)))

    def describe(self):
        if self.version == 1:
            where = ", ".join(f"{c}:{m}{self.v1_prefix}" for c, m in sorted(self.v1_mounts.items()))
        else:
            where = self.v2_scope_dir()
        return (f"cgroup/v{self.version} node={self.nodename} spool={self.spool_dir} "
                f"cgroups={where}")

    def __repr__(self):
        return f"Layout({self.describe()})"


def _norm(p):
    p = "/" + p.strip("/")
    return "" if p == "/" else p


def resolve_nodename(conf, short, full=None, explicit=None, env=None):
    """Pure: this host's NodeName from a parsed slurm.conf (see module docstring).

    Returns ``(nodename, how)`` where ``how`` says which rule matched.
    """
    if explicit:
        return explicit, "explicit"
    if env:
        return env, "SLURMD_NODENAME"
    hosts = {h for h in (short, full) if h}
    by_name = None
    for cl in conf.lines("NodeName") if conf is not None else ():
        d = cl.as_dict()
        try:
            names = _p.expand_hostlist(d.get("nodename", ""))
            hnames = _p.expand_hostlist(d["nodehostname"]) if "nodehostname" in d else None
        except ValueError as e:
            raise ConfError(cl.filename, cl.lineno, str(e)) from None
        if any(n.lower() == "default" for n in names):
            continue
        if hnames is not None:
            for i, n in enumerate(names):
                h = hnames[i] if i < len(hnames) else hnames[-1]
                if h in hosts:
                    return n, f"NodeHostname={h} ({cl.filename}:{cl.lineno})"
        elif by_name is None:
            for n in names:
                if n in hosts:
                    by_name = (n, f"NodeName matches host name ({cl.filename}:{cl.lineno})")
                    break
    if by_name:
        return by_name
    return short, "short host name (no matching NodeName line)"


def _hostnames():
    from _socket import gethostname     # = socket.gethostname, without socket's enum/selectors
    full = gethostname()
    return full.split(".")[0], full


def _plugin_version(plugin, where):
    p = (plugin or "autodetect").strip().lower()
    if p in ("cgroup/v1", "v1", "1"):
        return 1
    if p in ("cgroup/v2", "v2", "2"):
        return 2
    if p == "autodetect":
        return None
    if where:
        raise ConfError(where[0], where[1], f"unknown CgroupPlugin {plugin!r} "
                        "(expected cgroup/v1, cgroup/v2 or autodetect)")
    raise LayoutNotFound(f"unknown CgroupPlugin {plugin!r}")


def choose_version(requested, mountpoint, mounts):
    """Pure: 1 or 2 from the requested plugin (None = autodetect) and the mount table."""
    v1_under = {c: m for c, m in mounts.v1.items() if m.startswith(mountpoint + "/")}
    if requested == 1:
        if not v1_under:
            raise LayoutNotFound(f"CgroupPlugin=cgroup/v1 but no cgroup v1 controller is "
                                 f"mounted under {mountpoint}")
        return 1
    if requested == 2:
        if not mounts.v2:
            raise LayoutNotFound("CgroupPlugin=cgroup/v2 but no cgroup2 filesystem is mounted")
        return 2
    if mountpoint in mounts.v2 or mountpoint + "/systemd" in mounts.v2:
        return 2
    if v1_under:
        return 1
    if mounts.v2:
        return 2
    raise LayoutNotFound(f"no cgroup filesystem mounted (looked under {mountpoint})")


def choose_v2_mount(mountpoint, mounts):
    if mountpoint in mounts.v2:
        return mountpoint
    if mountpoint + "/unified" in mounts.v2:
        return mountpoint + "/unified"
    under = [m for m in mounts.v2 if m.startswith(mountpoint + "/")]
    return (under or mounts.v2)[0]


def discover(slurm_conf=DEFAULT_SLURM_CONF, cgroup_conf=None, nodename=None, mounts=None, *,
             hostname=None, spool_dir=None, cgroup_root=None, plugin=None, prefix=None,
             multiple_slurmd=None, v2_scope=None, v2_user_cgroup=None, allow_memory=False,
             use_env=True):
    """Discover this node's Slurm cgroup layout and return a :class:`Layout`.

    slurm_conf   path of slurm.conf, or an already loaded Conf, or None (defaults only)
    cgroup_conf  path of cgroup.conf (default: next to slurm.conf; a missing file means
                 defaults, like Slurm), a Conf, or None
    nodename     this node's NodeName (default: resolved as slurmd does)
    mounts       mount table: text of /proc/self/mounts, a paths.Mounts, or None (read it)
    hostname     override gethostname() (short or full)
    spool_dir    override SlurmdSpoolDir (tests); cgroup_root: see module docstring
    plugin       override CgroupPlugin; prefix/multiple_slurmd/v2_scope: see module docstring
    v2_user_cgroup  v2 user-level fallback cgroup, "%u" = uid (e.g. "/callerid.slice/user-%u")
    allow_memory never set this outside a dedicated deployment: lets v1 adoption also write
                 the memory controller.
    Raises ConfError (file:line) for bad configuration and LayoutNotFound when the mount
    table has no usable cgroup filesystem.
    """
    from .conf import Conf, load_conf

    notes = []
    if isinstance(slurm_conf, Conf) or slurm_conf is None:
        sconf = slurm_conf or Conf()
        conf_dir = os.path.dirname(DEFAULT_SLURM_CONF)
    else:
        sconf = load_conf(slurm_conf)
        conf_dir = os.path.dirname(os.path.abspath(slurm_conf))
    if isinstance(cgroup_conf, Conf):
        cconf = cgroup_conf
    else:
        path = cgroup_conf or os.path.join(conf_dir, "cgroup.conf")
        if cgroup_conf is None and not os.path.exists(path):
            cconf = Conf()
            notes.append(f"no {path}: cgroup.conf defaults")
        else:
            cconf = load_conf(path)

    if hostname:
        short, full = hostname.split(".")[0], hostname
    else:
        short, full = _hostnames()
    env = os.environ.get("SLURMD_NODENAME") if use_env else None
    node, how = resolve_nodename(sconf, short, full, nodename, env)
    notes.append(f"node name {node!r} from {how}")

    if spool_dir is None:
        spool_dir = _p.expand_node_pattern(sconf.get("SlurmdSpoolDir", DEFAULT_SPOOL_DIR),
                                           node, short)
    mp = cconf.get("CgroupMountpoint", DEFAULT_MOUNTPOINT).rstrip("/") or "/"

    if mounts is None:
        with open("/proc/self/mounts") as f:
            mounts = _p.parse_mounts(f.read())
    elif isinstance(mounts, str):
        mounts = _p.parse_mounts(mounts)

    requested = _plugin_version(plugin if plugin is not None else cconf.get("CgroupPlugin"),
                                None if plugin is not None else cconf.where("CgroupPlugin"))
    version = choose_version(requested, mp, mounts)
    root = _norm(cgroup_root or "/")

    if version == 1:
        v1 = {c: m for c, m in mounts.v1.items() if m.startswith(mp + "/")}
        layout_kw = dict(v1_mounts=v1)
        if prefix is not None:
            pre = _p.expand_node_pattern(prefix, node, short)
            how = "explicit prefix"
        else:
            if multiple_slurmd is None:
                probe = Layout(1, node, spool_dir, v1, root + "/x", allow_memory=allow_memory)
                base = probe.v1_mounts[probe.track] + root
                if os.path.isdir(f"{base}/slurm_{node}"):
                    multiple_slurmd, how = True, f"found {base}/slurm_{node}"
                elif os.path.isdir(f"{base}/slurm"):
                    multiple_slurmd, how = False, f"found {base}/slurm"
                else:
                    multiple_slurmd, how = DEFAULT_MULTIPLE_SLURMD, "default (Debian build)"
            else:
                how = "multiple_slurmd given"
            pre = f"/slurm_{node}" if multiple_slurmd else "/slurm"
        notes.append(f"v1 prefix {pre} ({how})")
        return Layout(1, node, spool_dir, v1_prefix=root + _norm(pre), allow_memory=allow_memory,
                      notes=notes, **layout_kw)

    v2m = choose_v2_mount(mp, mounts)
    if v2_scope is not None:
        scope = _p.expand_node_pattern(v2_scope, node, short)
        how = "explicit v2_scope"
    else:
        slice_ = cconf.get("CgroupSlice", DEFAULT_SLICE) or DEFAULT_SLICE
        base = v2m + root + _norm(slice_)
        if multiple_slurmd is None:
            if os.path.isdir(f"{base}/{node}_slurmstepd.scope"):
                multiple_slurmd, how = True, "found"
            elif os.path.isdir(f"{base}/slurmstepd.scope"):
                multiple_slurmd, how = False, "found"
            else:
                multiple_slurmd, how = DEFAULT_MULTIPLE_SLURMD, "default (Debian build)"
        else:
            how = "multiple_slurmd given"
        scope = root + _norm(slice_) + ("/%s_slurmstepd.scope" % node if multiple_slurmd
                                        else "/slurmstepd.scope")
    notes.append(f"v2 scope {scope} ({how})")
    return Layout(2, node, spool_dir, v2_mount=v2m, v2_scope=scope,
                  v2_user_cgroup=v2_user_cgroup, allow_memory=allow_memory, notes=notes)
