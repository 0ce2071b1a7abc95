"""``qkdproxy probe``: one connection through a client tunnel's peer, end to end.

A handshake alone proves little: in TLS 1.3 the client finishes before the server has
checked the client certificate, so a server that refuses us (``access_denied``,
``unknown_ca``) or cannot reach its backend still lets the handshake "succeed". The probe
therefore asks the server for its verdict (a ``qkdproxy/1`` PROBE frame) and reports
success only once the server answered that its backend is connected.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from qkdproxy.core.addresses import TcpAddress
from qkdproxy.core.peer.frames import VERDICT_OK
from qkdproxy.core.tls.wire import Alert
from qkdproxy.daemon.app import build_endpoint, tunnel_qkd_options
from qkdproxy.daemon.config import Config, TunnelConfig
from qkdproxy.daemon.kme_binding import KmeConnection
from qkdproxy.io.peer_channel import open_peer_channel
from qkdproxy.io.tls_stream import HandshakeError, TlsStreamError
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.sources import KeySources

# Past the server's own backend connect timeout (which we cannot see), how long we wait.
VERDICT_MARGIN_S = 5.0


def alert_name(alert: int | None) -> str:
    """``access_denied`` for 49; ``alert_N`` for a number outside the registry."""
    if alert is None:
        return "closed"
    try:
        return Alert(alert).name.lower()
    except ValueError:
        return f"alert_{alert}"


def _failed(result: dict[str, Any], stage: str, reason: str, error: str) -> dict[str, Any]:
    return result | {"ok": False, "stage": stage, "reason": reason, "error": error}


async def probe(config: Config, tunnel: TunnelConfig) -> dict[str, Any]:
    """Connect, handshake, ask for the verdict; a JSON-ready result (``ok`` says it all)."""
    result: dict[str, Any] = {"ok": False, "tunnel": tunnel.name}
    kme = KmeConnection.open(config.kmes[tunnel.kme]) if tunnel.kme else None
    try:
        options = tunnel_qkd_options(tunnel, kme.config if kme else None)
        keys = KeyContext(kme.sources_for(tunnel) if kme else KeySources(), options)
        endpoint = build_endpoint(tunnel, keys, tunnel.plan.groups)
        peer = tunnel.connect
        assert isinstance(peer, TcpAddress)
        result["peer_address"] = str(peer)
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(peer.host, peer.port), tunnel.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            text = getattr(exc, "strerror", None) or type(exc).__name__
            return _failed(result, "connect", "connect_failed", f"cannot connect: {text}")
        result["connect_ms"] = round((time.perf_counter() - started) * 1000, 3)
        try:
            stream = await endpoint.connect(reader, writer)
        except HandshakeError as exc:
            side = "the server refused" if exc.remote else "we refused"
            return _failed(
                result, "handshake", alert_name(exc.alert),
                f"handshake failed ({side}): {exc.reason}",
            )  # fmt: skip
        result |= {
            "peer": stream.peer.describe(),
            "group": stream.record.group,
            "flow": stream.record.flow.value if stream.record.flow else None,
            "api": stream.record.api.value if stream.record.api else None,
            "qkd_key_id": stream.record.qkd_key_id,
            "hello_retry": stream.record.hello_retry,
            "cipher": stream.cipher,
            "alpn": stream.alpn,
            "handshake_ms": round(stream.handshake_seconds * 1000, 3),
        }
        return await _verdict(result, stream, keys, tunnel.connect_timeout_s + VERDICT_MARGIN_S)
    finally:
        if kme is not None:
            await kme.aclose()


async def _verdict(
    result: dict[str, Any], stream: Any, keys: KeyContext, within: float
) -> dict[str, Any]:
    try:
        channel = await open_peer_channel(stream, keys.sources)
        if channel is None:
            return _failed(
                result, "verdict", "no_verdict",
                f"the peer speaks {stream.alpn or 'no ALPN protocol'}, not qkdproxy/1: "
                "the backend cannot be checked",
            )  # fmt: skip
        async with asyncio.timeout(within):
            verdict = await channel.probe()
    except TlsStreamError as exc:
        # The server checked our certificate after the handshake and said no.
        return _failed(
            result, "verdict", alert_name(exc.alert), f"the server refused us: {exc.reason}"
        )
    except ConnectionError as exc:
        return _failed(result, "verdict", "closed", f"the connection broke: {exc}")
    except TimeoutError:
        return _failed(result, "verdict", "timeout", f"no verdict from the server in {within} s")
    finally:
        await stream.close()
    if verdict is None:
        return _failed(
            result, "verdict", "no_verdict",
            "the server closed without a verdict (an older qkdproxy, or it dropped us)",
        )  # fmt: skip
    if verdict != VERDICT_OK:
        label = "backend_unreachable" if verdict.startswith("backend unreachable") else "refused"
        return _failed(result, "verdict", label, f"the server gave up: {verdict}")
    return result | {"ok": True, "stage": "done", "backend": "reached"}


def format_result(result: dict[str, Any]) -> str:
    """Human output: a verdict line, then one ``key: value`` line per field."""
    head = "OK: the server reached its backend" if result["ok"] else f"FAILED: {result['error']}"
    lines = [head]
    for key, value in result.items():
        if key in ("ok", "error"):
            continue
        shown = "yes" if value is True else "no" if value is False else value
        lines.append(f"{key:>14}: {'-' if shown is None else shown}")
    return "\n".join(lines)
