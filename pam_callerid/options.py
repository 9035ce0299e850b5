"""Module arguments of pam_callerid (pure, no I/O).

The C client (pam_callerid.so) sends its arguments unchanged to the PAM service, which parses
them here for every request. The C client itself reads only ``service=``, ``ignore_root``,
``socket=``, ``daemon_timeout=`` and ``action_generic_failure=`` (before any I/O, with the same
matching rules).

Every option of pam_slurm_adopt is accepted with the same spelling, values and defaults; the
matching rules are the same too: an argument matches an option when it *starts* with
``name=`` compared case-insensitively, and a value matches when it starts with one of the
option's words (``action_unknown=NewestXYZ`` means ``newest``).

Ours (additions):

=========================  ===========================================================
``rpc_timeout=SECONDS``    total budget for the caller-ID query (1.0; 0.05..10)
``port=N``                 caller-ID daemon port (default: ``Port`` of the config file)
``config=PATH``            the shared callerid.conf (default /etc/slurm/callerid.conf)
``audit=PATH|none``        JSON-lines audit file, written by the service
``messages=fallback|always|never``  the info line to the user on success: only when a
                           fallback chose (newest / allow / user; default), on every
                           adoption, or never. Denials always say why.
``quiet``                  the same as ``messages=never``
``allow_groups=G1,G2``     members of these groups are let through (PAM_IGNORE) without
                           adoption, like root; audited as ``exempt``
``socket=PATH``            the service's socket (C client; /run/callerid/pam.sock)
``daemon_timeout=SECONDS`` the C client's bound on the whole exchange (2.0; 0.05..60)
``action_unknown=user``    adopt into the user-level cgroup instead of guessing a job
=========================  ===========================================================

Bad values never loosen security: an unrecognised ``action_*`` value selects that option's
*most restrictive* value (``deny``) and is logged; other bad values keep the default. Unknown
options are logged and ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

from cgroups.conf import parse_bool      # the project's one boolean vocabulary

__all__ = ["Options", "parse", "LOG_LEVELS", "DEFAULT_PORT", "DEFAULT_CONFIG", "DEFAULT_AUDIT",
           "DEFAULT_SOCKET"]

DEFAULT_PORT = 6820
DEFAULT_CONFIG = "/etc/slurm/callerid.conf"
DEFAULT_AUDIT = "/var/log/slurm-callerid/audit.jsonl"      # a root-owned directory of its own
DEFAULT_SOCKET = "/run/callerid/pam.sock"
RPC_TIMEOUT_DEFAULT, RPC_TIMEOUT_MIN, RPC_TIMEOUT_MAX = 1.0, 0.05, 10.0
DAEMON_TIMEOUT_DEFAULT, DAEMON_TIMEOUT_MIN, DAEMON_TIMEOUT_MAX = 2.0, 0.05, 60.0

# pam_slurm_adopt's log levels (Slurm's LOG_LEVEL_* numbering) -> our numeric threshold
LOG_LEVELS = {"quiet": 0, "fatal": 1, "error": 2, "info": 3, "verbose": 4, "debug": 5,
              "debug2": 6, "debug3": 7, "debug4": 8, "debug5": 9}

# name -> (valid values in matching order, default, most restrictive value for bad input)
_CHOICES = {
    "action_no_jobs": (("deny", "ignore"), "deny", "deny"),
    "action_unknown": (("newest", "allow", "deny", "user"), "newest", "deny"),
    "action_adopt_failure": (("allow", "deny"), "allow", "deny"),
    "action_generic_failure": (("ignore", "allow", "deny"), "ignore", "deny"),
    "messages": (("fallback", "always", "never"), "fallback", "fallback"),
}
# boolean options: name -> default. Slurm spells them 0/1 (true/false for join_container);
# every spelling of cgroups.conf.parse_bool is accepted for every boolean.
_BOOLS = {"disable_x11": False, "ignore_root": True, "join_container": True,
          "single_job_skip_rpc": True}
_PATHS = {"config": DEFAULT_CONFIG, "audit": DEFAULT_AUDIT, "socket": DEFAULT_SOCKET}
_SECONDS = {"rpc_timeout": (RPC_TIMEOUT_DEFAULT, RPC_TIMEOUT_MIN, RPC_TIMEOUT_MAX),
            "daemon_timeout": (DAEMON_TIMEOUT_DEFAULT, DAEMON_TIMEOUT_MIN, DAEMON_TIMEOUT_MAX)}
_OTHERS = ("nodename", "service", "log_level", "port", "allow_groups")
_NAMES = (*_CHOICES, *_BOOLS, *_PATHS, *_SECONDS, *_OTHERS)


@dataclass(frozen=True, slots=True)
class Options:
    """Parsed module arguments. ``logs``: ``(level, text)`` lines about the parsing;
    ``given``: the options named explicitly."""
    action_no_jobs: str = "deny"
    action_unknown: str = "newest"
    action_adopt_failure: str = "allow"
    action_generic_failure: str = "ignore"
    messages: str = "fallback"
    disable_x11: bool = False
    ignore_root: bool = True
    join_container: bool = True
    single_job_skip_rpc: bool = True
    config: str = DEFAULT_CONFIG
    audit: str = DEFAULT_AUDIT
    socket: str = DEFAULT_SOCKET
    rpc_timeout: float = RPC_TIMEOUT_DEFAULT
    daemon_timeout: float = DAEMON_TIMEOUT_DEFAULT
    nodename: str | None = None
    service: str = "sshd"
    log_level: int = LOG_LEVELS["info"]
    port: int | None = None          # None: the config file's Port
    allow_groups: tuple[str, ...] = ()
    logs: tuple[tuple[str, str], ...] = ()
    given: frozenset = frozenset()


def _match(arg):
    """The option an argument names (prefix match of ``<option>=``), or None."""
    low = arg.lower()
    for name in _NAMES:
        if low.startswith(name + "="):
            return name
    return None


def _seconds(name, value, err):
    default, lo, hi = _SECONDS[name]
    try:
        t = float(value)
        if t != t:
            raise ValueError
    except ValueError:
        err(("error", "unrecognized %s=%s, setting to %.2f" % (name, value, default)))
        return default
    c = min(max(t, lo), hi)
    if c != t:
        err(("error", "%s=%s out of range, using %.2f" % (name, value, c)))
    return c


def _one(name, value, err):
    """The value of one recognised option, or None to keep the current one."""
    if name in _CHOICES:
        values, _, safest = _CHOICES[name]
        for val in values:
            if value.lower().startswith(val):
                return val
        err(("error", "unrecognized %s=%s, setting to '%s'" % (name, value, safest)))
        return safest
    if name in _BOOLS:
        b = parse_bool(value, prefix=True)      # pam_slurm_adopt matches a prefix
        if b is None:
            err(("error", "unrecognized %s=%s, setting to '%d'" % (name, value, _BOOLS[name])))
            return _BOOLS[name]
        return b
    if name in _PATHS:
        if name == "audit" and value.lower() == "none":
            return "none"
        if not value.startswith("/"):
            err(("error", "%s=%s is not an absolute path, using '%s'"
                 % (name, value, _PATHS[name])))
            return None
        return value
    if name in _SECONDS:
        return _seconds(name, value, err)
    if name == "service":
        if not value:
            err(("error", "empty service=, keeping 'sshd'"))
            return None
        return value
    if name == "nodename":
        return value or None
    if name == "log_level":
        lv = value.lower()
        if lv in LOG_LEVELS:
            return LOG_LEVELS[lv]
        if lv.isascii() and lv.isdigit():
            return min(int(lv), 9)
        err(("error", "unrecognized log_level=%s, setting to 'info'" % value))
        return LOG_LEVELS["info"]
    if name == "port":
        if value.isascii() and value.isdigit() and 0 < int(value) < 65536:
            return int(value)
        err(("error", "unrecognized port=%s, using the configured port" % value))
        return None
    groups = tuple(g for g in (x.strip() for x in value.split(",")) if g)   # allow_groups
    if not groups:
        err(("error", "empty allow_groups=, no group exempt"))
    return groups


def parse(argv) -> Options:
    """Parse PAM module arguments (a sequence of str) into :class:`Options`. Never raises."""
    values, logs, given = {}, [], set()
    err = logs.append
    for arg in argv:
        if not isinstance(arg, str):
            err(("error", "ignoring non-text option %r" % (arg,)))
            continue
        if arg.lower() == "quiet":
            values["messages"] = "never"
            given.add("messages")
            continue
        name = _match(arg)
        if name is None:
            err(("error", "ignoring unrecognized option '%s'" % arg))
            continue
        given.add(name)
        v = _one(name, arg[len(name) + 1:], err)
        if v is not None:
            values[name] = v
    # pam_slurm_adopt's safety net: with ignore_root=0, every configuration that can deny
    # would lock root out (action_no_jobs has no "allow"), so root is always ignored.
    if values.get("ignore_root") is False:
        err(("error", "Danger!!! ignore_root=0 would lock root out of this node "
             "(action_no_jobs cannot be 'allow'); forcing ignore_root=1"))
        values["ignore_root"] = True
    return Options(**values, logs=tuple(logs), given=frozenset(given))
