"""Reused output buffers of sealed and opened batches: a buffer anything still refers to
(a caller, a memoryview, a transport) is never overwritten; a reused one hands out
exactly the bytes of its batch, never what an earlier (larger) batch left in it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qkdproxy.core.tls import records
from qkdproxy.core.tls.records import (
    HEADER,
    MAX_PLAINTEXT,
    POOLED_BATCH,
    TrafficKeys,
    open_records,
    seal,
)

KEY = bytes(range(32))
IV = 0x1234


@dataclass
class Counter:
    seqnum: int = 0


def keys(seqnum: int = 0) -> TrafficKeys:
    return TrafficKeys(AESGCM(KEY), IV, Counter(seqnum))


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no pooled buffer (other tests' batches are not in the way)."""
    monkeypatch.setattr(records, "_POOL", [])


def test_a_released_sealed_batch_is_reused_and_holds_exactly_the_next_batch() -> None:
    big, small = os.urandom(8 * MAX_PLAINTEXT), os.urandom(POOLED_BATCH + 5)
    first = seal(keys(), big)
    first_id = id(first)
    del first
    second = seal(keys(1), small)
    assert id(second) == first_id  # reused, not a new (zeroed) buffer
    assert bytes(second) == bytes(seal(keys(1), small))
    assert open_records(keys(1), second).data == small


def test_a_sealed_batch_still_referenced_is_never_overwritten() -> None:
    data = os.urandom(8 * MAX_PLAINTEXT)
    held = seal(keys(), data)
    copy = bytes(held)
    view = memoryview(held)[100:200]  # a transport holding part of it
    del held
    for seqnum in range(1, 40):
        seal(keys(seqnum), os.urandom(8 * MAX_PLAINTEXT))
    assert bytes(view.obj) == copy


def test_an_opened_batch_in_use_is_not_reused_a_released_one_is() -> None:
    first_plain = os.urandom(8 * MAX_PLAINTEXT)
    opened = open_records(keys(), seal(keys(), first_plain))
    payload = memoryview(opened.data)[5:1000]  # a DATA payload on its way to the backend
    first = id(opened.data)
    del opened
    other = open_records(keys(), seal(keys(), os.urandom(8 * MAX_PLAINTEXT)))
    assert id(other.data) != first
    assert bytes(payload) == first_plain[5:1000]
    del payload
    again = open_records(keys(), seal(keys(), first_plain))
    assert id(again.data) == first
    assert again.data == first_plain


def test_a_reused_opened_buffer_exposes_no_bytes_of_an_earlier_batch() -> None:
    # A large batch leaves plaintext in the buffer; the next batch stops at a tampered
    # record: only its authenticated records' bytes are handed out.
    del open_records(keys(), seal(keys(), b"S" * (8 * MAX_PLAINTEXT))).data
    good, more = os.urandom(4 * MAX_PLAINTEXT), os.urandom(4 * MAX_PLAINTEXT)
    wire = bytearray(seal(keys(), good) + seal(keys(4), more))
    wire[len(wire) - 100] ^= 1  # the last record fails authentication
    opened = open_records(keys(), wire)
    assert opened.handoff
    assert opened.data == good + more[: 3 * MAX_PLAINTEXT]


def test_a_batch_opened_into_a_reused_buffer_has_every_record_and_nothing_else() -> None:
    del open_records(keys(), seal(keys(), os.urandom(8 * MAX_PLAINTEXT))).data
    sizes = [MAX_PLAINTEXT, 7, 0, 300, MAX_PLAINTEXT - 1]
    plain = [os.urandom(n) for n in sizes]
    wire = b""
    for seqnum, part in enumerate(plain):
        header = HEADER.pack(0x17, 0x0303, len(part) + 1 + 16)
        k = keys(seqnum)
        wire += header + k.aead.encrypt(k.nonce(), part + b"\x17", header)
    opened = open_records(keys(), wire)
    assert opened.records == len(sizes)
    assert opened.data == b"".join(plain)


def test_a_large_batch_after_a_few_bytes_goes_to_a_reused_buffer_that_starts_with_them() -> None:
    # The record a receive completes is opened alone; the rest of the receive follows it.
    # Appending to its small buffer would zero the room first: a reused buffer takes a
    # copy of the few bytes instead, and the result is the same bytes in order.
    del open_records(keys(), seal(keys(), os.urandom(8 * MAX_PLAINTEXT))).data
    head, rest = os.urandom(MAX_PLAINTEXT), os.urandom(7 * MAX_PLAINTEXT)
    small = open_records(keys(), seal(keys(), head)).data
    opened = open_records(keys(1), seal(keys(1), rest), into=small)
    assert opened.data is not small and opened.data == head + rest
    assert small == head
    # Few bytes after the head stay in its buffer, appended.
    again = open_records(keys(1), seal(keys(1), b"tail"), into=small)
    assert again.data is small and small == head + b"tail"


def test_the_reuse_check_is_measured_on_this_interpreter() -> None:
    """The reference count that means "free" is calibrated at import: a buffer only the
    pool holds is free, one with a view on it is not."""
    assert records._POOL_ONLY > 0
    pool = [bytearray(8)]
    assert records._free_index(pool, records._POOL_ONLY) == 0
    view = memoryview(pool[0])
    assert records._free_index(pool, records._POOL_ONLY) == -1
    view.release()
    assert records._free_index(pool, records._POOL_ONLY) == 0
