"""The job container's mount namespace (pam_slurm_adopt's ``join_container``), as an fd.

Two sources, both root-only:

* the job's extern slurmstepd: REQUEST_GET_NS_FD (22.05..25.05) / REQUEST_GET_NS_FDS (25.11+),
  the fd passed with SCM_RIGHTS (:mod:`cgroups.stepd`). Every release from 22.05 on offers it
  (req.c ``_handle_get_ns_fd`` at slurm-22-05-8-1 already); it is what pam_slurm_adopt uses,
  and it also covers plugins whose files we do not read (25.11 namespace/linux).
* the nsfs bind mount job_container/tmpfs keeps per job: ``<BasePath>/<job>/.ns``
  (job_container_tmpfs.c ``_create_paths``, 22.05..25.05; namespace_tmpfs.c in 25.11), with
  BasePath from job_container.conf for this node (:func:`jc_basepath`). Used when the stepd
  cannot be asked. The extern placeholder's /proc/PID/ns/mnt is *not* the job's namespace on
  22.05 (measured: the extern stepd and its sleep stay in slurmd's namespace).

The caller joins with ``setns(fd, CLONE_NEWNS)``, which the kernel refuses in a
multi-threaded process: hand the fd to a single-threaded process (the PAM client) for that.
"""
import fcntl
import os
import stat as _stat

from .errors import ConfError, JobGone, NamespaceError, StepdError
from . import paths as _p

CLONE_NEWNS = 0x00020000           # <sched.h>
NS_GET_USERNS = 0xB701             # <linux/nsfs.h> _IO(0xb7, 0x1)
NS_GET_NSTYPE = 0xB703             # <linux/nsfs.h> _IO(0xb7, 0x3), kernel >= 4.11


# ---------------------------------------------------------------- pure: configuration

def container_plugin(sconf):
    """Pure: the job container plugin slurm.conf selects, or None. ``NamespaceType`` (25.11+)
    wins over ``JobContainerType`` (22.05..25.05; still read by 25.11), as in read_config.c at
    slurm-25-11-7-1; a value containing "none" means none."""
    value = sconf.get("NamespaceType") or sconf.get("JobContainerType")
    if not value or "none" in value.lower():
        return None
    return value.strip().lower()


def jc_basepath(jc, nodename, hostname=None, multiple_slurmd=True):
    """Pure: this node's BasePath from a parsed job_container.conf, or None when the plugin is
    off on this node. Rules (read_jcconf.c, 22.05..25.11): ``BasePath=`` lines and the
    ``NodeName=<hostlist> BasePath=`` lines whose hostlist holds this node set it, the last
    such line in the file wins; ``%n``/``%h`` are expanded (23.02+); ``BasePath=none``
    disables the plugin on the node (23.11+); a build with --enable-multiple-slurmd (Debian)
    appends ``/<NodeName>``. Raises ConfError for a NodeName line without BasePath or a bad
    hostlist."""
    base = None
    for cl in jc.lines():
        d = cl.as_dict()
        key = cl.key.lower()
        if key == "nodename":
            try:
                names = _p.expand_hostlist(d["nodename"])
            except ValueError as e:
                raise ConfError(cl.filename, cl.lineno, str(e)) from None
            if nodename not in names:
                continue
            if not d.get("basepath"):
                raise ConfError(cl.filename, cl.lineno, "NodeName line without BasePath "
                                "(slurmd refuses it: empty basepath)")
            base = d["basepath"]
        elif key == "basepath":
            base = d["basepath"]
    if not base or base[:4].lower() == "none":
        return None
    base = _p.expand_node_pattern(base, nodename, hostname)
    return f"{base}/{nodename}" if multiple_slurmd else base


def ns_file(basepath, job_id):
    """Pure: the nsfs bind mount of the job's container, ``<BasePath>/<job>/.ns``."""
    return f"{basepath.rstrip('/')}/{int(job_id)}/.ns"


# ---------------------------------------------------------------- I/O edge

def check_mount_ns(fd, what):
    """The fd must be an nsfs mount namespace owned by our own user namespace (so not one a
    user made with unshare -U, nor another namespace type); raises NamespaceError."""
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        raise NamespaceError(f"{what} is not a namespace file (nsfs): {e.strerror}",
                             what) from None
    if kind != CLONE_NEWNS:
        raise NamespaceError(f"{what} is a namespace of type {kind:#x}, not a mount "
                             f"namespace", what)
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
    except OSError as e:
        raise NamespaceError(f"{what}: cannot tell its user namespace: {e.strerror}",
                             what) from None
    try:
        ours = os.stat("/proc/self/ns/user").st_ino
        if os.fstat(owner).st_ino != ours:
            raise NamespaceError(f"{what} belongs to another user namespace (made by a user, "
                                 f"not by slurmstepd): refused", what)
    finally:
        os.close(owner)


def open_ns_file(path):
    """Open the nsfs file ``path`` safely: no symlink as the last component, no blocking on a
    FIFO, owned by root, an nsfs mount namespace of our user namespace. Returns an O_CLOEXEC
    fd; raises FileNotFoundError when it does not exist, NamespaceError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NamespaceError(f"cannot open {path}: {e.strerror} (a symlink is refused)",
                             path) from None
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            raise NamespaceError(f"{path} is not a root-owned nsfs file (mode {st.st_mode:o}, "
                                 f"uid {st.st_uid})", path)
        check_mount_ns(fd, path)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _from_stepd(layout, job, timeout):
    from .stepd import connect
    with connect(layout.extern_socket(job.job_id), timeout) as c:
        fd = c.namespace_fd()
    if fd is not None:
        try:
            check_mount_ns(fd, f"the fd from the stepd of job {job.job_id}")
        except BaseException:
            os.close(fd)
            raise
    return fd


def _from_file(layout, job, why):
    path = ns_file(layout.jc_basepath, job.job_id)
    try:
        return open_ns_file(path)
    except FileNotFoundError:
        raise JobGone(f"job {job.job_id}: no job container namespace at {path} (job ended, or "
                      f"its container is not set up){why}", job.job_id) from None


def job_namespace_fd(layout, job, *, stepd_timeout=0.5, use_stepd=True):
    """The mount namespace of ``job``'s container as an O_CLOEXEC fd (the caller closes it,
    and joins it with setns(fd, CLONE_NEWNS) from a single-threaded process), or None when
    the job has no container (also, without asking anyone, when slurm.conf names no job
    container plugin: ``layout.container`` is None).

    Asks the job's extern stepd first; when it cannot be asked (StepdError) and the layout
    knows this node's job_container/tmpfs BasePath, opens ``<BasePath>/<job>/.ns``. Raises
    JobGone (no .ns while the plugin is on), NamespaceError (not a usable mount namespace),
    or the StepdError when there is no file to fall back to.
    """
    if layout.container is None:
        return None
    why = ""
    if use_stepd:
        try:
            return _from_stepd(layout, job, stepd_timeout)
        except StepdError as e:
            if not layout.jc_basepath:
                raise
            why = f"; the stepd could not be asked: {e}"
    if not layout.jc_basepath:
        return None
    return _from_file(layout, job, why)


__all__ = ["job_namespace_fd", "open_ns_file", "check_mount_ns", "jc_basepath", "ns_file",
           "container_plugin"]
