#!/bin/bash
# Build the RPM slurm-callerid (EL9: Rocky/Alma/RHEL 9) from this checkout with rpmbuild and
# packaging/rpm/slurm-callerid.spec (`bash packaging/run rpm` installs rpmbuild and calls
# this script).  On an EL9 host with the spec's BuildRequires this is a normal build; on
# Debian 12 (CI) the BuildRequires are EL package names rpm's database does not know, so
# they are not checked (--nodeps): the result is the same package, built by Debian's gcc
# and python3.11 for the same ABI (x86_64, Python 3.11 bytecode).
#
#   bash packaging/rpm/build.sh [OUTDIR]          (default OUTDIR: build/rpm in the checkout)
#   CALLERID_VERSION=0.1.1 bash packaging/rpm/build.sh
#
# Prints the path of the .rpm on stdout.  The source tarball is the checkout's files as they
# are now.
set -euo pipefail
HERE=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
OUTDIR=${1:-$HERE/build/rpm}

die() { echo "packaging/rpm/build.sh: $*" >&2; exit 1; }
. "$HERE/packaging/common.sh"

VERSION=$(callerid_version) || die "no version to package"
command -v rpmbuild >/dev/null || die "rpmbuild not found (Debian: apt-get install rpm)"
TOP=$(mktemp -d /tmp/callerid-rpm.XXXXXX)
trap 'rm -rf "$TOP"' EXIT
mkdir -p "$TOP/SOURCES"
# the source tarball's files: git's tracked ones, or (not a git checkout) the tree without
# build products
sources() {
    if git -C "$HERE" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$HERE" ls-files -z
    else
        find . \( -path ./build -o -path ./.git -o -name __pycache__ \) -prune -o -type f -printf '%P\0'
    fi
}
(cd "$HERE" && sources | tar czf "$TOP/SOURCES/slurm-callerid-$VERSION.tar.gz" --null -T - \
    --transform "s,^,slurm-callerid-$VERSION/,") || die "cannot make the source tarball"
nodeps=--nodeps
[ -e /etc/redhat-release ] && nodeps=
rpmbuild -bb $nodeps --define "_topdir $TOP" --define "cid_version $VERSION" \
    "$HERE/packaging/rpm/slurm-callerid.spec" > "$TOP/log" 2>&1 \
    || { tail -40 "$TOP/log" >&2; die "rpmbuild failed (its log's end is above)"; }
mkdir -p "$OUTDIR"
for rpm in "$TOP"/RPMS/*/*.rpm; do
    mv "$rpm" "$OUTDIR/"
    echo "$OUTDIR/$(basename "$rpm")"
done
