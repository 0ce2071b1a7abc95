"""``qkdproxy run``, ``check-config`` and ``probe``."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from qkdproxy.core import logsafe
from qkdproxy.core.errors import SettingError
from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.daemon.app import EXIT_CONFIG, EXIT_OK, EXIT_START_FAILED, Daemon, build_endpoint
from qkdproxy.daemon.config import Config, ConfigError, load_config
from qkdproxy.daemon.logformat import LOG_FORMATS, configure_logging, event
from qkdproxy.daemon.risk import assess
from qkdproxy.io.aio import run
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.sources import KeySources
from qkdproxy.tools.probe import format_result, probe

log = logging.getLogger("qkdproxy.daemon.app")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the daemon commands."""
    run_parser = commands.add_parser(
        "run", help="run the tunnels of a configuration file",
        description="Exit codes: 0 stopped cleanly, 1 could not start, 2 bad configuration.",
    )  # fmt: skip
    run_parser.add_argument("--config", type=Path, required=True, help="TOML file")
    run_parser.add_argument(
        "--log-format", choices=LOG_FORMATS, help="text or json (overrides [daemon] log_format)"
    )
    run_parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"),
        help="overrides [daemon] log_level",
    )  # fmt: skip
    run_parser.add_argument("--strict", action="store_true", help=STRICT_HELP)
    run_parser.set_defaults(handler=run_command)

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("--config", type=Path, help="TOML file")
    check.add_argument("file", type=Path, nargs="?", help="the same, positionally (older form)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--strict", action="store_true", help=STRICT_HELP)
    check.set_defaults(handler=check_command)

    probe = commands.add_parser(
        "probe", help="connect once to a client tunnel's peer and report the handshake"
    )
    probe.add_argument("--config", type=Path, required=True, help="TOML file")
    probe.add_argument("--tunnel", help="client tunnel name (default: the first)")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.set_defaults(handler=probe_command)


STRICT_HELP = "refuse risky settings instead of warning (also [daemon] strict = true)"


def _assess(config: Config, command: str, strict: bool, warn: Callable[[str], None]) -> list[str]:
    """Report risky settings through ``warn``; the problems that forbid using the
    configuration: private key files others can read, or any warning in strict mode."""
    assessment = assess(config)
    for risk in assessment.warnings:
        warn(f"WARNING: risky setting: {risk}")
    return [
        f"{config.path}: {problem}"
        for problem in assessment.refusals(strict or config.daemon.strict)
    ]


def _load(path: Path, command: str, logger: logging.Logger | None = None) -> Config | None:
    """The configuration, or None after reporting every problem (on stderr, or through
    ``logger`` when the log format is JSON and every line must be JSON)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            if logger is not None:
                logger.error(problem, extra=event("config_error", problem=problem))
            else:
                print(f"qkdproxy {command}: {problem}", file=sys.stderr)
        return None


def check_command(args: argparse.Namespace) -> int:
    """Validate the TOML and the files it names (certificates, keys, CA bundles)."""
    path: Path | None = args.config or args.file
    if path is None or (args.config and args.file and args.config != args.file):
        print("qkdproxy check-config: name one file: --config FILE", file=sys.stderr)
        return EXIT_CONFIG
    config: Config | None = None
    try:
        config = load_config(path)
        for kme in config.kmes.values():
            Credentials.load(kme.cert, kme.key)
            load_trust_anchors(kme.ca)
        for tunnel in config.tunnels:
            build_endpoint(tunnel, KeyContext(KeySources()), tunnel.plan.groups)
        problems: list[str] = _assess(config, "check-config", args.strict, _stderr)
    except ConfigError as exc:
        problems = exc.problems
    except SettingError as exc:
        problems = [f"{path}: {exc}"]
    if args.json:
        counts = {"tunnels": len(config.tunnels), "kmes": len(config.kmes)} if config else {}
        print(json.dumps({"ok": not problems, "config": str(path), **counts, "problems": problems}))
    elif problems:
        for problem in problems:
            print(f"qkdproxy check-config: {problem}", file=sys.stderr)
    else:
        assert config is not None
        print(f"{path}: OK ({len(config.tunnels)} tunnels, {len(config.kmes)} KMEs)")
    return EXIT_CONFIG if problems else EXIT_OK


def run_command(args: argparse.Namespace) -> int:
    """Run until SIGTERM."""
    # Until the file is read, the command line alone decides the format (of config errors).
    configure_logging(args.log_level or "info", args.log_format or "text")
    config = _load(args.config, "run", log if args.log_format == "json" else None)
    if config is None:
        return _exit(EXIT_CONFIG)
    _configure_logging(args, config)
    # Peer and KME text in any record stays on its line (observability/logsafe.py).
    logsafe.install()
    refusals = _assess(config, "run", args.strict, log.warning)
    for problem in refusals:
        log.error(problem, extra=event("config_error", problem=problem))
    if refusals:
        return _exit(EXIT_CONFIG)
    return _exit(run(_run(config, args)))


def _configure_logging(args: argparse.Namespace, config: Config) -> None:
    """The file's [daemon] log settings, except what the command line set."""
    configure_logging(
        args.log_level or config.daemon.log_level,
        args.log_format or config.daemon.log_format,
        flush_interval_s=config.daemon.log_flush_ms / 1000,
    )


def _exit(code: int) -> int:
    log.info("exiting with code %d", code, extra=event("exit", code=code))
    return code


async def _run(config: Config, args: argparse.Namespace) -> int:
    daemon = Daemon(config)
    daemon.strict = args.strict
    daemon.apply_logging = functools.partial(_configure_logging, args)
    daemon.handle_signals()
    try:
        await daemon.start()
    except SettingError as exc:
        # A certificate, key, CA file, group or address named by the configuration is
        # unusable. Any other ValueError is a bug of ours and must not pass for one.
        log.error("%s: %s", config.path, exc, extra=event("start_failed", error=str(exc)))
        await daemon.close()
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot start: %s", exc, extra=event("start_failed", error=str(exc)))
        await daemon.close()
        return EXIT_START_FAILED
    return await daemon.run()


def probe_command(args: argparse.Namespace) -> int:
    """One connection through the peer of a client tunnel, to the server's backend."""
    try:
        config = load_config(args.config)
        clients = [t for t in config.tunnels if t.role == "client"]
        chosen = [t for t in clients if args.tunnel in (None, t.name)]
        if not chosen:
            named = f" named {args.tunnel!r}" if args.tunnel else ""
            raise ConfigError([f"{args.config}: no client tunnel{named}"])
    except ConfigError as exc:
        if args.json:
            # The shape of check-config --json, plus probe's stage and error.
            print(json.dumps({"ok": False, "stage": "config", "error": exc.problems[0],
                              "problems": exc.problems}))  # fmt: skip
        else:
            for problem in exc.problems:
                print(f"qkdproxy probe: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    result = run(probe(config, chosen[0]))
    print(json.dumps(result) if args.json else format_result(result))
    return EXIT_OK if result["ok"] else EXIT_START_FAILED


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
