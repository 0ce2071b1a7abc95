"""Metrics an operator can use: process metrics, no ``*_created`` series, byte counters that
move while a connection lives, /status counts that add up, CA expiry; alerts and dashboard
panels that never aggregate the daemon away."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.integration.test_observability import ROOT, STATUS, get, sample
from tests.integration.test_tunnel_runtime import port, setup

KEY_ALERTS = re.compile(r"Qkdproxy(Key|KmePool)")
ALERTS = ROOT / "etc/prometheus-alerts.yml"
DASHBOARD = ROOT / "etc/grafana-qkdproxy.json"
# Metrics labelled per tunnel and role: aggregations over them keep both.
TUNNEL_METRICS = re.compile(
    r"qkdproxy_(handshake|connections|sent_bytes|received_bytes|policy_fallbacks)"
)


async def test_process_metrics_live_bytes_consistent_counts_and_ca_expiry(
    tmp_path: Path,
) -> None:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml() + STATUS) as server,
        s.daemon("client", s.client_toml(port(server), "max_connections = 1") + STATUS) as client,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
        writer.write(b"x" * 5000)
        await writer.drain()
        assert len(await asyncio.wait_for(reader.readexactly(5000), 20)) == 5000
        # The connection is still open: its bytes already count.
        _, live = await get(client, "/metrics")
        # One more connection is refused at the limit: it is neither opened nor closed.
        extra_reader, extra = await asyncio.open_connection("127.0.0.1", port(client))
        # Admission control resets a refused connection at once (no TLS work).
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(extra_reader.read(), 20)
        extra.close()
        writer.close()
        await asyncio.wait_for(client.tunnels[0].wait_idle(), 10)
        _, text = await get(client, "/metrics")
        _, document = await get(client, "/status")
    assert sample(live, "qkdproxy_sent_bytes_total", tunnel="t", role="client") == 5000
    assert sample(live, "qkdproxy_received_bytes_total", tunnel="t", role="client") == 5000
    assert sample(text, "qkdproxy_sent_bytes_total", tunnel="t") == 5000  # not counted twice
    assert sample(text, "process_resident_memory_bytes") > 0
    assert "_created" not in text
    assert sample(text, "qkdproxy_config_last_reload_successful") == 1
    for owner in ("tunnel:t", "kme:local"):
        assert sample(
            text, "qkdproxy_certificate_expiration_timestamp_seconds", owner=owner,
            certificate="ca",
        ) > 0  # fmt: skip
    tunnel = json.loads(document)["tunnels"][0]
    assert tunnel["rejected_at_limit"] == 1
    assert (tunnel["opened"], tunnel["closed"], tunnel["active"]) == (1, 1, 0)


def by_clauses(expression: str) -> list[tuple[set[str], str]]:
    """(labels of each ``by (...)``, the metric it aggregates) in a PromQL expression."""
    out = []
    for m in re.finditer(r"\bby \(([^)]*)\)", expression):
        metric = re.search(r"\b(?:qkdproxy|process)_\w+", expression[m.end() :])
        out.append(({x.strip() for x in m.group(1).split(",")}, metric[0] if metric else ""))
    return out


def check_aggregations(expression: str, where: str, keep: set[str]) -> None:
    """The convention: never aggregate the daemon away; tunnel metrics keep ``keep`` too."""
    for labels, metric in by_clauses(expression):
        assert "instance" in labels, where
        if TUNNEL_METRICS.match(metric):
            assert keep <= labels, where


def test_alerts_keep_the_daemon_and_the_role() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"QkdproxyReloadFailed", "QkdproxyTargetDown", "QkdproxyRejectionSurge"} <= names
    for rule in rules:
        check_aggregations(rule["expr"], rule["alert"], {"role", "tunnel"})
        if not KEY_ALERTS.match(rule["alert"]):  # their text is issue 12's
            assert "instance" in rule["annotations"]["summary"], rule["alert"]
    certificate = next(r for r in rules if r["alert"] == "QkdproxyCertificateExpiring")
    assert "systemctl reload" in certificate["annotations"]["description"]


def test_dashboard_has_instance_and_role_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert {"instance", "role", "tunnel"} <= set(variables)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr, legend = target["expr"], target["legendFormat"]
            assert legend.startswith("{{instance}}"), panel["title"]
            assert 'instance=~"$instance"' in expr, panel["title"]
            check_aggregations(expr, panel["title"], {"role"})
            if TUNNEL_METRICS.search(expr):
                assert 'role=~"$role"' in expr, panel["title"]
