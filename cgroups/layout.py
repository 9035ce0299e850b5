"""Layout discovery: where this node's Slurm keeps its stepd sockets and job cgroups.

Resolved the way slurmd does it (see the package docstring for the sources):

* slurm.conf: the path given, else the first that exists of ``$SLURM_CONF`` (with
  ``use_env``), ``/run/slurm/conf/slurm.conf`` (configless slurmd's symlink to its cache,
  made at every start), ``<SlurmdSpoolDir>/conf-cache/slurm.conf`` (configless slurmd's cache:
  the ``spool_dir=`` given, else the default spool /var/spool/slurmd), /etc/slurm/slurm.conf.
  Facts: slurmd.c ``_establish_configuration`` / ``_handle_slash_run`` (22.05, 24.11):
  a configless slurmd writes every file to ``<SlurmdSpoolDir>/conf-cache/`` (the spool dir
  from the server's SlurmdSpoolDir, %n/%h expanded) and points ``/run/slurm/conf`` at it.
  cgroup.conf and job_container.conf are read next to the slurm.conf found (Slurm's
  ``get_extra_conf_path``), and configless slurmd caches them there too (fetch_config.c).
  Caveat: a conf-cache left over from an earlier configless setup is never removed by Slurm.
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
* v1 controllers: every mounted v1 controller under the mountpoint, memory included (adoption
  writes only where the job's ``step_extern`` directory exists); named hierarchies are not
  controllers. The memory hierarchy is never used to list jobs.
* job container: ``JobContainerType`` (``NamespaceType`` from 25.11) ending in ``/tmpfs`` ->
  the node's BasePath from job_container.conf (:func:`namespace.jc_basepath`).
"""
import os

from .errors import ConfError, LayoutNotFound
from . import paths as _p

DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"
DEFAULT_SPOOL_DIR = "/var/spool/slurmd"
CONFIGLESS_LINK = "/run/slurm/conf"          # slurmd.c _handle_slash_run
CONF_CACHE = "conf-cache"                    # <SlurmdSpoolDir>/conf-cache
DEFAULT_MOUNTPOINT = "/sys/fs/cgroup"
DEFAULT_SLICE = "system.slice"
DEFAULT_MULTIPLE_SLURMD = True     # Debian's slurm-wlm is built with --enable-multiple-slurmd
TRACK_PREFERENCE = ("freezer", "cpuset", "devices", "cpuacct", "pids")


class Layout:
    """One node's Slurm cgroup layout. Pure path building; no I/O in methods.

    version      1 or 2
    nodename     this node's NodeName
    spool_dir    SlurmdSpoolDir (expanded)
    v1_mounts    {controller: mountpoint} of the v1 controllers (memory included)
    v1_prefix    path inside each v1 hierarchy, e.g. "/slurm_node2" (includes cgroup_root)
    track        the v1 controller used to list jobs (freezer if mounted; never memory)
    v2_mount     cgroup2 mountpoint
    v2_scope     path inside the cgroup2 mount, e.g. "/system.slice/node2_slurmstepd.scope"
    v2_user_cgroup  v2 user-level fallback cgroup (path inside the mount, "%u" = uid) or None
    multiple_slurmd  whether Slurm was built with --enable-multiple-slurmd (as resolved)
    container    the job container plugin ("job_container/tmpfs", ...) or None
    jc_basepath  this node's job_container/tmpfs BasePath (node suffix included) or None
    """

    __slots__ = ("version", "nodename", "spool_dir", "v1_mounts", "v1_prefix", "track",
                 "v2_mount", "v2_scope", "v2_user_cgroup", "multiple_slurmd", "container",
                 "jc_basepath", "notes")

    def __init__(self, version, nodename, spool_dir, v1_mounts=None, v1_prefix=None,
                 v2_mount=None, v2_scope=None, v2_user_cgroup=None, multiple_slurmd=None,
                 container=None, jc_basepath=None, notes=()):
        self.version = version
        self.nodename = nodename
        self.spool_dir = spool_dir
        # named hierarchies (name=systemd) are not controllers Slurm uses
        v1 = {c: m for c, m in dict(v1_mounts or {}).items() if not c.startswith("name=")}
        self.v1_mounts = v1
        self.v1_prefix = _norm(v1_prefix) if v1_prefix else None
        self.track = next((c for c in TRACK_PREFERENCE if c in v1),
                          next((c for c in v1 if c != "memory"), None))
        self.v2_mount = v2_mount
        self.v2_scope = _norm(v2_scope) if v2_scope else None
        self.v2_user_cgroup = v2_user_cgroup
        self.multiple_slurmd = multiple_slurmd
        self.container = container
        self.jc_basepath = jc_basepath
        self.notes = list(notes)
        if version == 1 and (not self.track or not self.v1_prefix):
            raise LayoutNotFound("cgroup/v1 layout needs a prefix and at least one mounted "
                                 "controller besides memory")
        if version == 2 and (not v2_mount or not self.v2_scope):
            raise LayoutNotFound("cgroup/v2 layout needs a cgroup2 mount and a stepd scope")

    def extern_socket(self, job_id):
        """The extern step's stepd socket ``<spool>/<node>_<job>.4294967292``."""
        return f"{self.spool_dir.rstrip('/')}/{self.nodename}_{job_id}.{_p.SLURM_EXTERN_CONT}"

    # -- v1 -------------------------------------------------------------------------------
    def v1_base(self, ctrl):
        return self.v1_mounts[ctrl] + self.v1_prefix

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


def slurm_conf_candidates(spool_dir=None, env=None):
    """Pure: where to look for slurm.conf, in order (module docstring): ``$SLURM_CONF``
    (``env``), the configless link, the conf-cache of ``spool_dir`` and of the default spool
    dir, /etc/slurm/slurm.conf. Duplicates dropped."""
    out = [env] if env else []
    out.append(f"{CONFIGLESS_LINK}/slurm.conf")
    for spool in (spool_dir, DEFAULT_SPOOL_DIR):
        if spool:
            out.append(f"{spool.rstrip('/')}/{CONF_CACHE}/slurm.conf")
    out.append(DEFAULT_SLURM_CONF)
    return list(dict.fromkeys(out))


def find_slurm_conf(candidates):
    """The first of ``candidates`` that is a file; else one ConfError naming every place."""
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ConfError("slurm.conf", None,
                    "not found; looked at " + ", ".join(candidates) +
                    " (configless slurmd keeps it in /run/slurm/conf/ and "
                    "<SlurmdSpoolDir>/conf-cache/; pass its path to use another)")


def _load_confs(slurm_conf, cgroup_conf, spool_dir, use_env, notes):
    """(slurm.conf Conf, cgroup.conf Conf, directory of the other configuration files)."""
    from .conf import Conf, load_conf
    if isinstance(slurm_conf, Conf):
        sconf, conf_dir = slurm_conf, None
    else:
        if slurm_conf is None:
            env = os.environ.get("SLURM_CONF") if use_env else None
            slurm_conf = find_slurm_conf(slurm_conf_candidates(spool_dir, env))
            notes.append(f"slurm.conf found at {slurm_conf}")
        sconf = load_conf(slurm_conf)
        conf_dir = os.path.dirname(os.path.abspath(slurm_conf))
    if isinstance(cgroup_conf, Conf):
        return sconf, cgroup_conf, conf_dir
    path = cgroup_conf or os.path.join(conf_dir or os.path.dirname(DEFAULT_SLURM_CONF),
                                       "cgroup.conf")
    if cgroup_conf is None and not os.path.exists(path):
        notes.append(f"no {path}: cgroup.conf defaults")
        return sconf, Conf(), conf_dir
    return sconf, load_conf(path), conf_dir


def _node_and_spool(sconf, nodename, hostname, use_env, spool_dir, notes):
    """(NodeName, short host name, SlurmdSpoolDir)."""
    short, full = (hostname.split(".")[0], hostname) if hostname else _hostnames()
    env = os.environ.get("SLURMD_NODENAME") if use_env else None
    node, how = resolve_nodename(sconf, short, full, nodename, env)
    notes.append(f"node name {node!r} from {how}")
    if spool_dir is None:
        spool_dir = _p.expand_node_pattern(sconf.get("SlurmdSpoolDir", DEFAULT_SPOOL_DIR),
                                           node, short)
    return node, short, spool_dir


def _mount_table(mounts):
    if mounts is None:
        with open("/proc/self/mounts") as f:
            return _p.parse_mounts(f.read())
    return _p.parse_mounts(mounts) if isinstance(mounts, str) else mounts


def _probe_multiple(given, with_node, without_node):
    """(multiple_slurmd, how): the value given, else which of the two directories exists,
    else Debian's build default."""
    if given is not None:
        return given, "multiple_slurmd given"
    if os.path.isdir(with_node):
        return True, f"found {with_node}"
    if os.path.isdir(without_node):
        return False, f"found {without_node}"
    return DEFAULT_MULTIPLE_SLURMD, "default (Debian build)"


def _v1_placement(mounts, mp, node, short, root, prefix, multiple_slurmd):
    """(v1 mounts, prefix inside each hierarchy, multiple_slurmd, note)."""
    v1 = {c: m for c, m in mounts.v1.items()
          if m.startswith(mp + "/") and not c.startswith("name=")}
    if prefix is not None:
        return v1, root + _norm(_p.expand_node_pattern(prefix, node, short)), \
            multiple_slurmd, "explicit prefix"
    track = next((c for c in TRACK_PREFERENCE if c in v1),
                 next((c for c in v1 if c != "memory"), None))
    if track is None:
        raise LayoutNotFound(f"no cgroup v1 controller besides memory mounted under {mp}")
    base = v1[track] + root
    multiple_slurmd, how = _probe_multiple(multiple_slurmd, f"{base}/slurm_{node}",
                                           f"{base}/slurm")
    pre = f"/slurm_{node}" if multiple_slurmd else "/slurm"
    return v1, root + pre, multiple_slurmd, how


def _v2_placement(cconf, mounts, mp, node, short, root, v2_scope, multiple_slurmd):
    """(cgroup2 mount, stepd scope inside it, multiple_slurmd, note)."""
    v2m = choose_v2_mount(mp, mounts)
    if v2_scope is not None:
        return v2m, _p.expand_node_pattern(v2_scope, node, short), multiple_slurmd, \
            "explicit v2_scope"
    slice_ = root + _norm(cconf.get("CgroupSlice", DEFAULT_SLICE) or DEFAULT_SLICE)
    multiple_slurmd, how = _probe_multiple(multiple_slurmd,
                                           f"{v2m}{slice_}/{node}_slurmstepd.scope",
                                           f"{v2m}{slice_}/slurmstepd.scope")
    scope = slice_ + (f"/{node}_slurmstepd.scope" if multiple_slurmd else "/slurmstepd.scope")
    return v2m, scope, multiple_slurmd, how


def _job_container(sconf, conf_dir, node, short, multiple_slurmd, notes):
    """(container plugin or None, this node's tmpfs BasePath or None)."""
    from .conf import load_conf
    from .namespace import container_plugin, jc_basepath
    plugin = container_plugin(sconf)
    if plugin is None or not plugin.endswith("/tmpfs"):
        return plugin, None
    if conf_dir is None:
        notes.append(f"{plugin}: no configuration directory, BasePath unknown")
        return plugin, None
    jc = load_conf(os.path.join(conf_dir, "job_container.conf"))
    base = jc_basepath(jc, node, short, multiple_slurmd)
    notes.append(f"{plugin}: BasePath {base}" if base else
                 f"{plugin}: disabled on {node} (no BasePath for it, or BasePath=none)")
    return plugin, base


def discover(slurm_conf=None, cgroup_conf=None, nodename=None, mounts=None, *,
             hostname=None, spool_dir=None, cgroup_root=None, plugin=None, prefix=None,
             multiple_slurmd=None, v2_scope=None, v2_user_cgroup=None, use_env=True):
    """Discover this node's Slurm cgroup layout and return a :class:`Layout`.

    slurm_conf   path of slurm.conf; None = find it (configless first, module docstring);
                 or an already loaded Conf (then no job_container.conf is read)
    cgroup_conf  path of cgroup.conf (default: next to slurm.conf; a missing file means
                 defaults, like Slurm), a Conf, or None
    nodename     this node's NodeName (default: resolved as slurmd does)
    mounts       mount table: text of /proc/self/mounts, a paths.Mounts, or None (read it)
    hostname     override gethostname() (short or full)
    spool_dir    override SlurmdSpoolDir (tests); cgroup_root: see module docstring
    plugin       override CgroupPlugin; prefix/multiple_slurmd/v2_scope: see module docstring
    v2_user_cgroup  v2 user-level fallback cgroup, "%u" = uid (e.g. "/callerid.slice/user-%u")
    use_env      honour $SLURM_CONF and $SLURMD_NODENAME
    Raises ConfError (file:line, or every place looked at) for missing or bad configuration
    and LayoutNotFound when the mount table has no usable cgroup filesystem.
    """
    notes = []
    sconf, cconf, conf_dir = _load_confs(slurm_conf, cgroup_conf, spool_dir, use_env, notes)
    node, short, spool = _node_and_spool(sconf, nodename, hostname, use_env, spool_dir, notes)
    mp = cconf.get("CgroupMountpoint", DEFAULT_MOUNTPOINT).rstrip("/") or "/"
    mtab = _mount_table(mounts)
    requested = _plugin_version(plugin if plugin is not None else cconf.get("CgroupPlugin"),
                                None if plugin is not None else cconf.where("CgroupPlugin"))
    version = choose_version(requested, mp, mtab)
    root = _norm(cgroup_root or "/")
    if version == 1:
        v1, pre, multi, how = _v1_placement(mtab, mp, node, short, root, prefix,
                                            multiple_slurmd)
        notes.append(f"v1 prefix {pre} ({how})")
        kw = dict(v1_mounts=v1, v1_prefix=pre)
    else:
        v2m, scope, multi, how = _v2_placement(cconf, mtab, mp, node, short, root, v2_scope,
                                               multiple_slurmd)
        notes.append(f"v2 scope {scope} ({how})")
        kw = dict(v2_mount=v2m, v2_scope=scope, v2_user_cgroup=v2_user_cgroup)
    container, base = _job_container(sconf, conf_dir, node, short,
                                     DEFAULT_MULTIPLE_SLURMD if multi is None else multi, notes)
    return Layout(version, node, spool, multiple_slurmd=multi, container=container,
                  jc_basepath=base, notes=notes, **kw)
