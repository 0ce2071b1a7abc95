"""The mux pool's establishment backoff: what connections get while it lasts."""

from __future__ import annotations

import traceback

from qkdproxy.daemon.config import MuxSettings
from qkdproxy.daemon.muxconn import MuxTunnel
from qkdproxy.daemon.muxpool import MuxPool, PlainTunnel


async def test_connections_during_a_backoff_do_not_pile_up_on_one_traceback() -> None:
    # Each connection in a backoff gets the failure that set it, raised again: if the same
    # exception object carried every raise's frames, a backoff (up to 30 s) of connections
    # would keep each one's frames (and what they refer to) alive until the next failure.
    async def unreachable() -> MuxTunnel | PlainTunnel:
        raise ConnectionRefusedError("peer down")

    pool = MuxPool(MuxSettings(enabled=True, pool_min=0), unreachable, wait_s=1, clock=lambda: 0.0)
    depths = []
    for _ in range(50):
        try:
            await pool.open()
        except ConnectionRefusedError as exc:
            depths.append(len(traceback.extract_tb(exc.__traceback__)))
    assert pool.establish_failures == 1  # the rest were inside the backoff
    assert max(depths) <= depths[0]
