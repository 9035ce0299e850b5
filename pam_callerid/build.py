"""Build (and install) pam_callerid.so, the PAM module: a thin C client of the node's
``callerid daemon`` (pam_callerid.c, next to this file).

    python -m pam_callerid.build --out DIR
    python -m pam_callerid.build [--out DIR] --install [--install-dir DIR]

Needs only a C compiler (``$CC``, default gcc) and libpam's headers (Debian: libpam0g-dev).
The module links libpam and libc only and exports only ``pam_sm_*``.  Without
``--install-dir``, the system's PAM module directory is the one holding pam_unix.so, looked
for under the compiler's multiarch library directories first.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from daemon.version import VERSION
from pam_callerid.pamconf import IDENT, module_dir, module_dirs

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pam_callerid.c")
CFLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2", "-fPIC", "-shared",
          "-fvisibility=hidden", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong"]
LDFLAGS = ["-Wl,-z,relro", "-Wl,-z,now", "-Wl,--as-needed"]
LIBS = ["-lpam"]
VERSION_CHARS = re.compile(r"[0-9A-Za-z.+~]+\Z")    # = packaging/common.sh's callerid_version


class BuildError(Exception):
    """The module could not be built or installed (the message says why, for an admin)."""


def compiler():
    return os.environ.get("CC") or "gcc"


def _run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError("%s not found: install a C compiler (Debian: apt-get install gcc)"
                         % cmd[0]) from None
    return r


def version_defines(version):
    """The -D flags that build ``version`` into the module: sent in each request (the
    daemon logs a module older or newer than itself) and kept as pamconf.IDENT + version."""
    if not VERSION_CHARS.match(version):
        raise BuildError("bad version %r (letters, digits and . + ~ only)" % version)
    return ['-DCALLERID_VERSION="%s"' % version, '-DCALLERID_IDENT="%s%s"' % (IDENT, version)]


def build(out, name="pam_callerid", verbose=False, version=VERSION):
    """Compile pam_callerid.c into ``out``/<name>.so (mode 0644, atomic replace); returns
    the path."""
    os.makedirs(out, exist_ok=True)
    final = os.path.join(out, name + ".so")
    tmp = final + ".tmp%d" % os.getpid()
    cmd = [compiler()] + CFLAGS + version_defines(version) + ["-o", tmp, SOURCE] + LDFLAGS + LIBS
    if verbose:
        print(" ".join(cmd))
    r = _run(cmd)
    if r.returncode != 0:
        hint = ""
        if "security/pam_" in r.stderr:
            hint = "\n(libpam's headers missing? Debian: apt-get install libpam0g-dev)"
        raise BuildError("compiling %s failed:\n%s%s" % (SOURCE, r.stderr.strip(), hint))
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    return final


def _multiarch():
    r = _run([compiler(), "-print-multiarch"])
    return r.stdout.strip() if r.returncode == 0 else ""


def pam_module_dir():
    """The directory of the system's PAM modules: where pam_unix.so is."""
    multiarch = _multiarch()
    found = module_dir(multiarch)
    if found is None:
        raise BuildError("cannot find the PAM module directory (no pam_unix.so in %s); give "
                         "--install-dir" % ", ".join(module_dirs(multiarch)))
    return found


def install(so, install_dir=None, name="pam_callerid.so"):
    """Copy the module into the PAM module directory (atomic replace, mode 0644)."""
    install_dir = install_dir or pam_module_dir()
    os.makedirs(install_dir, exist_ok=True)
    dst = os.path.join(install_dir, name)
    tmp = dst + ".tmp%d" % os.getpid()
    shutil.copyfile(so, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pam_callerid.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="output directory for pam_callerid.so (default with --install: a "
                         "temporary directory, removed afterwards)")
    ap.add_argument("--name", default="pam_callerid", help="module base name")
    ap.add_argument("--version", default=VERSION,
                    help="the version built into the module (default: daemon/version.py's, %(default)s)")
    ap.add_argument("--install", action="store_true", help="also install the module")
    ap.add_argument("--install-dir", default=None,
                    help="PAM module directory (default: the one holding pam_unix.so)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.out is None and not a.install:
        ap.error("give --out DIR, or --install")
    out = a.out or tempfile.mkdtemp(prefix="pam_callerid-build-")
    try:
        so = build(out, a.name, a.verbose, a.version)
        print("built", so)
        if a.install:
            print("installed", install(so, a.install_dir, a.name + ".so"))
    except BuildError as e:
        print("pam_callerid.build: %s" % e, file=sys.stderr)
        return 1
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
