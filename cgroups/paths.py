"""Pure logic: /proc/PID/cgroup parsing, Slurm path recognition, mount table parsing,
hostlists, %n/%h expansion, the "newest" rule (the project's one definition of it: every
package that picks among several jobs uses :func:`newest`). No I/O here.
"""
from dataclasses import dataclass, field

from .errors import CgroupError

# The extern step's id (slurm.h SLURM_EXTERN_CONT): it appears numerically in the name of
# its stepd socket <spool>/<node>_<job>.4294967292.
SLURM_EXTERN_CONT = 0xFFFFFFFC      # 4294967292

MAX_PROC_CGROUP_CHARS = 1 << 20   # /proc/PID/cgroup is a few hundred bytes; refuse more

_SLUID_CHARS = frozenset("0123456789ABCDEFGHJKMNPQRSTVWXYZ")  # Crockford base32, upper


def _dec(s, maxlen=10):
    """True if s is 1..maxlen ASCII decimal digits (str.isdigit alone accepts other digits)."""
    return 0 < len(s) <= maxlen and s.isascii() and s.isdigit()


def is_sluid(c):
    """Slurm 26.05 SLUID directory name: "s" + Crockford base32 (e.g. sEKNKTV3WPV500)."""
    return 9 <= len(c) <= 25 and c[0] == "s" and all(ch in _SLUID_CHARS for ch in c[1:])


def _step_of(c):
    """'step_extern' -> 'extern', 'step_0+1' -> '0+1', else None."""
    if not c.startswith("step_"):
        return None
    s = c[5:]
    if s in ("extern", "batch", "interactive"):
        return s
    a, plus, b = s.partition("+")
    if _dec(a) and (not plus or _dec(b)):
        return s
    return None


def _task_of(c):
    if c.startswith("task_") and (c == "task_special" or _dec(c[5:])):
        return c[5:]
    return None


class CgroupParseError(CgroupError, ValueError):
    """Text that should come from the kernel (/proc/PID/cgroup, /proc/self/mounts) is malformed."""


@dataclass(frozen=True, slots=True)
class JobRef:
    """Where a process sits in Slurm's cgroup tree, as read from one /proc/PID/cgroup line.

    job_id   int, or None when the job directory is a Slurm 26.05 SLUID (see ``sluid``)
    sluid    the opaque SLUID directory name, or None
    step     "extern", "batch", "interactive", "<n>" or "<n>+<het>", or None (job level,
             where v1 slurmstepds sit in freezer)
    task     "<n>", "special", or None; "slurm" for v2's step_*/slurm (the stepd itself)
    uid      owner from v1's uid_<U> component, None on v2
    node     node name from the prefix (slurm_<node> / <node>_slurmstepd.scope), or None
    version  1 or 2
    cgroup   the cgroup path from the line (relative to the hierarchy root)
    controller  the v1 controller list of that line ("freezer"), "" for v2
    """

    job_id: int | None
    sluid: str | None
    step: str | None
    task: str | None
    uid: int | None
    node: str | None
    version: int
    cgroup: str
    controller: str

    def __str__(self):
        if self.job_id is None:
            j = (f"job with SLUID {self.sluid} (numeric job id unknown: Slurm 26.05+ "
                 f"cgroup/v2 without CgroupJobIdPaths=yes)")
        else:
            j = f"job {self.job_id}"
        s = f" step {self.step}" if self.step else ""
        return f"{j}{s} ({self.cgroup})"


def parse_proc_cgroup(text):
    """Parse /proc/PID/cgroup text into ``[(hierarchy_id, controllers, path)]``.

    ``controllers`` is the comma list as written ("" for the v2 line "0::/..."). Raises
    :class:`CgroupParseError` with the line number for malformed lines or oversized input.
    """
    if len(text) > MAX_PROC_CGROUP_CHARS:
        raise CgroupParseError(f"/proc/PID/cgroup text too large ({len(text)} chars)")
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        hid, sep1, rest = line.partition(":")
        ctrls, sep2, path = rest.partition(":")
        if not sep1 or not sep2 or not hid.isdigit() or not path.startswith("/") \
                or "\x00" in line:
            raise CgroupParseError(
                f"/proc/PID/cgroup line {n}: expected 'ID:CONTROLLERS:/PATH', got {line[:80]!r}")
        out.append((int(hid), ctrls, path))
    return out


def match_slurm_path(path, version=None):
    """Recognise a Slurm job cgroup path (pure). Returns ``(fields dict)`` or None.

    v1: ``.../slurm[_<node>]/uid_<U>/<jobdir>[/step_<S>[/task_<N>...]]``
    v2: ``.../[<node>_]slurmstepd.scope/<jobdir>[/step_<S>[/slurm|/user[/task_<N>]]]``
    ``<jobdir>`` is ``job_<J>`` or a SLUID. Leading components (a container's or a test's
    root) are allowed. ``version`` restricts the match to 1 or 2.
    """
    comps = path.split("/")
    n = len(comps)
    for i, c in enumerate(comps):
        if version != 2 and (c == "slurm" or c.startswith("slurm_")) and i + 2 < n:
            cu = comps[i + 1]
            if not (cu.startswith("uid_") and _dec(cu[4:])):
                continue
            jf = _jobdir(comps[i + 2])
            if jf is None:
                continue
            step = task = None
            if i + 3 < n:
                step = _step_of(comps[i + 3])
                if step is None:
                    continue
                if i + 4 < n:
                    task = _task_of(comps[i + 4])
            node = c[6:] if c.startswith("slurm_") else None
            return dict(job_id=jf[0], sluid=jf[1], step=step, task=task, uid=int(cu[4:]),
                        node=node or None, version=1)
        if version != 1 and c.endswith("slurmstepd.scope") and i + 1 < n:
            if c == "slurmstepd.scope":
                node = None
            elif c.endswith("_slurmstepd.scope") and len(c) > len("_slurmstepd.scope"):
                node = c[:-len("_slurmstepd.scope")]
            else:
                continue
            jf = _jobdir(comps[i + 1])
            if jf is None:
                continue   # e.g. the "system" waiting area of new stepds
            step = task = None
            if i + 2 < n:
                step = _step_of(comps[i + 2])
                if step is None:
                    continue
                if i + 3 < n:
                    if comps[i + 3] == "slurm":
                        task = "slurm"
                    elif comps[i + 3] == "user" and i + 4 < n:
                        task = _task_of(comps[i + 4])
            return dict(job_id=jf[0], sluid=jf[1], step=step, task=task, uid=None,
                        node=node, version=2)
    return None


def _jobdir(c):
    if c.startswith("job_") and _dec(c[4:]):
        return int(c[4:]), None
    if is_sluid(c):
        return None, c
    return None


# freezer is what proctrack/cgroup uses: its answer wins when v1 controllers disagree
_V1_PRIORITY = ("freezer", "cpuset", "devices", "cpuacct", "cpu,cpuacct", "memory", "pids")


def job_from_proc_cgroup(text, node=None):
    """Pure: the Slurm job a process belongs to, from its /proc/PID/cgroup text.

    Returns a :class:`JobRef` or None (not in a Slurm job). Lines are tried in order:
    v1 freezer, the other v1 controllers, then the v2 line. ``node`` (optional) keeps only
    matches whose prefix names that node (or names no node). Raises CgroupParseError on
    malformed text.
    """
    entries = parse_proc_cgroup(text)

    def rank(e):
        if e[1] == "":
            return 100
        try:
            return _V1_PRIORITY.index(e[1])
        except ValueError:
            return 50
    for hid, ctrls, path in sorted(entries, key=rank):
        if path == "/":
            continue
        f = match_slurm_path(path, 2 if ctrls == "" else 1)
        if f is None:
            continue
        if node is not None and f["node"] not in (None, node):
            continue
        return JobRef(cgroup=path, controller=ctrls, **f)
    return None


def _unescape_mount(s):
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        esc = s[i + 1:i + 4]
        if s[i] == "\\" and len(esc) == 3 and all(c in "01234567" for c in esc):
            out.append(chr(int(esc, 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


_NOT_CONTROLLERS = frozenset("""rw ro relatime norelatime noatime nodiratime strictatime nosuid
 suid nodev dev noexec exec sync async lazytime noacl nsdelegate memory_localevents
 memory_recursiveprot clone_children cpuset_v2_mode noprefix favordynmods""".split())


@dataclass(slots=True)
class Mounts:
    """cgroup mounts: ``v1`` = {controller: mountpoint} (first mount wins, named hierarchies
    as "name=systemd"), ``v2`` = [mountpoints of cgroup2]."""

    v1: dict = field(default_factory=dict)
    v2: list = field(default_factory=list)


def parse_mounts(text):
    """Parse /proc/self/mounts (or /proc/mounts) text into :class:`Mounts` (pure).

    Lines that are not cgroup mounts are ignored; malformed cgroup lines raise
    CgroupParseError naming the line.
    """
    m = Mounts()
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        f = line.split()
        if len(f) < 3 or f[2] not in ("cgroup", "cgroup2"):
            continue
        if len(f) < 4:
            raise CgroupParseError(f"mount table line {n}: missing options: {line[:80]!r}")
        mp = _unescape_mount(f[1])
        if f[2] == "cgroup2":
            m.v2.append(mp)
            continue
        for opt in f[3].split(","):
            if not opt or opt in _NOT_CONTROLLERS or opt.startswith("release_agent=") \
                    or opt.startswith("xattr"):
                continue
            m.v1.setdefault(opt, mp)
    return m


def expand_hostlist(expr, limit=100000):
    """Expand a Slurm hostlist ("n[1-3,5],login[01-02]x") into names (pure).

    Raises ValueError for malformed brackets or more than ``limit`` names.
    """
    out = []
    for part in _split_top(expr):
        if not part:
            continue
        names = [""]
        i = 0
        while i < len(part):
            c = part[i]
            if c == "[":
                j = part.find("]", i)
                if j < 0:
                    raise ValueError(f"unbalanced '[' in hostlist {expr!r}")
                alts = []
                for rng in part[i + 1:j].split(","):
                    a, dash, b = rng.partition("-")
                    if not a.isdigit() or (dash and not b.isdigit()):
                        raise ValueError(f"bad range {rng!r} in hostlist {expr!r}")
                    lo, hi = int(a), int(b) if dash else int(a)
                    if hi < lo or hi - lo > limit:
                        raise ValueError(f"bad range {rng!r} in hostlist {expr!r}")
                    w = len(a)
                    alts.extend(str(k).zfill(w) for k in range(lo, hi + 1))
                if len(names) * len(alts) > limit:
                    raise ValueError(f"hostlist {expr!r} expands to more than {limit} names")
                names = [p + a for p in names for a in alts]
                i = j + 1
            elif c == "]":
                raise ValueError(f"unbalanced ']' in hostlist {expr!r}")
            else:
                names = [p + c for p in names]
                i += 1
        out.extend(names)
        if len(out) > limit:
            raise ValueError(f"hostlist {expr!r} expands to more than {limit} names")
    return out


def _split_top(expr):
    parts, depth, cur = [], 0, []
    for c in expr:
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def expand_node_pattern(s, nodename, hostname=None):
    """Expand slurmd's ``%n`` (node name) and ``%h`` (host name) in a path (pure)."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "%" and i + 1 < len(s):
            d = s[i + 1]
            if d == "n":
                out.append(nodename)
            elif d == "h":
                out.append(hostname if hostname is not None else nodename)
            elif d == "%":
                out.append("%")
            else:
                out.append(s[i:i + 2])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def newest(jobs):
    """The job to pick when several qualify: latest start time, ties to the larger job id
    (Slurm 26.05's rule). ``jobs`` need ``.start_time`` and ``.job_id``; None if empty."""
    best = None
    for j in jobs:
        if best is None or (j.start_time, j.job_id) > (best.start_time, best.job_id):
            best = j
    return best
