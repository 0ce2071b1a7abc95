"""The mux pool's establishment backoff: what connections get while it lasts."""

from __future__ import annotations

import contextlib
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


async def test_a_reload_grants_one_attempt_not_a_fresh_backoff() -> None:
    # A reload lets the next connection try at once (the failure may have been the old
    # settings'), but the backoff keeps its level: had it started again at 0.25 s, a peer
    # that fails every establishment (each costs a QKD key) would get about seven more
    # per reload (0.25 + 0.5 + ... to the 30 s cap), and a reload every few seconds
    # (certificate rotation, a config watcher) would undo the cap.
    now = [0.0]
    dials = [0]

    async def failing() -> MuxTunnel | PlainTunnel:
        dials[0] += 1
        raise ConnectionRefusedError("refused")

    pool = MuxPool(MuxSettings(enabled=True, pool_min=0), failing, wait_s=1, clock=lambda: now[0])

    async def attempt(after_s: float) -> None:
        now[0] += after_s
        with contextlib.suppress(ConnectionRefusedError):
            await pool.open()

    for wait in (0.0, 0.25, 0.5, 1.0, 2.0):  # each just at the end of the backoff before
        await attempt(wait)
    assert dials[0] == 5  # the backoff is now 4 s
    pool.reconfigured(lambda tunnel: False, "reloaded")
    await attempt(0.0)
    assert dials[0] == 6  # the reload's attempt
    await attempt(4.0)
    assert dials[0] == 6  # still within the backoff, now 8 s
    await attempt(4.0)
    assert dials[0] == 7
