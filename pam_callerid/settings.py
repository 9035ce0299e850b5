"""What the PAM service reads from files, parsed once and reused until a file changes.

A :class:`Settings` holds one callerid.conf (``daemon.config.Config``: the one schema of
keys), the slurm.conf it leads to (``SlurmConf``, else found as slurmd does: configless places
first, see ``cgroups.layout``), the discovered Slurm layout, and, on first use, the caller-ID
authenticator and whether slurm.conf names this host as a compute node.

Freshness: every login stats the files the settings came from (callerid.conf, slurm.conf,
cgroup.conf, job_container.conf: ~5 µs each) and re-reads them when one changed (mtime, size,
inode); the job list itself is never cached (the service lists jobs at every login, so a job
that started a moment ago is seen). A discovery that failed is not cached: the next login
tries again.

Files are opened without following a FIFO's promise: callerid.conf must be a regular file
(a FIFO planted at ``config=`` is refused at once, never waited on).
"""
from __future__ import annotations

import os
import stat as _stat
import threading

from .options import DEFAULT_CONFIG

MAX_CONFIG_BYTES = 1 << 20


class SettingsError(Exception):
    """The configuration cannot be used; the text names the file and the problem."""


def stamp(path):
    """What tells that a file changed: (path, inode, size, mtime), or (path, None)."""
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_ino, st.st_size, st.st_mtime_ns)


def read_regular(path, limit=MAX_CONFIG_BYTES, root_only=False):
    """The text of a regular file (UTF-8); a FIFO, device or directory there is refused
    without blocking. ``root_only``: also a symlink, or a file root does not own."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags | (os.O_NOFOLLOW if root_only else 0))
    except OSError as e:
        raise SettingsError(f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            raise SettingsError(f"{path}: not a regular file")
        if root_only and st.st_uid != 0:
            raise SettingsError(f"{path}: not owned by root")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SettingsError(f"{path}: larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None


def load_config(path, required):
    """(daemon Config, set of lower-case keys given). A missing file that is not
    ``required`` means defaults."""
    from cgroups.conf import parse_conf_text
    from daemon.config import Config, ConfigError, config_from_entries
    if not required and not os.path.exists(path):
        return Config(source="<defaults>"), set()
    text = read_regular(path)
    try:
        entries = parse_conf_text(text, path)
        return config_from_entries(entries, path), {k.lower() for k, _, _ in entries}
    except (ConfigError, ValueError) as e:
        raise SettingsError(str(e)) from None


class Settings:
    """One callerid.conf and what it leads to (see the module docstring)."""

    def __init__(self, path, cfg, given, nodename):
        self.path, self.cfg, self.given, self.nodename = path, cfg, given, nodename
        self.slurm_conf = None
        self.layout = None
        self.stamp = None
        self._auth = None
        self._compute_node = None
        self._lock = threading.Lock()

    def slurm_conf_path(self):
        """SlurmConf when given, else the first of slurmd's places that exists."""
        if "slurmconf" in self.given:
            return self.cfg.slurm_conf
        from cgroups.layout import find_slurm_conf, slurm_conf_candidates
        return find_slurm_conf(slurm_conf_candidates(self.cfg.pam_spool_dir))

    def files(self, slurm_conf):
        d = os.path.dirname(os.path.abspath(slurm_conf))
        return (self.path, slurm_conf, self.cfg.pam_cgroup_conf or f"{d}/cgroup.conf",
                f"{d}/job_container.conf")

    def discover(self, slurm_conf):
        import cgroups
        c = self.cfg
        self.layout = cgroups.discover(
            slurm_conf=slurm_conf, cgroup_conf=c.pam_cgroup_conf,
            nodename=self.nodename or c.node_name, spool_dir=c.pam_spool_dir,
            cgroup_root=c.pam_cgroup_root, plugin=c.pam_cgroup_plugin, prefix=c.pam_v1_prefix,
            v2_scope=c.pam_v2_scope, v2_user_cgroup=c.pam_user_cgroup, use_env=False)
        self.slurm_conf = slurm_conf

    def auth(self):
        """The caller-ID authenticator (built once; may raise auth.AuthError)."""
        with self._lock:
            if self._auth is None:
                from daemon.client import auth_from_config
                self._auth = auth_from_config(self.cfg)
            return self._auth

    def compute_node(self):
        """Whether a NodeName line of slurm.conf names this node (parsed once)."""
        with self._lock:
            if self._compute_node is None:
                from cgroups.conf import load_conf
                from cgroups.paths import expand_hostlist
                node = self.layout.nodename
                found = False
                for cl in load_conf(self.slurm_conf).lines("NodeName"):
                    try:
                        if node in expand_hostlist(cl.as_dict().get("nodename", "")):
                            found = True
                            break
                    except ValueError:
                        continue
                self._compute_node = found
            return self._compute_node


class SettingsCache:
    """Settings per (callerid.conf path, nodename= option), checked for freshness at every
    use. ``get`` returns (Settings, None) or (Settings or None, error text)."""

    def __init__(self, default_path=DEFAULT_CONFIG, max_entries=16):
        self.default_path = default_path
        self.max_entries = max_entries
        self._cache = {}
        self._lock = threading.Lock()
        self.loads = 0            # how many times files were (re)read: tests, stats

    def get(self, path=None, nodename=None):
        explicit = path is not None
        path = path or self.default_path
        key = (path, nodename)
        with self._lock:
            s = self._cache.get(key)
            try:
                if s is not None and self._fresh(s):
                    return s, None
                s = self._load(path, explicit, nodename)
            except SettingsError as e:
                return None, str(e)
            except Exception as e:                   # ConfError, LayoutNotFound, OSError
                return None, f"{type(e).__name__}: {e}"
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = s
            return s, None

    def _fresh(self, s):
        try:
            sc = s.slurm_conf_path()
        except Exception:
            return False
        return sc == s.slurm_conf and tuple(map(stamp, s.files(sc))) == s.stamp

    def _load(self, path, explicit, nodename):
        self.loads += 1
        cfg, given = load_config(path, required=explicit)
        s = Settings(path, cfg, given, nodename)
        sc = s.slurm_conf_path()
        s.stamp = tuple(map(stamp, s.files(sc)))   # before reading: a change meanwhile
        s.discover(sc)                              # makes the next login re-read
        return s
