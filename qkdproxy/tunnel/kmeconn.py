"""Key sources for a ``[kme.NAME]`` section: ETSI 014 or 004 clients with prefetching."""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field
from typing import Protocol

from qkdproxy.config import KmeConfig
from qkdproxy.etsi004.client import Etsi004Client, Etsi004ClientPool
from qkdproxy.etsi014.client import Etsi014Client
from qkdproxy.qkd.announce import AnnouncedSlave
from qkdproxy.qkd.etsi004_sources import PrefetchingStreams
from qkdproxy.qkd.etsi014_sources import Etsi014Master, Etsi014Slave, PrefetchSettings
from qkdproxy.qkd.sources import KeySources
from qkdproxy.sslctx import client_context
from qkdproxy.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.tls.keyexchange import KeyApi
from qkdproxy.tunnel.addresses import TcpAddress, parse_address


class _Closable(Protocol):
    async def aclose(self) -> None: ...


@dataclass(slots=True)
class KmeConnection:
    """The clients and sources of one KME section; shared by the tunnels that name it."""

    config: KmeConfig
    sources: KeySources
    _closers: list[_Closable] = field(default_factory=list)

    @classmethod
    def open(cls, config: KmeConfig) -> KmeConnection:
        """Build the clients (no network traffic until the first refill)."""
        credentials = Credentials.load(config.cert, config.key)
        anchors = load_trust_anchors(config.ca)
        if config.api is KeyApi.ETSI_014:
            client = Etsi014Client(config.endpoint, client_context(credentials, anchors))
            master = Etsi014Master(
                client, config.peer_sae_id, PrefetchSettings() if config.prefetch else None
            )
            slave = AnnouncedSlave(Etsi014Slave(client, config.peer_sae_id))
            return cls(config, KeySources(master=master, slave=slave), [master, slave, client])
        address = parse_address(config.endpoint)
        if not isinstance(address, TcpAddress):
            raise ValueError(f"kme.{config.name}.address must be host:port")
        context = client_context(credentials, anchors, ssl.TLSVersion.TLSv1_3)
        factory = functools.partial(
            Etsi004Client, address.host, address.port, context,
            source=config.sae_id, destination=config.peer_sae_id,
        )  # fmt: skip
        pool = Etsi004ClientPool(factory)
        stream: Etsi004ClientPool | PrefetchingStreams = pool
        closers: list[_Closable] = [pool]
        if config.prefetch:
            stream = PrefetchingStreams(pool)
            closers.insert(0, stream)
        return cls(config, KeySources(stream=stream), closers)

    def start(self) -> None:
        """Start background prefetching."""
        for source in (self.sources.master, self.sources.stream):
            refill = getattr(source, "ensure_refill", None)
            if refill is not None:
                refill()

    async def aclose(self) -> None:
        """Stop prefetching and close the KME connections."""
        for closer in self._closers:
            await closer.aclose()
