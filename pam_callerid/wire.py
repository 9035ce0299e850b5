"""Local protocol v1 between pam_callerid.so (the C client in sshd) and the PAM decision
service in ``callerid daemon``: parsing and encoding only.

Strategy (as h11 does for HTTP): this module performs no I/O and keeps no state. It turns the
bytes of one SOCK_SEQPACKET message into a :class:`Request` (or raises :class:`WireError`) and
a :class:`Reply` into the bytes of one message. Sockets, credentials, timeouts and the fd
passed with SCM_RIGHTS belong to the caller (pam_callerid/service.py); the C client has its
own encoder and parser (pam_callerid.c), and the encoder of requests and the parser of replies
here exist for the tests and for tools that speak the protocol.

The request parser is strict, because its input comes from a socket: the first line must be
``callerid-pam 1``; every further line is ``key=value`` with a known key, single-valued keys at
most once, bounded sizes; UTF-8, no NUL, every line ends with ``\\n``; at most
:data:`MAX_MESSAGE` bytes. Anything else is a :class:`WireError` naming what is wrong.

Request (client -> service)::

    callerid-pam 1
    phase=account              account | session             (required)
    service=sshd               PAM_SERVICE                   (required, may be empty)
    user=alice                 PAM_USER                      (required, may be empty)
    rhost=10.199.3.254         PAM_RHOST                     (optional, may be empty)
    tty=ssh                    PAM_TTY                       (optional, may be empty)
    conn=SRC_IP SRC_PORT DST_IP DST_PORT   the TCP connection (optional)
    ssh_connection=...         SSH_CONNECTION                (optional)
    silent=1                   PAM_SILENT was passed         (optional)
    module=0.1.0               the client's version          (optional)
    arg=action_no_jobs=deny    each module argument, in order (repeatable)

Reply (service -> client)::

    callerid-pam 1
    rc=success                 success | ignore | perm_denied | session_err | system_err | auth_err
    error=text                 PAM_ERROR_MSG (repeatable)
    info=text                  PAM_TEXT_INFO unless silent (repeatable)
    env=SLURM_JOB_ID=12        pam_putenv (repeatable)
    setns=mnt                  setns(fd, CLONE_NEWNS) with the fd attached to the message
    setns_fail=perm_denied     rc when that setns fails (else rc stands)
    enter=3                    3 more fds attached (after setns's): cgroup v1 ``tasks`` files
                               of the job's extern step; the client writes "0" into each (it
                               enters them itself: cgroups.adoption.open_entry), then acks
    enter_fail=perm_denied     rc when a write fails (else rc stands)
    enter_error=text           PAM_ERROR_MSG when a write fails (once, optional)
    enter_info=text            PAM_TEXT_INFO when a write fails, unless silent (once, optional)

Acknowledgement (client -> service), only after a reply with ``enter=``, then the client
closes::

    callerid-pam 1
    entered=ok                 ok | "failed: <reason>" (at most MAX_TEXT characters)
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAGIC", "MAX_MESSAGE", "RCS", "WireError", "Conn", "Request", "Reply",
           "parse_request", "encode_request", "parse_reply", "encode_reply", "encode_ack",
           "parse_ack"]

MAGIC = "callerid-pam 1"
MAX_MESSAGE = 16384          # bytes, both directions; longer is malformed
PHASES = ("account", "session")
RCS = ("success", "ignore", "perm_denied", "session_err", "system_err", "auth_err")
MAX_ARGS = 64
MAX_TEXTS = 16               # error= / info= / env= lines in one reply
MAX_TEXT = 1024              # one error/info text, characters (longer texts are cut)
MAX_ENTER = 12               # enter=N: at most this many tasks files (v1 hierarchies)

# key -> maximum value length in bytes (UTF-8); "arg" is the only repeatable request key
_REQUEST_KEYS = {"phase": 16, "service": 255, "user": 255, "rhost": 1025, "tty": 255,
                 "conn": 128, "ssh_connection": 255, "silent": 1, "module": 64, "arg": 1024}
_REQUIRED = ("phase", "service", "user")


class WireError(ValueError):
    """A message that does not follow protocol v1; the text says what is wrong."""


@dataclass(frozen=True, slots=True)
class Conn:
    """The TCP connection sshd serves: ``src`` is the client's end, ``dst`` this node's.
    Addresses exactly as sent (an IPv4-mapped IPv6 address stays as it is)."""
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int

    def __str__(self):
        return f"{self.src_ip} {self.src_port} {self.dst_ip} {self.dst_port}"


@dataclass(frozen=True, slots=True)
class Request:
    phase: str
    service: str
    user: str
    rhost: str | None = None
    tty: str | None = None
    conn: Conn | None = None
    ssh_connection: str | None = None
    silent: bool = False
    args: tuple[str, ...] = ()
    module: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    rc: str
    errors: tuple[str, ...] = ()
    infos: tuple[str, ...] = ()
    env: tuple[str, ...] = ()          # "NAME=value"
    setns: str | None = None           # "mnt": the message carries the namespace fd
    setns_fail: str | None = None      # rc when setns fails
    enter: int = 0                     # tasks-file fds attached after the namespace fd
    enter_fail: str | None = None      # rc when entering them fails
    enter_error: str | None = None     # the user's messages when entering them fails
    enter_info: str | None = None


# ------------------------------------------------------------------------------ helpers
def _lines(data: bytes, what: str) -> list[str]:
    """The lines of one message (without their newlines), after the size, NUL, UTF-8 and
    framing checks common to both directions."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{what}: not bytes")
    data = bytes(data)
    if len(data) > MAX_MESSAGE:
        raise WireError(f"{what}: {len(data)} bytes, more than {MAX_MESSAGE}")
    if not data:
        raise WireError(f"{what}: empty message")
    if b"\0" in data:
        raise WireError(f"{what}: contains a NUL byte")
    if not data.endswith(b"\n"):
        raise WireError(f"{what}: truncated (does not end with a newline)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"{what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    lines = text[:-1].split("\n")
    if lines[0] != MAGIC:
        raise WireError(f"{what}: first line is {_show(lines[0])}, expected {MAGIC!r}")
    return lines[1:]


def _show(s: str, limit: int = 40) -> str:
    return repr(s if len(s) <= limit else s[:limit] + "...")


def _pairs(lines, what):
    for n, line in enumerate(lines, 2):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise WireError(f"{what}: line {n} is not key=value: {_show(line)}")
        yield n, key, value


def _port(s: str) -> int:
    if not (s.isascii() and s.isdigit() and 0 < len(s) <= 5) or not 0 < int(s) < 65536:
        raise ValueError(f"bad port {_show(s)}")
    return int(s)


def _ip(s: str) -> str:
    from _socket import AF_INET, AF_INET6, inet_pton   # C module: no socket package import
    for fam in (AF_INET, AF_INET6):
        try:
            inet_pton(fam, s)
            return s
        except (OSError, ValueError):
            pass
    raise ValueError(f"bad address {_show(s)}")


def parse_conn(value: str) -> Conn:
    """``"SRC_IP SRC_PORT DST_IP DST_PORT"`` -> :class:`Conn` (ValueError if malformed)."""
    parts = value.split(" ")
    if len(parts) != 4:
        raise ValueError("expected 'SRC_IP SRC_PORT DST_IP DST_PORT'")
    return Conn(_ip(parts[0]), _port(parts[1]), _ip(parts[2]), _port(parts[3]))


# ------------------------------------------------------------------------------ requests
def parse_request(data: bytes) -> Request:
    """One request message -> :class:`Request`; :class:`WireError` when malformed."""
    what = "request"
    fields: dict = {}
    args = []
    for n, key, value in _pairs(_lines(data, what), what):
        limit = _REQUEST_KEYS.get(key)
        if limit is None:
            raise WireError(f"{what}: line {n}: unknown key {_show(key)}")
        if len(value.encode()) > limit:
            raise WireError(f"{what}: line {n}: {key} longer than {limit} bytes")
        if key == "arg":
            if len(args) == MAX_ARGS:
                raise WireError(f"{what}: more than {MAX_ARGS} arg= lines")
            args.append(value)
            continue
        if key in fields:
            raise WireError(f"{what}: line {n}: {key} given twice")
        fields[key] = value
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise WireError(f"{what}: missing {', '.join(missing)}")
    if fields["phase"] not in PHASES:
        raise WireError(f"{what}: phase={_show(fields['phase'])}, expected account or session")
    if fields.get("silent", "1") != "1":
        raise WireError(f"{what}: silent={_show(fields['silent'])}, expected 1")
    conn = None
    if "conn" in fields:
        try:
            conn = parse_conn(fields["conn"])
        except ValueError as e:
            raise WireError(f"{what}: conn: {e}") from None
    return Request(fields["phase"], fields["service"], fields["user"], fields.get("rhost"),
                   fields.get("tty"), conn, fields.get("ssh_connection"), "silent" in fields,
                   tuple(args), fields.get("module"))


def _value(key: str, v: str) -> str:
    if "\n" in v or "\0" in v:
        raise ValueError(f"{key} value contains a newline or NUL: {_show(v)}")
    return v


def encode_request(req: Request) -> bytes:
    """The message the C client sends for ``req`` (tests and tools; ValueError if a value
    cannot be sent)."""
    out = [MAGIC, f"phase={req.phase}", f"service={_value('service', req.service)}",
           f"user={_value('user', req.user)}"]
    for key in ("rhost", "tty", "ssh_connection"):
        v = getattr(req, key)
        if v is not None:
            out.append(f"{key}={_value(key, v)}")
    if req.conn is not None:
        out.append(f"conn={req.conn}")
    if req.silent:
        out.append("silent=1")
    if req.module is not None:
        out.append(f"module={_value('module', req.module)}")
    out += [f"arg={_value('arg', a)}" for a in req.args]
    data = ("\n".join(out) + "\n").encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"request of {len(data)} bytes is longer than {MAX_MESSAGE}")
    return data


# ------------------------------------------------------------------------------ replies
def _text(s: str) -> str:
    """A user-visible text as one protocol value: control characters become spaces, at most
    MAX_TEXT characters."""
    s = "".join(c if c >= " " and c != "\x7f" else " " for c in str(s))
    return s[:MAX_TEXT]


def _env_ok(item: str) -> bool:
    name, sep, value = item.partition("=")
    return bool(sep and name and (name[0].isalpha() or name[0] == "_") and name.isascii()
                and all(c.isalnum() or c == "_" for c in name)
                and "\n" not in value and "\0" not in value)


def encode_reply(rep: Reply) -> bytes:
    """One reply message. Texts are sanitised (control characters, length); a bad rc, env
    item or count is a ValueError: those come from our own code, never from a peer."""
    if rep.rc not in RCS:
        raise ValueError(f"unknown rc {rep.rc!r}")
    if rep.setns not in (None, "mnt"):
        raise ValueError(f"unknown setns {rep.setns!r}")
    if rep.setns_fail is not None and (rep.setns is None or rep.setns_fail not in RCS):
        raise ValueError(f"setns_fail={rep.setns_fail!r} without a valid setns")
    if not 0 <= rep.enter <= MAX_ENTER:
        raise ValueError(f"enter={rep.enter}: 0..{MAX_ENTER}")
    if rep.enter_fail is not None and (not rep.enter or rep.enter_fail not in RCS):
        raise ValueError(f"enter_fail={rep.enter_fail!r} without a valid enter")
    if (rep.enter_error is not None or rep.enter_info is not None) and not rep.enter:
        raise ValueError("enter_error/enter_info without enter")
    for what, items in (("error", rep.errors), ("info", rep.infos), ("env", rep.env)):
        if len(items) > MAX_TEXTS:
            raise ValueError(f"more than {MAX_TEXTS} {what}= lines")
    bad = [e for e in rep.env if not _env_ok(e)]
    if bad:
        raise ValueError(f"bad env item {bad[0]!r}")
    out = [MAGIC, f"rc={rep.rc}"]
    out += [f"error={_text(t)}" for t in rep.errors]
    out += [f"info={_text(t)}" for t in rep.infos]
    out += [f"env={e}" for e in rep.env]
    if rep.setns is not None:
        out.append(f"setns={rep.setns}")
        if rep.setns_fail is not None:
            out.append(f"setns_fail={rep.setns_fail}")
    if rep.enter:
        out.append(f"enter={rep.enter}")
        if rep.enter_fail is not None:
            out.append(f"enter_fail={rep.enter_fail}")
        out += [f"{k}={_text(v)}" for k, v in (("enter_error", rep.enter_error),
                                               ("enter_info", rep.enter_info)) if v is not None]
    data = ("\n".join(out) + "\n").encode()
    if len(data) > MAX_MESSAGE:      # cannot happen with the bounds above; kept as a guard
        raise ValueError(f"reply of {len(data)} bytes is longer than {MAX_MESSAGE}")
    return data


def parse_reply(data: bytes) -> Reply:
    """One reply message -> :class:`Reply` (what the C client does; for tests and tools)."""
    what = "reply"
    single = {}
    lists = {"error": [], "info": [], "env": []}
    for n, key, value in _pairs(_lines(data, what), what):
        if key in lists:
            if len(lists[key]) == MAX_TEXTS:
                raise WireError(f"{what}: more than {MAX_TEXTS} {key}= lines")
            if key == "env" and not _env_ok(value):
                raise WireError(f"{what}: line {n}: bad env item {_show(value)}")
            lists[key].append(value)
            continue
        if key not in _REPLY_SINGLE:
            raise WireError(f"{what}: line {n}: unknown key {_show(key)}")
        if key in single:
            raise WireError(f"{what}: line {n}: {key} given twice")
        if _REPLY_SINGLE[key] is not None and value not in _REPLY_SINGLE[key]:
            raise WireError(f"{what}: line {n}: bad {key} {_show(value)}")
        single[key] = value
    if "rc" not in single:
        raise WireError(f"{what}: no rc")
    for fail, base in (("setns_fail", "setns"), ("enter_fail", "enter"),
                       ("enter_error", "enter"), ("enter_info", "enter")):
        if fail in single and base not in single:
            raise WireError(f"{what}: {fail} without {base}")
    return Reply(single["rc"], tuple(lists["error"]), tuple(lists["info"]), tuple(lists["env"]),
                 single.get("setns"), single.get("setns_fail"), int(single.get("enter", 0)),
                 single.get("enter_fail"), single.get("enter_error"), single.get("enter_info"))


# key -> the values it may take (None: any text), for the reply's single-valued keys
_REPLY_SINGLE = {"rc": RCS, "setns": ("mnt",), "setns_fail": RCS, "enter_fail": RCS,
                 "enter": tuple(str(n) for n in range(1, MAX_ENTER + 1)),
                 "enter_error": None, "enter_info": None}


# ------------------------------------------------------------------------------ the ack
def encode_ack(failure: str | None) -> bytes:
    """The client's acknowledgement of ``enter=``: None = entered every cgroup (tests and
    tools; the C client has its own encoder)."""
    value = "ok" if failure is None else "failed: " + _text(failure)
    return f"{MAGIC}\nentered={value}\n".encode()


def parse_ack(data: bytes) -> str | None:
    """One acknowledgement -> None when the client entered every cgroup, else its reason;
    :class:`WireError` when malformed."""
    lines = _lines(data, "ack")
    if len(lines) != 1 or not lines[0].startswith("entered="):
        raise WireError("ack: expected exactly one entered= line")
    value = lines[0][len("entered="):]
    if value == "ok":
        return None
    if not value.startswith("failed: ") or len(value) > MAX_TEXT + 8:
        raise WireError(f"ack: bad entered= value {_show(value)}")
    return value[len("failed: "):]
