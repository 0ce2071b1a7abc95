"""The in-process QKD link keeps the guarantees of a KME pair."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdproxy.core.accounting import KeyIdGuard, KeyLedger
from qkdproxy.core.keys import (
    KeyExhaustedError,
    KeyNotFoundError,
    KsidInUseError,
    PeerNotConnectedError,
    QkdKey,
    key_id_from_text,
    key_id_to_text,
)
from qkdproxy.sim.inprocess import InProcessQkdLink


async def test_014_key_is_delivered_once_to_the_peer_only() -> None:
    link = InProcessQkdLink()
    a, b = link.sources("a"), link.sources("b")
    assert a.master and a.slave and b.slave
    key = await a.master.take_key()
    with pytest.raises(KeyNotFoundError):
        await a.slave.get_key(key.key_id)  # the master's own end cannot fetch it
    assert (await b.slave.get_key(key.key_id)).material == key.material
    with pytest.raises(KeyNotFoundError):
        await b.slave.get_key(key.key_id)
    assert link.keys_in_flight == 0


async def test_keys_are_distinct_and_pool_runs_dry() -> None:
    link = InProcessQkdLink(capacity=3)
    master = link.sources("a").master
    assert master
    keys = [await master.take_key() for _ in range(3)]
    assert len({k.key_id for k in keys}) == 3
    assert len({k.material for k in keys}) == 3
    with pytest.raises(KeyExhaustedError):
        await master.take_key()


async def test_004_stream_semantics() -> None:
    link = InProcessQkdLink()
    a, b = link.sources("a").stream, link.sources("b").stream
    assert a and b
    ksid = await a.open(None)
    with pytest.raises(PeerNotConnectedError):
        await a.get_key(ksid, 0)
    assert await b.open(ksid) == ksid
    with pytest.raises(KsidInUseError):
        await b.open(ksid)
    key_a = await a.get_key(ksid, 0)
    assert await b.get_key(ksid, 0) == key_a
    with pytest.raises(KeyNotFoundError):
        await a.get_key(ksid, 0)  # single use per end
    key_b1 = await b.get_key(ksid, 1)
    assert key_b1 != key_a
    await b.close(ksid)
    assert await a.get_key(ksid, 1) == key_b1  # allocated before the close: still delivered
    with pytest.raises(KeyNotFoundError):
        await a.get_key(ksid, 2)  # nothing new after CLOSE
    with pytest.raises(KeyNotFoundError):
        await b.get_key(ksid, 2)  # the closed end gets nothing at all
    await a.close(ksid)
    with pytest.raises(KeyNotFoundError):
        await a.get_key(ksid, 3)


async def test_004_predefined_ksid_and_bad_ids() -> None:
    link = InProcessQkdLink()
    a, b = link.sources("a").stream, link.sources("b").stream
    assert a and b
    ksid = bytes(range(16))
    await a.open(ksid)
    await b.open(ksid)
    assert await a.get_key(ksid, 0) == await b.get_key(ksid, 0)
    with pytest.raises(ValueError, match="16 bytes"):
        await a.open(b"short")
    with pytest.raises(KeyNotFoundError):
        await a.get_key(bytes(16), 0)


def test_unknown_end_is_refused() -> None:
    with pytest.raises(ValueError, match="end must be"):
        InProcessQkdLink().sources("c")


def test_key_repr_never_shows_the_key() -> None:
    key = QkdKey(bytes(16), b"\xab" * 32)
    assert "ab" not in repr(key).replace(key.key_id_text, "")
    with pytest.raises(ValueError, match="32 bytes"):
        QkdKey(bytes(16), b"short")
    with pytest.raises(ValueError, match="16 bytes"):
        QkdKey(b"short", bytes(32))


def test_key_id_text_round_trip() -> None:
    text = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    assert key_id_to_text(key_id_from_text(text)) == text
    assert key_id_from_text(text.upper()) == key_id_from_text(text)
    with pytest.raises(ValueError, match="hexadecimal UUID"):
        key_id_from_text("not-a-uuid")


def test_ledger_and_guard() -> None:
    ledger = KeyLedger()
    ledger.record_taken()
    ledger.record_taken()
    ledger.record_consumed()
    ledger.record_wasted("hello_retry")
    assert (ledger.outstanding, ledger.wasted_by_reason) == (0, {"hello_retry": 1})
    guard = KeyIdGuard(capacity=2)
    assert guard.claim(b"1") and guard.claim(b"2") and not guard.claim(b"1")
    assert guard.claim(b"3")
    assert guard.claim(b"1")  # forgotten: the oldest entry left the bounded window


@given(st.binary(min_size=16, max_size=16))
def test_key_id_text_is_the_uuid_text(key_id: bytes) -> None:
    assert key_id_to_text(key_id) == str(uuid.UUID(bytes=key_id))


@pytest.mark.parametrize("size", [0, 15, 17])
def test_key_id_text_needs_16_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        key_id_to_text(bytes(size))
