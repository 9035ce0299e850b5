"""Exception hierarchy of :mod:`cgroups`.

Every error this package raises on purpose is a :class:`CgroupError`; each message is written
for an administrator reading a log line (what happened, to which pid/job/path, what it means).
"""


class CgroupError(Exception):
    """Base class of every error raised on purpose by the cgroups package."""


class ConfError(CgroupError, ValueError):
    """A configuration file cannot be read or parsed.

    ``filename`` and ``lineno`` (1-based, or None when the whole file is concerned) name the
    place; ``str(err)`` reads ``"<file>:<line>: <what is wrong>"``.
    """

    def __init__(self, filename, lineno, message):
        self.filename = filename
        self.lineno = lineno
        self.reason = message
        where = f"{filename}:{lineno}" if lineno is not None else str(filename)
        super().__init__(f"{where}: {message}")


class LayoutNotFound(CgroupError):
    """No usable Slurm cgroup layout on this node (cgroup fs not mounted, unsupported or
    unparsable job directory names such as Slurm 26.05 SLUIDs, missing configuration)."""


class JobGone(CgroupError):
    """The job (or its extern step) ended between lookup and the cgroup write."""

    def __init__(self, message, job_id=None):
        self.job_id = job_id
        super().__init__(message)


class PidGone(CgroupError):
    """The process to adopt exited before it could be moved."""

    def __init__(self, message, pid=None):
        self.pid = pid
        super().__init__(message)


class PermissionDenied(CgroupError):
    """The kernel refused the cgroup write (not root, delegation, LSM, cpuset constraints)."""

    def __init__(self, message, path=None):
        self.path = path
        super().__init__(message)


class AdoptionFailed(CgroupError):
    """The write was accepted but /proc/PID/cgroup does not show the pid in the target
    (for example something moved it again), or another unexpected kernel error."""


class StepdError(CgroupError):
    """A slurmstepd could not be asked (see :mod:`cgroups.stepd`). ``socket`` is its path."""

    def __init__(self, message, socket=None):
        self.socket = socket
        super().__init__(message)


class StepdUnavailable(StepdError):
    """No stepd behind the socket: the file is gone (step ended), nobody listens (stale socket
    of a dead stepd) or its listen backlog is full. Fails at once, no waiting."""


class StepdTimeout(StepdError, TimeoutError):
    """The stepd did not answer completely within the deadline."""


class StepdProtocolError(StepdError):
    """The peer answered something a slurmstepd would not: closed early, impossible values,
    or a listener that does not run as root (not trusted)."""


class StepdRefused(StepdProtocolError):
    """The stepd refused our protocol version in the handshake (it answered -1 and closed).
    ``version`` is the version we sent."""

    def __init__(self, message, socket=None, version=None):
        self.version = version
        super().__init__(message, socket)


class StepdRequestFailed(StepdError):
    """The stepd understood the request and answered that it failed (for example
    REQUEST_ADD_EXTERN_PID answered rc -1). ``rc`` is what it answered."""

    def __init__(self, message, socket=None, rc=None):
        self.rc = rc
        super().__init__(message, socket)


class NamespaceError(CgroupError):
    """A job container's mount namespace handle is unusable: the file is not an nsfs mount
    namespace (a FIFO, a symlink, another namespace type, not root's), or cannot be opened."""

    def __init__(self, message, path=None):
        self.path = path
        super().__init__(message)
