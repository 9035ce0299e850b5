"""/etc/slurm/callerid.conf: Key=Value lines in slurm.conf style (keys case-insensitive).

Shared by the daemon, the `callerid` CLI and the PAM decision service (its Pam* keys).  Every key is documented in
daemon/README.md.  Bad values are errors naming file, line and key.  Unknown keys are errors
with strict=True; otherwise (the default) they are collected in Config.unknown_keys and the daemon logs a warning for each.
"""
from __future__ import annotations

import os

DEFAULT_PATH = "/etc/slurm/callerid.conf"
DEFAULT_PORT = 6820
DEFAULT_KEY_FILE = "/etc/slurm/callerid.key"


class ConfigError(Exception):
    pass


def _bool(v: str) -> bool:
    from cgroups.conf import parse_bool         # the project's one boolean vocabulary
    b = parse_bool(v)
    if b is None:
        raise ValueError(f"not a boolean: {v!r}")
    return b


def _list(v: str) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()]


# (attribute, default); a list default is copied for every Config
_FIELDS = (
    ("port", DEFAULT_PORT),
    ("listen_addresses", ["::", "0.0.0.0"]),
    ("auth_type", "munge"),
    ("key_file", DEFAULT_KEY_FILE),
    ("munge_socket", None),
    ("munge_ttl", None),
    ("slurm_user", "slurm"),
    ("reply_user", "root"),
    ("munge_reply_key", True),
    ("munge_session_lifetime", 60.0),
    ("node_name", None),
    ("log_unknown_holder", False),
    ("sock_diag", "netlink"),
    ("cgroup_roots", []),
    ("slurm_conf", "/etc/slurm/slurm.conf"),
    ("max_connections", 16384),
    ("rate_limit", 50.0),
    ("rate_burst", 100),
    ("root_share", 0.75),
    ("first_byte_timeout", 1.0),
    ("request_timeout", 3.0),
    ("connection_timeout", 5.0),
    ("max_clock_skew", 60.0),
    ("workers", 4),
    ("processes", 1),
    ("log_level", "info"),
    ("query_timeout", 2.0),
    ("reserved_source_port", True),
    ("pam_socket", "/run/callerid/pam.sock"),
    ("pam_workers", 32),
    ("pam_negative_cache_ttl", 60.0),
    ("pam_cgroup_conf", None),
    ("pam_spool_dir", None),
    ("pam_cgroup_root", None),
    ("pam_cgroup_plugin", None),
    ("pam_v1_prefix", None),
    ("pam_v2_scope", None),
    ("pam_user_cgroup", None),
    ("metrics_file", None),
    ("metrics_interval", 15.0),
    ("source", "<defaults>"),
    ("unknown_keys", []),
)
_NAMES = tuple(n for n, _ in _FIELDS)


class Config:
    """The settings (attributes named as in _FIELDS).  A plain class, not a dataclass (the
    PAM hook imports this module at logins): Config(**fields) or positionally in _FIELDS
    order; equality and repr over the fields."""

    __hash__ = None       # mutable, compared by value

    def __init__(self, *args, **kw):
        if len(args) > len(_FIELDS):
            raise TypeError(f"Config() takes at most {len(_FIELDS)} positional arguments")
        for (name, _), v in zip(_FIELDS, args):
            if name in kw:
                raise TypeError(f"Config() got multiple values for argument {name!r}")
            kw[name] = v
        for name, default in _FIELDS:
            v = kw.pop(name, default)
            if v is default and type(v) is list:
                v = list(v)
            setattr(self, name, v)
        if kw:
            raise TypeError(f"Config() got an unexpected keyword argument {next(iter(kw))!r}")

    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return tuple(getattr(self, n) for n in _NAMES) == \
                tuple(getattr(other, n) for n in _NAMES)
        return NotImplemented

    def __repr__(self):
        return "Config(%s)" % ", ".join(f"{n}={getattr(self, n)!r}" for n in _NAMES)

    def slurm_uid(self) -> int | None:
        return _uid_of(self.slurm_user)

    def reply_uid(self) -> int:
        """The uid the daemons answer as (ReplyUser; root when that user is unknown here)."""
        uid = _uid_of(self.reply_user)
        return 0 if uid is None else uid

    def reply_uids(self) -> frozenset[int]:
        return frozenset({0, self.reply_uid()})

    def serving_processes(self) -> int:
        """Processes that serve the caller-ID port (Processes; 0: one per CPU we may use)."""
        return self.processes or min(64, len(os.sched_getaffinity(0)))

    def node(self) -> str:
        if self.node_name:
            return self.node_name
        return os.uname().nodename.split(".")[0]


def _uid_of(name: str) -> int | None:
    if name is None or name == "":
        return None
    if name.isdigit():
        return int(name)
    import pwd
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


# key (lower case) -> (attribute, converter, check)
def _pos(x):
    return x > 0


_KEYS = {
    "port": ("port", int, lambda x: 0 < x < 65536),
    "listenaddresses": ("listen_addresses", _list, bool),
    "authtype": ("auth_type", lambda v: v.strip().lower(), lambda x: x in ("munge", "hmac")),
    "keyfile": ("key_file", str, bool),
    "mungesocket": ("munge_socket", str, bool),
    "mungettl": ("munge_ttl", int, _pos),
    "slurmuser": ("slurm_user", str, lambda x: True),
    "replyuser": ("reply_user", str, bool),
    "mungereplykey": ("munge_reply_key", _bool, lambda x: True),
    "mungesessionlifetime": ("munge_session_lifetime", float, lambda x: x == 0 or 10 <= x <= 3600),
    "nodename": ("node_name", str, lambda x: 0 < len(x) <= 64 and all(0x21 <= ord(c) < 0x7F for c in x)),
    "logunknownholder": ("log_unknown_holder", _bool, lambda x: True),
    "sockdiag": ("sock_diag", lambda v: v.strip().lower(), lambda x: x in ("netlink", "pyroute2", "no")),
    "cgrouproots": ("cgroup_roots", _list, lambda x: True),
    "slurmconf": ("slurm_conf", str, bool),
    "maxconnections": ("max_connections", int, _pos),
    "ratelimit": ("rate_limit", float, _pos),
    "rateburst": ("rate_burst", int, _pos),
    "rootshare": ("root_share", float, lambda x: 0 < x <= 1),
    "firstbytetimeout": ("first_byte_timeout", float, _pos),
    "requesttimeout": ("request_timeout", float, _pos),
    "connectiontimeout": ("connection_timeout", float, _pos),
    "maxclockskew": ("max_clock_skew", float, _pos),
    "workers": ("workers", int, lambda x: 0 < x <= 64),
    "processes": ("processes", int, lambda x: 0 <= x <= 64),
    "loglevel": ("log_level", lambda v: v.strip().lower(),
                 lambda x: x in ("debug", "info", "warning", "error")),
    "querytimeout": ("query_timeout", float, _pos),
    "reservedsourceport": ("reserved_source_port", _bool, lambda x: True),
}

KEY_NAMES = {
    "port": "Port", "listenaddresses": "ListenAddresses", "authtype": "AuthType",
    "keyfile": "KeyFile", "mungesocket": "MungeSocket", "mungettl": "MungeTTL",
    "slurmuser": "SlurmUser", "replyuser": "ReplyUser", "mungereplykey": "MungeReplyKey",
    "mungesessionlifetime": "MungeSessionLifetime", "nodename": "NodeName",
    "logunknownholder": "LogUnknownHolder", "sockdiag": "SockDiag", "cgrouproots": "CgroupRoots", "slurmconf": "SlurmConf",
    "maxconnections": "MaxConnections", "ratelimit": "RateLimit", "rateburst": "RateBurst",
    "rootshare": "RootShare", "firstbytetimeout": "FirstByteTimeout",
    "requesttimeout": "RequestTimeout", "connectiontimeout": "ConnectionTimeout",
    "maxclockskew": "MaxClockSkew", "workers": "Workers", "processes": "Processes",
    "loglevel": "LogLevel",
    "querytimeout": "QueryTimeout", "reservedsourceport": "ReservedSourcePort",
}

# Keys of the PAM decision service (pam_callerid/service.py, run inside `callerid daemon`):
# the same file, the same parser, one schema. Key -> (attribute, converter, check); the
# Pam<...> layout overrides are for non-standard installations and synthetic test nodes
# (passed to cgroups.discover). SlurmConf and NodeName above serve both.
_PAM_KEYS = {
    "PamSocket": ("pam_socket", str, os.path.isabs),
    "PamWorkers": ("pam_workers", int, lambda x: 0 < x <= 256),
    "PamNegativeCacheTTL": ("pam_negative_cache_ttl", float, lambda x: x >= 0),
    "PamCgroupConf": ("pam_cgroup_conf", str, os.path.isabs),
    "PamSpoolDir": ("pam_spool_dir", str, os.path.isabs),
    "PamCgroupRoot": ("pam_cgroup_root", str, bool),
    "PamCgroupPlugin": ("pam_cgroup_plugin", lambda v: v.strip().lower(),
                        lambda x: x in ("cgroup/v1", "cgroup/v2", "autodetect")),
    "PamV1Prefix": ("pam_v1_prefix", str, bool),
    "PamV2Scope": ("pam_v2_scope", str, bool),
    "PamUserCgroup": ("pam_user_cgroup", str, bool),
}
_KEYS.update((k.lower(), v) for k, v in _PAM_KEYS.items())
KEY_NAMES.update((k.lower(), k) for k in _PAM_KEYS)

# Metrics (daemon/metrics.py): a node_exporter textfile written every MetricsInterval s.
_METRICS_KEYS = {
    "MetricsFile": ("metrics_file", str, os.path.isabs),
    "MetricsInterval": ("metrics_interval", float, lambda x: 1 <= x <= 3600),
}
_KEYS.update((k.lower(), v) for k, v in _METRICS_KEYS.items())
KEY_NAMES.update((k.lower(), k) for k in _METRICS_KEYS)


def _parse_text(text: str, filename: str):
    from cgroups.conf import parse_conf_text     # the project's one slurm.conf-style reader
    try:
        return parse_conf_text(text, filename)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_config(text: str, filename: str = "<string>", *, strict: bool = False) -> Config:
    return config_from_entries(_parse_text(text, filename), filename, strict=strict)


def config_from_entries(entries, filename: str, *, strict: bool = False) -> Config:
    """A Config from already parsed ``(key, value, lineno)`` entries (the PAM module has the
    file parsed with cgroups.conf and need not read it twice)."""
    cfg = Config(source=filename)
    for key, value, lineno in entries:
        lk = key.lower()
        if lk == "include":
            raise ConfigError(f"{filename}:{lineno}: Include is not supported in callerid.conf")
        spec = _KEYS.get(lk)
        if spec is None:
            if not strict:
                cfg.unknown_keys.append(f"{filename}:{lineno}: {key}")
                continue
            raise ConfigError(f"{filename}:{lineno}: unknown key {key!r}")
        attr, conv, check = spec
        try:
            val = conv(value)
            ok = check(val)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{filename}:{lineno}: bad value for {KEY_NAMES[lk]}: {value!r} ({e})") from None
        if not ok:
            raise ConfigError(f"{filename}:{lineno}: bad value for {KEY_NAMES[lk]}: {value!r}")
        setattr(cfg, attr, val)
    return cfg


def load_config(path: str | None = None, *, required: bool = False, strict: bool = False) -> Config:
    """Load the config file.  A missing default file means defaults; a missing explicit file
    (or required=True) is an error."""
    explicit = path is not None
    path = path or os.environ.get("CALLERID_CONF") or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        if explicit or required:
            raise ConfigError(f"{path}: no such file") from None
        return Config(source="<defaults>")
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, path, strict=strict)


def config_field_names() -> list[str]:
    return list(_NAMES)
