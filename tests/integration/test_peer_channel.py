"""qkdproxy/1 framing, key-id announcements and the announced-key slave cache."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdproxy.core.accounting import KeyAccount
from qkdproxy.core.etsi014.models import Status
from qkdproxy.core.keys import KeyNotFoundError, QkdKey, QkdKeyError
from qkdproxy.core.peer.frames import (
    MAX_ANNOUNCED_IDS,
    MAX_PAYLOAD,
    FrameDecoder,
    FrameError,
    FrameType,
    encode,
    encode_data,
    encode_key_ids,
)
from qkdproxy.core.tls.keyexchange import QkdOptions
from qkdproxy.io.peer_channel import MAX_PROBE_ANSWERS, PeerChannel, open_peer_channel
from qkdproxy.io.tls_stream import TlsStream, TlsStreamError
from qkdproxy.keys.announce import AnnouncedSlave
from qkdproxy.keys.etsi014_client import Etsi014Client
from qkdproxy.keys.etsi014_supply import Etsi014Master
from qkdproxy.keys.sources import KeySources, SlaveKeySource
from qkdproxy.keys.supply import SupplySettings
from qkdproxy.sim.inprocess import InProcessQkdLink
from qkdproxy.tools.bench.kme_setup import simulated_kme_sources
from qkdproxy.tools.loopback import LoopbackPair, loopback_pair
from tests.conftest import groups


@settings(max_examples=60)
@given(st.binary(max_size=70_000), st.lists(st.integers(1, 5000), max_size=30))
def test_data_frames_survive_any_chunking(data: bytes, cuts: list[int]) -> None:
    framed = encode_data(data)
    # The wire format is one DATA frame per MAX_PAYLOAD bytes, as encode() writes them.
    assert framed == b"".join(
        encode(FrameType.DATA, data[i : i + MAX_PAYLOAD]) for i in range(0, len(data), MAX_PAYLOAD)
    )
    wire = bytes(framed) + encode(FrameType.FIN)
    decoder, frames, offset = FrameDecoder(), [], 0
    for cut in [*cuts, len(wire)]:
        frames += decoder.feed(wire[offset : offset + cut])
        offset += cut
    frames += decoder.feed(wire[offset:])
    assert b"".join(f.payload for f in frames if f.type is FrameType.DATA) == data
    assert frames[-1].type is FrameType.FIN
    assert decoder.pending == 0


_FRAMES = st.one_of(
    st.tuples(st.just(FrameType.DATA), st.binary(max_size=300)),
    st.tuples(st.sampled_from([FrameType.FIN, FrameType.PROBE]), st.just(b"")),
    st.tuples(st.just(FrameType.KEY_IDS), st.binary(min_size=16, max_size=16)),
    st.tuples(st.just(FrameType.VERDICT), st.binary(min_size=1, max_size=20)),
)


@settings(max_examples=100)
@given(st.lists(_FRAMES, max_size=12), st.lists(st.integers(1, 400), max_size=10))
def test_feed_data_hands_out_the_same_frames_as_feed(
    sent: list[tuple[FrameType, bytes]], cuts: list[int]
) -> None:
    # The receiver's fast path: DATA payloads ahead of any other frame of a read come as
    # views, the rest as frames; together, in order, exactly what feed returns (empty DATA
    # payloads aside, which carry nothing).
    wire = b"".join(encode(kind, payload) for kind, payload in sent)
    plain, fast, offset = FrameDecoder(), FrameDecoder(), 0
    for cut in [*cuts, len(wire)]:
        chunk = wire[offset : offset + cut]
        offset += cut
        frames = plain.feed(chunk)
        payloads, rest = fast.feed_data(chunk)
        leading = len(frames) - len(rest)
        assert all(f.type is FrameType.DATA for f in frames[:leading])
        assert [bytes(p) for p in payloads] == [
            bytes(f.payload) for f in frames[:leading] if f.payload
        ]
        assert [(f.type, bytes(f.payload)) for f in rest] == [
            (f.type, bytes(f.payload)) for f in frames[leading:]
        ]
        assert not rest or rest[0].type is not FrameType.DATA
    assert plain.pending == fast.pending


def test_feed_data_refuses_what_feed_refuses() -> None:
    for wire in (b"\x00\x00\x40\x01", b"\x00\x00\x00\x01x\x7f\x00\x00\x00"):
        with pytest.raises(FrameError):
            FrameDecoder().feed(wire)
        with pytest.raises(FrameError):
            FrameDecoder().feed_data(wire)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x7f\x00\x00\x00", "unknown frame type"),
        (b"\x01\x00\x00\x01x", "FIN carries no payload"),
        (b"\x10\x00\x00\x0f" + bytes(15), "KEY_IDS payload"),
        (b"\x10\x00\x00\x00", "KEY_IDS payload"),
        (b"\x00\xff\xff\xff", "longer than allowed"),
    ],
)
def test_frame_violations(wire: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        FrameDecoder().feed(wire)


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        FrameDecoder().feed(data)


def test_key_ids_frame_limits() -> None:
    ids = [os.urandom(16) for _ in range(3)]
    [frame] = FrameDecoder().feed(encode_key_ids(ids))
    assert frame.key_ids() == ids
    with pytest.raises(ValueError, match="announce"):
        encode_key_ids([])
    with pytest.raises(ValueError, match="announce"):
        encode_key_ids([bytes(16)] * (MAX_ANNOUNCED_IDS + 1))
    with pytest.raises(ValueError, match="16 bytes"):
        encode_key_ids([b"short"])
    with pytest.raises(ValueError, match="payload"):
        encode(FrameType.DATA, bytes(MAX_PAYLOAD + 1))


@dataclass
class FakeKme:
    """Just enough of Etsi014Client for the master: hands out distinct keys."""

    calls: int = 0
    handed_out: list[bytes] = field(default_factory=list)
    max_key_per_request: int = 128
    sizes_asked: list[int] = field(default_factory=list)

    async def status(self, slave_sae: str) -> Status:
        return Status(
            "kme-a", "kme-b", "sae-a", slave_sae, 256, 1000, 1000,
            self.max_key_per_request, 256, 256, 0,
        )  # fmt: skip

    async def max_keys_per_request(self, peer_sae: str) -> int:
        return self.max_key_per_request

    async def enc_keys(self, slave_sae: str, number: int = 1, size: int = 256) -> list[QkdKey]:
        if number > self.max_key_per_request:
            raise QkdKeyError("KME answered 400: number too large")
        self.calls += 1
        self.sizes_asked.append(number)
        keys = [QkdKey(os.urandom(16), os.urandom(32)) for _ in range(number)]
        self.handed_out += [k.key_id for k in keys]
        return keys


async def filled_master(kme: FakeKme, high: int = 8) -> Etsi014Master:
    master = Etsi014Master(
        cast(Etsi014Client, kme), "sae-b", SupplySettings(floor=high, ceiling=high)
    )
    master.ensure_refill()
    await asyncio.wait_for(master.wait_refilled(), 5)
    assert master.depth == high
    return master


async def test_master_respects_a_kme_that_gives_one_key_per_request() -> None:
    kme = FakeKme(max_key_per_request=1)
    master = await filled_master(kme, high=5)
    assert kme.sizes_asked == [1] * 5
    assert master.counters.refill_errors == 0
    await master.aclose()


async def test_master_announces_in_order_of_use_and_never_twice() -> None:
    kme = FakeKme()
    master = await filled_master(kme)
    first = master.announce(3)
    second = master.announce(3)
    assert len(first) == len(second) == 3 and not set(first) & set(second)
    used = [(await master.take_key()).key_id for _ in range(6)]
    assert used == first + second
    assert set(master.announce(100)).isdisjoint(used)
    await master.aclose()


async def test_announced_slave_serves_from_cache_once() -> None:
    link = InProcessQkdLink()
    a, b = link.sources("a"), link.sources("b")
    assert a.master and b.slave
    keys = [await a.master.take_key() for _ in range(4)]
    slave = AnnouncedSlave(b.slave)
    slave.announced([k.key_id for k in keys[:3]])
    got = await slave.get_key(keys[0].key_id)
    assert got.material == keys[0].material
    await asyncio.wait_for(slave.wait_fetched(), 5)
    assert (await slave.get_key(keys[1].key_id)).material == keys[1].material
    assert slave.counters.served_from_cache == 2
    # Not announced: straight from the KME; already served: nowhere.
    assert (await slave.get_key(keys[3].key_id)).material == keys[3].material
    with pytest.raises(KeyNotFoundError):
        await slave.get_key(keys[0].key_id)
    await slave.aclose()


async def test_announced_slave_is_bounded_and_expires() -> None:
    link = InProcessQkdLink()
    a, b = link.sources("a"), link.sources("b")
    assert a.master and b.slave
    now = [0.0]
    slave = AnnouncedSlave(b.slave, max_keys=2, max_age_s=10, clock=lambda: now[0])
    keys = [await a.master.take_key() for _ in range(3)]
    slave.announced([k.key_id for k in keys])
    assert slave.counters.dropped_full == 1
    await asyncio.wait_for(slave.wait_fetched(), 5)
    assert slave.depth == 2
    now[0] = 11.0
    with pytest.raises(KeyNotFoundError):
        await slave.get_key(keys[0].key_id)  # expired and already taken from the KME
    assert slave.counters.expired == 2


async def test_announced_slave_expires_only_the_old_keys() -> None:
    """Keys fetched at different times age apart: the older ones expire (each settled in
    the account once), the younger one is still served from memory."""
    link = InProcessQkdLink()
    a, b = link.sources("a"), link.sources("b")
    assert a.master and b.slave
    now = [0.0]
    account = KeyAccount()
    slave = AnnouncedSlave(b.slave, max_age_s=10, clock=lambda: now[0], account=account)
    keys = [await a.master.take_key() for _ in range(3)]
    slave.announced([k.key_id for k in keys[:2]])
    await asyncio.wait_for(slave.wait_fetched(), 5)
    now[0] = 6.0
    slave.announced([keys[2].key_id])
    await asyncio.wait_for(slave.wait_fetched(), 5)
    now[0] = 11.0
    assert slave.depth == 3  # nothing looked at the ages yet
    assert (await slave.get_key(keys[2].key_id)).material == keys[2].material
    assert slave.counters.expired == 2 and account.fates["expired"] == 2
    assert slave.depth == 0
    with pytest.raises(KeyNotFoundError):
        await slave.get_key(keys[0].key_id)  # expired, and the KME handed it out already
    assert slave.counters.expired == 2
    await slave.aclose()


async def test_announcing_an_unknown_key_fails_only_that_handshake() -> None:
    link = InProcessQkdLink()
    b = link.sources("b")
    assert b.slave
    slave = AnnouncedSlave(b.slave)
    slave.announced([bytes(16)])
    with pytest.raises(KeyNotFoundError):
        await slave.get_key(bytes(16))
    assert slave.counters.fetch_failed == 1


async def test_announced_slave_counts_waits_and_unannounced_ids() -> None:
    """A handshake that finds its announced key still being fetched waits for that fetch
    (counted apart from a key ready in memory); an id never announced is fetched on demand."""
    link = InProcessQkdLink()
    a, b = link.sources("a"), link.sources("b")
    assert a.master and b.slave
    keys = [await a.master.take_key() for _ in range(3)]
    slave = AnnouncedSlave(b.slave)
    slave.announced([k.key_id for k in keys[:2]])
    await slave.get_key(keys[0].key_id)  # its fetch has not run yet: the handshake waits
    await asyncio.wait_for(slave.wait_fetched(), 5)
    await slave.get_key(keys[1].key_id)  # in memory
    await slave.get_key(keys[2].key_id)
    c = slave.counters
    assert (c.served_from_cache, c.served_after_wait, c.fetched_unannounced) == (2, 1, 1)
    await slave.aclose()


class ScriptedStream:
    """The TlsStream surface PeerChannel uses: records written, and records to read."""

    def __init__(self, incoming: list[bytes] | None = None) -> None:
        self.written: list[bytes] = []
        self.incoming = incoming or []

    async def write(self, data: bytes, *, frame_type: int | None = None) -> None:
        self.written.append(encode(FrameType(frame_type), data) if frame_type else bytes(data))

    async def read(self) -> bytes:
        return self.incoming.pop(0) if self.incoming else b""

    async def close(self) -> None:
        pass


class RecordingSlave:
    """A slave source that only records the ids announced to it."""

    def __init__(self) -> None:
        self.announced_ids: list[bytes] = []

    async def get_key(self, key_id: bytes) -> QkdKey:
        raise KeyNotFoundError("not used here")

    def announced(self, key_ids: list[bytes]) -> None:
        self.announced_ids += key_ids


async def test_keys_refilled_during_a_connection_are_announced_with_its_fin() -> None:
    """Many short connections at once: keys refilled after a connection's handshake are
    named in its FIN record, so the peer fetches them before the next handshakes take
    them, instead of waiting for a later handshake to announce them."""
    kme = FakeKme()
    master = await steady_master(kme)
    client = ScriptedStream()
    channel = await open_peer_channel_on(client, KeySources(master=master))
    assert master.announce(64) == []  # all four went out when the channel opened
    for _ in range(2):  # taken by handshakes of other connections
        await master.take_key()
    await asyncio.wait_for(master.wait_refilled(), 5)
    refilled = kme.handed_out[4:]
    assert len(refilled) == 2
    await channel.send_fin()
    # One record: the announcement, then FIN; the server's channel hands the ids over.
    assert len(client.written) == 2
    server_slave = RecordingSlave()
    server = PeerChannel(
        cast(TlsStream, ScriptedStream(client.written[:])),
        KeySources(slave=cast(SlaveKeySource, server_slave)),
    )
    assert await server.receive() == b""
    assert server_slave.announced_ids == kme.handed_out[:4] + refilled
    assert master.announce(64) == []
    await master.aclose()


async def test_no_announcement_with_fin_once_the_peer_finished() -> None:
    """A peer that sent FIN may stop reading: ids sent then could be lost, so they wait
    for the next connection."""
    kme = FakeKme()
    master = await steady_master(kme)
    client = ScriptedStream([encode(FrameType.FIN)])
    channel = await open_peer_channel_on(client, KeySources(master=master))
    assert await channel.receive() == b""
    for _ in range(2):
        await master.take_key()
    await asyncio.wait_for(master.wait_refilled(), 5)
    await channel.send_fin()
    assert client.written[-1] == encode(FrameType.FIN)
    assert master.announce(64) == kme.handed_out[4:]
    await master.aclose()


async def steady_master(kme: FakeKme) -> Etsi014Master:
    """Four keys held; a frozen clock and a one-second window make the takes a steady
    demand, so two takes start a refill of two."""
    supply = SupplySettings(floor=4, ceiling=4, window_s=1.0)
    master = Etsi014Master(cast(Etsi014Client, kme), "sae-b", supply, clock=lambda: 0.0)
    master.ensure_refill()
    await asyncio.wait_for(master.wait_refilled(), 5)
    return master


async def open_peer_channel_on(stream: ScriptedStream, sources: KeySources) -> PeerChannel:
    channel = PeerChannel(cast(TlsStream, stream), sources)
    await channel.announce()
    return channel


async def exchange(pair: LoopbackPair, payload: bytes) -> tuple[bytes, PeerChannel]:
    hybrids = groups("qkd_mlkem768")
    stream = await asyncio.wait_for(pair.handshake(pair.client(hybrids, QkdOptions())), 20)
    channel = await open_peer_channel(stream, pair.client_keys.sources)
    assert channel is not None
    await channel.send(payload)
    await channel.send_fin()
    echoed = bytearray()
    while data := await asyncio.wait_for(channel.receive(), 10):
        echoed += data
    await channel.close()
    return bytes(echoed), channel


async def test_tunnel_framing_and_announcements_between_peers() -> None:
    """The second handshake's key was announced by the first connection: no KME wait."""
    async with (
        simulated_kme_sources() as sources,
        loopback_pair(groups("qkd_mlkem768"), sources=sources, peer_protocol=True) as pair,
    ):
        payload = os.urandom(40_000)
        echoed, channel = await exchange(pair, payload)
        assert echoed == payload
        assert channel.stream.alpn == "qkdproxy/1"
        server_slave = sources[1].slave
        assert isinstance(server_slave, AnnouncedSlave)
        await asyncio.wait_for(server_slave.wait_fetched(), 10)
        assert server_slave.depth > 0
        await exchange(pair, b"second")
        assert server_slave.counters.served_from_cache >= 1


async def test_broken_framing_ends_the_connection_not_the_server() -> None:
    failures: list[BaseException] = []
    async with loopback_pair(
        groups("x25519"), peer_protocol=True, server_failures=failures
    ) as pair:
        stream = await pair.handshake(pair.client(groups("x25519"), QkdOptions()))
        assert stream.alpn == "qkdproxy/1"
        await stream.write(b"\x7f\x00\x00\x00")
        assert await asyncio.wait_for(stream.read(), 10) == b""  # the server hung up
        await stream.close()
        async with asyncio.timeout(10):
            await pair.wait_for_server(lambda: bool(failures))
        echoed, _ = await exchange_x25519(pair)
        assert echoed == b"still serving"
    assert isinstance(failures[0], TlsStreamError)


async def exchange_x25519(pair: LoopbackPair) -> tuple[bytes, PeerChannel]:
    stream = await pair.handshake(pair.client(groups("x25519"), QkdOptions()))
    channel = await open_peer_channel(stream, pair.client_keys.sources)
    assert channel is not None
    await channel.send(b"still serving")
    await channel.send_fin()
    echoed = bytearray()
    while data := await asyncio.wait_for(channel.receive(), 10):
        echoed += data
    await channel.close()
    return bytes(echoed), channel


async def test_a_probe_flood_gets_a_bounded_number_of_answers() -> None:
    """An authenticated peer sending PROBE frames in bulk gets a few VERDICTs, not one
    record per 3-byte frame, and the connection still carries data."""
    async with loopback_pair(groups("x25519"), peer_protocol=True) as pair:
        stream = await pair.handshake(pair.client(groups("x25519"), QkdOptions()))
        await stream.write(encode(FrameType.PROBE) * 500)
        channel = await open_peer_channel(stream, pair.client_keys.sources)
        assert channel is not None
        await channel.send(b"after the flood")
        await channel.send_fin()
        decoder, verdicts, echoed = FrameDecoder(), 0, bytearray()
        while data := await asyncio.wait_for(stream.read(), 10):
            for frame in decoder.feed(data):
                verdicts += frame.type is FrameType.VERDICT
                if frame.type is FrameType.DATA:
                    echoed += frame.payload
                if frame.type is FrameType.FIN:
                    break
            else:
                continue
            break
        await stream.close()
    assert echoed == b"after the flood"
    assert 1 <= verdicts <= MAX_PROBE_ANSWERS


async def test_closing_without_fin_sends_fin_and_close_notify_in_one_write() -> None:
    """A channel closed before its FIN (the pump ends with the peer already finished)
    sends FIN and close_notify together: one write, and the peer sees a clean end, not a
    truncation."""
    failures: list[BaseException] = []
    async with loopback_pair(
        groups("x25519"), peer_protocol=True, server_failures=failures
    ) as pair:
        stream = await pair.handshake(pair.client(groups("x25519"), QkdOptions()))
        channel = await open_peer_channel(stream, pair.client_keys.sources)
        assert channel is not None
        await channel.send(b"abc")
        assert await asyncio.wait_for(channel.receive(), 10) == b"abc"
        writes: list[bytes] = []
        transport = stream._driver.writer.transport  # the stream writes to it directly
        write = transport.write

        def counted(data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            write(data)

        transport.write = counted  # type: ignore[method-assign]
        await channel.close()
        assert len(writes) == 1
    assert not failures  # the echo server got FIN before close_notify
