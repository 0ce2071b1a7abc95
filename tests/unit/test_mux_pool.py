"""The client pool's establishments around a stop: what a cut tunnel's line says, and that a
stopped pool finishes the establishment in progress instead of cutting its handshake."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from qkdproxy.core.mux import MuxConnection
from qkdproxy.daemon.config import MuxSettings
from qkdproxy.daemon.muxconn import MuxTunnel
from qkdproxy.daemon.muxpool import MuxPool
from qkdproxy.daemon.pump import RekeyBudget


class DialledTunnel(MuxTunnel):
    """A tunnel whose handshake is done: it has no transport, and records how it ended."""

    def __init__(self, waiting: asyncio.Event) -> None:
        super().__init__(
            cast(Any, None), cast(Any, None), MuxConnection(client=True, max_streams=10),
            keepalive_s=0, rekey=RekeyBudget(),
        )  # fmt: skip
        self.ends: list[str] = []
        self.gone = asyncio.Event()
        self._waiting = waiting

    async def wait_settled(self) -> bool:
        self._waiting.set()
        return await super().wait_settled()

    async def drain(self, why: str = "closed") -> None:
        await self.close(why)

    async def close(self, why: str = "closed") -> None:
        self.ends.append(why)
        self.gone.set()


class Dialler:
    """The pool's dial: one fresh tunnel per call."""

    def __init__(self) -> None:
        self.made: list[DialledTunnel] = []
        self.settling = asyncio.Event()

    async def __call__(self) -> MuxTunnel:
        self.made.append(DialledTunnel(self.settling))
        return self.made[-1]


async def settling(dial: Dialler) -> DialledTunnel:
    """The first tunnel, once the pool waits for its SETTINGS."""
    await dial.settling.wait()
    return dial.made[0]


async def test_a_tunnel_cut_by_the_pool_closing_is_closed_not_blamed_on_the_peer() -> None:
    dial = Dialler()
    pool = MuxPool(MuxSettings(enabled=True), dial, wait_s=60.0)
    pool.start()
    tunnel = await settling(dial)
    await pool.close()
    assert tunnel.ends == ["closed"]


async def test_a_peer_that_sends_no_settings_in_time_is_named() -> None:
    dial = Dialler()
    pool = MuxPool(MuxSettings(enabled=True, pool_min=0), dial, wait_s=0.01)
    with pytest.raises(TimeoutError):
        await pool.open()
    await dial.made[0].gone.wait()  # retired: its drain runs in the background
    assert dial.made[0].ends == ["no SETTINGS from the peer"]
    await pool.close()


async def test_a_stopped_pool_finishes_the_establishment_in_progress_and_starts_none() -> None:
    dial = Dialler()
    pool = MuxPool(MuxSettings(enabled=True, pool_min=2), dial, wait_s=60.0)
    pool.start()
    tunnel = await settling(dial)
    pool.stop()
    maintainer = pool.maintainer
    assert maintainer is not None
    tunnel.settled.set()
    await maintainer  # ends with its round, not cut mid-establishment (that would raise)
    # It joined the pool, and no second one was dialled to reach pool_min.
    assert pool.tunnels == [tunnel] and len(dial.made) == 1
    assert tunnel.ends == []
    await pool.close()
    assert tunnel.ends == ["closed"]


async def test_a_pool_stopped_outside_a_round_stops_at_once() -> None:
    dial = Dialler()
    pool = MuxPool(MuxSettings(enabled=True), dial, wait_s=60.0)
    pool.start()
    pool.stop()
    maintainer = pool.maintainer
    assert maintainer is not None
    await asyncio.gather(maintainer, return_exceptions=True)
    assert dial.made == []
    await pool.close()
