"""No byte left over in a reused (never zeroed) record buffer is ever delivered.

Before every receive each pooled buffer nobody holds is filled with a marker, as if
another connection's plaintext were left in it. Batches large enough to be opened into
reused buffers then arrive cut at awkward places, and stop mid-batch at a tampered
record, a KeyUpdate, a close_notify, a smaller batch after a larger one: what the
record layer delivers must be exactly the authenticated bytes, in order, however the
receives cut them (and stay so while later receives reuse the pool).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import Callable

import pytest

from qkdproxy.core.tls import records
from qkdproxy.core.tls.events import DataReceived, Failed, PeerClosed
from qkdproxy.core.tls.record_layer import RecordLayer
from qkdproxy.core.tls.records import MAX_PLAINTEXT
from qkdproxy.core.tls.wire import Alert
from tests.integration.test_eku_attack import stream_pair
from tests.integration.test_records import read_exactly

MARKER = 0xA5
BIG, SMALL = 15 * MAX_PLAINTEXT + 999, 5 * MAX_PLAINTEXT + 7


def _references(pool: list[bytearray], index: int) -> int:
    return sys.getrefcount(pool[index])


# What _references sees for a buffer only its list holds.
ONLY = _references([bytearray(1)], 0)


def poison_free_pool() -> None:
    """Fill every pooled buffer nothing else holds with the marker: what another
    connection's batch would leave in it."""
    for index in range(len(records._POOL)):
        if _references(records._POOL, index) == ONLY:
            buffer = records._POOL[index]
            buffer[:] = bytes([MARKER]) * len(buffer)


def wire_of(layer: RecordLayer, steps: list[Callable[[RecordLayer], None]]) -> bytes:
    for step in steps:
        step(layer)
    return bytes(layer.data_to_send())


def tampered(wire: bytes, record_end_offset: int) -> bytes:
    """``wire`` with one byte flipped ``record_end_offset`` bytes before its end."""
    out = bytearray(wire)
    out[len(out) - record_end_offset] ^= 1
    return bytes(out)


def cuts(size: int, seed: int) -> list[int]:
    """Where the receives end: a few random places, and ones next to record boundaries."""
    rng = random.Random(seed)
    record = MAX_PLAINTEXT + records.RECORD_OVERHEAD
    points = {rng.randrange(1, size) for _ in range(6)}
    points |= {
        n * record + d for n in (1, 4, 9) for d in (-1, 0, 3, 6) if 0 < n * record + d < size
    }
    return [*sorted(points), size]


def deliver(layer: RecordLayer, wire: bytes, ends: list[int]) -> tuple[bytes, list[object]]:
    """Feed ``wire`` to ``layer`` cut at ``ends``; the bytes delivered (joined only at the
    end: chunks stay as delivered while later receives reuse the pool) and the ends."""
    chunks: list[bytes | bytearray] = []
    other: list[object] = []
    start = 0
    for end in ends:
        poison_free_pool()
        for event in layer.receive(bytearray(wire[start:end]), 0.0):
            if isinstance(event, DataReceived):
                chunks.append(event.data)
            else:
                other.append(event)
        start = end
    return b"".join(chunks), other


def a_big(data: bytes) -> Callable[[RecordLayer], None]:
    return lambda layer: layer.send_data(data)


SCENARIOS = ["tampered", "key_update", "close_notify", "shrinking", "cut_only"]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("seed", [1, 2])
async def test_only_authenticated_bytes_of_a_batch_are_delivered(scenario: str, seed: int) -> None:
    first, second = os.urandom(BIG), os.urandom(SMALL)
    records.drop_pooled_buffers()
    async with stream_pair() as s:
        sender, receiver = s.client._layer, s.server._layer
        # A large batch first: its buffers go to the pool and are poisoned from then on.
        prime = os.urandom(BIG)
        got, _ = deliver(receiver, wire_of(sender, [a_big(prime)]), [BIG + 10_000])
        assert got == prime
        expected_end: type | None = None
        if scenario == "tampered":
            wire = wire_of(sender, [a_big(first), a_big(second)])
            # The second-to-last record of the second batch fails: the last never counts.
            last = len(second) % MAX_PLAINTEXT + records.RECORD_OVERHEAD
            wire = tampered(wire, last + 100)
            expected = first + second[: (len(second) // MAX_PLAINTEXT - 1) * MAX_PLAINTEXT]
            expected_end = Failed
        elif scenario == "key_update":
            wire = wire_of(sender, [a_big(first), lambda layer: layer.update_keys(), a_big(second)])
            expected = first + second
        elif scenario == "close_notify":
            steps = [a_big(first), lambda layer: layer.close()]
            wire = wire_of(sender, steps)
            expected, expected_end = first, PeerClosed
        elif scenario == "shrinking":
            wire = wire_of(sender, [a_big(first)]) + wire_of(sender, [a_big(second)])
            expected = first + second
        else:
            wire = wire_of(sender, [a_big(first)])
            expected = first
        got, ends = deliver(receiver, wire, cuts(len(wire), seed))
        assert len(got) == len(expected)
        assert got == expected
        if expected_end is None:
            assert ends == [] or all(type(e).__name__ == "KeysUpdated" for e in ends)
        else:
            assert [type(e) for e in ends] == [expected_end]
            if expected_end is Failed:
                assert ends[0].alert == Alert.BAD_RECORD_MAC  # type: ignore[attr-defined]


async def test_data_around_an_extended_key_update_arrives_whole_while_the_pool_is_poisoned() -> (
    None
):
    """A fresh key exchange in the middle of a flow: what waits behind it in a receive is
    kept and opened later (with the pool refilled with markers meanwhile)."""
    first, second = os.urandom(BIG), os.urandom(BIG)
    records.drop_pooled_buffers()
    async with stream_pair() as s:

        async def send() -> None:
            await s.client.write(first)
            assert await s.client.fresh_key_update()
            await s.client.write(second)

        async def receive() -> bytes:
            got = bytearray()
            while len(got) < len(first) + len(second):
                poison_free_pool()
                chunk = await asyncio.wait_for(s.server.read(), 10)
                assert chunk
                got += chunk
            return bytes(got)

        _, got = await asyncio.gather(send(), receive())
        assert got == first + second
        await s.client.write(b"after")
        assert await read_exactly(s.server, 5) == b"after"
