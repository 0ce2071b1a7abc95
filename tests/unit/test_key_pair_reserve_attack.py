"""Attacks on the spare client key pairs (core.hybrid.KeyPairReserve) with time passed in:
an ephemeral key pair reaches at most one key share, is never handed to another group,
is not used once its age is unknown or too great, and the reserve neither holds more than
one pair per group nor draws QKD keys nor shows key material."""

from __future__ import annotations

import logging
import math

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from qkdproxy.core.hybrid import SPARE_MAX_AGE_S, HybridKem, KeyPairReserve
from qkdproxy.core.keys import KeySourceUnavailableError
from qkdproxy.core.tls.hello import ServerHello
from qkdproxy.core.tls.keyexchange import (
    ClientKeyExchange,
    HandshakeRejectedError,
    ServerKeyExchange,
)
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.key_supply import run
from qkdproxy.keys.sources import KeySources
from tests.conftest import groups
from tests.unit.test_keyexchange import (
    MLKEM768,
    MLKEM1024,
    TRIPLE,
    X25519,
    FailingMaster,
    Pair,
    client_hello,
)

# The same ML-KEM-768 component as qkd_mlkem768, without QKD, under another code point:
# a spare of one must never be offered under the other's label.
PLAIN_MLKEM768 = groups("MLKEM768")[0]
ALL = [MLKEM768, MLKEM1024, TRIPLE, X25519, PLAIN_MLKEM768]


def parts(hybrid: HybridKem, share: bytes) -> list[bytes]:
    """A client share's component public values (the key id, if any, left off)."""
    out, offset = [], 0
    for kem in hybrid.components:
        out.append(share[offset : offset + kem.sizes.public_key])
        offset += kem.sizes.public_key
    return out


def held_spare(reserve: KeyPairReserve, hybrid: HybridKem, made: float) -> bytes:
    """Make ``reserve`` hold a spare for ``hybrid`` made at ``made``; its public value."""
    reserve.take(hybrid, made)
    reserve.replenish(made)
    return reserve._spares[hybrid.group.code_point][1]


@pytest.mark.parametrize(
    ("made", "now"),
    [
        (100.0, 50.0),  # the clock went back: the spare's age is unknown
        (100.0, 100.0 - 1e-9),
        (100.0, -math.inf),
        (100.0, math.inf),
        (100.0, math.nan),
        (100.0, 100.0 + SPARE_MAX_AGE_S + 1e-6),
        (math.inf, 0.0),  # made at a huge time, taken at an ordinary one
        (1e300, 1.0),
        (math.nan, 100.0),
        (-math.inf, 100.0),
    ],
)
def test_a_spare_of_unknown_or_excessive_age_is_dropped_unused(made: float, now: float) -> None:
    reserve = KeyPairReserve()
    spare = held_spare(reserve, MLKEM768, made)
    share = reserve.take(MLKEM768, now)[1]
    assert share != spare
    assert reserve.held == 0  # dropped, not kept for a later handshake either


@pytest.mark.parametrize("age", [0.0, SPARE_MAX_AGE_S / 2, SPARE_MAX_AGE_S])
def test_a_spare_within_its_age_is_used(age: float) -> None:
    reserve = KeyPairReserve()
    spare = held_spare(reserve, MLKEM768, 1000.0)
    assert reserve.take(MLKEM768, 1000.0 + age)[1] == spare


def test_handshakes_started_before_any_replenish_never_share_a_pair() -> None:
    """Many handshakes in one event-loop round take before the first replenish runs: one
    gets each group's spare, the others generate; then one spare per group, not more."""
    reserve = KeyPairReserve()
    seen: list[bytes] = [held_spare(reserve, g, 0.0) for g in ALL]
    taken: list[tuple[HybridKem, bytes]] = []
    for round_ in range(3):
        now = float(round_)
        for _ in range(8):
            for hybrid in ALL:
                taken.append((hybrid, reserve.take(hybrid, now)[1]))
        assert reserve.held == 0
        for _ in range(8):  # every handshake of the round schedules one
            reserve.replenish(now)
        assert reserve.held == len(ALL)
        assert len(reserve._wanted) == 0
    components = [p for hybrid, share in taken for p in parts(hybrid, share)]
    assert len(set(components)) == len(components)
    # The spares held before the first round went out, each exactly once.
    assert sum(share in seen for _, share in taken) == len(seen)


def test_a_spare_is_never_handed_to_another_group() -> None:
    reserve = KeyPairReserve()
    spares = {g.group.code_point: held_spare(reserve, g, 0.0) for g in (MLKEM768, TRIPLE)}
    # The same ML-KEM-768 component under a plain code point, and groups with none.
    for hybrid in (PLAIN_MLKEM768, X25519, MLKEM1024):
        share = reserve.take(hybrid, 0.0)[1]
        assert len(share) == hybrid.public_size
        assert all(s not in share and share not in s for s in spares.values())
    assert reserve.held == 2
    # Each spare's private key answers the share it was sent with, for its own group.
    for hybrid in (MLKEM768, TRIPLE):
        private, share = reserve.take(hybrid, 0.0)
        assert share == spares[hybrid.group.code_point]
        ciphertext, secret = hybrid.encapsulate(share)
        assert hybrid.decapsulate(private, ciphertext) == secret


def test_the_reserve_never_draws_a_qkd_key() -> None:
    """A QKD key is spent only by a handshake's own offer, never ahead of it."""
    pair = Pair()
    ledger = pair.client_ctx.ledger
    reserve = KeyPairReserve()
    for n in range(5):
        share = reserve.take(MLKEM768, float(n))[1]
        reserve.replenish(float(n))
        assert len(share) == MLKEM768.public_size  # no key id: only the PQ part
    assert len(reserve._spares[MLKEM768.group.code_point][1]) == MLKEM768.public_size
    assert (ledger.taken, ledger.consumed, ledger.wasted) == (0, 0, 0)


async def test_an_offer_that_fails_after_taking_the_spare_does_not_return_it() -> None:
    link_pair = Pair()
    failing = KeyContext(
        KeySources(
            FailingMaster(KeySourceUnavailableError("KME down")),
            link_pair.client_ctx.sources.slave,
            None,
        )
    )
    reserve = KeyPairReserve()
    spare = held_spare(reserve, MLKEM768, 0.0)
    client = ClientKeyExchange([MLKEM768], failing, reserve)
    with pytest.raises(HandshakeRejectedError):
        await run(client.offer(MLKEM768.group.code_point, 1.0))
    assert reserve.held == 0  # spent on the failed offer, never offered again
    reserve.replenish(1.0)
    again = ClientKeyExchange([MLKEM768], link_pair.client_ctx, reserve)
    await run(again.offer(MLKEM768.group.code_point, 2.0))
    share = again.key_share(MLKEM768.group.code_point)[0]
    assert share[: MLKEM768.public_size] != spare


async def test_a_hello_retry_offers_a_fresh_pair_and_leaves_the_other_spare() -> None:
    """The second offer after a HelloRetryRequest is generated then, not taken from the
    reserve, even when a spare for that group is held; the spare goes to one later
    handshake only."""
    pair = Pair()
    reserve = KeyPairReserve()
    first_spare = held_spare(reserve, MLKEM1024, 0.0)
    retry_spare = held_spare(reserve, MLKEM768, 0.0)
    client = ClientKeyExchange([MLKEM1024, MLKEM768], pair.client_ctx, reserve)
    code_1024, code_768 = MLKEM1024.group.code_point, MLKEM768.group.code_point
    await run(client.offer(code_1024, 1.0))
    assert client.key_share(code_1024)[0][: MLKEM1024.public_size] == first_spare
    server = ServerKeyExchange([MLKEM768], pair.server_ctx)
    hello = client_hello([MLKEM1024, MLKEM768], {code_1024: client.key_share(code_1024)[0]})
    assert await run(server.on_client_hello(hello))
    await run(client.on_server_hello(ServerHello(True, code_768, None)))
    second = client.key_share(code_768)[0]
    assert second[: MLKEM768.public_size] != retry_spare
    assert reserve._spares[code_768][1] == retry_spare  # still held, still unused
    later = ClientKeyExchange([MLKEM768], pair.client_ctx, reserve)
    await run(later.offer(code_768, 2.0))
    assert later.key_share(code_768)[0][: MLKEM768.public_size] == retry_spare
    assert reserve.held == 0
    await run(client.finish(False))
    await run(server.finish(False))
    await run(later.finish(False))


def test_nothing_accumulates_over_many_handshakes() -> None:
    reserve = KeyPairReserve()
    for n in range(300):
        hybrid = ALL[n % len(ALL)]
        reserve.take(hybrid, n * 7.0)  # most spares are stale by the next take
        if n % 3:
            reserve.replenish(n * 7.0)
        assert reserve.held <= len(ALL)
        assert len(reserve._wanted) <= len(ALL)


def test_no_key_material_in_a_repr_or_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    reserve = KeyPairReserve()
    reserve.take(X25519, 0.0)
    reserve.replenish(0.0)
    private = reserve._spares[X25519.group.code_point][0]
    (handle,) = private.handles
    assert isinstance(handle, x25519.X25519PrivateKey)
    secret = handle.private_bytes_raw()
    shown = " ".join(
        [repr(reserve), str(reserve), repr(private), repr(reserve.replenish), repr(X25519)]
    )
    for form in (secret.hex(), secret.hex().upper(), repr(secret), repr(handle)):
        assert form not in shown
    assert repr(private) == "ClientPrivate()"
    assert caplog.records == []
