"""Key sources backed by the KME simulator over real mTLS sockets, for benchmarks and demos."""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from qkdproxy.core.tls.keyexchange import KeyApi
from qkdproxy.keys.announce import AnnouncedSlave
from qkdproxy.keys.etsi004_client import Etsi004Client, Etsi004ClientPool
from qkdproxy.keys.etsi004_supply import PrefetchingStreams
from qkdproxy.keys.etsi014_client import Etsi014Client
from qkdproxy.keys.etsi014_supply import Etsi014Master, Etsi014Slave
from qkdproxy.keys.sources import KeySources, StreamKeySource
from qkdproxy.keys.sslctx import client_context
from qkdproxy.keys.supply import SupplySettings
from qkdproxy.sim.faults import FaultScript
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.certs import DevPki

SAE_CLIENT, SAE_SERVER = "sae-a", "sae-b"
# ETSI 004 has no batching: with a remote KME, keeping streams ahead of a few hundred
# handshakes per second takes many streams in flight over many connections.
STREAM_CONNECTIONS = 32
STREAMS_AHEAD = 256


@asynccontextmanager
async def simulated_kme_sources(
    latency_ms: float = 0.0, prefetch: bool = True, api: KeyApi = KeyApi.ETSI_014
) -> AsyncIterator[tuple[KeySources, KeySources]]:
    """A KME pair on loopback; yields (client-side, server-side) key sources.

    ETSI 014 sources are a master and a slave (with prefetch and announcements); ETSI 004
    sources are streams. Server-initiated flows always use ETSI 014, so the 014 sources are
    there in both cases.
    """
    pki = DevPki.create()
    pair = KmePair(
        SimulatorSettings(faults=FaultScript(fixed_ms=latency_ms)),
        [pki.kmes["kme-a"], pki.kmes["kme-b"]],
        [pki.ca.certificate],
    )
    await pair.start()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(pair.stop)
        settings = SupplySettings() if prefetch else None
        sides = []
        warm: list[Coroutine[Any, Any, None]] = []
        for url, sae, peer in (
            (pair.urls_014[0], SAE_CLIENT, SAE_SERVER),
            (pair.urls_014[1], SAE_SERVER, SAE_CLIENT),
        ):
            client = Etsi014Client(url, client_context(pki.saes[sae], [pki.ca.certificate]))
            stack.push_async_callback(client.aclose)
            master = Etsi014Master(client, peer, settings)
            stack.push_async_callback(master.aclose)
            master.ensure_refill()
            slave = AnnouncedSlave(Etsi014Slave(client, peer))
            stack.push_async_callback(slave.aclose)
            stream: StreamKeySource | None = None
            if api is KeyApi.ETSI_004:
                index = 0 if sae == SAE_CLIENT else 1
                context = client_context(
                    pki.saes[sae], [pki.ca.certificate], ssl.TLSVersion.TLSv1_3
                )
                factory = functools.partial(
                    Etsi004Client, pair.settings.host, pair.ports_004[index], context,
                    source=sae, destination=peer,
                )  # fmt: skip
                pool = Etsi004ClientPool(factory, size=STREAM_CONNECTIONS)
                stack.push_async_callback(pool.aclose)
                stream = pool
                if prefetch:
                    # As in the daemon: only the client opens streams ahead.
                    streams = PrefetchingStreams(
                        pool, pool=STREAMS_AHEAD, concurrency=STREAM_CONNECTIONS,
                        opens_ahead=sae == SAE_CLIENT,
                    )  # fmt: skip
                    stack.push_async_callback(streams.aclose)
                    streams.ensure_refill()
                    warm.append(streams.wait_idle())
                    stream = streams
            warm.append(master.wait_refilled())
            sides.append(KeySources(master=master, slave=slave, stream=stream))
        # "Prefetch on" means buffers that are full before the first measured handshake.
        await asyncio.gather(*warm)
        yield sides[0], sides[1]
