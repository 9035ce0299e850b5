"""Generic parser for slurm.conf-style files (slurm.conf, cgroup.conf, our callerid.conf).

Syntax accepted (the subset of Slurm's own parser that configuration files in the wild use):

* ``Key=Value`` pairs; keys are ``[A-Za-z0-9_]+`` and compared case-insensitively; blanks are
  allowed around ``=``; several pairs may share one line (``NodeName=n1 NodeAddr=10.0.0.1``).
* Values end at the next blank unless double-quoted (``Key="a b"``); ``Key=`` is an empty value.
* ``#`` starts a comment anywhere outside quotes; ``\\#`` is a literal ``#``.
* A line ending in ``\\`` continues on the next line (the joined line keeps the first line's
  number for error messages).
* ``Include <path>`` (keyword case-insensitive, path may be quoted, may contain glob
  characters; relative paths are relative to the including file's directory) is resolved by
  :func:`load_conf`; :func:`parse_conf_text` returns it as the entry ``("Include", path, lineno)``.

Every syntax error raises :class:`cgroups.errors.ConfError` naming the file and line.

Public API::

    parse_conf_text(text, filename="<string>") -> list[tuple[str, str, int]]
    parse_conf_lines(text, filename="<string>") -> list[ConfLine]
    load_conf(path, *, max_bytes=16 MiB) -> Conf
    Conf: get(key, default=None), conf[key], key in conf, lines(key),
          where(key) -> (filename, lineno), items(), keys(), entries()
    parse_bool(value, *, prefix=False) -> True | False | None

This module depends on the standard library only (it is also used by the daemon).
"""
import os

from .errors import ConfError

__all__ = ["ConfError", "ConfLine", "Conf", "parse_conf_text", "parse_conf_lines", "load_conf",
           "parse_bool"]

MAX_BYTES = 16 * 1024 * 1024
MAX_INCLUDE_DEPTH = 16
_KEYCHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_BLANKS = " \t\r\f\v"


class ConfLine:
    """One logical line: its ``(key, value)`` pairs in order, file name and first line number."""

    __slots__ = ("pairs", "filename", "lineno")

    def __init__(self, pairs, filename, lineno):
        self.pairs = pairs
        self.filename = filename
        self.lineno = lineno

    @property
    def key(self):
        """The first key of the line (``NodeName`` on a node line)."""
        return self.pairs[0][0]

    def as_dict(self):
        """The pairs as a dict with lower-cased keys (later duplicates win)."""
        return {k.lower(): v for k, v in self.pairs}

    def __repr__(self):
        return f"ConfLine({self.pairs!r}, {self.filename!r}, {self.lineno})"


# The one boolean vocabulary of the project: Slurm's (src/common/parse_value.c,
# s_p_handle_boolean, 22.05 and 24.11: yes/up/true/1, no/down/false/0, case-insensitive) plus
# on/off, which the daemon's configuration always accepted.
TRUE_WORDS = ("1", "yes", "true", "on", "up")
FALSE_WORDS = ("0", "no", "false", "off", "down")
_BOOL_WORDS = tuple((w, True) for w in TRUE_WORDS) + tuple((w, False) for w in FALSE_WORDS)


def parse_bool(value, *, prefix=False):
    """The boolean a configuration word means: True, False, or None when it is none of
    :data:`TRUE_WORDS` / :data:`FALSE_WORDS` (case-insensitive, surrounding blanks ignored).

    ``prefix=True`` is pam_slurm_adopt's way of reading module arguments (``xstrncasecmp``
    against the word's length): the value only has to start with a word, so ``yes_please``
    is True. The caller decides what None means (an error, or keep the default).
    """
    if not isinstance(value, str):
        return None
    v = value.strip(_BLANKS).lower()
    for word, meaning in _BOOL_WORDS:
        if v == word or (prefix and v.startswith(word)):
            return meaning
    return None


def _strip_comment(line, filename, lineno):
    """Remove a ``#`` comment outside double quotes; ``\\#`` becomes ``#``."""
    i = line.find("#")
    if i < 0:
        return line
    if '"' not in line and "\\" not in line:   # the usual case: the first # starts it
        return line[:i]
    out = []
    i, n, quoted = 0, len(line), False
    while i < n:
        c = line[i]
        if c == "\\" and i + 1 < n and line[i + 1] == "#":
            out.append("#")
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            break
        out.append(c)
        i += 1
    return "".join(out)


def _logical_lines(text, filename):
    """Yield (first_lineno, text) with comments removed and continuations joined."""
    pending, start = None, 0
    for lineno, raw in enumerate(text.split("\n"), 1):
        if "\x00" in raw:
            raise ConfError(filename, lineno, "NUL byte in configuration line")
        line = _strip_comment(raw, filename, lineno).rstrip(_BLANKS)
        if pending is not None:
            line = pending + line
        else:
            start = lineno
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = None
        if line.strip(_BLANKS):
            yield start, line
    if pending is not None and pending.strip(_BLANKS):
        yield start, pending


def _parse_pairs(line, filename, lineno):
    pairs = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _BLANKS:
            i += 1
        if i >= n:
            return pairs
        k0 = i
        while i < n and line[i] in _KEYCHARS:
            i += 1
        key = line[k0:i]
        if not key:
            raise ConfError(filename, lineno, f"expected Key=Value, found {_show(line[k0:])}")
        # "Include path" (only as the first word of a line)
        if not pairs and key.lower() == "include" and i < n and line[i] in _BLANKS \
                and not line[i:].lstrip(_BLANKS).startswith("="):
            rest = line[i:].strip(_BLANKS)
            if rest.startswith('"'):
                if len(rest) < 2 or not rest.endswith('"'):
                    raise ConfError(filename, lineno, "unterminated quote in Include")
                rest = rest[1:-1]
            if not rest:
                raise ConfError(filename, lineno, "Include without a file name")
            return [("Include", rest)]
        while i < n and line[i] in _BLANKS:
            i += 1
        if i >= n or line[i] != "=":
            raise ConfError(filename, lineno,
                            f"expected '=' after key {key!r}, found {_show(line[i:]) if i < n else 'end of line'}")
        i += 1
        eq = i
        while i < n and line[i] in _BLANKS:
            i += 1
        if i > eq and _starts_pair(line, i):
            # "Key= Other=1": blanks after '=' followed by another pair -> empty value
            pairs.append((key, ""))
            continue
        if i < n and line[i] == '"':
            end = line.find('"', i + 1)
            if end < 0:
                raise ConfError(filename, lineno, f"unterminated quote in value of {key!r}")
            value = line[i + 1:end]
            i = end + 1
            if i < n and line[i] not in _BLANKS:
                raise ConfError(filename, lineno,
                                f"unexpected text after quoted value of {key!r}: {_show(line[i:])}")
        else:
            v0 = i
            while i < n and line[i] not in _BLANKS:
                i += 1
            value = line[v0:i]
            if '"' in value:
                raise ConfError(filename, lineno, f"stray quote in value of {key!r}: {_show(value)}")
        pairs.append((key, value))


def _starts_pair(line, i):
    j, n = i, len(line)
    while j < n and line[j] in _KEYCHARS:
        j += 1
    return j > i and j < n and line[j] == "="


def _show(s, limit=40):
    s = s.strip()
    return repr(s if len(s) <= limit else s[:limit] + "...")


def parse_conf_lines(text, filename="<string>"):
    """Parse configuration text into :class:`ConfLine` objects (pure, no I/O, no Include)."""
    if not isinstance(text, str):
        raise TypeError("text must be str")
    return [ConfLine(_parse_pairs(line, filename, lineno), filename, lineno)
            for lineno, line in _logical_lines(text, filename)]


def parse_conf_text(text, filename="<string>"):
    """Parse configuration text into a flat list of ``(key, value, lineno)``.

    Keys keep their spelling from the file (compare them with ``.lower()``). Pairs that share a
    line share its ``lineno``. ``Include`` lines are returned as ``("Include", path, lineno)``
    and not followed (see :func:`load_conf`). Raises :class:`ConfError` on syntax errors.
    """
    return [(k, v, cl.lineno) for cl in parse_conf_lines(text, filename) for k, v in cl.pairs]


class Conf:
    """Parsed configuration with case-insensitive lookups; the last occurrence of a key wins
    (as in Slurm). Also keeps every line for multi-pair lines such as ``NodeName=...``."""

    def __init__(self, conflines=(), filenames=()):
        self._lines = list(conflines)
        self.filenames = list(filenames)
        self._last = {}
        for cl in self._lines:
            for k, v in cl.pairs:
                self._last[k.lower()] = (k, v, cl)

    def __getitem__(self, key):
        return self._last[key.lower()][1]

    def __contains__(self, key):
        return isinstance(key, str) and key.lower() in self._last

    def __len__(self):
        return len(self._last)

    def __iter__(self):
        return (k for k, _, _ in self._last.values())

    def keys(self):
        return list(self)

    def items(self):
        return [(k, v) for k, v, _ in self._last.values()]

    def get(self, key, default=None):
        hit = self._last.get(key.lower())
        return default if hit is None else hit[1]

    def lines(self, key=None):
        """Logical lines whose first key is ``key`` (all lines if None), in file order."""
        if key is None:
            return list(self._lines)
        low = key.lower()
        return [cl for cl in self._lines if cl.pairs[0][0].lower() == low]

    def entries(self):
        """Every setting in file order as ``(key, value, lineno)`` (the key as written)."""
        return [(k, v, cl.lineno) for cl in self._lines for k, v in cl.pairs]

    def where(self, key):
        """``(filename, lineno)`` of the effective (last) setting of ``key``, or None."""
        hit = self._last.get(key.lower())
        return None if hit is None else (hit[2].filename, hit[2].lineno)

    def __repr__(self):
        return f"Conf({dict(self.items())!r})"


def _read_text(path, max_bytes, from_file=None, from_line=None):
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        if from_file is not None:
            raise ConfError(from_file, from_line, f"included file {path} does not exist") from None
        raise ConfError(path, None, "file does not exist") from None
    except IsADirectoryError:
        raise ConfError(from_file or path, from_line, f"{path} is a directory, not a file") from None
    except PermissionError:
        raise ConfError(from_file or path, from_line, f"permission denied reading {path}") from None
    except OSError as e:
        raise ConfError(from_file or path, from_line, f"cannot read {path}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise ConfError(path, None, f"file larger than {max_bytes} bytes, refusing to parse")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise ConfError(path, lineno, "not valid UTF-8 text") from None


def _load(path, max_bytes, depth, out_lines, out_files, stack, from_file=None, from_line=None):
    real = os.path.realpath(path)
    if real in stack:
        raise ConfError(from_file, from_line, f"Include loop: {path} includes itself")
    if depth > MAX_INCLUDE_DEPTH:
        raise ConfError(from_file, from_line, f"Include nested deeper than {MAX_INCLUDE_DEPTH}")
    text = _read_text(path, max_bytes, from_file, from_line)
    out_files.append(path)
    stack.append(real)
    base = os.path.dirname(os.path.abspath(path))
    for cl in parse_conf_lines(text, path):
        if len(cl.pairs) == 1 and cl.pairs[0][0].lower() == "include":
            target = cl.pairs[0][1]
            if not target:
                raise ConfError(path, cl.lineno, "Include without a file name")
            if not os.path.isabs(target):
                target = os.path.join(base, target)
            if any(c in target for c in "*?["):
                import glob
                matches = sorted(glob.glob(target))
                # like a shell: a glob that matches nothing includes nothing
            else:
                matches = [target]
            for m in matches:
                _load(m, max_bytes, depth + 1, out_lines, out_files, stack, path, cl.lineno)
        else:
            out_lines.append(cl)
    stack.pop()


def load_conf(path, *, max_bytes=MAX_BYTES):
    """Read and parse ``path`` (following ``Include``) into a :class:`Conf`.

    Raises :class:`ConfError` (file and line in the message) for unreadable files, syntax
    errors, include loops and files larger than ``max_bytes``.
    """
    lines, files = [], []
    _load(os.fspath(path), max_bytes, 0, lines, files, [])
    return Conf(lines, files)
