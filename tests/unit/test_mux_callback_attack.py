"""An attacker's look at streams on callbacks (MuxStream._pull): a hostile peer playing
with windows, resets and refusals while the application keeps sending, against a real
:class:`SocketReader` and a recording TLS stream. Every byte must leave once, in order,
END_STREAM after the last one, and nothing may be sent on a stream the peer reset.
"""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any, cast

import pytest

from qkdproxy.core.mux import FRAME_SIZE, ErrorCode
from qkdproxy.daemon import muxconn
from qkdproxy.daemon.muxconn import MuxStream, MuxTunnel, pump_stream
from qkdproxy.daemon.pump import RekeyBudget, Traffic
from qkdproxy.io.socket_reader import SocketReader
from tests.unit.test_mux_codec import frame
from tests.unit.test_mux_hostile import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST,
    RecordingTls,
    client,
    feed,
    window_update,
)
from tests.unit.test_mux_pull import (
    BackedUpTls,
    Plaintext,
    Sink,
    Transport,
    arrive,
    data_sent,
    ended,
    frames,
    pumping,
)

ACCEPTED = b"\x88"  # :status 200, HPACK static index 8


def reset(stream_id: int, code: int) -> bytes:
    return frame(RST, 0, stream_id, struct.pack(">I", code))


def stream_frames(tls: RecordingTls, stream: MuxStream) -> list[tuple[int, int, bytes]]:
    return frames(tls.sent, stream.stream_id)


def end_is_last(tls: RecordingTls, stream: MuxStream) -> bool:
    """END_STREAM once, on the stream's last frame (never before a DATA frame)."""
    sent = stream_frames(tls, stream)
    ends = [i for i, (_, flags, _) in enumerate(sent) if flags & END_STREAM]
    return ends == [len(sent) - 1]


def new_reader() -> SocketReader:
    return SocketReader(cast(Any, Transport()), cast(Any, Plaintext()), FRAME_SIZE)


def tunnel(tls: RecordingTls, *settings: tuple[int, int]) -> MuxTunnel:
    return MuxTunnel(
        cast(Any, tls), cast(Any, None), client(*settings), keepalive_s=0, rekey=RekeyBudget()
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
async def test_windows_trickled_open_at_random_carry_every_byte_once_in_order(seed: int) -> None:
    """A peer that opens the stream window (1 byte at first) and the tunnel window in
    random small steps while the application sends in random pieces, then ends. Catches:
    a lost or duplicated byte, an END_STREAM ahead of the last byte, a stream that stops
    although its window was opened (the loop below would run out of rounds), empty DATA
    frames sent on every wake-up."""
    rng = random.Random(seed)
    tls = RecordingTls()
    carrier, stream, reader, task = await pumping(tls, (4, 1))
    payload = rng.randbytes(300_000)  # past the tunnel's 65,535 as well
    given = 0
    for _ in range(20_000):
        if given < len(payload):
            piece = rng.randint(1, 50_000)
            given += arrive(reader, payload[given : given + piece])
            if given == len(payload):
                reader.eof_received()
        if len(data_sent(tls, stream)) == len(payload) and ended(tls, stream):
            break
        which = rng.choice([0, stream.stream_id])
        feed(carrier, window_update(which, rng.randint(1, 20_000)))
    assert data_sent(tls, stream) == payload
    assert end_is_last(tls, stream)
    assert all(p for kind, flags, p in stream_frames(tls, stream) if kind == DATA and not flags)
    assert not task.done()  # the peer has not ended: the stream waits for it
    task.cancel()


async def test_no_byte_follows_the_peers_reset_whatever_windows_it_opens_after() -> None:
    """RST_STREAM while bytes wait in the reader for window, then the application keeps
    sending and the peer opens windows for the reset stream and the tunnel: nothing more
    is framed for it, no callback raises, and the pump ends with the reset."""
    tls = RecordingTls()
    carrier, stream, reader, task = await pumping(tls, (4, 10))
    arrive(reader, b"x" * 30_000)
    assert len(data_sent(tls, stream)) == 10
    feed(carrier, reset(stream.stream_id, ErrorCode.CANCEL))
    before = len(tls.sent)
    arrive(reader, b"y" * 100)
    feed(carrier, window_update(stream.stream_id, 1 << 20))
    feed(carrier, window_update(0, 1 << 20))
    reader.eof_received()
    assert tls.sent[before:] == b""  # no DATA, no END_STREAM after the reset
    assert await task == f"error: MuxStreamError: reset by the peer (code {ErrorCode.CANCEL})"


async def test_a_window_update_after_the_pump_ended_sends_nothing() -> None:
    """The pump is over (the application reset) but the stream is still the tunnel's: a
    WINDOW_UPDATE for it, or for the tunnel, must not read the dead reader again."""
    tls = RecordingTls()
    carrier, stream, reader, task = await pumping(tls, (4, 5))
    arrive(reader, b"0123456789")
    reader.connection_lost(ConnectionResetError("reset"))
    assert (await task).startswith("error: ConnectionResetError")
    assert stream.stream_id in carrier.streams  # its release is the tunnel's caller's
    sent = len(tls.sent)
    feed(carrier, window_update(stream.stream_id, 100))
    feed(carrier, window_update(0, 100))
    assert len(tls.sent) == sent


async def test_a_refusal_mid_upload_keeps_exactly_what_left_and_the_resend_keeps_order() -> None:
    """REFUSED_STREAM while the application is mid-upload and bytes wait for window: what
    the first stream sent is kept, the rest stays in the reader; the resend on a tunnel
    with a tiny window carries the kept bytes first, then what waited, then what the
    application sends during the resend, then the end. Catches a resend overtaken by new
    bytes, a byte sent twice or lost across the two streams."""
    rng = random.Random(7)
    payload = rng.randbytes(200_000)
    first_tls = RecordingTls()
    carrier, first, reader, task = await pumping(first_tls, (4, 25_000))
    given = arrive(reader, payload[:60_000])
    feed(carrier, window_update(first.stream_id, 5_000))
    feed(carrier, reset(first.stream_id, ErrorCode.REFUSED_STREAM))
    assert (await task).startswith("error: MuxStreamError: not processed by the peer")
    kept = first.kept()
    assert kept is not None
    assert kept == (payload[:30_000], False) == (data_sent(first_tls, first), False)
    given += arrive(reader, payload[given : given + 10_000])  # read while no stream listens

    tls = RecordingTls()
    again = tunnel(tls, (4, 1_000))
    second = again.open_stream()
    second.preload(*kept)
    resend = asyncio.ensure_future(
        pump_stream(reader, cast(Any, Sink()), second, Traffic(), idle_timeout_s=0)
    )
    await asyncio.sleep(0)
    for _ in range(5_000):
        if given < len(payload):
            given += arrive(reader, payload[given : given + rng.randint(1, 30_000)])
            if given == len(payload):
                reader.eof_received()
        if ended(tls, second):
            break
        feed(again, window_update(second.stream_id, rng.randint(1, 9_000)))
        feed(again, window_update(0, rng.randint(1, 9_000)))
        await asyncio.sleep(0)  # the preload's task
    assert data_sent(tls, second) == payload
    assert end_is_last(tls, second)
    resend.cancel()


async def test_goaway_disowning_a_stream_with_bytes_waiting_in_a_backed_up_tunnel() -> None:
    """GOAWAY (last id 0) while the tunnel's transport is backed up and the stream's bytes
    wait in the reader: once the transport drained, nothing is framed for the disowned
    stream, and what it kept is exactly what left before."""
    tls = BackedUpTls()
    carrier, stream, reader, task = await pumping(tls)
    writer = asyncio.ensure_future(carrier._write_queued())
    arrive(reader, b"first")
    assert carrier.backed_up
    arrive(reader, b"second")
    feed(carrier, frame(GOAWAY, 0, 0, struct.pack(">II", 0, ErrorCode.NO_ERROR)))
    tls.drained.set()
    assert (await task).startswith("error: MuxStreamError: not processed by the peer (GOAWAY)")
    for _ in range(5):
        await asyncio.sleep(0)
    assert data_sent(tls, stream) == b"first"
    assert stream.kept() == (b"first", False)
    assert not ended(tls, stream)
    writer.cancel()


async def test_a_stream_accepted_then_given_window_by_dribs_sends_its_end_after_it() -> None:
    """The server's 200 arrives (the kept bytes are dropped), then its window in 1-byte
    updates: the end the application gave before any of it waits behind every byte."""
    tls = RecordingTls()
    carrier, stream, reader, task = await pumping(tls, (4, 0))
    arrive(reader, b"abcdef")
    reader.eof_received()
    feed(carrier, frame(HEADERS, END_HEADERS, stream.stream_id, ACCEPTED))
    assert stream.kept() is None
    for _ in range(6):
        assert not ended(tls, stream)
        feed(carrier, window_update(stream.stream_id, 1))
    assert data_sent(tls, stream) == b"abcdef"
    assert end_is_last(tls, stream)
    task.cancel()


async def test_many_streams_share_a_trickled_tunnel_window_and_all_finish() -> None:
    """Four streams (the harness tunnel's limit) against a tunnel window the peer opens a little at a time: every
    stream must finish with its own bytes in order (none starved for good once windows
    keep coming, none given another's bytes)."""
    rng = random.Random(3)
    tls = RecordingTls()
    carrier = tunnel(tls)
    pumps = []
    for _ in range(4):
        stream = carrier.open_stream()
        reader = new_reader()
        task = asyncio.ensure_future(
            pump_stream(reader, cast(Any, Sink()), stream, Traffic(), idle_timeout_s=0)
        )
        pumps.append((stream, reader, task, rng.randbytes(rng.randint(1, 90_000)), [0]))
    await asyncio.sleep(0)
    for _ in range(20_000):
        for _, reader, _, payload, given in pumps:
            if given[0] < len(payload):
                given[0] += arrive(reader, payload[given[0] : given[0] + 20_000])
                if given[0] == len(payload):
                    reader.eof_received()
        await asyncio.sleep(0)  # several streams: their frames leave at the end of a round
        if all(ended(tls, s) for s, *_ in pumps):
            break
        feed(carrier, window_update(0, rng.randint(1, 30_000)))
        for stream, *_ in pumps:
            if rng.random() < 0.3:
                feed(carrier, window_update(stream.stream_id, rng.randint(1, 30_000)))
    for stream, _, task, payload, _ in pumps:
        assert data_sent(tls, stream) == payload
        assert end_is_last(tls, stream)
        task.cancel()


async def test_a_stream_window_shrunk_below_zero_by_settings_resumes_once_regrown() -> None:
    """A peer that shrinks every stream's window below zero by SETTINGS while bytes wait,
    then grows it again by SETTINGS (no WINDOW_UPDATE at all): the waiting bytes go."""
    tls = RecordingTls()
    carrier, stream, reader, task = await pumping(tls, (4, 100))
    arrive(reader, bytes(1_000))
    assert len(data_sent(tls, stream)) == 100
    feed(carrier, frame(4, 0, 0, struct.pack(">HI", 4, 0)))  # window now -100
    feed(carrier, window_update(stream.stream_id, 50))  # still shut: nothing
    assert len(data_sent(tls, stream)) == 100
    feed(carrier, frame(4, 0, 0, struct.pack(">HI", 4, 5_000)))
    assert len(data_sent(tls, stream)) == 1_000
    task.cancel()


class PeerTls(BackedUpTls):
    """A TLS stream the test feeds with the peer's bytes; its transport backs up (and
    ``drain`` waits) once ``drained`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.drained.set()
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()
        self.waiting = asyncio.Event()  # the reader asked for more

    async def read(self, size: int) -> bytes:
        self.waiting.set()
        data = await self.incoming.get()
        self.waiting.clear()
        return data


class TunnelWriter:
    """The tunnel's transport writer, as flush() waits on it."""

    def __init__(self, tls: PeerTls) -> None:
        self.tls = tls

    async def drain(self) -> None:
        await self.tls.drain()


async def reading_tunnel() -> tuple[MuxTunnel, PeerTls]:
    tls = PeerTls()
    carrier = MuxTunnel(
        cast(Any, tls), cast(Any, TunnelWriter(tls)), client(), keepalive_s=0,
        rekey=RekeyBudget(),
    )  # fmt: skip
    carrier.start()
    await tls.waiting.wait()
    tls.drained.clear()  # from here on the transport is past its high-water mark
    return carrier, tls


def stop(carrier: MuxTunnel) -> None:
    for task in carrier._tasks:
        task.cancel()


def ping(n: int) -> bytes:
    return frame(PING, 0, 0, n.to_bytes(8, "big"))


async def test_the_tunnel_reader_keeps_reading_while_its_transport_is_backed_up() -> None:
    """FAILS on fa0eed6: after a read that made us answer (a PING here, WINDOW_UPDATEs in
    a bulk transfer), the reader waited for its own transport to drain before reading
    again. Between two daemons that both back up, that is a deadlock (see
    tests/integration/test_mux_callback_attack.py::test_bulk_both_ways_...)."""
    carrier, tls = await reading_tunnel()
    tls.waiting.clear()  # set by the read under way: wait for the next one
    tls.incoming.put_nowait(ping(1))
    tls.incoming.put_nowait(ping(2))
    await asyncio.wait_for(tls.waiting.wait(), 5)  # both read (their answers are queued)
    assert tls.incoming.empty() and carrier.backed_up
    assert frame(PING, 1, 0, (2).to_bytes(8, "big")) in tls.sent
    tls.drained.set()
    stop(carrier)


async def test_a_peer_making_us_answer_without_reading_is_answered_only_so_far() -> None:
    """The bound on the above: a peer that floods PINGs while it reads nothing of ours gets
    at most ANSWER_LIMIT of answers handed to the backed-up transport; then the reader
    waits for the drain (the flood stops being read), and reads on once it came. (Part
    of the proposed fix: muxconn.ANSWER_LIMIT.)"""
    limit: int = muxconn.ANSWER_LIMIT  # type: ignore[attr-defined,unused-ignore]
    carrier, tls = await reading_tunnel()
    flood = b"".join(ping(n) for n in range(limit // 17 + 100))
    tls.incoming.put_nowait(ping(0))  # backs it up
    tls.incoming.put_nowait(flood)
    tls.incoming.put_nowait(ping(1))  # read, answered, and then the reader waits
    tls.incoming.put_nowait(ping(2))
    for _ in range(20):
        await asyncio.sleep(0)
    assert tls.incoming.qsize() == 1  # not read until the transport drained
    assert limit < len(tls.sent) < 2 * limit
    tls.drained.set()
    await asyncio.wait_for(tls.waiting.wait(), 5)
    assert tls.incoming.empty()
    stop(carrier)
