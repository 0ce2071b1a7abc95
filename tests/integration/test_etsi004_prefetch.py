"""ETSI 004 streams opened ahead and announced between qkdproxy peers."""

from __future__ import annotations

import asyncio

import pytest

from qkdproxy.core.keys import KeyNotFoundError
from qkdproxy.core.tls.keyexchange import Flow, KeyApi, QkdOptions
from qkdproxy.io.peer_channel import open_peer_channel
from qkdproxy.keys.etsi004_supply import PrefetchingStreams
from qkdproxy.sim.inprocess import InProcessQkdLink
from qkdproxy.tools.bench.kme_setup import simulated_kme_sources
from qkdproxy.tools.loopback import loopback_pair
from tests.conftest import groups


def ends(pool: int = 4) -> tuple[PrefetchingStreams, PrefetchingStreams]:
    link = InProcessQkdLink()
    a, b = link.sources("a").stream, link.sources("b").stream
    assert a and b
    return PrefetchingStreams(a, pool=pool), PrefetchingStreams(b, pool=pool)


async def test_streams_opened_ahead_and_keys_fetched_at_both_ends() -> None:
    initiator, responder = ends()
    initiator.ensure_refill()
    await asyncio.wait_for(initiator.wait_idle(), 5)
    assert initiator.counters.opened_ahead == 4
    announced = initiator.announce(2)
    assert len(announced) == 2 and initiator.announce(2) != announced
    responder.announced(announced)
    await asyncio.wait_for(responder.wait_idle(), 5)
    acks = responder.announce(8)
    assert set(announced) <= set(acks)  # opened at the responder: acknowledged
    initiator.announced(acks)
    await asyncio.wait_for(initiator.wait_idle(), 5)
    assert initiator.counters.keys_ahead == 2 and initiator.counters.failures == 0
    ksid = await initiator.open(None)
    assert ksid == announced[0]
    assert await responder.open(ksid) == ksid
    key = await initiator.get_key(ksid, 0)
    assert await responder.get_key(ksid, 0) == key and len(key) == 32
    for end in (initiator, responder):
        assert end.counters.served_open >= 1
        assert end.counters.keys_served_from_cache >= 1
    with pytest.raises(KeyNotFoundError):
        await initiator.get_key(ksid, 0)  # delivered once: the cache gave it away
    await initiator.close(ksid)
    await responder.close(ksid)
    await initiator.aclose()
    await responder.aclose()


async def test_unannounced_streams_still_work_on_demand() -> None:
    initiator, responder = ends(pool=0)
    ksid = await initiator.open(None)
    assert initiator.counters.opened_on_demand == 1
    assert await responder.open(ksid) == ksid
    assert await initiator.get_key(ksid, 0) == await responder.get_key(ksid, 0)


async def test_stale_streams_are_closed_not_used() -> None:
    link = InProcessQkdLink()
    stream = link.sources("a").stream
    assert stream
    now = [0.0]
    streams = PrefetchingStreams(stream, pool=2, max_age_s=10, clock=lambda: now[0])
    streams.ensure_refill()
    await asyncio.wait_for(streams.wait_idle(), 5)
    stale = set(streams.announce(2))
    now[0] = 11.0
    fresh = await streams.open(None)
    assert fresh not in stale
    await asyncio.wait_for(streams.wait_idle(), 5)
    assert link.open_streams == 3  # the fresh one, plus the refill; the stale two closed


@pytest.mark.parametrize("latency_ms", [0.0])
async def test_handshakes_over_real_004_use_streams_opened_ahead(latency_ms: float) -> None:
    hybrids = groups("qkd_mlkem768")
    options = QkdOptions(flow=Flow.CLIENT_INITIATED, api=KeyApi.ETSI_004)
    async with (
        simulated_kme_sources(latency_ms, prefetch=True, api=KeyApi.ETSI_004) as sources,
        loopback_pair(hybrids, sources=sources, peer_protocol=True) as pair,
    ):
        pair.server_keys.options = QkdOptions(api=KeyApi.ETSI_004)
        client_streams, server_streams = sources[0].stream, sources[1].stream
        assert isinstance(client_streams, PrefetchingStreams)
        assert isinstance(server_streams, PrefetchingStreams)
        await asyncio.wait_for(client_streams.wait_idle(), 20)
        for _ in range(3):
            stream = await asyncio.wait_for(pair.handshake(pair.client(hybrids, options)), 20)
            assert stream.record.api is KeyApi.ETSI_004
            channel = await open_peer_channel(stream, pair.client_keys.sources)
            assert channel is not None
            await channel.send_fin()
            while await asyncio.wait_for(channel.receive(), 10):
                pass
            await channel.close()
            await asyncio.wait_for(server_streams.wait_idle(), 20)
            await asyncio.wait_for(client_streams.wait_idle(), 20)
        await asyncio.wait_for(pair.wait_for_server(lambda: pair.echo.accepted >= 3), 10)
    assert client_streams.counters.served_open == 3
    assert server_streams.counters.served_open >= 2  # the first stream was not announced yet
    assert server_streams.counters.keys_served_from_cache >= 2
    for ledger in (pair.client_keys.ledger, pair.server_keys.ledger):
        assert ledger.consumed == 3 and ledger.outstanding == 0
