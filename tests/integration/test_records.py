"""The application-data fast path: record sealing and opening, alone and inside live streams."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from qkdproxy.core.peer.frames import FrameDecoder, FrameType, encode_data
from qkdproxy.core.tls.keyexchange import QkdOptions
from qkdproxy.core.tls.records import (
    HEADER,
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    RECORD_OVERHEAD,
    TrafficKeys,
    open_records,
    seal,
)
from qkdproxy.core.tls.wire import Alert
from qkdproxy.io.tls_stream import TlsStream, TlsStreamError
from qkdproxy.tools.loopback import loopback_pair
from tests.conftest import groups
from tests.integration.test_eku_attack import stream_pair

KEY = bytes(range(32))
IV = int.from_bytes(bytes(range(100, 112)), "big")


@dataclass
class Counter:
    seqnum: int = 0


def keys(aead: AESGCM | ChaCha20Poly1305 | None = None) -> TrafficKeys:
    return TrafficKeys(aead or AESGCM(KEY), IV, Counter())


def inner_record(k: TrafficKeys, inner: bytes, kind: int = 0x17, version: int = 0x0303) -> bytes:
    """A record with an arbitrary TLSInnerPlaintext, sealed like a peer would."""
    header = HEADER.pack(kind, version, len(inner) + 16)
    return header + k.aead.encrypt(k.nonce(), inner, header)


@given(st.binary(max_size=3 * MAX_PLAINTEXT + 7), st.integers(64, MAX_PLAINTEXT))
def test_framed_sealing_is_the_per_frame_encoder_sealed_one_frame_per_record(
    payload: bytes, limit: int
) -> None:
    # qkdproxy/1 DATA frames framed while sealing: at the default record size the very
    # bytes of encode_data then seal; under a smaller record_size_limit still one whole
    # frame per record, and the frames decode to the payload.
    framed = seal(keys(), payload, frame_type=FrameType.DATA)
    assert framed == seal(keys(), encode_data(payload))
    wire = seal(keys(), payload, limit, frame_type=FrameType.DATA)
    receiver, decoder, pos, frames = keys(), FrameDecoder(), 0, []
    while pos < len(wire):
        length = HEADER.unpack_from(wire, pos)[2]
        assert length - 17 <= limit
        record = open_records(receiver, wire[pos : pos + HEADER.size + length])
        frames += decoder.feed(record.data)
        assert decoder.pending == 0  # the record held whole frames only
        pos += HEADER.size + length
    assert all(f.type is FrameType.DATA and f.payload for f in frames)
    assert b"".join(f.payload for f in frames) == payload


@given(st.binary(max_size=3 * MAX_PLAINTEXT + 7), st.booleans())
def test_sealed_records_open_to_the_same_bytes(payload: bytes, chacha: bool) -> None:
    aead = ChaCha20Poly1305(KEY) if chacha else AESGCM(KEY)
    sender, receiver = keys(aead), keys(aead)
    wire = seal(sender, payload)
    opened = open_records(receiver, wire)
    assert opened.data == payload
    assert opened.consumed == len(wire) and not opened.handoff
    records = -(-len(payload) // MAX_PLAINTEXT)
    assert sender.state.seqnum == receiver.state.seqnum == opened.records == records
    assert len(wire) == len(payload) + records * RECORD_OVERHEAD
    assert all(
        HEADER.unpack_from(wire, i * (MAX_PLAINTEXT + RECORD_OVERHEAD))[2] <= MAX_PLAINTEXT + 1 + 16
        for i in range(records)
    )


def test_many_records_open_into_one_growing_buffer() -> None:
    # More records than the first output buffer holds: it grows, nothing is lost.
    payload = os.urandom(20 * MAX_PLAINTEXT + 5)
    sender, receiver = keys(), keys()
    opened = open_records(receiver, seal(sender, payload))
    assert opened.data == payload and opened.records == 21 and not opened.handoff


def test_nonce_is_the_iv_xor_the_sequence_number() -> None:
    k = keys()
    k.state.seqnum = 0x0102
    assert k.nonce() == (IV ^ 0x0102).to_bytes(12, "big")


@given(st.binary(min_size=1, max_size=40_000), st.data())
def test_a_truncated_buffer_opens_only_complete_records(
    payload: bytes, data: st.DataObject
) -> None:
    wire = seal(keys(), payload)
    cut = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    receiver = keys()
    opened = open_records(receiver, wire[:cut])
    assert not opened.handoff
    assert payload.startswith(opened.data)
    assert receiver.state.seqnum == opened.records
    rest = open_records(receiver, wire[opened.consumed :])
    assert opened.data + rest.data == payload


def hand_off_at_first(record: bytes) -> None:
    """``record`` follows one good record: the good one opens, the bad one is left alone."""
    receiver = keys()
    good = seal(keys(), b"first")
    opened = open_records(receiver, good + record)
    assert opened.data == b"first" and opened.records == 1
    assert opened.handoff
    assert opened.consumed == len(good)
    assert receiver.state.seqnum == 1, "a record handed to tlslite keeps its sequence number"


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("handshake record type", lambda k: inner_record(k, b"x\x17", kind=0x16)),
        ("alert record type", lambda k: inner_record(k, b"x\x17", kind=0x15)),
        ("wrong legacy version", lambda k: inner_record(k, b"x\x17", version=0x0301)),
        ("inner handshake (KeyUpdate)", lambda k: inner_record(k, b"\x18\x00\x00\x01\x00\x16")),
        ("inner alert", lambda k: inner_record(k, b"\x01\x00\x15")),
        ("padding only", lambda k: inner_record(k, bytes(40))),
        ("oversized plaintext", lambda k: inner_record(k, bytes(MAX_PLAINTEXT + 1) + b"\x17")),
        ("oversized length field", lambda k: HEADER.pack(0x17, 0x0303, MAX_CIPHERTEXT + 1)),
        ("length below a tag", lambda k: HEADER.pack(0x17, 0x0303, 16) + bytes(16)),
        ("zero length", lambda k: HEADER.pack(0x17, 0x0303, 0)),
        ("garbage", lambda k: b"\x17\x03\x03\x00\x30" + os.urandom(48)),
    ],
)
def test_anything_but_plain_application_data_is_handed_to_tlslite(name: str, make) -> None:  # type: ignore[no-untyped-def]
    sender = keys()
    sender.state.seqnum = 1  # the record after "first"
    hand_off_at_first(make(sender))


def test_a_flipped_bit_anywhere_hands_off() -> None:
    record = seal(keys(), b"payload-payload")
    for position in range(HEADER.size, len(record)):
        tampered = bytearray(record)
        tampered[position] ^= 0x01
        opened = open_records(keys(), tampered)
        assert opened.handoff and not opened.data, position


def test_padding_is_stripped_and_empty_data_records_are_kept() -> None:
    sender, receiver = keys(), keys()
    wire = inner_record(sender, b"abc\x17" + bytes(100))
    sender.state.seqnum += 1
    wire += inner_record(sender, b"\x17")
    opened = open_records(receiver, wire)
    assert opened.data == b"abc" and opened.records == 2 and not opened.handoff


# ------------------------------------------------------------------ live streams


async def open_stream(pair) -> TlsStream:  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(pair.handshake(pair.client(groups("x25519"), QkdOptions())), 20)


async def read_exactly(stream: TlsStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        chunk = await asyncio.wait_for(stream.read(), 10)
        assert chunk, "stream ended early"
        received += chunk
    return bytes(received)


async def test_request_response_survives_key_updates_between_messages() -> None:
    # A KeyUpdate right behind a request must not hold the request back: the client sends
    # nothing more until the echo arrives, so a server read that waited for the next data
    # record would stall here.
    async with loopback_pair(groups("x25519")) as pair:
        stream = await open_stream(pair)
        for size in (1, 700, 16_384, 16_385, 100_000):
            message = os.urandom(size)
            await stream.write(message)
            await stream.update_keys()
            assert await read_exactly(stream, size) == message
        await stream.close()
    assert not pair.echo.failures


async def test_key_updates_before_data_in_one_segment() -> None:
    async with loopback_pair(groups("x25519")) as pair:
        stream = await open_stream(pair)
        for _ in range(3):
            await stream.update_keys()
        await stream.write(b"after three updates")
        assert await read_exactly(stream, 19) == b"after three updates"
        await stream.close()
    assert not pair.echo.failures


async def test_a_small_read_returns_the_rest_of_the_record_later() -> None:
    async with loopback_pair(groups("x25519")) as pair:
        stream = await open_stream(pair)
        message = os.urandom(5000)
        await stream.write(message)
        head = await asyncio.wait_for(stream.read(10), 10)
        assert head == message[: len(head)] and 0 < len(head) <= 10
        assert head + await read_exactly(stream, 5000 - len(head)) == message
        await stream.close()


class CorruptingRelay:
    """A TCP relay between client and server that can flip one bit going to the server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.corrupt_next = False
        self.server: asyncio.Server | None = None
        self.to_server: asyncio.StreamWriter | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.to_server = up_writer
        await asyncio.gather(
            self._copy(reader, up_writer, corrupt=True),
            self._copy(up_reader, writer, corrupt=False),
            return_exceptions=True,
        )

    async def _copy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, corrupt: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if corrupt and self.corrupt_next:
                    self.corrupt_next = False
                    data = data[:-1] + bytes([data[-1] ^ 0x01])
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


async def test_a_tampered_record_ends_the_stream_with_bad_record_mac() -> None:
    failures: list[BaseException] = []
    async with loopback_pair(groups("x25519"), server_failures=failures) as pair:
        relay = CorruptingRelay(pair.port)
        pair.port = await relay.start()
        stream = await open_stream(pair)
        await stream.write(b"clean")
        assert await read_exactly(stream, 5) == b"clean"
        relay.corrupt_next = True
        await stream.write(b"tampered")
        with pytest.raises(TlsStreamError) as raised:
            await asyncio.wait_for(stream.read(), 10)
        assert raised.value.alert == 20  # bad_record_mac, sent by the server
        assert relay.server is not None
        relay.server.close()
        await relay.server.wait_closed()
    assert any(isinstance(f, TlsStreamError) and f.alert == 20 for f in failures)


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(b"\x15\x03\x03\x00\x02\x01\x00", id="plaintext-close-notify"),
        pytest.param(b"\x15\x03\x03\x00\x02\x02\x28", id="plaintext-fatal-alert"),
        pytest.param(b"\x14\x03\x03\x00\x01\x01", id="change-cipher-spec"),
        pytest.param(b"\x16\x03\x03\x00\x04\x18\x00\x00\x00", id="plaintext-handshake"),
    ],
)
async def test_an_unencrypted_record_after_the_handshake_is_refused(forged: bytes) -> None:
    # tlslite accepts a plaintext alert whenever a read sequence number is 0 (right after
    # the handshake or a KeyUpdate): anyone on path could end the stream as if the peer
    # had closed it. Every protected record has the outer type 0x17.
    failures: list[BaseException] = []
    async with loopback_pair(groups("x25519"), server_failures=failures) as pair:
        relay = CorruptingRelay(pair.port)
        pair.port = await relay.start()
        stream = await open_stream(pair)
        await stream.write(b"ready")  # the server has finished its handshake too
        assert await read_exactly(stream, 5) == b"ready"
        assert relay.to_server is not None
        relay.to_server.write(forged)
        with pytest.raises(TlsStreamError) as raised:
            await asyncio.wait_for(stream.read(), 10)
        assert raised.value.alert == 10  # unexpected_message, from the server
        assert relay.server is not None
        relay.server.close()
        await relay.server.wait_closed()
    assert any(isinstance(f, TlsStreamError) and f.alert == 10 for f in failures)


async def test_an_empty_application_data_record_is_not_an_end_of_stream() -> None:
    async with loopback_pair(groups("x25519")) as pair:
        stream = await open_stream(pair)
        keys = stream._layer.write.keys
        empty = HEADER.pack(0x17, 0x0303, 17)
        empty += keys.aead.encrypt(keys.nonce(), b"\x17", empty)
        keys.state.seqnum += 1
        # Written past the stream: its last handshake flight, still held for the first
        # write (TlsStream._corked), must go first.
        stream._uncork()
        stream._driver.writer.write(empty)
        await stream.write(b"after an empty record")
        assert await read_exactly(stream, 21) == b"after an empty record"
        await stream.close()
    assert not pair.echo.failures


def test_padding_counts_toward_the_record_size_limit() -> None:
    sender = keys()
    oversized = inner_record(sender, b"x\x17" + bytes(MAX_PLAINTEXT))
    assert open_records(keys(), oversized).handoff


async def test_a_flood_of_key_update_requests_is_answered_a_few_times_only() -> None:
    # An authenticated peer once got 79,558 answers in 10 s; now a batch gets one answer.
    async with loopback_pair(groups("x25519")) as pair:
        stream = await open_stream(pair)
        for _ in range(1000):
            stream._layer.update_keys(request_peer=True)
        await stream.write(b"ping")  # sends the queued KeyUpdates first, in order
        assert await read_exactly(stream, 4) == b"ping"
        answers = stream._layer.key_updates_received
        assert 1 <= answers <= 32, answers
        await stream.close()
    assert not pair.echo.failures


def _forged_tail(stream: TlsStream, how: str) -> bytes:
    """Genuine records from ``stream``'s keys, then what an on-path attacker appends, all
    meant for one TCP segment."""
    layer = stream._layer
    layer.send_data(b"g" * 3000)
    layer.update_keys()
    layer.send_data(os.urandom(MAX_PLAINTEXT))
    wire = bytes(layer.data_to_send())
    if how == "close-after-update":
        layer.update_keys()
        return wire + bytes(layer.data_to_send()) + b"\x15\x03\x03\x00\x02\x01\x00"
    if how == "bad-tag-then-good":
        layer.send_data(b"forged")
        bad = bytearray(layer.data_to_send())
        bad[-1] ^= 1
        layer.send_data(b"good after")  # sealed under the next sequence number
        return wire + bytes(bad) + bytes(layer.data_to_send())
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["close-after-update", "bad-tag-then-good"])
async def test_a_forged_end_in_the_middle_of_a_batch_never_reads_as_a_clean_end(how: str) -> None:
    # One TCP segment: data, a KeyUpdate (sequence number 0 again), a 16 KiB record, then a
    # forged plaintext close_notify or a record with a bad tag followed by genuine data.
    failures: list[BaseException] = []
    async with loopback_pair(groups("x25519"), server_failures=failures) as pair:
        stream = await open_stream(pair)
        await stream.write(b"ready")
        assert await read_exactly(stream, 5) == b"ready"
        stream._driver.writer.write(_forged_tail(stream, how))
        received, error = await read_until_failure(stream)
        assert error.alert in (Alert.UNEXPECTED_MESSAGE, Alert.BAD_RECORD_MAC)
        assert b"good after" not in received and b"forged" not in received
    assert any(isinstance(f, TlsStreamError) and f.alert == error.alert for f in failures)


async def test_genuine_data_in_the_batch_before_a_forged_record_is_delivered_then_it_fails() -> (
    None
):
    # The reader gets data, a KeyUpdate, a 16 KiB record and a forged close_notify in one
    # receive: it delivers the authenticated bytes before the forgery, then fails (how much
    # one receive holds must not decide what is delivered), never a clean end.
    async with stream_pair() as s:
        await s.client.write(b"ready")
        assert await read_exactly(s.server, 5) == b"ready"
        s.client._driver.writer.write(_forged_tail(s.client, "close-after-update"))
        received, error = await read_until_failure(s.server)
        assert error.alert == Alert.UNEXPECTED_MESSAGE
        assert len(received) == 3000 + MAX_PLAINTEXT and received.startswith(b"g" * 3000)


async def read_until_failure(stream: TlsStream) -> tuple[bytes, TlsStreamError]:
    """Everything ``stream`` delivers until it fails; a clean end fails the test."""
    received = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.read(), 10)
        except TlsStreamError as exc:
            return bytes(received), exc
        assert chunk, "a clean end after a forged record"
        received += chunk
