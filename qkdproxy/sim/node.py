"""One simulated KME: its identity, the shared link, its faults and its clock.

Both API servers of a KME (ETSI 014 over HTTPS, ETSI 004 over binary TLS) call
:meth:`KmeNode.admit` before serving a call, so latency, error bursts, resets, link-down
windows and scheduled exhaustion apply to both alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from qkdproxy.sim.faults import Decision, FaultInjector
from qkdproxy.sim.link import QkdLinkModel
from qkdproxy.sim.quirks import Quirk


class IdentitySource(StrEnum):
    """Where the SAE / application id is read from in a client certificate."""

    CN = "cn"
    URI = "uri"


@dataclass(frozen=True, slots=True)
class KmeLimits:
    """The figures a KME advertises in ETSI 014 ``status`` and enforces."""

    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = 128
    max_sae_id_count: int = 0


@dataclass(slots=True)
class KmeNode:
    """A KME of the simulated pair."""

    kme_id: str
    peer_kme_id: str
    link: QkdLinkModel
    faults: FaultInjector = field(default_factory=FaultInjector)
    limits: KmeLimits = field(default_factory=KmeLimits)
    identity: IdentitySource = IdentitySource.CN
    clock: Callable[[], float] = time.monotonic
    started: float = field(default_factory=time.monotonic)
    quirks: frozenset[Quirk] = frozenset()
    # ETSI 004 QoS values this KME insists on (field, value): an OPEN_CONNECT asking for
    # others gets status 7 with them as counter-proposal (QUBIP's default QoS check does so).
    qos_demands: tuple[tuple[str, int], ...] = ()

    def now(self) -> float:
        """The simulation time the link model runs on."""
        return self.clock()

    async def admit(self) -> Decision:
        """Apply the fault script to the next call: wait, then say whether it fails."""
        elapsed = self.now() - self.started
        self.link.link_up = self.faults.link_up(elapsed)
        for _ in range(self.faults.due_exhaustions(elapsed)):
            self.link.exhaust(self.now())
        decision = self.faults.decide()
        if decision.delay_s:
            await asyncio.sleep(decision.delay_s)
        return decision
