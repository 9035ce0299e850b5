"""Install, upgrade and purge the built .deb on this machine, and say what a purge left behind
(tests/packaging/installed.py and test_installed.py use it; root only).

Whatever a developer install put at the package's paths beforehand (packaging/run install
copies the PAM module into the system's PAM dir, unowned by any package) is saved before the
package is installed and put back after it is purged, so the test leaves the machine as it
found it."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

PKG = "slurm-callerid"
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
# what must not exist after a purge, besides every file the package listed
EXTRA_PATHS = ("/var/log/slurm-callerid", "/etc/slurm/callerid.conf", "/etc/slurm/callerid.key",
               "/run/callerid", "/usr/lib/slurm-callerid", "/usr/sbin/callerid",
               "/etc/logrotate.d/slurm-callerid", "/lib/systemd/system/callerid.service",
               "/etc/systemd/system/multi-user.target.wants/callerid.service",
               "/var/lib/systemd/deb-systemd-helper-enabled/callerid.service.dsh-also",
               "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/callerid.service")


def run(argv, check=True, timeout=600):
    r = subprocess.run(argv, capture_output=True, text=True, env=APT_ENV, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r


def installed_version() -> str | None:
    r = run(["dpkg-query", "-W", "-f=${Status} ${Version}", PKG], check=False)
    if r.returncode != 0 or "ok installed" not in r.stdout:
        return None
    return r.stdout.split()[-1]


def deb_files(deb) -> list[str]:
    """Every path in the package, absolute; directories end with "/"."""
    r = run(["dpkg-deb", "--contents", str(deb)])
    return [line.split()[-1][1:] for line in r.stdout.splitlines() if line.split()[-1] != "./"]


def unowned_files(paths) -> list[str]:
    """The files among ``paths`` that exist and belong to no installed package (so a
    half-installed or installed slurm-callerid's own files are never saved and restored)."""
    files = [p for p in paths if not p.endswith("/") and os.path.lexists(p)]
    if not files:
        return []
    owned = set()
    for line in run(["dpkg-query", "-S"] + files, check=False).stdout.splitlines():
        owned.update(x.strip() for x in line.split(": ", 1)[-1].split(","))
    return [p for p in files if p not in owned]


class Machine:
    """Saves unowned files at the package's paths, installs, purges, restores."""

    def __init__(self, deb):
        self.deb = str(deb)
        self.saved = tempfile.mkdtemp(prefix="callerid-pkgtest-")
        self.backups = {}
        for path in unowned_files(deb_files(deb)):
            if os.path.isfile(path) and not os.path.islink(path):
                dst = os.path.join(self.saved, str(len(self.backups)))
                shutil.copy2(path, dst)
                self.backups[path] = dst

    def install(self, deb=None):
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "--allow-downgrades",
             os.path.abspath(str(deb or self.deb))])

    def purge(self):
        if run(["dpkg-query", "-W", PKG], check=False).returncode == 0:
            run(["apt-get", "purge", "-y", "-q", PKG])

    def restore(self):
        for path, src in self.backups.items():
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copy2(src, path)
        shutil.rmtree(self.saved, ignore_errors=True)


OWN_DIRS = ("/usr/lib/slurm-callerid", "/usr/share/doc/slurm-callerid",
            "/var/log/slurm-callerid", "/run/callerid")


def leftovers(files) -> list[str]:
    """The package's paths (and EXTRA_PATHS) still present after a purge. Directories count
    only when they are the package's own (OWN_DIRS); /etc/slurm, /usr/sbin, the PAM dir and
    the like are shared with other packages."""
    left = []
    for p in list(files) + list(EXTRA_PATHS):
        is_dir = p.endswith("/")
        p = p.rstrip("/")
        if not os.path.lexists(p):
            continue
        if (is_dir or os.path.isdir(p)) and \
                not any(p == d or p.startswith(d + "/") for d in OWN_DIRS):
            continue
        left.append(p)
    return sorted(set(left))
