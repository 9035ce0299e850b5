"""The `callerid` command: `audit` (audit_reader), `check` and `--version` here; `daemon`, `query` and
`keygen` belong to daemon/ and are passed on to daemon.cli. (pam_callerid may import daemon,
not the other way round, so the console script enters here.)"""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("--version", "-V"):
        from daemon.version import VERSION
        print(f"slurm-callerid {VERSION}")
        return 0
    if argv and argv[0] == "audit":
        from . import audit_reader
        return audit_reader.main(argv[1:])
    config, rest = _global_config(argv)
    if rest and rest[0] == "check":
        from . import check
        return check.main(rest[1:], config=config)
    from daemon import cli
    rc = cli.main(argv)
    if argv and argv[0] in ("-h", "--help"):
        print("\nalso: callerid check [--nodes HOSTLIST | --all-nodes]  (is this node ready?)"
              "\n      callerid --version"
              "\n      callerid audit [--since WHEN] [--until WHEN] [--job N] [--user U] [--node N]"
              " [--path P] [--follow | --summary] [--json]")
    return rc


def _global_config(argv):
    """(--config value or None, the rest) for `callerid [--config FILE] check ...`."""
    if len(argv) >= 2 and argv[0] in ("--config", "-c"):
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--config="):
        return argv[0].split("=", 1)[1], argv[1:]
    return None, argv


if __name__ == "__main__":
    sys.exit(main())
