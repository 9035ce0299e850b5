"""Adapters from the hook to the project's other packages (imported lazily).

* configuration: the shared ``/etc/slurm/callerid.conf`` (``config=``), read with
  ``cgroups.conf``; the daemon's part of it with ``daemon.config`` (only when a caller-ID
  query is needed);
* jobs and adoption: ``cgroups.discover`` / ``cgroups.user_jobs`` / ``cgroups.adopt``;
* the caller-ID query: ``daemon.client``.

Keys of callerid.conf read here (all optional; they exist for non-standard installations and
for tests that point the module at a synthetic Slurm spool and cgroup tree):

=================  ========================================================================
NodeName           this node's Slurm NodeName (module arg ``nodename=`` wins)
PamSlurmConf       path of slurm.conf (default /etc/slurm/slurm.conf)
PamCgroupConf      path of cgroup.conf (default: next to slurm.conf)
PamSpoolDir        SlurmdSpoolDir override
PamCgroupRoot      directory inside every cgroup hierarchy holding the Slurm tree
PamCgroupPlugin    cgroup/v1 | cgroup/v2 | autodetect override
PamV1Prefix        v1 prefix override (``/slurm`` or ``/slurm_%n``)
PamV2Scope         v2 scope override
PamUserCgroup      v2 user-level fallback cgroup for ``action_unknown=user`` (``%u`` = uid)
PamNegativeCacheTTL  seconds a source without a daemon is not asked again (default 60)
=================  ========================================================================

Each adapter turns the other package's API and typed errors into what :mod:`policy` consumes
(``policy.Job``, ``policy.CallerId``) or an error string for the logs; none raises on an
expected failure.
"""
import os
import time

from . import policy
from .options import DEFAULT_CONFIG, DEFAULT_PORT

PAM_KEYS = ("NodeName", "PamSlurmConf", "PamCgroupConf", "PamSpoolDir", "PamCgroupRoot",
            "PamCgroupPlugin", "PamV1Prefix", "PamV2Scope", "PamUserCgroup",
            "PamNegativeCacheTTL")


class JobRef:
    """Enough of a cgroups Job to adopt into it (job id + owner)."""

    __slots__ = ("job_id", "uid")

    def __init__(self, job_id, uid):
        self.job_id, self.uid = job_id, uid

    def __repr__(self):
        return "JobRef(%r, %r)" % (self.job_id, self.uid)


class Context:
    """Per-call state: options, the parsed config file, the discovered layout."""

    def __init__(self, opts):
        self.opts = opts
        self.conf = None           # cgroups.conf.Conf of callerid.conf (or empty)
        self.path = None
        self.layout = None
        self.jobs = {}             # job id -> cgroups Job
        self.problems = []
        self.timings = {}          # stage -> ms, merged into the audit record

    def get(self, key, default=None):
        if self.conf is None:
            return default
        v = self.conf.get(key)
        return default if v in (None, "") else v

    @property
    def node_name(self):
        if self.layout is not None:
            return self.layout.nodename
        return self.opts.nodename or self.get("NodeName") or \
            os.uname().nodename.split(".")[0]

    @property
    def port(self):
        """The caller-ID daemon port: module arg, else the config file's Port, else 6820."""
        if self.opts.port:
            return self.opts.port
        try:
            p = int(self.get("Port", DEFAULT_PORT))
            return p if 0 < p < 65536 else DEFAULT_PORT
        except ValueError:
            return DEFAULT_PORT

    @property
    def negcache_ttl(self):
        try:
            return max(0.0, float(self.get("PamNegativeCacheTTL", 60)))
        except ValueError:
            return 60.0


def load_config(opts):
    """(Context, error str or None). The default file may be absent (defaults)."""
    ctx = Context(opts)
    path = opts.config or DEFAULT_CONFIG
    if "config" not in opts.given and not os.path.exists(path):
        return ctx, None
    ctx.path = path
    try:
        from cgroups.conf import load_conf
        ctx.conf = load_conf(path)
    except ImportError as e:
        return ctx, "configuration reader unavailable: %s" % e
    except Exception as e:                       # ConfError (file:line) or OSError
        return ctx, "bad configuration: %s" % e
    return ctx, None


def discover(ctx):
    """Discover the Slurm layout into ctx.layout; None or an error string."""
    if ctx.layout is not None:
        return None
    try:
        import cgroups
    except ImportError as e:
        return "job discovery unavailable: %s" % e
    kw = {"slurm_conf": ctx.get("PamSlurmConf", "/etc/slurm/slurm.conf"),
          "cgroup_conf": ctx.get("PamCgroupConf"),
          "nodename": ctx.opts.nodename or ctx.get("NodeName"),
          "spool_dir": ctx.get("PamSpoolDir"), "cgroup_root": ctx.get("PamCgroupRoot"),
          "plugin": ctx.get("PamCgroupPlugin"), "prefix": ctx.get("PamV1Prefix"),
          "v2_scope": ctx.get("PamV2Scope"), "v2_user_cgroup": ctx.get("PamUserCgroup"),
          "use_env": False}
    try:
        ctx.layout = cgroups.discover(**kw)
    except Exception as e:                       # ConfError, LayoutNotFound, OSError
        return "%s: %s" % (type(e).__name__, e)
    return None


def user_jobs(ctx, uid):
    """(list of policy.Job or None, error str or None)."""
    err = discover(ctx)
    if err:
        return None, err
    try:
        import cgroups
        found = cgroups.user_jobs(ctx.layout, uid)
    except Exception as e:
        return None, "%s: %s" % (type(e).__name__, e)
    ctx.problems = list(getattr(found, "problems", ()) or ())
    ctx.jobs = {j.job_id: j for j in found}
    return [policy.Job(j.job_id, j.uid, j.start_time) for j in found], None


def adopt(ctx, pid, decision, uid):
    """Move ``pid`` as decided. None on success, else an error string."""
    err = discover(ctx)
    if err:
        return err
    try:
        import cgroups
        if decision.target == "job":
            job = ctx.jobs.get(decision.job_id) or JobRef(decision.job_id, uid)
            cgroups.adopt(ctx.layout, pid, job)
        else:
            cgroups.adopt_user(ctx.layout, pid, uid)
    except Exception as e:
        return "%s: %s" % (type(e).__name__, e)
    return None


_STATUS = {"found": "found", "unknown": "unknown", "refused": "refused", "error": "error",
           "unreachable": "unreachable", "invalid": "error", "local-error": "error"}


def callerid(ctx, conn):
    """Ask the daemon at conn.src_ip; a policy.CallerId (never raises)."""
    src = "%s:%d" % (conn.src_ip, conn.src_port)
    t0 = time.monotonic()
    try:
        from daemon import client
        from daemon import config as dconfig
    except ImportError as e:
        return policy.CallerId("error", source=src,
                               detail="caller-ID client unavailable: %s" % e)
    try:
        if ctx.path and ctx.conf is not None and len(ctx.conf.filenames) == 1:
            cfg = dconfig.config_from_entries(ctx.conf.entries(), ctx.path)   # parsed once
        elif ctx.path:
            cfg = dconfig.load_config(ctx.path, required=True, strict=False)
        else:
            cfg = dconfig.Config()
        port = ctx.opts.port or cfg.port
        auth = client.auth_from_config(cfg)
        trusted = cfg.reply_uids()
    except Exception as e:
        return policy.CallerId("error", source=src,
                               detail="caller-ID set-up failed: %s: %s" % (type(e).__name__, e))
    t1 = time.monotonic()
    ctx.timings["callerid_setup"] = round((t1 - t0) * 1000, 3)    # imports, config, auth
    try:
        a = client.query(conn.src_ip, port, (conn.src_ip, conn.src_port),
                         (conn.dst_ip, conn.dst_port), auth=auth, timeout=ctx.opts.rpc_timeout,
                         trusted_uids=trusted)
    except Exception as e:
        return policy.CallerId("error", source=src,
                               detail="caller-ID query failed: %s: %s" % (type(e).__name__, e))
    status = _STATUS.get(a.outcome, "error")
    detail = a.detail or None
    if a.outcome == "invalid":
        detail = "reply rejected: %s" % a.detail
    elif status == "unreachable" and "waiting for reply" in (a.detail or ""):
        status = "timeout"                      # a daemon is there but did not answer in time
    # daemon.client returns "found" only for a reply whose signature and nonce verified
    return policy.CallerId(status, job=a.job_id, uid=a.job_uid, node=a.node,
                           authenticated=(a.outcome == "found"), source=src, detail=detail)
