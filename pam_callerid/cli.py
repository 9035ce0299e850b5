"""The `callerid` command: `audit` (pam_callerid's audit records) here; `daemon`, `query` and
`keygen` belong to daemon/ and are passed on to daemon.cli. (pam_callerid may import daemon,
not the other way round, so the console script enters here.)"""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "audit":
        from . import audit
        return audit.main(argv[1:])
    from daemon import cli
    rc = cli.main(argv)
    if argv and argv[0] in ("-h", "--help"):
        print("\nalso: callerid audit [--file PATH] [--job N] [--user NAME] [--node NAME] [--since WHEN] [--json]")
    return rc


if __name__ == "__main__":
    sys.exit(main())
