"""The per-tunnel Extended Key Update policy: configuration keys and the fresh-key task
(driven with a fake stream; the real thing runs in tests/integration/test_eku_soak.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from qkdproxy.daemon import pump
from qkdproxy.daemon.config import load_config
from qkdproxy.daemon.pump import FreshKeyBudget, Traffic, refresh_keys
from qkdproxy.io.tls_stream import TlsStreamError
from tests.unit.test_config import CLIENT, KME, problems, write


def test_fresh_key_settings_default_and_parse(tmp_path: Path) -> None:
    (default,) = load_config(write(tmp_path, KME + CLIENT)).tunnels
    assert default.fresh_key_update and not default.require_fresh_key_update
    assert (default.fresh_key_interval_s, default.fresh_key_bytes) == (600.0, 64 << 30)
    text = (
        KME
        + CLIENT
        + (
            "fresh_key_update = false\nrequire_fresh_key_update = true\n"
            "fresh_key_interval_s = 0\nfresh_key_bytes = 1048576\n"
        )
    )
    (tunnel,) = load_config(write(tmp_path, text)).tunnels
    assert not tunnel.fresh_key_update and tunnel.require_fresh_key_update
    assert (tunnel.fresh_key_interval_s, tunnel.fresh_key_bytes) == (0.0, 1 << 20)
    # Independent of the plain KeyUpdate budget.
    assert (tunnel.rekey_bytes, tunnel.rekey_interval_s) == (default.rekey_bytes, 3600.0)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("fresh_key_interval_s = -1", "fresh_key_interval_s"),
        ("fresh_key_bytes = -5", "fresh_key_bytes"),
        ('require_fresh_key_update = "yes"', "require_fresh_key_update"),
    ],
)
def test_bad_fresh_key_settings_are_named(tmp_path: Path, line: str, key: str) -> None:
    assert any(key in p for p in problems(tmp_path, KME + CLIENT + line + "\n"))


class FakeStream:
    """What the fresh-key task uses of a TlsStream: it records the updates asked for and
    completes each at once."""

    def __init__(self, originator: bool) -> None:
        self.fresh_key_originator = originator
        self.fresh_keys_at = time.monotonic()
        self.asked = 0

    async def fresh_key_update(self) -> bool:
        self.asked += 1
        self.fresh_keys_at = time.monotonic()
        return True

    async def check_fresh_key_deadline(self) -> None:
        if self.overdue:
            raise TlsStreamError("fresh key update not finished within 10 s")

    overdue = False


async def run_for(stream: FakeStream, traffic: Traffic, budget: FreshKeyBudget, s: float) -> None:
    task = asyncio.create_task(refresh_keys(stream, traffic, budget))  # type: ignore[arg-type]
    await asyncio.sleep(s)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_byte_budget_starts_an_update(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pump, "FRESH_KEY_POLL_S", 0.01)
    stream, traffic = FakeStream(originator=True), Traffic()
    traffic.to_peer = 10  # before the task starts: not counted
    budget = FreshKeyBudget(max_bytes=1000, max_seconds=0)
    task = asyncio.create_task(refresh_keys(stream, traffic, budget))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert stream.asked == 0
    traffic.from_peer += 600
    traffic.to_peer += 500
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert stream.asked == 1


async def test_the_non_originator_leaves_equal_budgets_to_its_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pump, "FRESH_KEY_POLL_S", 0.01)
    budget = FreshKeyBudget(max_bytes=0, max_seconds=10.0)
    originator, other = FakeStream(True), FakeStream(False)
    for stream in (originator, other):
        stream.fresh_keys_at -= 11.0  # both budgets spent; 1.5x of it is not
    await asyncio.gather(
        run_for(originator, Traffic(), budget, 0.05), run_for(other, Traffic(), budget, 0.05)
    )
    assert originator.asked == 1  # and its clock restarted
    assert other.asked == 0


async def test_an_overdue_update_ends_the_task_even_without_a_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no budget of its own the task still watches the peer's updates' deadline."""
    monkeypatch.setattr(pump, "FRESH_KEY_POLL_S", 0.01)
    stream = FakeStream(originator=False)
    task = asyncio.create_task(refresh_keys(stream, Traffic(), FreshKeyBudget(0, 0)))  # type: ignore[arg-type]
    await asyncio.sleep(0.03)
    assert not task.done() and stream.asked == 0
    stream.overdue = True
    await asyncio.wait_for(task, 1)  # returned: the stream failed closed
