"""A stream's outbound side on callbacks (MuxStream._pull): what the plaintext socket's
reader hands over is framed as far as the windows and the tunnel's transport allow, the
rest waits in the reader (which stops reading the socket when full) and goes, in order,
once a WINDOW_UPDATE or the tunnel's drain comes; the end goes after every byte.

The plaintext side is a real :class:`SocketReader` fed through its protocol methods, the
tunnel's TLS stream a recorder whose transport can be made to back up.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, cast

import pytest

from qkdproxy.core.mux import FRAME_SIZE, RST_STREAM
from qkdproxy.daemon.muxconn import MuxStream, MuxTunnel, pump_stream
from qkdproxy.daemon.pump import RekeyBudget, Traffic
from qkdproxy.daemon.tunnel import _close_stream
from qkdproxy.io.socket_reader import SocketReader
from tests.unit.test_mux_hostile import (
    DATA,
    END_STREAM,
    HEADERS,
    RecordingTls,
    client,
    feed,
    window_update,
)


class Transport:
    """What a socket reader asks of its transport: pausing and resuming reads."""

    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Plaintext:
    """The stream-pair half a socket reader forwards the peer's end to."""

    def eof_received(self) -> bool:
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class Sink:
    """The plaintext side's writer: takes everything."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.transport = Transport()
        self.transport.get_write_buffer_size = lambda: 0  # type: ignore[attr-defined]

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.received += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


class BackedUpTls(RecordingTls):
    """A TLS stream whose transport is past its high-water mark until ``drained`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.drained = asyncio.Event()

    def write_nowait(self, data: bytes | bytearray) -> bool:
        super().write_nowait(data)
        return not self.drained.is_set()

    async def drain(self) -> None:
        await self.drained.wait()


def arrive(reader: SocketReader, data: bytes) -> int:
    """Bytes from the application, as the event loop delivers them: into the room the
    reader offers, until it pauses reading; how many it took."""
    taken = 0
    while taken < len(data) and not cast(Transport, reader._transport).paused:
        buffer = reader.get_buffer(len(data) - taken)
        size = min(len(buffer), len(data) - taken)
        buffer[:size] = data[taken : taken + size]
        reader.buffer_updated(size)
        taken += size
    return taken


def frames(sent: bytes | bytearray, stream_id: int) -> list[tuple[int, int, bytes]]:
    """(type, flags, payload) of the frames written for ``stream_id``, in order."""
    found, at = [], 0
    while at + 9 <= len(sent):
        length = int.from_bytes(sent[at : at + 3], "big")
        kind, flags = sent[at + 3], sent[at + 4]
        sid = struct.unpack(">I", sent[at + 5 : at + 9])[0] & 0x7FFFFFFF
        if sid == stream_id:
            found.append((kind, flags, bytes(sent[at + 9 : at + 9 + length])))
        at += 9 + length
    return found


def data_sent(tls: RecordingTls, stream: MuxStream) -> bytes:
    return b"".join(p for kind, _, p in frames(tls.sent, stream.stream_id) if kind == DATA)


def ended(tls: RecordingTls, stream: MuxStream) -> bool:
    return any(flags & END_STREAM for _, flags, _ in frames(tls.sent, stream.stream_id))


async def pumping(
    tls: RecordingTls, *settings: tuple[int, int], carrier: MuxTunnel | None = None
) -> tuple[MuxTunnel, MuxStream, SocketReader, asyncio.Task[str]]:
    if carrier is None:
        carrier = MuxTunnel(
            cast(Any, tls), cast(Any, None), client(*settings), keepalive_s=0, rekey=RekeyBudget()
        )  # fmt: skip
    stream = carrier.open_stream()
    reader = SocketReader(cast(Any, Transport()), cast(Any, Plaintext()), FRAME_SIZE)
    task = asyncio.ensure_future(
        pump_stream(reader, cast(Any, Sink()), stream, Traffic(), idle_timeout_s=0)
    )
    await asyncio.sleep(0)  # the pump attached; the request waits one round for data
    return carrier, stream, reader, task


async def test_bytes_at_hand_leave_with_the_request_in_one_write() -> None:
    tls = RecordingTls()
    _, stream, reader, task = await pumping(tls)
    arrive(reader, b"GET / HTTP/1.0\r\n\r\n")
    kinds = [kind for kind, _, _ in frames(tls.sent, stream.stream_id)]
    assert kinds == [HEADERS, DATA]
    assert data_sent(tls, stream) == b"GET / HTTP/1.0\r\n\r\n"
    task.cancel()


async def test_a_shut_window_keeps_the_rest_in_the_reader_until_it_opens() -> None:
    tls = RecordingTls()
    carrier, stream, reader, task = await pumping(tls, (4, 10))  # stream window 10
    arrive(reader, b"0123456789abcdef")
    reader.eof_received()  # the application ended: END_STREAM only after every byte
    assert data_sent(tls, stream) == b"0123456789"
    assert not ended(tls, stream)
    feed(carrier, window_update(stream.stream_id, 3))
    assert data_sent(tls, stream) == b"0123456789abc"
    assert not ended(tls, stream)
    feed(carrier, window_update(stream.stream_id, 100))
    assert data_sent(tls, stream) == b"0123456789abcdef"
    assert ended(tls, stream)
    task.cancel()


async def test_a_full_reader_stops_reading_the_socket_until_the_window_opens() -> None:
    tls = RecordingTls()
    carrier, stream, reader, task = await pumping(tls, (4, 1))
    transport = cast(Transport, reader._transport)
    taken = arrive(reader, bytes(40_000))  # 1 byte sent; the rest fills the reader
    assert len(data_sent(tls, stream)) == 1
    assert transport.paused and taken < 40_000
    feed(carrier, window_update(stream.stream_id, 1 << 20))
    assert len(data_sent(tls, stream)) == taken
    assert not transport.paused
    assert arrive(reader, bytes(40_000 - taken)) == 40_000 - taken
    assert len(data_sent(tls, stream)) == 40_000
    task.cancel()


async def test_a_backed_up_tunnel_stops_every_stream_until_it_drained() -> None:
    tls = BackedUpTls()
    carrier, stream, reader, task = await pumping(tls)
    writer = asyncio.ensure_future(carrier._write_queued())  # what start() runs
    arrive(reader, b"first")
    assert data_sent(tls, stream) == b"first" and carrier.backed_up
    arrive(reader, b"second")  # kept in the reader: the transport has enough
    reader.eof_received()
    assert data_sent(tls, stream) == b"first" and not ended(tls, stream)
    tls.drained.set()
    for _ in range(5):  # the writer task's drain, then the streams read again
        await asyncio.sleep(0)
    assert data_sent(tls, stream) == b"firstsecond"
    assert ended(tls, stream) and not carrier.backed_up
    task.cancel()
    writer.cancel()


async def test_a_reset_application_ends_the_stream_with_an_error() -> None:
    tls = RecordingTls()
    _, stream, reader, task = await pumping(tls)
    arrive(reader, b"partial upload")
    reader.connection_lost(ConnectionResetError("Connection reset by peer"))
    reason = await task
    assert reason == "error: ConnectionResetError: Connection reset by peer"
    assert not ended(tls, stream)  # never a clean end for a cut upload


async def test_a_resend_goes_before_anything_the_application_sends_after_it() -> None:
    tls = RecordingTls()
    carrier = MuxTunnel(
        cast(Any, tls), cast(Any, None), client(), keepalive_s=0, rekey=RekeyBudget()
    )  # fmt: skip
    stream = carrier.open_stream()
    stream.preload(b"kept from the first attempt;", False)
    reader = SocketReader(cast(Any, Transport()), cast(Any, Plaintext()), FRAME_SIZE)
    arrive(reader, b"then this")
    task = asyncio.ensure_future(
        pump_stream(reader, cast(Any, Sink()), stream, Traffic(), idle_timeout_s=0)
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert data_sent(tls, stream) == b"kept from the first attempt;then this"
    task.cancel()


async def test_a_connection_window_update_resumes_the_streams_it_stopped() -> None:
    tls = RecordingTls()
    carrier = MuxTunnel(
        cast(Any, tls), cast(Any, None), client(), keepalive_s=0, rekey=RekeyBudget()
    )  # fmt: skip
    pumps = []
    for _ in range(2):
        stream = carrier.open_stream()
        reader = SocketReader(cast(Any, Transport()), cast(Any, Plaintext()), FRAME_SIZE)
        task = asyncio.ensure_future(
            pump_stream(reader, cast(Any, Sink()), stream, Traffic(), idle_timeout_s=0)
        )
        pumps.append((stream, reader, task))
    await asyncio.sleep(0)
    for _, reader, _ in pumps:
        arrive(reader, bytes(40_000))  # 80,000 against the tunnel's 65,535
    await asyncio.sleep(0)  # two streams active: their frames leave together, this round
    first, second = (len(data_sent(tls, stream)) for stream, _, _ in pumps)
    assert (first, second) == (40_000, 65_535 - 40_000)
    feed(carrier, window_update(0, 1 << 20))
    await asyncio.sleep(0)
    assert len(data_sent(tls, pumps[1][0])) == 40_000
    for _, _, task in pumps:
        task.cancel()


async def test_a_stream_that_only_waits_for_its_peer_does_not_hold_up_the_next() -> None:
    # Sequentially, the last connection's stream often still waits for its peer's end
    # when the next one sends: nothing to coalesce with, so the next writes at once.
    tls = RecordingTls()
    carrier, first, reader, task = await pumping(tls)
    arrive(reader, b"last request")
    reader.eof_received()
    assert ended(tls, first) and carrier.active == 1
    _, second, next_reader, next_task = await pumping(tls, carrier=carrier)
    arrive(next_reader, b"next request")
    assert data_sent(tls, second) == b"next request"  # not at the end of the round
    for pump in (task, next_task):
        pump.cancel()


class AbortedSink(Sink):
    """A plaintext writer that records whether it was reset (``gate.reset``)."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self.transport.abort = self.abort  # type: ignore[attr-defined]

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> None:
        return None


@pytest.mark.parametrize(
    ("reason", "pending", "app_ended", "cut"),
    [
        ("idle_timeout", b"0123456789abcdef", False, True),  # 6 bytes never left: a cut
        # Everything left and the application ended its upload: an idle close.
        ("idle_timeout", b"0123456789", True, False),
        # Everything left but the application had not ended: END_STREAM would say that
        # the 10 bytes were the whole upload.
        ("idle_timeout", b"0123456789", False, True),
        ("rejected: peer answered 502", b"0123456789abcdef", False, False),  # nothing processed
        ("error: MuxStreamError: tunnel broke", b"0123456789abcdef", False, True),
    ],
)
async def test_an_end_that_leaves_bytes_unsent_is_a_reset_never_an_end_stream(
    reason: str, pending: bytes, app_ended: bool, cut: bool
) -> None:
    """A stream whose window stayed shut with the application's bytes waiting ends (an
    idle timeout): END_STREAM would tell the peer that what it got was the whole upload,
    and a FIN would tell the application it was delivered. Both sides are reset instead,
    and so they are when everything left but the application had not ended its upload;
    an end with nothing left unsent after the application's own end, or a refusal, stays
    a close."""
    tls = RecordingTls()
    _, stream, reader, task = await pumping(tls, (4, 10))  # stream window 10
    arrive(reader, pending)
    if app_ended:
        reader.eof_received()
    assert data_sent(tls, stream) == pending[:10]
    stream._conclude(reason)
    assert await task == reason
    traffic = Traffic(to_peer=len(data_sent(tls, stream)))
    plaintext = AbortedSink()
    await _close_stream(reason, traffic, stream, cast(Any, plaintext), reader.buffered)
    assert ended(tls, stream) == (not cut)
    if cut:
        assert RST_STREAM in [kind for kind, _, _ in frames(tls.sent, stream.stream_id)]
    assert plaintext.aborted == cut
