"""`callerid` command line: daemon, query, keygen.

Exit status of `callerid query`:
    0 found, 1 unknown, 2 refused, 3 unreachable, 4 invalid reply (forged/wrong nonce/malformed),
    5 daemon error, 6 local error (cannot sign: munged down here, bad key), 7 busy (our uid is
    rate-limited by that daemon), 64 usage/config error.
`callerid daemon`: 0 after SIGTERM/SIGINT, 64 bad config, 65 bad key/auth, 69 cannot listen.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

(EXIT_FOUND, EXIT_UNKNOWN, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_INVALID, EXIT_ERROR, EXIT_LOCAL,
 EXIT_BUSY) = range(8)
EXIT_USAGE = 64
EXIT_BADKEY = 65
EXIT_LISTEN = 69

_PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """One line per record.  Under journald (JOURNAL_STREAM set) prefix <prio> so journald
    records the severity; otherwise a plain 'LEVEL name: message'."""

    def __init__(self):
        super().__init__()
        self.journal = bool(os.environ.get("JOURNAL_STREAM"))

    def format(self, record):
        msg = record.getMessage().replace("\n", " | ")
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        if self.journal:
            return f"<{_PRIO.get(record.levelno, 6)}>{record.name}: {msg}"
        return f"{record.levelname} {record.name}: {msg}"


def setup_logging(level: str = "info"):
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_JournalFormatter())
    root = logging.getLogger("callerid")
    root.handlers[:] = [h]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False


def _err(msg: str) -> None:
    print(f"callerid: {msg}", file=sys.stderr)


def cmd_daemon(args) -> int:
    from .config import ConfigError, load_config
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        _err(f"configuration error: {e}")
        return EXIT_USAGE
    if args.port is not None:
        cfg.port = args.port
    setup_logging(args.log_level or cfg.log_level)
    log = logging.getLogger("callerid")
    for k in cfg.unknown_keys:
        log.warning("event=config-unknown-key key=%s", k)
    from .auth import AuthError
    from .server import make_auth_checked, make_lookup, reloader, run
    try:
        auth = make_auth_checked(cfg)
    except AuthError as e:
        _err(f"authentication setup failed ({cfg.auth_type}): {e}")
        return EXIT_BADKEY
    import asyncio
    lookup = make_lookup(cfg)
    overrides = {k: v for k, v in (("port", args.port), ("log_level", args.log_level))
                 if v is not None}
    inherited = None
    if args.serve_fds:                  # one of several serving processes (daemon.group)
        from .group import decode_fds
        try:
            inherited = decode_fds(args.serve_fds)
        except ValueError as e:
            _err(str(e))
            return EXIT_USAGE
        exporter, ready = None, None
    else:
        exporter, ready = _metrics(cfg, log)
    from .group import helper_argv
    try:
        return asyncio.run(run(cfg, auth, lookup, reload=reloader(args.config, overrides),
                               ready=ready, inherited=inherited,
                               helper_argv=lambda port: helper_argv(args.config, port,
                                                                    args.log_level)))
    except OSError as e:
        _err(str(e))
        return EXIT_LISTEN
    finally:
        lookup.close()
        if exporter is not None:
            exporter.stop()


def _metrics(cfg, log):
    """With MetricsFile: the node_exporter textfile exporter (daemon/metrics.py, started
    now, stopped with the daemon) and the server's ready hook that exports its counters.
    (MetricsFile/MetricsInterval take effect at start, not on SIGHUP.)"""
    if not cfg.metrics_file:
        return None, None
    from .metrics import METRICS, TextfileExporter
    exporter = TextfileExporter(METRICS, cfg.metrics_file, cfg.metrics_interval, log).start()
    return exporter, lambda srv: METRICS.watch_server(srv.snapshot)


def cmd_query(args) -> int:
    from .config import ConfigError, load_config
    from . import client as C
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        _err(f"configuration error: {e}")
        return EXIT_USAGE
    try:
        auth = C.auth_from_config(cfg)
    except Exception as e:
        _err(f"authentication setup failed ({cfg.auth_type}): {e}")
        return EXIT_LOCAL
    try:
        C.parse_endpoint(args.src)
        C.parse_endpoint(args.dst)
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    port = args.port or cfg.port
    timeout = args.timeout or cfg.query_timeout
    ans = C.query(args.host, port, args.src, args.dst, auth=auth, timeout=timeout,
                  proto=args.proto, trusted_uids=cfg.reply_uids(),
                  reserved_port=cfg.reserved_source_port)
    if ans.outcome == C.FOUND:
        print(f"job_id={ans.job_id} node={ans.node} uid={ans.job_uid}")
    else:
        print(f"{ans.outcome}" + (f" node={ans.node}" if ans.node else "")
              + (f": {ans.detail}" if ans.detail else ""))
    return {C.FOUND: EXIT_FOUND, C.UNKNOWN: EXIT_UNKNOWN, C.REFUSED: EXIT_REFUSED,
            C.UNREACHABLE: EXIT_UNREACHABLE, C.INVALID: EXIT_INVALID, C.ERROR: EXIT_ERROR,
            C.LOCAL_ERROR: EXIT_LOCAL, C.BUSY: EXIT_BUSY}[ans.outcome]


def cmd_keygen(args) -> int:
    from .auth import write_key
    from .config import ConfigError, load_config
    path = args.output
    if path is None:
        try:
            path = load_config(args.config).key_file
        except ConfigError as e:
            _err(f"configuration error: {e}")
            return EXIT_USAGE
    try:
        write_key(path, args.bytes, force=args.force)
    except FileExistsError:
        _err(f"{path} exists (use --force to replace it)")
        return 1
    except OSError as e:
        _err(f"{path}: {e.strerror}")
        return 1
    print(f"wrote {args.bytes}-byte key to {path} (mode 0600); copy it to every node")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="callerid", description="Slurm caller-ID daemon and client")
    p.add_argument("--config", "-c", help="config file (default /etc/slurm/callerid.conf or $CALLERID_CONF)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("daemon", help="run the caller-ID daemon in the foreground")
    d.add_argument("--config", "-c", dest="config_sub")
    d.add_argument("--port", type=int, help="override Port")
    d.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    d.add_argument("--serve-fds", help=argparse.SUPPRESS)    # daemon.group's helpers
    d.set_defaults(func=cmd_daemon)
    q = sub.add_parser("query", help="ask HOST's daemon which job owns its end of a connection")
    q.add_argument("--config", "-c", dest="config_sub")
    q.add_argument("host")
    q.add_argument("src", metavar="SRC_IP:PORT", help="the connection's source (on HOST)")
    q.add_argument("dst", metavar="DST_IP:PORT", help="the connection's destination")
    q.add_argument("--port", type=int, help="daemon port (default: Port from config)")
    q.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    q.add_argument("--timeout", type=float, help="total deadline in seconds (default QueryTimeout)")
    q.set_defaults(func=cmd_query)
    k = sub.add_parser("keygen", help="write a new HMAC key file (mode 0600)")
    k.add_argument("--config", "-c", dest="config_sub")
    k.add_argument("--output", "-o", help="key file (default: KeyFile from config)")
    k.add_argument("--bytes", type=int, default=32, choices=[32, 48, 64])
    k.add_argument("--force", action="store_true", help="replace an existing file")
    k.set_defaults(func=cmd_keygen)
    return p


def main(argv=None) -> int:
    p = build_parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    if getattr(args, "config_sub", None):
        args.config = args.config_sub
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
