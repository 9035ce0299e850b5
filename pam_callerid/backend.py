"""Adapters from the hook to the project's other packages (imported lazily).

* configuration: ``daemon.config`` (the shared /etc/slurm/callerid.conf);
* jobs and adoption: ``cgroups``;
* the caller-ID query: the ``daemon`` client.

Each adapter turns the other package's API and typed errors into what :mod:`policy` consumes
(``policy.Job``, ``policy.CallerId``) or an error string for the logs; none raises on an
expected failure.
"""
import os

from . import policy
from .options import DEFAULT_CONFIG


def load_config(opts):
    """(config or None, error str or None). The default file may be absent (defaults)."""
    path = opts.config or DEFAULT_CONFIG
    explicit = "config" in opts.given
    if not explicit and not os.path.exists(path):
        path = None
    try:
        from daemon import config as dconf
    except ImportError as e:
        return None, "configuration reader unavailable: %s" % e
    try:
        if path is None:
            return dconf.Config(source="<defaults>"), None
        return dconf.load_config(path, required=True), None
    except Exception as e:                      # ConfigError and anything unexpected
        return None, "bad configuration %s: %s" % (path, e)


def user_jobs(uid, opts, conf):
    """(list of policy.Job or None, error str or None)."""
    try:
        import cgroups  # noqa: F401
        from cgroups import jobs as cjobs
    except ImportError as e:
        return None, "job discovery unavailable: %s" % e
    try:
        found = cjobs.user_jobs(uid, node=opts.nodename)
    except Exception as e:
        return None, "%s: %s" % (type(e).__name__, e)
    return [policy.Job(j.job_id, j.uid, j.start) for j in found], None


def adopt(pid, decision, uid, opts, conf):
    """Move ``pid`` as decided. None on success, else an error string."""
    try:
        from cgroups import adopt as cadopt
    except ImportError as e:
        return "adoption unavailable: %s" % e
    try:
        if decision.target == "job":
            cadopt.adopt(pid, decision.job_id, node=opts.nodename)
        else:
            cadopt.adopt_user(pid, uid, node=opts.nodename)
    except Exception as e:
        return "%s: %s" % (type(e).__name__, e)
    return None


def callerid(conn, opts, conf, log):
    """Ask the daemon at conn.src_ip; a policy.CallerId (never raises)."""
    try:
        from daemon import client
    except ImportError as e:
        return policy.CallerId("error", detail="caller-ID client unavailable: %s" % e)
    port = opts.port or getattr(conf, "port", None)
    try:
        r = client.query(conn.src_ip, conn.src_ip, conn.src_port, conn.dst_ip, conn.dst_port,
                         port=port, timeout=opts.rpc_timeout, config=conf)
    except Exception as e:
        return policy.CallerId("error", detail="%s: %s" % (type(e).__name__, e))
    return policy.CallerId(getattr(r, "status", "error"), job=getattr(r, "job_id", None),
                           uid=getattr(r, "uid", None), node=getattr(r, "node", None),
                           authenticated=getattr(r, "authenticated", False),
                           detail=getattr(r, "detail", None))
