"""The `callerid` command: `audit` (audit_reader), `check` and `--version` here; `query` and
`keygen` belong to daemon/ and are passed on to daemon.cli; `daemon` runs both halves of the
node's daemon in one process: the caller-ID server (daemon.cli) and the PAM decision service
(service.py, its own threads). (pam_callerid may import daemon, not the other way round, so
the console script enters here.)"""
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
    if rest and rest[0] == "daemon":
        return _daemon(argv)
    from daemon import cli
    rc = cli.main(argv)
    if argv and argv[0] in ("-h", "--help"):
        print("\nalso: callerid check [--nodes HOSTLIST | --all-nodes]  (is this node ready?)"
              "\n      callerid --version"
              "\n      callerid audit [--since WHEN] [--until WHEN] [--job N] [--user U] [--node N]"
              " [--path P] [--follow | --summary] [--json]")
    return rc


def _daemon(argv):
    """`callerid daemon`: start the PAM service on PamSocket, then run the caller-ID server
    (daemon.cli, until SIGTERM/SIGINT); stop the service when the server returns."""
    from daemon import cli
    from daemon.config import DEFAULT_PATH, ConfigError, load_config
    try:
        args = cli.build_parser().parse_args(argv)
        cfg = load_config(getattr(args, "config_sub", None) or args.config)
    except (SystemExit, ConfigError):
        return cli.main(argv)                   # it reports usage and configuration errors
    cli.setup_logging(args.log_level or cfg.log_level)
    from . import service
    try:
        from daemon.metrics import METRICS
    except ImportError:                         # prometheus-client not installed
        METRICS = None
    try:
        svc = service.start(cfg, DEFAULT_PATH if cfg.source == "<defaults>" else cfg.source,
                            METRICS)
    except (service.ServiceError, OSError) as e:
        print(f"callerid: PAM service on {cfg.pam_socket}: {e}", file=sys.stderr)
        return cli.EXIT_LISTEN
    try:
        return cli.main(argv)
    finally:
        svc.stop()


def _global_config(argv):
    """(--config value or None, the rest) for `callerid [--config FILE] check ...`."""
    if len(argv) >= 2 and argv[0] in ("--config", "-c"):
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--config="):
        return argv[0].split("=", 1)[1], argv[1:]
    return None, argv


if __name__ == "__main__":
    sys.exit(main())
