"""The product's version: the one definition (setup.py, the Debian/RPM package builders,
`callerid --version`, `callerid check` and the metrics' build_info read it from here).
The package builders write a different value into their staged copy when asked to
(`bash packaging/run deb` with CALLERID_VERSION=...)."""
VERSION = "0.1.0"
