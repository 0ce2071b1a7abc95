"""``qkdproxy run``, ``check-config`` and ``probe``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from qkdproxy.aio import run
from qkdproxy.config import Config, ConfigError, TunnelConfig, load_config
from qkdproxy.daemon import EXIT_CONFIG, EXIT_OK, EXIT_START_FAILED, Daemon, build_endpoint
from qkdproxy.qkd.sources import KeySources
from qkdproxy.tls.credentials import CredentialError, Credentials, load_trust_anchors
from qkdproxy.tls.keyexchange import KeyContext, QkdOptions
from qkdproxy.tls.peer import open_peer_channel
from qkdproxy.tls.session import HandshakeError
from qkdproxy.tunnel.addresses import TcpAddress
from qkdproxy.tunnel.kmeconn import KmeConnection


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the daemon commands."""
    run_parser = commands.add_parser(
        "run", help="run the tunnels of a configuration file",
        description="Exit codes: 0 stopped cleanly, 1 could not start, 2 bad configuration.",
    )  # fmt: skip
    run_parser.add_argument("--config", type=Path, required=True, help="TOML file")
    run_parser.set_defaults(handler=run_command)

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=check_command)

    probe = commands.add_parser(
        "probe", help="connect once to a client tunnel's peer and report the handshake"
    )
    probe.add_argument("--config", type=Path, required=True, help="TOML file")
    probe.add_argument("--tunnel", help="client tunnel name (default: the first)")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.set_defaults(handler=probe_command)


def _load(path: Path, command: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"qkdproxy {command}: {problem}", file=sys.stderr)
        return None


def check_command(args: argparse.Namespace) -> int:
    """Validate the TOML and the files it names (certificates, keys, CA bundles)."""
    config = _load(args.file, "check-config")
    if config is None:
        return EXIT_CONFIG
    try:
        for kme in config.kmes.values():
            Credentials.load(kme.cert, kme.key)
            load_trust_anchors(kme.ca)
        for tunnel in config.tunnels:
            build_endpoint(tunnel, KeyContext(KeySources()), tunnel.plan.groups)
    except (CredentialError, ValueError) as exc:
        print(f"qkdproxy check-config: {args.file}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.file}: OK ({len(config.tunnels)} tunnels, {len(config.kmes)} KMEs)")
    return EXIT_OK


def run_command(args: argparse.Namespace) -> int:
    """Run until SIGTERM."""
    config = _load(args.config, "run")
    if config is None:
        return EXIT_CONFIG
    logging.basicConfig(
        level=config.daemon.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return run(_run(config))


async def _run(config: Config) -> int:
    daemon = Daemon(config)
    daemon.handle_signals()
    try:
        await daemon.start()
    except (CredentialError, ValueError) as exc:
        # A certificate, key or CA file named by the configuration is unusable.
        print(f"qkdproxy run: {config.path}: {exc}", file=sys.stderr)
        await daemon.close()
        return EXIT_CONFIG
    except OSError as exc:
        print(f"qkdproxy run: cannot start: {exc}", file=sys.stderr)
        await daemon.close()
        return EXIT_START_FAILED
    return await daemon.run()


def probe_command(args: argparse.Namespace) -> int:
    """One handshake with the peer of a client tunnel; report what was negotiated."""
    config = _load(args.config, "probe")
    if config is None:
        return EXIT_CONFIG
    clients = [t for t in config.tunnels if t.role == "client"]
    chosen = [t for t in clients if args.tunnel in (None, t.name)]
    if not chosen:
        print("qkdproxy probe: no such client tunnel", file=sys.stderr)
        return EXIT_CONFIG
    result = run(_probe(config, chosen[0]))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value}")
    return EXIT_OK if result.get("ok") else EXIT_START_FAILED


async def _probe(config: Config, tunnel: TunnelConfig) -> dict[str, object]:
    kme = KmeConnection.open(config.kmes[tunnel.kme]) if tunnel.kme else None
    try:
        options = QkdOptions(flow=tunnel.flow, api=kme.config.api) if kme else QkdOptions()
        keys = KeyContext(kme.sources_for(tunnel) if kme else KeySources(), options)
        endpoint = build_endpoint(tunnel, keys, tunnel.plan.groups)
        peer = tunnel.connect
        assert isinstance(peer, TcpAddress)
        started = time.perf_counter()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(peer.host, peer.port), tunnel.connect_timeout_s
        )
        connected = time.perf_counter()
        stream = await endpoint.connect(reader, writer)
        result: dict[str, object] = {
            "ok": True,
            "tunnel": tunnel.name,
            "peer_address": str(peer),
            "peer": stream.peer.describe(),
            "group": stream.record.group,
            "flow": stream.record.flow.value if stream.record.flow else None,
            "api": stream.record.api.value if stream.record.api else None,
            "qkd_key_id": stream.record.qkd_key_id,
            "hello_retry": stream.record.hello_retry,
            "cipher": stream.cipher,
            "alpn": stream.alpn,
            "connect_ms": round((connected - started) * 1000, 3),
            "handshake_ms": round(stream.handshake_seconds * 1000, 3),
        }
        channel = await open_peer_channel(stream, keys.sources)
        if channel is not None:
            await channel.send_fin()
        await stream.close()
        return result
    except HandshakeError as exc:
        return {"ok": False, "tunnel": tunnel.name, "error": f"handshake failed: {exc.reason}"}
    except (OSError, TimeoutError) as exc:
        return {"ok": False, "tunnel": tunnel.name, "error": f"cannot connect: {exc}"}
    finally:
        if kme is not None:
            await kme.aclose()
