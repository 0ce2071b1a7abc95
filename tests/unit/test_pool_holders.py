"""Every way the data path (or a transport) can hold a pooled batch keeps it out of reuse,
also once the interpreter has specialized the reuse check (it is calibrated cold, at
import, and runs hot on every large batch)."""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qkdproxy.core.tls import records
from qkdproxy.core.tls.records import MAX_PLAINTEXT, TrafficKeys, open_records, seal
from tests.unit.test_record_buffers import Counter


def keys(seqnum: int = 0) -> TrafficKeys:
    return TrafficKeys(AESGCM(bytes(32)), 7, Counter(seqnum))


def slice_of_a_slice(buffer: bytearray) -> object:
    outer = memoryview(buffer)[10:]
    inner = outer[5:100_000][3:]
    outer.release()  # the parent view is gone, the slice is not
    return inner


def cast_view(buffer: bytearray) -> object:
    return memoryview(buffer).cast("b")[1:]  # uvloop's form of what it queues


def deque_of_buffer(buffer: bytearray) -> object:
    return deque([buffer])  # asyncio >= 3.12 when send() took nothing


def deque_of_view(buffer: bytearray) -> object:
    return deque([memoryview(buffer)[1234:]])  # asyncio >= 3.12 after a partial send


def ctypes_export(buffer: bytearray) -> object:
    return (ctypes.c_char * 1000).from_buffer(buffer)  # a C holder of the raw memory


HOLDERS: list[Callable[[bytearray], object]] = [
    memoryview,
    slice_of_a_slice,
    cast_view,
    deque_of_buffer,
    deque_of_view,
    ctypes_export,
    lambda buffer: [buffer],
]


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_POOL", [])


def test_the_reuse_check_gives_the_same_answer_hot_as_at_import() -> None:
    pool = [bytearray(8)]
    for _ in range(20_000):  # far past any specialization threshold
        assert records._free_index(pool, records._POOL_ONLY) == 0
    held = memoryview(pool[0])
    for _ in range(20_000):
        assert records._free_index(pool, records._POOL_ONLY) == -1
    held.release()
    assert records._free_index(pool, records._POOL_ONLY) == 0


@pytest.mark.parametrize("holder", HOLDERS, ids=lambda h: getattr(h, "__name__", "list"))
@pytest.mark.parametrize("kind", ["sealed", "opened"])
def test_a_held_batch_is_never_overwritten(
    holder: Callable[[bytearray], object], kind: str
) -> None:
    plain = os.urandom(8 * MAX_PLAINTEXT)
    for seqnum in range(50):  # warm every path up first
        seal(keys(seqnum), plain)
    batch = (
        seal(keys(), plain) if kind == "sealed" else open_records(keys(), seal(keys(), plain)).data
    )
    assert any(buffer is batch for buffer in records._POOL)  # the case under test
    before = bytes(batch)
    held = holder(batch)
    batch_id = id(batch)
    del batch
    for seqnum in range(1, 30):
        other = seal(keys(seqnum), os.urandom(8 * MAX_PLAINTEXT))
        assert id(other) != batch_id
        opened = open_records(keys(seqnum), other).data
        assert id(opened) != batch_id
        del other, opened
    target = held
    while not isinstance(target, bytearray):
        target = target[0] if isinstance(target, (deque, list)) else getattr(target, "obj", None)
        if target is None:
            break
    if isinstance(target, bytearray):
        assert bytes(target) == before
    del held, target


def test_the_pool_keeps_no_buffer_larger_than_its_cap() -> None:
    """A huge batch (a multiplexed flush of many streams) is not kept resident afterwards,
    and a pooled buffer never grows past the cap."""
    huge = os.urandom(records.POOLED_MAX + MAX_PLAINTEXT)
    sealed = seal(keys(), huge)
    assert all(buffer is not sealed for buffer in records._POOL)
    opened = open_records(keys(), memoryview(sealed))
    assert opened.data == huge
    del sealed, opened
    seal(keys(), os.urandom(records.POOLED_BATCH))  # a pooled size, then a huge one again
    seal(keys(), huge)
    assert records._POOL and all(len(b) <= records.POOLED_MAX for b in records._POOL)
