# Shared by the package builders (packaging/deb/build.sh, packaging/rpm/build.sh and the
# RPM spec's %install): sourced, defines functions only.  $HERE: the checkout.

# The version to package: $CALLERID_VERSION when set (the upgrade test packages the same
# tree as a higher version), else daemon/version.py's -- the one definition.
callerid_version() {
    local v=${CALLERID_VERSION:-}
    [ -n "$v" ] || v=$(sed -n 's/^VERSION = "\([^"]*\)"$/\1/p' "$HERE/daemon/version.py")
    # the characters pam_callerid/build.py's VERSION_CHARS accepts (it checks again)
    case "$v" in *[!0-9A-Za-z.+~]*|"") echo "bad version '$v'" >&2; return 1 ;; esac
    echo "$v"
}

# The run-time Python packages into ROOT/LIBDIR: every module of pam_callerid, daemon and
# cgroups except the build-time and demo ones, daemon/version.py saying VERSION, all
# byte-compiled for PYTHON as installed (tracebacks name LIBDIR, not ROOT).
#   stage_python ROOT LIBDIR VERSION PYTHON
RUNTIME_EXCLUDE="pam_callerid/build.py pam_callerid/demo.py"
stage_python() {
    local root=$1 libdir=$2 version=$3 py=$4 pkg f rel
    install -d -m 0755 "$root$libdir"
    for pkg in pam_callerid daemon cgroups; do
        install -d -m 0755 "$root$libdir/$pkg"
        for f in "$HERE/$pkg"/*.py; do
            rel=$pkg/$(basename "$f")
            case " $RUNTIME_EXCLUDE " in *" $rel "*) continue ;; esac
            install -m 0644 "$f" "$root$libdir/$rel"
        done
    done
    printf '"""The product'"'"'s version (written by the package builder)."""\nVERSION = "%s"\n' \
        "$version" > "$root$libdir/daemon/version.py"
    "$py" -I -B -m compileall -q --invalidation-mode checked-hash -s "$root" -p / \
        "$root$libdir" >/dev/null
}

# The PAM module, built by the project's own build script (gcc, libpam only) into OUTDIR.
#   build_pam_module OUTDIR VERSION PYTHON
build_pam_module() {
    local out=$1 version=$2 py=$3
    (cd "$HERE" && "$py" -I -B -c 'import sys; sys.path.insert(0, "."); from pam_callerid.build import main; sys.exit(main(sys.argv[1:]))' \
        --out "$out" --version "$version" >&2) && [ -f "$out/pam_callerid.so" ]
}
