"""A long connection through two in-process daemons and the KME simulator, renewing its keys
with fresh QKD keys about every second (Extended Key Update), checksummed both ways.

Brief by default; ``QKDPROXY_EKU_SOAK_SECONDS=600 QKDPROXY_EKU_SOAK_INTERVAL=10`` runs the
issue's target (a 10-minute connection with a 10 s budget)."""

from __future__ import annotations

import os

import pytest

from qkdproxy.tools.bench.eku_soak import EkuSoakSettings, run_eku_soak

SECONDS = float(os.environ.get("QKDPROXY_EKU_SOAK_SECONDS", "6"))
INTERVAL = float(os.environ.get("QKDPROXY_EKU_SOAK_INTERVAL", "1"))


@pytest.mark.soak
@pytest.mark.timeout(SECONDS * 3 + 60)
async def test_a_long_connection_updates_with_fresh_qkd_keys_and_loses_no_byte() -> None:
    result = await run_eku_soak(EkuSoakSettings(seconds=SECONDS, interval_s=INTERVAL))
    assert result.problems() == []
    expected = SECONDS / INTERVAL
    updates = result.updates["client"]
    assert updates == result.updates["server"]
    assert expected * 0.6 <= updates <= expected + 1, result
    assert len(result.kme_deliveries) == updates
    assert result.bytes_sent > 0


@pytest.mark.soak
@pytest.mark.timeout(60)
async def test_etsi_004_connections_update_with_a_fresh_stream_each() -> None:
    result = await run_eku_soak(EkuSoakSettings(seconds=3, interval_s=1, api="004"))
    assert result.problems() == []
    assert result.updates["client"] == result.updates["server"] >= 1
