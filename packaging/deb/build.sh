#!/bin/bash
# Build the Debian package slurm-callerid from this checkout with dpkg-deb (no debhelper,
# no build-dependency beyond gcc, libc6-dev, libpam0g-dev, dpkg-dev and python3; `bash
# packaging/run deb` installs those and calls this script).
#
#   bash packaging/deb/build.sh [OUTDIR]          (default OUTDIR: build/deb in the checkout)
#   CALLERID_VERSION=0.1.1 bash packaging/deb/build.sh   (package another version of the
#                                                  same tree: the upgrade test does this)
#
# Prints the path of the .deb on stdout. What goes where (callerid(8), FILES):
#   <PAM dir>/pam_callerid.so     the C client (pam_callerid/build.py), PAM dir = where pam_unix.so is
#   /usr/lib/slurm-callerid/      the daemon's Python packages (pam_callerid, daemon, cgroups),
#                                 byte-compiled, root-owned; run by Debian's /usr/bin/python3
#   /usr/sbin/callerid            `python3 -IB` wrapper (isolated: no PYTHON* variables, no
#                                 user site, no current directory on the import path)
#   /lib/systemd/system/callerid.service, /etc/slurm/callerid.conf (conffile),
#   /etc/logrotate.d/slurm-callerid (conffile), man pages, /usr/share/doc/slurm-callerid/
set -euo pipefail
HERE=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
PKG=slurm-callerid
LIBDIR=/usr/lib/slurm-callerid
OUTDIR=${1:-$HERE/build/deb}
PY=/usr/bin/python3

die() { echo "packaging/deb/build.sh: $*" >&2; exit 1; }
. "$HERE/packaging/common.sh"

# the directory libpam loads modules from on this system: where pam_unix.so is (one
# definition: pam_callerid.build.pam_module_dir; Debian 12: /lib/x86_64-linux-gnu/security)
pam_module_dir() {
    (cd "$HERE" && "$PY" -I -B -c 'import sys; sys.path.insert(0, "."); from pam_callerid.build import pam_module_dir; print(pam_module_dir())') \
        || die "cannot find the PAM module directory"
}

systemd_unit_dir() {
    pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || echo /lib/systemd/system
}

stage_files() {
    local dest=$1 pamdir unitdir
    pamdir=$(pam_module_dir)
    unitdir=$(systemd_unit_dir)
    install -d -m 0755 "$dest$pamdir" "$dest/usr/sbin" "$dest$unitdir" "$dest/etc/slurm" \
        "$dest/etc/logrotate.d" "$dest/usr/share/man/man5" "$dest/usr/share/man/man8" \
        "$dest/usr/share/doc/$PKG"
    install -m 0644 "$BUILD/pam/pam_callerid.so" "$dest$pamdir/pam_callerid.so"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$dest$pamdir/pam_callerid.so"
    install -m 0755 "$HERE/packaging/callerid.sbin" "$dest/usr/sbin/callerid"
    install -m 0644 "$HERE/packaging/callerid.service" "$dest$unitdir/callerid.service"
    install -m 0644 "$HERE/packaging/callerid.conf" "$dest/etc/slurm/callerid.conf"
    install -m 0644 "$HERE/packaging/logrotate" "$dest/etc/logrotate.d/$PKG"
    local page
    for page in "$HERE"/packaging/man/*.[58]; do
        sed "s/@VERSION@/$VERSION/g" "$page" | gzip -9n > "$dest/usr/share/man/man${page##*.}/$(basename "$page").gz"
    done
    install -m 0644 "$HERE/packaging/deb/copyright" "$dest/usr/share/doc/$PKG/copyright"
    gzip -9n < "$HERE/docs/admin-guide.md" > "$dest/usr/share/doc/$PKG/admin-guide.md.gz"
    install -m 0644 "$HERE/packaging/callerid.conf" "$dest/usr/share/doc/$PKG/callerid.conf.example"
    changelog | gzip -9n > "$dest/usr/share/doc/$PKG/changelog.Debian.gz"
}

changelog() {
    cat <<EOF
$PKG ($DEBVERSION) unstable; urgency=medium

  * Built from the slurm-callerid checkout ($(cd "$HERE" && git rev-parse --short HEAD 2>/dev/null || echo unknown)).

 -- $MAINTAINER  $(date -R -d "@$SOURCE_DATE_EPOCH")
EOF
}

# shared-library dependencies of the PAM module, as dpkg-shlibdeps computes them
shlibs_depends() {
    local so=$1 tmp
    tmp=$(mktemp -d)
    mkdir "$tmp/debian"
    printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$PKG" "$PKG" > "$tmp/debian/control"
    (cd "$tmp" && dpkg-shlibdeps -O "$so" 2>/dev/null) | sed -n 's/^shlibs:Depends=//p'
    rm -rf "$tmp"
}

write_control() {
    local dest=$1 arch size shlibs pyver
    arch=$(dpkg --print-architecture)
    size=$(du -sk --exclude=DEBIAN "$dest" | cut -f1)
    shlibs=$(shlibs_depends "$BUILD/pam/pam_callerid.so")
    [ -n "$shlibs" ] || die "dpkg-shlibdeps found no dependencies for the PAM module"
    # byte-compiled for this python3 (3.X): the same minor version on the target
    pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    install -d -m 0755 "$dest/DEBIAN"
    cat > "$dest/DEBIAN/control" <<EOF
Package: $PKG
Version: $DEBVERSION
Architecture: $arch
Maintainer: $MAINTAINER
Installed-Size: $size
Depends: $shlibs, python3 (>= $pyver), python3 (<< ${pyver%.*}.$(( ${pyver#*.} + 1 ))), python3-cffi-backend, python3-prometheus-client, libmunge2, init-system-helpers (>= 1.54)
Recommends: munge
Suggests: python3-pyroute2, prometheus-node-exporter
Section: admin
Priority: optional
Description: adopt ssh sessions into Slurm jobs via an authenticated caller-ID daemon
 A drop-in for Slurm's pam_slurm_adopt: pam_callerid.so, a thin C PAM client in
 sshd's account stack, asks the node's own daemon (callerid daemon) which job an
 incoming ssh login belongs to. With several jobs the daemon asks the caller-ID
 daemon on the source host (MUNGE- or HMAC-authenticated, checked against the
 user's own jobs), then puts the session into the job's extern step.
 .
 Includes the daemon (systemd unit callerid.service), callerid check, callerid
 audit (the audit trail in /var/log/slurm-callerid), Prometheus metrics for
 node_exporter's textfile collector, and man pages.
EOF
    printf '/etc/slurm/callerid.conf\n/etc/logrotate.d/%s\n' "$PKG" > "$dest/DEBIAN/conffiles"
    install -m 0755 "$HERE/packaging/deb/postinst" "$HERE/packaging/deb/prerm" \
        "$HERE/packaging/deb/postrm" "$dest/DEBIAN/"
    (cd "$dest" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
        | xargs -0 md5sum) > "$dest/DEBIAN/md5sums"
    chmod 0644 "$dest/DEBIAN/control" "$dest/DEBIAN/conffiles" "$dest/DEBIAN/md5sums"
}

VERSION=$(callerid_version) || die "no version to package"
DEBVERSION=$VERSION-1
MAINTAINER=${CALLERID_MAINTAINER:-slurm-callerid maintainers <root@localhost>}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(cd "$HERE" && git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
BUILD=$(mktemp -d /tmp/callerid-deb.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
umask 022
ROOT=$BUILD/root
mkdir -p "$ROOT" "$BUILD/pam"
build_pam_module "$BUILD/pam" "$VERSION" "$PY" || die "building the PAM module failed"
stage_python "$ROOT" "$LIBDIR" "$VERSION" "$PY" || die "staging the Python packages failed"
stage_files "$ROOT"
write_control "$ROOT"
mkdir -p "$OUTDIR"
DEB=$OUTDIR/${PKG}_${DEBVERSION}_$(dpkg --print-architecture).deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
