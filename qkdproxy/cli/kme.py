"""``qkdproxy kme`` and ``qkdproxy certs``: run the simulator pair, write the dev PKI."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

from qkdproxy.cli.args import given, remember_given
from qkdproxy.core.etsi004.qos import NEGOTIABLE, U32_MAX
from qkdproxy.core.tls.credentials import CredentialError, Credentials, load_trust_anchors
from qkdproxy.sim.faults import FaultScript, FaultScriptError
from qkdproxy.sim.link import LinkSettings
from qkdproxy.sim.node import IdentitySource
from qkdproxy.sim.quirks import Quirk, parse_quirks
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.certs import KMES, write_dev_pki

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_LINK = LinkSettings()


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kme`` and ``certs`` on the top-level parser."""
    certs = commands.add_parser(
        "certs", help="write the development PKI (CA, KME, SAE and tunnel certificates)"
    )
    certs.add_argument("--out", type=Path, default=Path("pki"), help="directory (default: pki)")
    certs.add_argument("--force", action="store_true", help="replace an existing PKI")
    certs.set_defaults(handler=certs_command)

    kme = commands.add_parser(
        "kme", help="run the KME simulator pair (ETSI 014 and 004 over mTLS)",
        description="Two simulated KMEs joined by a QKD link. Prints one JSON line with the "
        "ETSI 014 URLs and ETSI 004 addresses once both listen; stops on SIGINT/SIGTERM.",
    )  # fmt: skip
    kme.add_argument(
        "--config",
        type=Path,
        help="TOML file with a [simulator] table (its keys are the long options below, "
        "with '_' for '-'); options given on the command line override its values",
    )
    kme.add_argument(
        "--pki",
        type=Path,
        default=Path("pki"),
        help="directory written by 'qkdproxy certs' (default: pki)",
    )
    kme.add_argument("--host", default="127.0.0.1")
    kme.add_argument("--port-a", type=int, default=0, help="ETSI 014 port of kme-a (0: any)")
    kme.add_argument("--port-b", type=int, default=0, help="ETSI 014 port of kme-b (0: any)")
    kme.add_argument("--port-004-a", type=int, default=0, help="ETSI 004 port of kme-a")
    kme.add_argument("--port-004-b", type=int, default=0, help="ETSI 004 port of kme-b")
    kme.add_argument(
        "--rate-bps",
        type=float,
        default=DEFAULT_LINK.rate_bps,
        help="secret key rate of the link, bits/s",
    )
    kme.add_argument(
        "--pool-bits", type=int, default=DEFAULT_LINK.pool_bits, help="key pool size, bits"
    )
    kme.add_argument(
        "--key-ttl-s",
        type=float,
        default=DEFAULT_LINK.key_ttl_s,
        help="seconds before undelivered key material expires",
    )
    kme.add_argument("--latency-ms", type=float, default=0.0, help="added to every call")
    kme.add_argument("--faults", type=Path, help="JSON fault script (see docs/KME.md)")
    kme.add_argument(
        "--identity",
        choices=["cn", "uri"],
        default="cn",
        help="SAE id from the client certificate CN or URI SAN",
    )
    kme.add_argument(
        "--quirk",
        action="append",
        default=[],
        choices=[q.value for q in Quirk if q is not Quirk.CN_ONLY],
        help="reproduce a deviation from ETSI 014 seen in real KMEs (repeatable; "
        "docs/KME.md). For CN-only KME certificates, put such certificates in --pki",
    )
    kme.add_argument(
        "--qos-demand",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="ETSI 004: a QoS value the KMEs insist on (max_bps, min_bps, jitter, priority, "
        "timeout_ms, ttl_s); other values get status 7 with it as counter-proposal (repeatable)",
    )
    remember_given(kme)
    kme.set_defaults(handler=kme_command)  # fmt: skip


def certs_command(args: argparse.Namespace) -> int:
    """Write the PKI; refuse to overwrite unless --force."""
    try:
        written = write_dev_pki(args.out, force=args.force)
    except (FileExistsError, OSError) as exc:
        print(f"qkdproxy certs: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {len(written)} files to {args.out}")
    return EXIT_OK


def _settings(args: argparse.Namespace) -> SimulatorSettings:
    script = FaultScript()
    if args.faults:
        try:
            script = FaultScript.from_mapping(json.loads(args.faults.read_text()))
        except (OSError, ValueError) as exc:
            raise FaultScriptError(f"{args.faults}: {exc}") from None
    if args.latency_ms:
        script = replace(script, fixed_ms=args.latency_ms)
    return SimulatorSettings(
        host=args.host,
        ports_014=(args.port_a, args.port_b),
        ports_004=(args.port_004_a, args.port_004_b),
        link=LinkSettings(args.rate_bps, args.pool_bits, args.key_ttl_s),
        faults=script,
        identity=IdentitySource(args.identity),
        quirks=parse_quirks(args.quirk),
        qos_demands=parse_qos_demands(args.qos_demand),
    )


def parse_qos_demands(items: list[str]) -> tuple[tuple[str, int], ...]:
    """``["min_bps=1000", ...]``; ValueError naming the bad item."""
    demands = []
    for item in items:
        name, _, value = item.partition("=")
        if name not in NEGOTIABLE or not value.isdigit() or int(value) > U32_MAX:
            fields = ", ".join(NEGOTIABLE)
            raise ValueError(
                f"--qos-demand {item!r}: want FIELD=VALUE, FIELD one of {fields}, "
                "VALUE a 32-bit unsigned integer"
            )
        demands.append((name, int(value)))
    return tuple(demands)


CONFIG_KEYS: dict[str, type] = {
    "pki": Path, "host": str, "port_a": int, "port_b": int, "port_004_a": int,
    "port_004_b": int, "rate_bps": float, "pool_bits": int, "key_ttl_s": float,
    "latency_ms": float, "faults": Path, "identity": str, "quirk": list, "qos_demand": list,
}  # fmt: skip


def _apply_config(args: argparse.Namespace) -> None:
    """Take the [simulator] table of --config; relative paths are relative to that file."""
    try:
        table = tomllib.loads(args.config.read_text()).get("simulator", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{args.config}: {exc}") from None
    explicit = given(args)
    for key, value in table.items():
        kind = CONFIG_KEYS.get(key)
        if kind is None:
            raise ValueError(f"{args.config}: simulator.{key}: unknown key")
        if kind is Path:
            if key not in explicit:
                setattr(args, key, args.config.parent / str(value))
            continue
        number_ok = kind in (int, float) and isinstance(value, int | float)
        if isinstance(value, bool) or not (isinstance(value, kind) or number_ok):
            raise ValueError(f"{args.config}: simulator.{key}: must be a {kind.__name__}")
        if key not in explicit:  # the command line wins
            setattr(args, key, kind(value))


def kme_command(args: argparse.Namespace) -> int:
    """Run the pair until a signal arrives."""
    try:
        if args.config is not None:
            _apply_config(args)
        settings = _settings(args)
        anchors = load_trust_anchors(args.pki / "ca.pem")
        credentials = [Credentials.load(args.pki / f"{k}.pem", args.pki / f"{k}-key.pem")
                       for k in KMES]  # fmt: skip
    except (FaultScriptError, CredentialError, ValueError) as exc:
        print(f"qkdproxy kme: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_serve(KmePair(settings, credentials, anchors)))


async def _serve(pair: KmePair) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await pair.start()
    except OSError as exc:
        print(f"qkdproxy kme: cannot listen: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    ids = pair.settings.kme_ids
    announcement = {
        "kme": dict(zip(ids, pair.urls_014, strict=True)),
        "etsi004": {
            k: f"{pair.settings.host}:{p}" for k, p in zip(ids, pair.ports_004, strict=True)
        },
    }
    print(json.dumps(announcement), flush=True)
    await stop.wait()
    await pair.stop()
    return EXIT_OK
