"""ETSI 004 streams opened ahead and announced between qkdproxy peers."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from qkdproxy.core.accounting import KeyAccount
from qkdproxy.core.keys import KeyExhaustedError, KeyNotFoundError
from qkdproxy.core.tls.keyexchange import Flow, KeyApi, QkdOptions
from qkdproxy.daemon.app import kme_state
from qkdproxy.daemon.config import Config, load_config
from qkdproxy.daemon.kme_binding import KmeConnection
from qkdproxy.io.peer_channel import open_peer_channel
from qkdproxy.keys.etsi004_supply import PrefetchingStreams
from qkdproxy.sim.inprocess import InProcessQkdLink
from qkdproxy.sim.simulator import KmePair
from qkdproxy.tools.bench.kme_setup import simulated_kme_sources
from qkdproxy.tools.certs import DevPki
from qkdproxy.tools.loopback import loopback_pair
from tests.conftest import groups
from tests.kme_helpers import quirky_pair


def ends(pool: int = 4) -> tuple[PrefetchingStreams, PrefetchingStreams]:
    link = InProcessQkdLink()
    a, b = link.sources("a").stream, link.sources("b").stream
    assert a and b
    return PrefetchingStreams(a, pool=pool), PrefetchingStreams(b, pool=pool, opens_ahead=False)


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


async def test_a_responder_lets_go_of_joined_streams_twice_its_max_age_old() -> None:
    """Streams the peer announced and never used (it let them age out, flushed them, or
    dials another server now) are closed at the responder's KME once twice its max_age_s
    old, key 0 settled expired and no acknowledgement sent: the room they took (at most
    4 x pool) is the next announcement's. Before: held until the daemon stopped, and once
    the room was full no announced stream was joined again."""
    link = InProcessQkdLink()
    a, b = link.sources("a").stream, link.sources("b").stream
    assert a and b
    now = [0.0]
    account = KeyAccount()
    initiator = PrefetchingStreams(a, pool=4, max_age_s=10, clock=lambda: now[0])
    responder = PrefetchingStreams(
        b, pool=1, max_age_s=10, clock=lambda: now[0], account=account, opens_ahead=False
    )
    initiator.ensure_refill()
    await asyncio.wait_for(initiator.wait_idle(), 5)
    responder.announced(initiator.announce(4))
    await asyncio.wait_for(responder.wait_idle(), 5)
    assert account.held == 4  # the room of a pool of 1: full
    now[0] = 20.5
    # A server announces at each connection's start: no acknowledgement of what it let go.
    assert responder.announce(8) == []
    await asyncio.wait_for(responder.wait_idle(), 5)
    assert (account.fates["expired"], account.held) == (4, 0)
    taken = await initiator.open(None)  # the initiator closes its aged streams and refills
    await asyncio.wait_for(initiator.wait_idle(), 5)
    second = initiator.announce(4)
    responder.announced(second)
    await asyncio.wait_for(responder.wait_idle(), 5)
    assert account.held == 4
    assert responder.announce(8) == second
    assert link.open_streams == 5  # the second four at both ends, and the one taken
    await initiator.close(taken)


class ShortOfKeyOnce:
    """An ETSI 004 application whose KME has no key for the first GET_KEY, then has."""

    def __init__(self) -> None:
        self.short = True
        self.closed: list[bytes] = []

    async def open(self, ksid: bytes | None) -> bytes:
        return ksid or uuid.uuid4().bytes

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        if self.short:
            self.short = False
            raise KeyExhaustedError("no key in the pool")
        return bytes(32)

    async def close(self, ksid: bytes) -> None:
        self.closed.append(ksid)


async def test_a_responder_keeps_a_joined_stream_whose_key_0_the_kme_was_short_of() -> None:
    """Key 0 of an announced stream could not be fetched ahead because the KME was short of
    key: the stream stays joined, and the handshake that uses it fetches key 0 then."""
    inner = ShortOfKeyOnce()
    responder = PrefetchingStreams(inner, pool=1, opens_ahead=False)
    ksid = uuid.uuid4().bytes
    responder.announced([ksid])
    await asyncio.wait_for(responder.wait_idle(), 5)
    assert responder.counters.failures == 1
    assert await responder.open(ksid) == ksid
    assert responder.counters.served_open == 1
    assert await responder.get_key(ksid, 0) == bytes(32)
    assert inner.closed == []


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


def _client_tunnel(name: str, connect: str) -> str:
    return (
        f'[[tunnel]]\nname = "{name}"\nrole = "client"\nlisten = "127.0.0.1:1"\n'
        f'connect = "{connect}"\nserver_name = "server.test"\ncert = "tunnel-client.pem"\n'
        'key = "tunnel-client-key.pem"\nca = "ca.pem"\nkme = "k"\n'
    )


def _server_tunnel(port: int) -> str:
    return (
        f'[[tunnel]]\nrole = "server"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:2"\n'
        'cert = "tunnel-server.pem"\nkey = "tunnel-server-key.pem"\nca = "ca.pem"\n'
        f'allow_any_peer = true\nkme = "k"\nname = "s{port}"\n'
    )


def _section(tmp_path: Path, kmes: KmePair, side: str, tunnels: str) -> Config:
    """A configuration with ``[kme.k]`` on side "a" (sae-a) or "b" of ``kmes`` (ETSI 004,
    two streams ahead) and ``tunnels``."""
    sae, peer, port = ("sae-a", "sae-b", 0) if side == "a" else ("sae-b", "sae-a", 1)
    path = tmp_path / f"{side}.toml"
    path.write_text(
        f'[kme.k]\napi = "004"\naddress = "{kmes.settings.host}:{kmes.ports_004[port]}"\n'
        f'sae_id = "{sae}"\npeer_sae_id = "{peer}"\ncert = "{sae}.pem"\n'
        f'key = "{sae}-key.pem"\nca = "ca.pem"\nsupply_floor = 2\nsupply_ceiling = 2\n' + tunnels
    )
    return load_config(path)


async def test_a_kme_section_opens_streams_ahead_per_client_peer_and_none_for_its_servers(
    tmp_path: Path,
) -> None:
    """One [kme] section, three client tunnels to two peers and two server tunnels: each peer
    gets its own streams opened ahead (ids announced to one server are never offered to
    another), tunnels to the same peer share them, the server tunnels share one responder
    that opens none, the section's depth is the sum, and closing the section closes them
    all."""
    pki = DevPki.create()
    pki.write(tmp_path)
    async with quirky_pair(pki, frozenset()) as kmes:
        config = _section(
            tmp_path, kmes, "a",
            _client_tunnel("x", "127.0.0.1:10") + _client_tunnel("y", "127.0.0.1:11")
            + _client_tunnel("x-again", "127.0.0.1:10") + _server_tunnel(3) + _server_tunnel(4),
        )  # fmt: skip
        kme = KmeConnection.open(config.kmes["k"])
        try:
            supply = {t.name: kme.sources_for(t).stream for t in config.tunnels}
            x, y, responder = supply["x"], supply["y"], kme.sources.stream
            assert isinstance(x, PrefetchingStreams) and isinstance(y, PrefetchingStreams)
            assert isinstance(responder, PrefetchingStreams)
            assert x is supply["x-again"] and x is not y
            assert supply["s3"] is supply["s4"] is responder not in (x, y)
            kme.start()
            for each in (x, y, responder):
                await asyncio.wait_for(each.wait_idle(), 10)
            assert (x.depth, y.depth, kme.depth) == (2, 2, 4)
            assert responder.counters.opened_ahead == 0
            ksids = x.announce(8) + y.announce(8)
            assert len(set(ksids)) == 4
            # What /metrics reads: streams count as keys, and the take rate is measured.
            state = kme_state(kme)
            assert state.consumption_per_s() == 0
            taken = await x.open(None)
            assert state.consumption_per_s() > 0
            assert state.buffer_depth() == 3
            counted = state.counters()
            assert (counted["prefetched"], counted["served_from_buffer"]) == (4, 1)
            assert counted["fetched_on_demand"] == counted["announced"] == 0
            await x.close(taken)
            # A server's Extended Key Update opens its stream on demand, and no more.
            update = await responder.open(None)
            await asyncio.wait_for(responder.wait_idle(), 10)
            assert (responder.counters.opened_ahead, responder.depth) == (0, 0)
            assert responder.announce(8) == []
            await responder.close(update)
        finally:
            await kme.aclose()
        assert kme.depth == 0
        assert [kmes.link.stream(ksid) for ksid in ksids] == [None] * 4  # closed at the KME


async def test_a_responder_closes_the_streams_it_joined_once_it_has_no_use_for_them(
    tmp_path: Path,
) -> None:
    """A server's responder joins what its authenticated clients announce. A KSID that no
    stream of the client's has (made up, or closed already) gives no key 0: the responder
    closes its end at once. The streams it joined are closed at its KME when the section
    closes. Before: both stayed open at the KME (until the KME's TTL) and in the
    responder's memory until the daemon stopped, so a client naming made-up KSIDs had the
    server's KME open as many streams as it liked."""
    pki = DevPki.create()
    pki.write(tmp_path)
    async with quirky_pair(pki, frozenset()) as kmes:
        client = KmeConnection.open(
            _section(tmp_path, kmes, "a", _client_tunnel("x", "127.0.0.1:10")).kmes["k"]
        )
        server = KmeConnection.open(_section(tmp_path, kmes, "b", _server_tunnel(3)).kmes["k"])
        responder = server.sources.stream
        assert isinstance(responder, PrefetchingStreams)
        try:
            ours = client.streams_for("server.test@127.0.0.1:10")
            assert ours is not None
            client.start()
            await asyncio.wait_for(ours.wait_idle(), 10)
            real = ours.announce(8)
            made_up = [uuid.uuid4().bytes for _ in range(2)]
            responder.announced(real + made_up)
            await asyncio.wait_for(responder.wait_idle(), 10)
            assert (responder.counters.keys_ahead, responder.counters.failures) == (2, 2)
            assert [kmes.link.stream(ksid) for ksid in made_up] == [None, None]
            assert responder.announce(8) == real  # acknowledged
        finally:
            await server.aclose()
            await client.aclose()
        assert server.account.fates["stranded"] == 2
        assert [kmes.link.stream(ksid) for ksid in real] == [None, None]  # closed at both ends
