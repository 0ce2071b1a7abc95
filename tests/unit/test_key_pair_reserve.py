"""Client key pairs generated ahead of use (core.hybrid.KeyPairReserve): each handed out
once, fresh or not at all, and the handshakes that take them still agree on the secret."""

from __future__ import annotations

from qkdproxy.core.hybrid import SPARE_MAX_AGE_S, KeyPairReserve
from qkdproxy.core.tls.hello import ServerHello
from qkdproxy.core.tls.keyexchange import ClientKeyExchange, ServerKeyExchange
from qkdproxy.keys.key_supply import run
from tests.unit.test_keyexchange import MLKEM768, TRIPLE, X25519, Pair, client_hello


def test_a_spare_is_made_only_for_a_group_a_handshake_used_and_handed_out_once() -> None:
    reserve = KeyPairReserve()
    reserve.replenish(0.0)
    assert reserve.held == 0  # nothing asked for yet: nothing generated
    first = reserve.take(MLKEM768, 0.0)
    reserve.replenish(0.0)
    reserve.replenish(0.0)  # a second call makes no second spare
    assert reserve.held == 1
    second = reserve.take(MLKEM768, 1.0)
    assert reserve.held == 0
    third = reserve.take(MLKEM768, 1.0)  # not replenished in between: generated now
    shares = {first[1], second[1], third[1]}
    assert len(shares) == 3
    assert len({id(first[0]), id(second[0]), id(third[0])}) == 3


def test_the_spare_is_the_pair_the_next_handshake_gets() -> None:
    reserve = KeyPairReserve()
    reserve.take(TRIPLE, 0.0)
    reserve.replenish(0.0)
    spare = reserve._spares[TRIPLE.group.code_point]
    assert reserve.take(TRIPLE, 0.5) == (spare[0], spare[1])
    # Another group's take does not get it, and gets its own spare later.
    reserve.take(TRIPLE, 0.5)
    reserve.take(X25519, 0.5)
    reserve.replenish(0.5)
    assert sorted(reserve._spares) == sorted([TRIPLE.group.code_point, X25519.group.code_point])


def test_a_stale_spare_is_dropped_unused() -> None:
    reserve = KeyPairReserve()
    reserve.take(MLKEM768, 0.0)
    reserve.replenish(0.0)
    stale = reserve._spares[MLKEM768.group.code_point]
    private, share = reserve.take(MLKEM768, SPARE_MAX_AGE_S + 0.1)
    assert share != stale[1] and private is not stale[0]
    assert reserve.held == 0


async def test_handshakes_on_spares_agree_and_never_offer_a_share_twice() -> None:
    pair = Pair()
    reserve = KeyPairReserve()
    offered: list[bytes] = []
    for n in range(6):
        client = ClientKeyExchange([MLKEM768], pair.client_ctx, reserve)
        code = MLKEM768.group.code_point
        await run(client.offer(code, float(n)))
        share = client.key_share(code)[0]
        offered.append(share)
        if n % 2 == 0:  # every other handshake finds a spare
            reserve.replenish(float(n))
        server = ServerKeyExchange([MLKEM768], pair.server_ctx)
        assert not await run(server.on_client_hello(client_hello([MLKEM768], {code: share})))
        server_share = server.key_share(code)[0]
        server_secret = server.shared_secret(code, share)
        await run(client.on_server_hello(ServerHello(False, code, server_share)))
        assert client.shared_secret(code, server_share) == server_secret
        await run(client.finish(True))
        await run(server.finish(True))
    assert len(set(offered)) == len(offered)


async def test_without_a_time_an_offer_never_takes_a_spare() -> None:
    # A HelloRetryRequest's second offer and Extended Key Updates pass no time.
    pair = Pair()
    reserve = KeyPairReserve()
    reserve.take(MLKEM768, 0.0)
    reserve.replenish(0.0)
    client = ClientKeyExchange([MLKEM768], pair.client_ctx, reserve)
    await run(client.offer(MLKEM768.group.code_point))
    assert reserve.held == 1
