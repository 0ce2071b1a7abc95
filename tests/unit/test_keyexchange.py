"""Both flows and both APIs through the key-exchange objects, without sockets."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdproxy.core.hybrid import KEY_ID_SIZE, ZERO_KEY_ID, HybridKem
from qkdproxy.core.keys import KeySourceUnavailableError, QkdKey
from qkdproxy.core.tls.hello import ClientHello, KeyShareEntry, ServerHello
from qkdproxy.core.tls.keyexchange import (
    ClientKeyExchange,
    Flow,
    HandshakeRejectedError,
    KeyApi,
    QkdOptions,
    ServerKeyExchange,
)
from qkdproxy.core.tls.wire import Alert
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.key_supply import run
from qkdproxy.keys.sources import KeySources
from qkdproxy.sim.inprocess import InProcessQkdLink
from tests.conftest import groups

MLKEM768 = groups("qkd_mlkem768")[0]
MLKEM1024 = groups("qkd_mlkem1024")[0]
TRIPLE = groups("qkd_x25519mlkem768")[0]
X25519 = groups("x25519")[0]


@dataclass
class CountingSlave:
    """Wraps a slave source and counts the KME calls made."""

    inner: object
    calls: int = 0

    async def get_key(self, key_id: bytes) -> QkdKey:
        self.calls += 1
        return await self.inner.get_key(key_id)  # type: ignore[attr-defined, no-any-return]


@dataclass
class FailingMaster:
    error: BaseException

    async def take_key(self) -> QkdKey:
        raise self.error


@dataclass
class Pair:
    link: InProcessQkdLink = field(default_factory=InProcessQkdLink)
    client_ctx: KeyContext = field(init=False)
    server_ctx: KeyContext = field(init=False)
    slave_counter: CountingSlave = field(init=False)

    def __post_init__(self) -> None:
        self.client_ctx = KeyContext(self.link.sources("a"))
        server = self.link.sources("b")
        self.slave_counter = CountingSlave(server.slave)
        self.server_ctx = KeyContext(KeySources(server.master, self.slave_counter, server.stream))


def client_hello(offered: list[HybridKem], shares: dict[int, bytes]) -> ClientHello:
    return ClientHello(
        tuple(g.group.code_point for g in offered),
        tuple(KeyShareEntry(code, share) for code, share in shares.items()),
        (0x0304,),
        (0x1301,),
    )


async def full_exchange(
    pair: Pair, client_groups: list[HybridKem], server_groups: list[HybridKem]
) -> tuple[ClientKeyExchange, ServerKeyExchange, bytes]:
    """One handshake's key exchange, HelloRetryRequest included; returns the agreed secret."""
    client = ClientKeyExchange(client_groups, pair.client_ctx)
    first = client_groups[0].group.code_point
    await run(client.offer(first))
    server = ServerKeyExchange(server_groups, pair.server_ctx)
    shares = {first: client.key_share(first)[0]}
    if await run(server.on_client_hello(client_hello(client_groups, shares))):
        assert server.chosen is not None
        chosen = server.chosen.group.code_point
        await run(client.on_server_hello(ServerHello(True, chosen, None)))
        shares = {chosen: client.key_share(chosen)[0]}
        assert not await run(server.on_client_hello(client_hello(client_groups, shares)))
    assert server.chosen is not None
    chosen = server.chosen.group.code_point
    server_share = server.key_share(chosen)[0]
    server_secret = server.shared_secret(chosen, shares[chosen])
    await run(client.on_server_hello(ServerHello(False, chosen, server_share)))
    assert client.shared_secret(chosen, server_share) == server_secret
    await run(client.finish(True))
    await run(server.finish(True))
    return client, server, server_secret


@pytest.mark.parametrize("hybrid", [MLKEM768, TRIPLE], ids=lambda h: h.group.name)
@pytest.mark.parametrize(
    ("flow", "api"),
    [
        (Flow.CLIENT_INITIATED, KeyApi.ETSI_014),
        (Flow.CLIENT_INITIATED, KeyApi.ETSI_004),
        (Flow.SERVER_INITIATED, KeyApi.ETSI_014),
    ],
)
async def test_flows_agree_and_account_for_every_key(
    hybrid: HybridKem, flow: Flow, api: KeyApi
) -> None:
    pair = Pair()
    pair.client_ctx.options = QkdOptions(flow=flow, api=api)
    pair.server_ctx.options = QkdOptions(api=api)
    client, server, secret = await full_exchange(pair, [hybrid], [hybrid])
    assert len(secret) == hybrid.secret_size
    assert client.record.flow is flow and server.record.flow is flow
    assert client.record.qkd_key_id == server.record.qkd_key_id
    assert client.record.group == server.record.group == hybrid.group.name
    for ledger in (pair.client_ctx.ledger, pair.server_ctx.ledger):
        assert (ledger.taken, ledger.consumed, ledger.wasted) == (1, 1, 0)
    await asyncio.wait_for(pair.client_ctx.drain(), 5)
    await asyncio.wait_for(pair.server_ctx.drain(), 5)
    assert pair.link.keys_in_flight == 0
    assert pair.link.open_streams == 0  # both ends closed their ETSI 004 stream


async def test_client_initiated_server_echoes_the_key_id() -> None:
    pair = Pair()
    client = ClientKeyExchange([MLKEM768], pair.client_ctx)
    code = MLKEM768.group.code_point
    await run(client.offer(code))
    share = client.key_share(code)[0]
    server = ServerKeyExchange([MLKEM768], pair.server_ctx)
    await run(server.on_client_hello(client_hello([MLKEM768], {code: share})))
    assert server.key_share(code)[0][-KEY_ID_SIZE:] == share[-KEY_ID_SIZE:]


async def test_server_initiated_client_sends_zero_key_id() -> None:
    pair = Pair()
    pair.client_ctx.options = QkdOptions(flow=Flow.SERVER_INITIATED)
    client = ClientKeyExchange([MLKEM768], pair.client_ctx)
    await run(client.offer(MLKEM768.group.code_point))
    assert client.key_share(MLKEM768.group.code_point)[0][-KEY_ID_SIZE:] == ZERO_KEY_ID
    assert pair.client_ctx.ledger.taken == 0


@pytest.mark.parametrize("tolerant", [False, True])
async def test_unechoed_key_id_is_refused_unless_configured(tolerant: bool) -> None:
    pair = Pair()
    pair.client_ctx.options = QkdOptions(accept_unechoed_key_id=tolerant)
    client = ClientKeyExchange([MLKEM768], pair.client_ctx)
    code = MLKEM768.group.code_point
    await run(client.offer(code))
    share = client.key_share(code)[0]
    server = ServerKeyExchange([MLKEM768], pair.server_ctx)
    await run(server.on_client_hello(client_hello([MLKEM768], {code: share})))
    reference_011 = server.key_share(code)[0][:-KEY_ID_SIZE] + ZERO_KEY_ID
    if tolerant:
        await run(client.on_server_hello(ServerHello(False, code, reference_011)))
        assert client.record.flow is Flow.CLIENT_INITIATED
        return
    with pytest.raises(HandshakeRejectedError) as info:
        await run(client.on_server_hello(ServerHello(False, code, reference_011)))
    assert info.value.alert is Alert.ILLEGAL_PARAMETER


async def test_hello_retry_takes_a_fresh_key_and_wastes_the_first() -> None:
    pair = Pair()
    client, server, _ = await full_exchange(pair, [MLKEM1024, MLKEM768], [MLKEM768])
    assert client.record.hello_retry and server.record.hello_retry
    ledger = pair.client_ctx.ledger
    assert (ledger.taken, ledger.consumed, ledger.wasted) == (2, 1, 1)
    assert ledger.wasted_by_reason == {"hello_retry": 1}
    assert pair.server_ctx.ledger.taken == 1
    assert pair.link.keys_in_flight == 1  # the wasted key was never fetched by the server


async def test_server_takes_an_acceptable_group_with_a_share_over_a_retry() -> None:
    """No HelloRetryRequest (and no wasted client key) when the client's share is acceptable."""
    pair = Pair()
    client, server, _ = await full_exchange(pair, [MLKEM1024, MLKEM768], [MLKEM768, MLKEM1024])
    assert not client.record.hello_retry
    assert server.record.group == "qkd_mlkem1024"
    assert pair.client_ctx.ledger.wasted == 0


async def test_records_name_the_key_of_the_retry() -> None:
    """After a HelloRetryRequest the client's records name its second key, the one the
    server fetched and both used (the id's text is formatted once per key)."""
    pair = Pair()
    client, server, _ = await full_exchange(pair, [MLKEM1024, MLKEM768], [MLKEM768])
    assert client.record.offered_key_id == client.record.qkd_key_id == server.record.qkd_key_id
    assert server.record.qkd_key_id is not None
    assert str(uuid.UUID(server.record.qkd_key_id)) == server.record.qkd_key_id


async def test_hello_retry_from_classical_share_wastes_nothing() -> None:
    pair = Pair()
    client, _, _ = await full_exchange(pair, [X25519, MLKEM768], [MLKEM768])
    assert client.record.hello_retry
    assert pair.client_ctx.ledger.wasted == 0


@pytest.mark.parametrize("bad", [b"", bytes(1199), bytes(1201)])
async def test_malformed_share_costs_no_qkd_key(bad: bytes) -> None:
    pair = Pair()
    code = MLKEM768.group.code_point
    server = ServerKeyExchange([MLKEM768], pair.server_ctx)
    with pytest.raises(HandshakeRejectedError) as info:
        await run(server.on_client_hello(client_hello([MLKEM768], {code: bad})))
    assert info.value.alert is Alert.ILLEGAL_PARAMETER
    assert pair.slave_counter.calls == 0 and pair.server_ctx.ledger.taken == 0


async def test_bad_x25519_component_in_triple_costs_no_qkd_key() -> None:
    pair = Pair()
    client = ClientKeyExchange([TRIPLE], pair.client_ctx)
    code = TRIPLE.group.code_point
    await run(client.offer(code))
    share = client.key_share(code)[0]
    zero_point = share[:1184] + bytes(32) + share[-KEY_ID_SIZE:]
    server = ServerKeyExchange([TRIPLE], pair.server_ctx)
    with pytest.raises(HandshakeRejectedError):
        await run(server.on_client_hello(client_hello([TRIPLE], {code: zero_point})))
    assert pair.slave_counter.calls == 0


async def test_replayed_key_id_is_refused_without_a_kme_call() -> None:
    pair = Pair()
    client = ClientKeyExchange([MLKEM768], pair.client_ctx)
    code = MLKEM768.group.code_point
    await run(client.offer(code))
    hello = client_hello([MLKEM768], {code: client.key_share(code)[0]})
    await run(ServerKeyExchange([MLKEM768], pair.server_ctx).on_client_hello(hello))
    with pytest.raises(HandshakeRejectedError, match="already used"):
        await run(ServerKeyExchange([MLKEM768], pair.server_ctx).on_client_hello(hello))
    assert pair.slave_counter.calls == 1


async def test_unknown_key_id_is_illegal_parameter() -> None:
    pair = Pair()
    code = MLKEM768.group.code_point
    _, public = MLKEM768.generate()
    hello = client_hello([MLKEM768], {code: public + b"\x01" * 16})
    with pytest.raises(HandshakeRejectedError) as info:
        await run(ServerKeyExchange([MLKEM768], pair.server_ctx).on_client_hello(hello))
    assert info.value.alert is Alert.ILLEGAL_PARAMETER
    assert pair.server_ctx.ledger.taken == 0


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (KeySourceUnavailableError("KME down"), "KME down"),
        (RuntimeError("secret detail"), "RuntimeError"),
    ],
)
async def test_key_source_failures_are_internal_errors(error: BaseException, fragment: str) -> None:
    context = KeyContext(KeySources(master=FailingMaster(error)))
    client = ClientKeyExchange([MLKEM768], context)
    with pytest.raises(HandshakeRejectedError) as info:
        await run(client.offer(MLKEM768.group.code_point))
    assert info.value.alert is Alert.INTERNAL_ERROR
    assert fragment in info.value.reason
    assert "secret detail" not in info.value.reason


async def test_missing_sources_and_groups_fail_closed() -> None:
    pair = Pair()
    code = MLKEM768.group.code_point
    _, public = MLKEM768.generate()
    server = ServerKeyExchange([MLKEM768], KeyContext(KeySources()))
    with pytest.raises(HandshakeRejectedError) as info:
        await run(server.on_client_hello(client_hello([MLKEM768], {code: public + ZERO_KEY_ID})))
    assert info.value.alert is Alert.HANDSHAKE_FAILURE
    with pytest.raises(HandshakeRejectedError, match="in common"):
        await run(
            ServerKeyExchange([X25519], pair.server_ctx).on_client_hello(
                client_hello([MLKEM768], {code: public + ZERO_KEY_ID})
            )
        )


async def test_client_refuses_inconsistent_server_hellos() -> None:
    pair = Pair()
    pair.client_ctx.options = QkdOptions(flow=Flow.SERVER_INITIATED)
    client = ClientKeyExchange([MLKEM768, X25519], pair.client_ctx)
    code = MLKEM768.group.code_point
    await run(client.offer(code))
    with pytest.raises(HandshakeRejectedError, match="not offered"):
        await run(client.on_server_hello(ServerHello(False, X25519.group.code_point, bytes(32))))
    with pytest.raises(HandshakeRejectedError, match="bad group"):
        await run(client.on_server_hello(ServerHello(True, code, None)))
    with pytest.raises(HandshakeRejectedError, match="no QKD key id"):
        await run(client.on_server_hello(ServerHello(False, code, bytes(1088) + ZERO_KEY_ID)))
    with pytest.raises(HandshakeRejectedError, match="no key share"):
        await run(client.on_server_hello(ServerHello(False, None, None)))


async def test_hooks_refuse_unprepared_or_mismatched_shares() -> None:
    pair = Pair()
    _, _, _ = await full_exchange(pair, [MLKEM768], [MLKEM768])
    server = ServerKeyExchange([MLKEM768], pair.server_ctx)
    with pytest.raises(LookupError):
        server.key_share(MLKEM768.group.code_point)
    with pytest.raises(LookupError):
        server.shared_secret(MLKEM768.group.code_point, b"x")


async def test_failed_handshake_wastes_held_keys_once() -> None:
    pair = Pair()
    client = ClientKeyExchange([MLKEM768], pair.client_ctx)
    await run(client.offer(MLKEM768.group.code_point))
    await run(client.finish(False))
    await run(client.finish(False))
    ledger = pair.client_ctx.ledger
    assert (ledger.taken, ledger.consumed, ledger.wasted) == (1, 0, 1)


SCENARIOS = st.sampled_from(["ok", "hrr", "tamper", "abort_client", "server_initiated"])


@settings(max_examples=30, deadline=None)
@given(st.lists(SCENARIOS, min_size=1, max_size=12))
async def test_no_key_is_ever_used_twice(scenarios: list[str]) -> None:
    pair = Pair()
    used: list[str] = []
    for scenario in scenarios:
        pair.client_ctx.options = QkdOptions(
            flow=Flow.SERVER_INITIATED if scenario == "server_initiated" else Flow.CLIENT_INITIATED
        )
        if scenario in ("ok", "server_initiated", "hrr"):
            offered = [MLKEM1024, MLKEM768] if scenario == "hrr" else [MLKEM768]
            client, _, _ = await full_exchange(pair, offered, [MLKEM768])
            assert client.record.qkd_key_id
            used.append(client.record.qkd_key_id)
            continue
        client = ClientKeyExchange([MLKEM768], pair.client_ctx)
        code = MLKEM768.group.code_point
        await run(client.offer(code))
        if scenario == "tamper":
            share = bytearray(client.key_share(code)[0])
            share[-1] ^= 1
            server = ServerKeyExchange([MLKEM768], pair.server_ctx)
            with pytest.raises(HandshakeRejectedError):
                await run(server.on_client_hello(client_hello([MLKEM768], {code: bytes(share)})))
            await run(server.finish(False))
        await run(client.finish(False))
    assert len(used) == len(set(used))
    for ledger in (pair.client_ctx.ledger, pair.server_ctx.ledger):
        assert ledger.outstanding == 0
        assert ledger.consumed == len(used)


@dataclass
class HangingStream:
    """An ETSI 004 source whose CLOSE never answers."""

    inner: object

    async def open(self, ksid: bytes | None) -> bytes:
        return await self.inner.open(ksid)  # type: ignore[attr-defined, no-any-return]

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        return await self.inner.get_key(ksid, index)  # type: ignore[attr-defined, no-any-return]

    async def close(self, ksid: bytes) -> None:
        await asyncio.Event().wait()


async def test_a_hanging_stream_close_cannot_hang_the_handshake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("qkdproxy.keys.key_supply.STREAM_CLOSE_TIMEOUT", 0.05)
    link = InProcessQkdLink()
    context = KeyContext(
        KeySources(stream=HangingStream(link.sources("a").stream)),
        QkdOptions(api=KeyApi.ETSI_004),
    )
    client = ClientKeyExchange([MLKEM768], context)
    await run(client.offer(MLKEM768.group.code_point))
    await asyncio.wait_for(run(client.finish(False)), 5)
    assert context.ledger.outstanding == 0
    await asyncio.wait_for(context.drain(), 5)  # the CLOSE gave up after its own timeout
