"""Does pam_callerid.so surely run in the session phase of a PAM service?

The account phase may answer before its adoption has finished only if the session phase of
the same login will wait for it: sshd forks the user's side right after the session phase,
and a process forked before the adoption would stay outside the job. So the daemon reads the
service's PAM configuration as libpam does (``/etc/pam.d/<service>``, its ``@include`` lines
and ``include`` / ``substack`` entries) and answers yes only when every path through the
session stack reaches the module: no ``sufficient`` line and no ``done`` action before it
(either can end the stack with success first), no jump that can skip it. A stack that ends
with a failure before it is harmless (sshd then starts no session). Anything it cannot read
or parse is a no: the account phase then adopts before it answers, as always.

``session_reaches`` is pure; ``SessionStacks`` reads the files (root-owned regular files,
bounded size: settings.read_regular) and keeps each answer until one of the files read
changes (settings.stamp).

Also here, the other facts about where libpam finds the module: ``module_dir`` (the
directory of the system's modules) and ``IDENT`` (the version string built into the module,
so that ``callerid check`` can tell which version is installed).
"""
from __future__ import annotations

import os

from .settings import SettingsError, read_regular, stamp

PAM_DIR = "/etc/pam.d"
MODULE = "pam_callerid.so"
IDENT = "slurm-callerid pam_callerid.so version "    # + VERSION, NUL-terminated, in the .so
MAX_FILE = 65536
MAX_DEPTH = 8
_CONTROLS = ("required", "requisite", "optional", "sufficient", "include", "substack")


def module_dirs(multiarch: str) -> list[str]:
    """The directories that may hold the system's PAM modules, most specific first (Debian:
    /lib/<multiarch>/security; EL: /usr/lib64/security)."""
    out = [f"/lib/{multiarch}/security", f"/usr/lib/{multiarch}/security"] if multiarch else []
    return out + ["/lib64/security", "/usr/lib64/security", "/lib/security", "/usr/lib/security"]


def module_dir(multiarch: str) -> str | None:
    """The system's PAM module directory: the first of module_dirs holding pam_unix.so."""
    for d in module_dirs(multiarch):
        if os.path.isfile(os.path.join(d, "pam_unix.so")):
            return d
    return None


class PamConfError(ValueError):
    """A configuration we do not follow (the caller treats the answer as no)."""


def lines(text):
    """The entries of one PAM file: [(type, control, module, args)], comments and blank
    lines dropped, continuation lines joined, a bracketed control kept whole."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("@include"):
            out.append(("@include", "include", line.split()[1], ()))
            continue
        kind, _, rest = line.replace("\t", " ").partition(" ")
        rest = rest.strip()
        if not rest:
            raise PamConfError("no control in %r" % line)
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise PamConfError("unclosed [ in %r" % line)
            control, rest = rest[:end + 1], rest[end + 1:].split()
        else:
            control, *rest = rest.split()
        if not rest:
            raise PamConfError("no module in %r" % line)
        out.append((kind.lstrip("-"), control, rest[0], tuple(rest[1:])))
    return out


def session_reaches(service, read, module=MODULE):
    """Whether every path through ``service``'s session stack runs ``module``; ``read(name)``
    returns a PAM file's text. Raises PamConfError on what it cannot follow."""
    stack = _session(service, read, 0)
    for i, (control, mod) in enumerate(stack):
        if os.path.basename(mod) == module:
            return all(_cannot_skip(c, k, i) for k, (c, _) in enumerate(stack[:i]))
    return False


def _session(name, read, depth):
    """The session entries of a file with its includes inlined: [(control, module)]."""
    if depth > MAX_DEPTH:
        raise PamConfError("includes nested deeper than %d" % MAX_DEPTH)
    out = []
    for kind, control, mod, _ in lines(read(name)):
        if kind == "@include":
            out += _session(mod, read, depth + 1)
        elif kind != "session":
            continue
        elif control in ("include", "substack"):
            out += _session(mod, read, depth + 1)
        elif control in _CONTROLS or control.startswith("["):
            out.append((control, mod))
        else:
            raise PamConfError("unknown control %r" % control)
    return out


def _cannot_skip(control, k, target):
    """Line ``k``'s control can neither end the stack with success nor jump past line
    ``target``."""
    if control == "sufficient":
        return False
    if not control.startswith("["):
        return True
    for item in control[1:-1].split():
        _, _, action = item.partition("=")
        if action == "done" or action.isdigit() and k + int(action) >= target:
            return False
    return True


class SessionStacks:
    """``reaches(service)`` -> bool, from the files under ``pam_dir``, cached until one of
    the files read changes (checked with one stat per file and call)."""

    def __init__(self, pam_dir=PAM_DIR):
        self.pam_dir = pam_dir
        self._cache = {}             # service -> (answer, [stamp of each file read])

    def reaches(self, service):
        hit = self._cache.get(service)
        if hit is not None and all(stamp(s[0]) == s for s in hit[1]):
            return hit[0]
        seen = []
        try:
            answer = session_reaches(service, lambda name: self._read(name, seen))
        except (PamConfError, SettingsError):
            answer = False
        if len(self._cache) < 64:
            self._cache[service] = (answer, seen)
        return answer

    def _read(self, name, seen):
        if not name or "/" in name and not name.startswith(self.pam_dir + "/"):
            raise PamConfError("file %r outside %s" % (name, self.pam_dir))
        path = name if name.startswith("/") else os.path.join(self.pam_dir, name)
        seen.append(stamp(path))          # before reading: a change meanwhile shows later
        return read_regular(path, MAX_FILE, root_only=True)
