"""Spare client key pairs (core.hybrid.KeyPairReserve) end to end, over real sockets: every
client key share that reaches a server (first and second ClientHellos, Extended Key
Update requests) carries key pairs never sent before, component by component, through
concurrent dials, HelloRetryRequests, handshakes that fail, time out or are cancelled
after the hello left, a multiplexing pool and configuration reloads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from qkdproxy.core.groups import DEFAULT_GROUPS
from qkdproxy.core.hybrid import GroupUnavailableError, HybridKem, KeyPairReserve, resolve
from qkdproxy.core.kem import default_registry
from qkdproxy.core.tls.hello import ClientHello, parse_client_hello
from qkdproxy.core.tls.keyexchange import KeySteps, QkdOptions, ServerKeyExchange
from qkdproxy.io.tls_stream import HandshakeError, TlsEndpoint
from qkdproxy.tools.loopback import LoopbackPair, loopback_pair
from tests.conftest import groups
from tests.integration.test_handshake_loopback import echo, handshake, settled
from tests.integration.test_mux import MUX
from tests.integration.test_tunnel_runtime import port, setup, transfer
from tests.system_helpers import eventually

Share = tuple[int, bytes]  # (code point, client key share) as a server received it


def _runnable() -> dict[int, HybridKem]:
    out = {}
    for group in DEFAULT_GROUPS.all():
        with contextlib.suppress(GroupUnavailableError):
            out[group.code_point] = resolve(group, default_registry())
    return out


HYBRIDS = _runnable()


def components(code: int, share: bytes) -> Iterator[bytes]:
    """The component public values of a client share (its QKD key id left off)."""
    offset = 0
    for kem in HYBRIDS[code].components:
        yield share[offset : offset + kem.sizes.public_key]
        offset += kem.sizes.public_key


def assert_never_twice(shares: list[Share]) -> None:
    """No component public value (so no private key) in two shares, in any group."""
    parts = [part for code, share in shares for part in components(code, share)]
    assert len(set(parts)) == len(parts)


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[Share]:
    """Every client key share a server in this process receives, in order."""
    seen: list[Share] = []
    on_hello = ServerKeyExchange.on_client_hello
    on_update = ServerKeyExchange.on_update_request

    def hello(self: ServerKeyExchange, hello: ClientHello) -> KeySteps[bool]:
        seen.extend((s.group, s.key_exchange) for s in hello.key_shares)
        return on_hello(self, hello)

    def update(self: ServerKeyExchange, hybrid: HybridKem, share: bytes) -> KeySteps[None]:
        seen.append((hybrid.group.code_point, share))
        return on_update(self, hybrid, share)

    monkeypatch.setattr(ServerKeyExchange, "on_client_hello", hello)
    monkeypatch.setattr(ServerKeyExchange, "on_update_request", update)
    return seen


def spares_of(endpoint: TlsEndpoint) -> KeyPairReserve:
    reserve = endpoint._config.spares
    assert reserve is not None
    return reserve


def spare_share(endpoint: TlsEndpoint, code: int) -> bytes:
    return spares_of(endpoint)._spares[code][1]


async def settled_after_update(pair: LoopbackPair, handshakes: int) -> None:
    """:func:`settled` for connections that ran a fresh-key update: the key the update
    spent is booked as the server's handler ends, which on 3.12+ can come a loop round
    after the handshake count."""
    async with asyncio.timeout(10):
        await pair.wait_for_server(lambda: pair.echo.accepted >= handshakes)

    async def accounted() -> bool:
        return pair.server_keys.ledger.outstanding == 0

    await eventually(accounted, "every key the server took accounted")


@pytest.mark.parametrize("engine", ["native", "tlslite"])
async def test_hellos_retries_and_fresh_key_updates_never_repeat_a_key_pair(
    received: list[Share], engine: str
) -> None:
    """Two clients on one server, one always through a HelloRetryRequest; every connection
    also runs an Extended Key Update. Each dial after the first sends the spare made after
    the previous hello, and no key pair is ever sent twice."""
    server_groups = groups("qkd_x25519mlkem768", "qkd_mlkem768")
    async with loopback_pair(server_groups, tls_engine=engine) as pair:
        direct = pair.client(groups("qkd_x25519mlkem768"), QkdOptions())
        retrying = pair.client(groups("qkd_mlkem1024", "qkd_mlkem768"), QkdOptions())
        done = 0
        for n in range(4):
            for client in (direct, retrying):
                first = client.settings.groups[0].group.code_point
                expected = spare_share(client, first) if n else None
                before = len(received)
                stream = await handshake(pair, client)
                assert stream.record.hello_retry is (client is retrying)
                assert await stream.fresh_key_update()
                assert await echo(stream, b"updated") == b"updated"
                assert stream.fresh_key_stats().completed == 1
                await stream.close()
                done += 1
                await settled_after_update(pair, done)
                if expected is not None:  # the spare went out, in its own group
                    assert received[before][0] == first
                    assert received[before][1][: HYBRIDS[first].public_size] == expected
                assert spares_of(client).held == 1
    # direct: hello + update; retrying: two hellos + update.
    assert len(received) == 4 * (2 + 3)
    assert_never_twice(received)


async def test_dials_started_in_one_round_take_the_spare_once(received: list[Share]) -> None:
    """Several dials begin in one event-loop round, before the replenish of any of them
    runs: one gets the held spare, the others generate; one spare is held afterwards."""
    hybrids = groups("qkd_mlkem768")
    code = hybrids[0].group.code_point
    async with loopback_pair(hybrids) as pair:
        client = pair.client(hybrids, QkdOptions())
        await (await handshake(pair, client)).close()
        await settled(pair)
        held = spare_share(client, code)
        connections = [await asyncio.open_connection("127.0.0.1", pair.port) for _ in range(6)]
        async with asyncio.timeout(30):
            streams = await asyncio.gather(*(client.connect(r, w) for r, w in connections))
        for stream in streams:
            await stream.close()
        await settled(pair, 7)
        assert spares_of(client).held == 1
    assert len(received) == 7
    assert sum(share[: len(held)] == held for _, share in received) == 1
    assert_never_twice(received)


class SilentPeer:
    """Reads a client's first ClientHello, keeps it and hands the connection to the test
    (which then closes it, answers garbage or leaves it hanging)."""

    def __init__(self) -> None:
        self.hellos: list[ClientHello] = []
        self.arrived: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
        self._writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        data = b""
        while (hello := first_client_hello(data)) is None:
            chunk = await reader.read(65536)
            if not chunk:
                return
            data += chunk
        self.hellos.append(hello)
        await self.arrived.put(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client gives up

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


def first_client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello of a client's first TLS record, once it arrived whole."""
    if len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
        return None
    record = data[5 : 5 + int.from_bytes(data[3:5], "big")]
    assert data[0] == 22 and record[0] == 1  # handshake record, ClientHello
    length = int.from_bytes(record[1:4], "big")
    assert 4 + length <= len(record), "the ClientHello spans records"
    return parse_client_hello(record[4 : 4 + length])


@asynccontextmanager
async def silent_peer() -> AsyncIterator[tuple[SilentPeer, int]]:
    peer = SilentPeer()
    server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
    try:
        yield peer, server.sockets[0].getsockname()[1]
    finally:
        peer.close()
        server.close()
        await server.wait_closed()


async def _dial_and(client: TlsEndpoint, peer: SilentPeer, silent_port: int, what: str) -> None:
    """A dial to the silent peer that ends, after its hello left, in ``what``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", silent_port)
    task = asyncio.create_task(client.connect(reader, writer))
    if what == "timeout":  # the handshake's own deadline ends it
        with pytest.raises(HandshakeError):
            await task
        await peer.arrived.get()
        return
    theirs = await peer.arrived.get()
    if what == "cancel":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return
    if what == "garbage":
        theirs.write(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00")  # an empty ServerHello
    else:
        theirs.close()
    with pytest.raises(HandshakeError):
        await task


@pytest.mark.parametrize("name", ["qkd_x25519mlkem768", "X25519MLKEM768"])
async def test_handshakes_that_fail_after_the_hello_left_never_lend_their_key_pair(
    received: list[Share], name: str
) -> None:
    """Cancelled, refused, answered with garbage or timed out once the hello went out:
    the key pair it carried (a spare, mostly) is gone; later dials send new ones."""
    hybrids = groups(name)
    code = hybrids[0].group.code_point
    async with loopback_pair(hybrids) as pair, silent_peer() as (peer, silent_port):
        client = pair.client(hybrids, QkdOptions())
        impatient = TlsEndpoint(dataclasses.replace(client.settings, handshake_timeout=0.3))
        # The impatient endpoint's own reserve: one handshake makes its first spare.
        sent_spares = []
        for n, what in enumerate(["close", "cancel", "garbage", "cancel", "close", "timeout"]):
            if n:
                sent_spares.append(spare_share(impatient, code))
            await _dial_and(impatient, peer, silent_port, what)
        assert spares_of(impatient).held == 1
        for done in range(1, 3):  # and on to a real server
            sent_spares.append(spare_share(impatient, code))
            stream = await handshake(pair, impatient)
            await stream.close()
            await settled(pair, done)
    wire = [(e.group, e.key_exchange) for hello in peer.hellos for e in hello.key_shares]
    assert len(wire) == 6 and len(received) == 2
    shares = wire + received
    # Each spare was sent, by the next dial, and by no other.
    for spare in sent_spares:
        assert sum(share[: len(spare)] == spare for _, share in shares) == 1
    assert_never_twice(shares)


async def test_a_pool_and_per_connection_dials_share_a_reserve_but_not_a_key_pair(
    received: list[Share],
) -> None:
    """Pool tunnel handshakes (mux) take the spare a per-connection dial left and make
    none; interleaved and concurrent, no key pair is sent twice."""
    hybrids = groups("qkd_mlkem768")
    code = hybrids[0].group.code_point
    async with loopback_pair(hybrids) as pair:
        client = pair.client(hybrids, QkdOptions())
        reserve = spares_of(client)
        done = 0

        async def dial(mux: bool) -> None:
            nonlocal done
            reader, writer = await asyncio.open_connection("127.0.0.1", pair.port)
            async with asyncio.timeout(20):
                stream = await client.connect(reader, writer, mux=mux)
            await stream.close()
            done += 1

        for mux in (False, True, True, False, True, False, False):
            held = reserve._spares.get(code)
            await dial(mux)
            await settled(pair, done)
            if held is not None:  # whoever dialled next took it
                assert received[-1][1][: len(held[1])] == held[1]
            assert reserve.held == (0 if mux else 1)
        await asyncio.gather(*(dial(n % 2 == 0) for n in range(6)))
        await settled(pair, done)
        assert reserve.held <= 1
    assert len(received) == 13
    assert_never_twice(received)


async def test_daemons_per_connection_concurrent_and_across_reloads(
    tmp_path: Path, received: list[Share]
) -> None:
    """Real daemons: sequential and concurrent connections, then reloads that change the
    client's groups. A reload's endpoint starts with an empty reserve, the old one's spare
    is never sent, and spares exist only for groups the endpoint offers."""
    both = 'groups = ["qkd_mlkem768", "qkd_x25519mlkem768"]'
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml(both)) as server,
        s.daemon("client", s.client_toml(port(server), 'groups = ["qkd_mlkem768"]')) as client,
    ):
        for n in range(3):
            assert await transfer(port(client), b"seq %d" % n) == b"seq %d" % n
        got = await asyncio.gather(*(transfer(port(client), b"c %d" % n) for n in range(5)))
        assert got == [b"c %d" % n for n in range(5)]
        old = client.tunnels[0].endpoint
        old_spares = {c: share for c, (_, share, _) in spares_of(old)._spares.items()}
        assert old_spares
        # The same first group, another list: a new endpoint, so a new reserve.
        (tmp_path / "client.toml").write_text(s.client_toml(port(server), both))
        assert client.reload() == []
        new = client.tunnels[0].endpoint
        assert new is not old and spares_of(new).held == 0
        for n in range(3):
            assert await transfer(port(client), b"after %d" % n) == b"after %d" % n
        # A group list without the old first group: no spare for it is ever made.
        (tmp_path / "client.toml").write_text(
            s.client_toml(port(server), 'groups = ["qkd_x25519mlkem768"]')
        )
        assert client.reload() == []
        for n in range(3):
            assert await transfer(port(client), b"last %d" % n) == b"last %d" % n
        last = client.tunnels[0].endpoint
        offered = {g.group.code_point for g in last.settings.groups}
        assert set(spares_of(last)._spares) <= offered and spares_of(last).held == 1
        assert {c for c, _ in received[-3:]} == offered
        assert spares_of(old)._spares.keys() == old_spares.keys()  # nobody took from it
    assert len(received) == 14
    for share in old_spares.values():
        assert all(not sent.startswith(share) for _, sent in received)
    assert_never_twice(received)


async def test_a_multiplexing_pool_never_sends_a_key_pair_twice(
    tmp_path: Path, received: list[Share]
) -> None:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml(MUX)) as server,
        s.daemon("client", s.client_toml(port(server), MUX)) as client,
    ):
        got = await asyncio.gather(*(transfer(port(client), b"m %d" % n) for n in range(6)))
        assert got == [b"m %d" % n for n in range(6)]
        assert spares_of(client.tunnels[0].endpoint).held == 0  # the pool makes none
    assert received
    assert_never_twice(received)
