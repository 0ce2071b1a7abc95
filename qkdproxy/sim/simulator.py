"""The KME simulator pair: two KMEs joined by a simulated QKD link, served on loopback.

Each KME serves ETSI 014 over HTTPS and ETSI 004 over binary TLS 1.3, both with mutual
TLS. ``KmePair`` is importable for tests and demos; ``qkdproxy kme`` runs one from the
command line.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from aiohttp import web
from cryptography import x509

from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.keys.sslctx import server_context
from qkdproxy.sim.faults import FaultInjector, FaultScript
from qkdproxy.sim.link import LinkSettings, QkdLinkModel
from qkdproxy.sim.node import IdentitySource, KmeLimits, KmeNode
from qkdproxy.sim.quirks import Quirk, quirky_limits
from qkdproxy.sim.server004 import Etsi004Server
from qkdproxy.sim.server014 import create_app


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """How the pair behaves and where it listens (port 0 = any free port)."""

    host: str = "127.0.0.1"
    ports_014: tuple[int, int] = (0, 0)
    ports_004: tuple[int, int] = (0, 0)
    link: LinkSettings = field(default_factory=LinkSettings)
    faults: FaultScript = field(default_factory=FaultScript)
    identity: IdentitySource = IdentitySource.CN
    limits: KmeLimits = field(default_factory=KmeLimits)
    kme_ids: tuple[str, str] = ("kme-a", "kme-b")
    # Deviations from ETSI 014 to reproduce (qkdproxy.sim.quirks); none by default.
    quirks: frozenset[Quirk] = frozenset()
    # ETSI 004 QoS values the KMEs insist on, counter-proposed with status 7 (KmeNode).
    qos_demands: tuple[tuple[str, int], ...] = ()


class KmePair:
    """Two KMEs sharing one link model; start, stop and restart them."""

    def __init__(
        self,
        settings: SimulatorSettings,
        credentials: Sequence[Credentials],
        anchors: Sequence[x509.Certificate],
    ) -> None:
        self.settings = settings
        started = time.monotonic()
        self.link = QkdLinkModel(settings.link, started)
        a, b = settings.kme_ids
        self.nodes = tuple(
            KmeNode(
                kme_id, peer, self.link,
                FaultInjector(replace(settings.faults, seed=settings.faults.seed + i)),
                quirky_limits(settings.limits, settings.quirks), settings.identity,
                started=started, quirks=settings.quirks, qos_demands=settings.qos_demands,
            )
            for i, (kme_id, peer) in enumerate(((a, b), (b, a)))
        )  # fmt: skip
        self._contexts = [server_context(c, anchors) for c in credentials]
        self._runners: list[web.AppRunner | None] = [None, None]
        self.ports_014 = list(settings.ports_014)
        self._servers_004 = [
            Etsi004Server(node, server_context(c, anchors, ssl.TLSVersion.TLSv1_3))
            for node, c in zip(self.nodes, credentials, strict=True)
        ]
        self.ports_004 = list(settings.ports_004)

    @property
    def urls_014(self) -> list[str]:
        """Base URLs of the two ETSI 014 servers."""
        return [f"https://{_url_host(self.settings.host)}:{p}" for p in self.ports_014]

    async def start(self) -> None:
        """Bind and serve both KMEs."""
        for index in range(2):
            await self._start(index)

    async def _start(self, index: int) -> None:
        self.ports_004[index] = await self._servers_004[index].start(
            self.settings.host, self.ports_004[index]
        )
        runner = web.AppRunner(create_app(self.nodes[index]), access_log=None)
        await runner.setup()
        sock = socket.create_server((self.settings.host, self.ports_014[index]), reuse_port=False)
        self.ports_014[index] = sock.getsockname()[1]
        await web.SockSite(runner, sock, ssl_context=self._contexts[index]).start()
        self._runners[index] = runner

    async def stop(self) -> None:
        """Stop both KMEs (in-flight requests are cut after a short grace period)."""
        for index in range(2):
            await self._stop(index)

    async def _stop(self, index: int) -> None:
        await self._servers_004[index].stop()
        runner = self._runners[index]
        if runner is not None:
            await runner.cleanup()
            self._runners[index] = None

    async def restart(self, index: int, downtime_s: float = 0.0) -> None:
        """Take one KME down and bring it back on the same port; the link keeps its keys."""
        await self._stop(index)
        if downtime_s:
            await asyncio.sleep(downtime_s)
        await self._start(index)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
