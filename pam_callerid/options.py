"""Module arguments of pam_callerid (pure, no I/O).

Every option of pam_slurm_adopt is accepted with the same spelling, values and defaults; the
matching rules are the same too: an argument matches an option when it *starts* with
``name=`` compared case-insensitively, and a value matches when it starts with one of the
option's words (``action_unknown=NewestXYZ`` means ``newest``).

Ours (additions): ``rpc_timeout=SECONDS`` (total budget for the caller-ID query, default 1.0,
clamped to 0.05..10), ``port=N`` (caller-ID daemon port; default taken from the config file or
:data:`DEFAULT_PORT`), ``config=PATH`` (the shared ``/etc/slurm/callerid.conf``),
``audit=PATH|none`` (JSON-lines audit file), ``quiet`` / ``quiet=0|1`` (no info line to the
user), ``onerror=fail|ignore`` (what an internal error returns: PAM_SYSTEM_ERR or PAM_IGNORE;
the C shim parses this one too, with the same rule), ``cgroup_warmup=0|1`` (default 1: the C
shim starts the kernel's cgroup-migration grace period in the background before Python starts,
see build.py; also parsed there) and ``action_unknown=user`` (adopt into the
user-level cgroup instead of guessing a job).

Bad values never loosen security: an unrecognised ``action_*`` value selects that option's
*most restrictive* value (``deny``) and is logged; other bad values keep the default. Unknown
options are logged and ignored.  Options we accept but do not implement (``disable_x11``,
``join_container``) are logged once when given explicitly.
"""

__all__ = ["Options", "parse", "LOG_LEVELS", "DEFAULT_PORT", "DEFAULT_CONFIG", "DEFAULT_AUDIT"]

DEFAULT_PORT = 6820
DEFAULT_CONFIG = "/etc/slurm/callerid.conf"
DEFAULT_AUDIT = "/var/log/slurm/pam_callerid-audit.jsonl"
RPC_TIMEOUT_DEFAULT = 1.0
RPC_TIMEOUT_MIN = 0.05
RPC_TIMEOUT_MAX = 10.0

# pam_slurm_adopt's log levels (Slurm's LOG_LEVEL_* numbering) -> our numeric threshold
LOG_LEVELS = {"quiet": 0, "fatal": 1, "error": 2, "info": 3, "verbose": 4, "debug": 5,
              "debug2": 6, "debug3": 7, "debug4": 8, "debug5": 9}

# name -> (valid values in matching order, default, most restrictive value for bad input)
_CHOICES = {
    "action_no_jobs": (("deny", "ignore"), "deny", "deny"),
    "action_unknown": (("newest", "allow", "deny", "user"), "newest", "deny"),
    "action_adopt_failure": (("allow", "deny"), "allow", "deny"),
    "action_generic_failure": (("ignore", "allow", "deny"), "ignore", "deny"),
    "onerror": (("fail", "ignore"), "fail", "fail"),
}
# boolean options: name -> default.  Values follow Slurm: 0/1 for the numeric ones,
# true/false for join_container; we accept both spellings for every boolean.
_BOOLS = {"disable_x11": False, "ignore_root": True, "join_container": True,
          "single_job_skip_rpc": True, "quiet": False, "cgroup_warmup": True}
_STRINGS = {"nodename": None, "service": "sshd", "config": DEFAULT_CONFIG, "audit": DEFAULT_AUDIT}
# what we actually do for the options we accept but do not implement (no X11 forwarding
# set-up, no setns() into the job's namespaces): a different explicit value is logged
_UNSUPPORTED = {"disable_x11": True, "join_container": False}


class Options:
    """Parsed module arguments. ``logs`` holds ``(level, text)`` lines about the parsing."""

    __slots__ = tuple(_CHOICES) + tuple(_BOOLS) + tuple(_STRINGS) + (
        "log_level", "rpc_timeout", "port", "logs", "given")

    def __init__(self):
        for name, (_, default, _) in _CHOICES.items():
            setattr(self, name, default)
        for name, default in _BOOLS.items():
            setattr(self, name, default)
        for name, default in _STRINGS.items():
            setattr(self, name, default)
        self.log_level = LOG_LEVELS["info"]
        self.rpc_timeout = RPC_TIMEOUT_DEFAULT
        self.port = None            # None: from the config file, else DEFAULT_PORT
        self.logs = []
        self.given = set()

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("logs", "given")}

    def __repr__(self):
        return "Options(%r)" % self.as_dict()


def _startswith_ci(s, prefix):
    return s[:len(prefix)].lower() == prefix


def _bool(v):
    lv = v.lower()
    for word, val in (("1", True), ("0", False), ("true", True), ("false", False),
                      ("yes", True), ("no", False)):
        if lv.startswith(word):
            return val
    return None


def parse(argv):
    """Parse PAM module arguments (a sequence of str) into :class:`Options`. Never raises."""
    o = Options()
    err = o.logs.append
    for arg in argv:
        if not isinstance(arg, str):
            err(("error", "ignoring non-text option %r" % (arg,)))
            continue
        if arg.lower() == "quiet":
            o.quiet = True
            o.given.add("quiet")
            continue
        name, sep, value = arg.partition("=")
        key = None
        if sep:
            # prefix match: the argument starts with "<option>=" (case-insensitive)
            for cand in (*_CHOICES, *_BOOLS, *_STRINGS, "log_level", "rpc_timeout", "port"):
                if _startswith_ci(arg, cand + "="):
                    key = cand
                    break
        if key is None:
            err(("error", "ignoring unrecognized option '%s'" % arg))
            continue
        o.given.add(key)
        if key in _CHOICES:
            values, default, safest = _CHOICES[key]
            for val in values:
                if value.lower().startswith(val):
                    setattr(o, key, val)
                    break
            else:
                setattr(o, key, safest)
                err(("error", "unrecognized %s=%s, setting to '%s'" % (key, value, safest)))
        elif key in _BOOLS:
            b = _bool(value)
            if b is None:
                err(("error", "unrecognized %s=%s, setting to '%d'"
                     % (key, value, int(_BOOLS[key]))))
                b = _BOOLS[key]
            setattr(o, key, b)
        elif key in _STRINGS:
            if key in ("config", "audit") and value and not value.startswith("/") \
                    and value.lower() != "none":
                err(("error", "%s=%s is not an absolute path, using '%s'"
                     % (key, value, _STRINGS[key])))
                continue
            if key == "service" and not value:
                err(("error", "empty service=, keeping 'sshd'"))
                continue
            setattr(o, key, value if value else None)
        elif key == "log_level":
            lv = value.lower()
            if lv in LOG_LEVELS:
                o.log_level = LOG_LEVELS[lv]
            elif lv.isdigit():
                o.log_level = min(int(lv), 9)
            else:
                err(("error", "unrecognized log_level=%s, setting to 'info'" % value))
                o.log_level = LOG_LEVELS["info"]
        elif key == "rpc_timeout":
            try:
                t = float(value)
                if t != t:
                    raise ValueError
            except ValueError:
                err(("error", "unrecognized rpc_timeout=%s, setting to %.2f"
                     % (value, RPC_TIMEOUT_DEFAULT)))
                continue
            c = min(max(t, RPC_TIMEOUT_MIN), RPC_TIMEOUT_MAX)
            if c != t:
                err(("error", "rpc_timeout=%s out of range, using %.2f" % (value, c)))
            o.rpc_timeout = c
        elif key == "port":
            if value.isdigit() and 0 < int(value) < 65536:
                o.port = int(value)
            else:
                err(("error", "unrecognized port=%s, using the configured port" % value))
    for name, behaves in _UNSUPPORTED.items():
        if name in o.given and getattr(o, name) != behaves:
            err(("info", "%s=%s is accepted but not supported by pam_callerid; ignored"
                 % (name, int(getattr(o, name)) if name == "disable_x11"
                    else str(getattr(o, name)).lower())))
    # pam_slurm_adopt's safety net: with ignore_root=0, every configuration that can deny
    # would lock root out (action_no_jobs has no "allow"), so root is always ignored.
    if not o.ignore_root:
        err(("error", "Danger!!! ignore_root=0 would lock root out of this node "
             "(action_no_jobs cannot be 'allow'); forcing ignore_root=1"))
        o.ignore_root = True
    return o
