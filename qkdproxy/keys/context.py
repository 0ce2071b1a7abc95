"""The key context of one endpoint: its key sources and what its handshakes share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from qkdproxy.core.accounting import KeyIdGuard, KeyLedger
from qkdproxy.core.tls.keyexchange import QkdOptions, SpendGate
from qkdproxy.keys.loops import HeldLoop
from qkdproxy.keys.sources import KeySources


@dataclass(slots=True)
class KeyContext:
    """What all handshakes of one endpoint share: key sources, accounting, replay guard
    (the key exchange sees it as an :class:`~qkdproxy.core.tls.keyexchange.ExchangeContext`)."""

    sources: KeySources
    options: QkdOptions = field(default_factory=QkdOptions)
    ledger: KeyLedger = field(default_factory=KeyLedger)
    guard: KeyIdGuard = field(default_factory=KeyIdGuard)
    # Clean-up calls (ETSI 004 CLOSE) running after their handshake ended.
    background: set[asyncio.Task[None]] = field(default_factory=set)
    # Server only: what an unauthenticated hello may cost (None: no limit).
    gate: SpendGate | None = None
    # Where the clean-up calls run.
    loop: HeldLoop = field(default_factory=HeldLoop)

    async def drain(self) -> None:
        """Wait for the clean-up calls still running (each bounded by its own timeout)."""
        # Not ``while self.background``: a finished task leaves the set in a callback, and
        # from Python 3.12 gathering finished tasks completes without yielding to the loop,
        # so that callback would never run (a busy loop).
        while pending := [task for task in self.background if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
