"""Metrics, health and status of running daemons, scraped over HTTP; shipped dashboard and
alert rules checked against what the daemon really exports."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from qkdproxy.daemon.app import Daemon
from tests.integration.test_tunnel_runtime import Setup, port, setup, transfer

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")
requires_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package: prometheus)"
)
STATUS = '\n[status]\nlisten = "127.0.0.1:0"\n'


async def get(daemon: Daemon, path: str) -> tuple[int, str]:
    assert daemon.status_server is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{daemon.status_server.address}{path}") as response,
    ):
        return response.status, await response.text()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def exported_names(text: str) -> set[str]:
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    suffixes = ("", "_total", "_bucket", "_count", "_sum", "_created", "_info")
    return {family + suffix for family in families for suffix in suffixes}


async def traffic_through(s: Setup, server: Daemon, client: Daemon, count: int = 3) -> None:
    for _ in range(count):
        assert await transfer(port(client), b"metrics move") == b"metrics move"
    for daemon in (client, server):
        await asyncio.wait_for(daemon.tunnels[0].wait_idle(), 10)


async def test_figures_move_with_real_traffic(tmp_path: Path) -> None:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml() + STATUS) as server,
        s.daemon("client", s.client_toml(port(server)) + STATUS) as client,
    ):
        _, before = await get(client, "/metrics")
        await traffic_through(s, server, client)
        _, text = await get(client, "/metrics")
        status, health = await get(client, "/healthz")
        ready_status, ready = await get(client, "/readyz")
        _, document = await get(client, "/status")
        _, server_text = await get(server, "/metrics")
    assert sample(before, "qkdproxy_handshakes_total") == 0
    # The server accounts for the key of every handshake: announced (in memory, or after
    # waiting for its fetch) or not (the first connection's key had no earlier connection).
    announced = sample(server_text, "qkdproxy_qkd_prefetch_keys_total", outcome="served_from_cache")
    unannounced = sample(
        server_text, "qkdproxy_qkd_prefetch_keys_total", outcome="fetched_unannounced"
    )
    assert announced + unannounced == 3 and unannounced >= 1
    assert 'outcome="served_after_wait"' in server_text
    assert sample(text, "qkdproxy_handshakes_total", result="success", group="qkd_mlkem768") == 3
    assert sample(text, "qkdproxy_handshake_duration_seconds_count", tunnel="t") == 3
    assert sample(text, "qkdproxy_qkd_keys_total", fate="consumed") == 3
    assert sample(text, "qkdproxy_qkd_key_bytes_total", fate="consumed") == 96
    assert sample(text, "qkdproxy_sent_bytes_total", tunnel="t") == 3 * len(b"metrics move")
    assert sample(text, "qkdproxy_connections_closed_total", reason="closed") == 3
    assert sample(text, "qkdproxy_connections_opened_total") == 3
    assert sample(text, "qkdproxy_kme_request_duration_seconds_count", call="enc_keys") >= 1
    assert sample(text, "qkdproxy_qkd_prefetch_keys_total", outcome="served_from_buffer") == 3
    assert sample(text, "qkdproxy_qkd_key_buffer_depth", kme="local") > 0
    assert sample(text, "qkdproxy_kme_up", kme="local") == 1
    assert sample(text, "qkdproxy_kme_circuit_breaker_state", kme="local") == 0
    assert 'qkdproxy_build_info{version="' in text
    assert 'groups="qkd_mlkem768"' in text and 'policy="qkd-pq-required"' in text
    assert sample(text, "qkdproxy_certificate_expiration_timestamp_seconds", owner="tunnel:t") > 0
    assert (status, health.strip()) == (200, "ok")
    assert ready_status == 200 and json.loads(ready) == {"ready": True, "reasons": []}
    tunnel = json.loads(document)["tunnels"][0]
    assert tunnel["qkd_keys_consumed"] == 3 and tunnel["opened"] == 3


async def test_kme_failure_shows_in_errors_and_readiness(tmp_path: Path) -> None:
    async with setup(tmp_path) as s, s.daemon("server", s.server_toml() + STATUS) as server:
        # Without prefetch the client asks its KME for every key, so the outage shows at once.
        on_demand = s.client_toml(port(server)).replace(
            'ca = "pki/ca.pem"', 'ca = "pki/ca.pem"\nprefetch = false', 1
        )
        async with s.daemon("client", on_demand + STATUS) as client:
            await traffic_through(s, server, client, count=1)
            await s.pair.stop()
            assert await transfer(port(client), b"no key") == b""
            await asyncio.wait_for(client.tunnels[0].wait_idle(), 10)
            _, text = await get(client, "/metrics")
            ready_status, ready = await get(client, "/readyz")
            await s.pair.start()  # the exit stack stops it again
    assert sample(text, "qkdproxy_kme_errors_total", kme="local", call="enc_keys") >= 1
    assert sample(text, "qkdproxy_kme_up", kme="local") == 0
    assert sample(text, "qkdproxy_handshakes_total", result="failure") == 1
    assert sample(text, "qkdproxy_handshake_failures_total", reason="internal_error") == 1
    assert ready_status == 503
    assert "requires QKD" in json.loads(ready)["reasons"][0]


async def test_reloads_are_counted(tmp_path: Path) -> None:
    async with setup(tmp_path) as s, s.daemon("server", s.server_toml() + STATUS) as server:
        server.reload()
        (tmp_path / "server.toml").write_text(s.server_toml("bogus = 1") + STATUS)
        server.reload()
        _, text = await get(server, "/metrics")
    assert sample(text, "qkdproxy_reloads_total", result="success") == 1
    assert sample(text, "qkdproxy_reloads_total", result="failure") == 1


async def scrape_after_traffic(tmp_path: Path) -> str:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml() + STATUS) as server,
        s.daemon("client", s.client_toml(port(server)) + STATUS) as client,
    ):
        await traffic_through(s, server, client, count=2)
        return (await get(client, "/metrics"))[1]


@requires_promtool
async def test_exposition_passes_promtool(tmp_path: Path) -> None:
    text = await scrape_after_traffic(tmp_path)
    result = await asyncio.to_thread(
        subprocess.run, [str(PROMTOOL), "check", "metrics"], input=text,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@requires_promtool
def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(ROOT / "etc/prometheus-alerts.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 rules found" in result.stdout


async def test_dashboard_and_rules_only_name_exported_metrics(tmp_path: Path) -> None:
    exported = exported_names(await scrape_after_traffic(tmp_path))
    dashboard = json.loads((ROOT / "etc/grafana-qkdproxy.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    expressions += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = (ROOT / "etc/prometheus-alerts.yml").read_text()
    expressions += re.findall(r"expr: \|?\s*\n?\s*(.+)", rules)
    named = {n for e in expressions for n in re.findall(r"qkdproxy_[a-z0-9_]+", e)}
    assert len(named) > 15
    assert named <= exported, sorted(named - exported)
    titles = {p["title"] for p in dashboard["panels"]}
    for topic in ("Handshake latency", "QKD keys", "KME latency", "Traffic"):
        assert any(topic in t for t in titles), topic
