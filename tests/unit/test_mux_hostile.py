"""An authenticated but hostile peer against the qkdproxy-mux/1 codec and the tunnel that
drives it: what RFC 9113 lets a peer send (or what it must not), and the safe outcome."""

from __future__ import annotations

import asyncio
import random
import struct
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hpack import Encoder

from qkdproxy.core.mux import (
    FRAME_SIZE,
    MAX_HEADER_LIST,
    PREFACE,
    STREAM_WINDOW,
    MuxConnection,
    MuxEvent,
    PeerSettled,
    StreamAccepted,
    StreamData,
    StreamFinished,
    StreamOpened,
    TunnelEnded,
    WindowOpened,
)
from qkdproxy.daemon.muxconn import MuxStream, MuxTunnel, pump_stream
from qkdproxy.daemon.pump import RekeyBudget, Traffic
from qkdproxy.io.socket_reader import SocketReader
from tests.unit.test_mux_codec import CONNECT, ends_tunnel, frame, opened, server

DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONTINUATION = range(10)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW, 0, stream_id, struct.pack(">I", increment))


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def client(*server_settings: tuple[int, int]) -> MuxConnection:
    """A client tunnel that heard the server's SETTINGS."""
    conn = MuxConnection(client=True, max_streams=4)
    conn.start()
    assert PeerSettled() in conn.receive(settings(*server_settings))
    conn.data_to_send()
    return conn


# ---------------------------------------------------------------- frame level


@pytest.mark.parametrize(
    "bad",
    [
        # PADDED: the pad length is the whole payload, or there is no pad length at all.
        frame(DATA, PADDED, 1, b"\x04abc"),
        frame(DATA, PADDED, 1, b""),
        frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 3, b"\x02" + bytes(5) + b"\x00"),
        frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 3, bytes(4)),  # priority cut short
        frame(PRIORITY, 0, 0, bytes(5)),  # PRIORITY on the connection
        frame(RST, 0, 0, bytes(4)),
        frame(WINDOW, 0, 1, bytes(4)),  # a stream increment of 0
        settings((5, 2**24)),  # frame size above the maximum
        settings((4, 2**32 - 1)),
        frame(GOAWAY, 0, 1, bytes(8)),
        frame(PING, 1, 0, bytes(9)),  # an ACK of the wrong size
        # Request-side only: the server must not get a response, nor a promise.
        frame(HEADERS, END_HEADERS, 3, Encoder().encode([(b":status", b"200")])),
        frame(HEADERS, END_HEADERS, 3, b"\x88"),
        frame(HEADERS, END_HEADERS, 3, Encoder().encode([(b":method", b"CONNECT")]) * 2),
        frame(PUSH, END_HEADERS, 1, struct.pack(">I", 2) + b"\x88"),
        # DATA after the peer's END_STREAM on a stream still open our way.
        frame(DATA, END_STREAM, 1, b"") + frame(DATA, 0, 1, b"late"),
        # A second CONNECT on a stream (and HEADERS as trailers, END_STREAM or not).
        frame(HEADERS, END_HEADERS | END_STREAM, 1, CONNECT),
        frame(DATA, 0, 1, b"x") + frame(HEADERS, END_HEADERS, 1, b"\x88"),
    ],
)
def test_frames_a_server_must_not_take_end_the_tunnel(bad: bytes) -> None:
    conn = server()
    opened(conn)
    ends_tunnel(conn, bad)


@pytest.mark.parametrize(
    "bad",
    [
        frame(HEADERS, END_HEADERS, 1, CONNECT),  # a request, not a response
        frame(PUSH, END_HEADERS, 1, struct.pack(">I", 2) + CONNECT),
        frame(HEADERS, END_HEADERS, 2, b"\x88"),  # a stream the server opened
        frame(DATA, 0, 1, b"before the answer"),
        frame(HEADERS, END_HEADERS, 1, Encoder().encode([(b":status", b"101")])),
        frame(HEADERS, END_HEADERS, 1, Encoder().encode([(b":status", b"2000")])),
        frame(HEADERS, END_HEADERS, 1, b"\x88") + frame(HEADERS, END_HEADERS, 1, b"\x88"),
        frame(HEADERS, END_HEADERS, 1, b"\x88")
        + frame(DATA, END_STREAM, 1, b"")
        + frame(DATA, 0, 1, b"after the end"),
        frame(CONTINUATION, END_HEADERS, 1, b""),
    ],
)
def test_frames_a_client_must_not_take_end_the_tunnel(bad: bytes) -> None:
    conn = client()
    assert conn.open_stream() == 1
    ends_tunnel(conn, bad)


def test_frames_that_change_nothing_are_taken() -> None:
    conn = server()
    opened(conn)
    events = conn.receive(
        frame(PRIORITY, 0, 99, bytes(5))  # PRIORITY on an idle stream: allowed, ignored
        + frame(DATA, 0xF0 | PADDED, 1, b"\x02ab\x00\x00")  # unknown flags are ignored
        + frame(DATA, PADDED, 1, b"\x00")  # padding only
        + frame(HEADERS, 0xD0 | END_HEADERS | PRIORITY_FLAG, 3, bytes(5) + CONNECT)
        + frame(PING, 0, 0, b"12345678")
    )
    assert events == [
        StreamData(1, b"ab", 5),
        StreamData(1, b"", 1),
        StreamOpened(3),
    ]
    assert conn.data_to_send() == frame(PING, 1, 0, b"12345678")


def test_a_frame_in_pieces_waits_and_a_truncated_one_never_counts() -> None:
    conn = server()
    opened(conn)
    whole = frame(DATA, 0, 1, b"x" * 1000)
    assert conn.receive(whole[:5]) == []
    assert conn.receive(whole[5:500]) == []
    assert conn.receive(whole[500:]) == [StreamData(1, b"x" * 1000, 1000)]
    # A frame cut short, then the tunnel's end: nothing of it surfaced.
    assert conn.receive(frame(DATA, 0, 1, b"y" * FRAME_SIZE)[:-1]) == []


def test_a_header_block_of_table_size_updates_ends_the_tunnel() -> None:
    """RFC 7541 allows at most two table size updates at a block's start; hpack takes any
    number, at about a microsecond each. A 128 KiB block of them cost ~0.1 s of CPU and
    still opened a stream: no header block of ours or h2's is near MAX_HEADER_LIST bytes."""
    spam = b"\x20" * (FRAME_SIZE - 100) + CONNECT
    ended = ends_tunnel(server(), frame(HEADERS, END_HEADERS, 1, spam))
    assert "header block" in ended.reason
    answer = b"\x20" * MAX_HEADER_LIST + b"\x88"
    conn = client()
    conn.open_stream()
    ends_tunnel(conn, frame(HEADERS, END_HEADERS, 1, answer))
    # Padding is not part of the block: a padded CONNECT still opens its stream.
    padded = frame(HEADERS, END_HEADERS | PADDED, 1, b"\xff" + CONNECT + bytes(255))
    assert server().receive(padded) == [StreamOpened(1)]


def test_hpack_bombs_end_the_tunnel() -> None:
    # A table size update above the 4096 octets we allow (we announce no other size).
    ends_tunnel(server(), frame(HEADERS, END_HEADERS, 1, b"\x3f\xe9\x26" + CONNECT))
    # Many small fields: the header list size counts 32 octets each.
    many = Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"a")] + [(b"a", b"")] * 200)
    ends_tunnel(server(), frame(HEADERS, END_HEADERS, 1, many))
    # One literal as large as the frame allows.
    huge = Encoder().encode([(b":method", b"CONNECT"), (b"x", b"v" * (MAX_HEADER_LIST - 200))])
    assert len(huge) < MAX_HEADER_LIST
    assert server().receive(frame(HEADERS, END_HEADERS, 1, huge)) == [StreamOpened(1)]


def test_goaway_with_an_error_ends_the_tunnel_before_the_frames_behind_it() -> None:
    conn = server()
    events = conn.receive(
        frame(GOAWAY, 0, 0, struct.pack(">2I", 0, 2)) + frame(HEADERS, END_HEADERS, 1, CONNECT)
    )
    assert len(events) == 1 and isinstance(events[0], TunnelEnded) and events[0].error
    assert conn.receive(frame(HEADERS, END_HEADERS, 3, CONNECT)) == []


def test_a_clean_goaway_lets_open_streams_finish() -> None:
    conn = client()
    sid = conn.open_stream()
    events = conn.receive(
        frame(GOAWAY, 0, 0, struct.pack(">2I", sid, 0))
        + frame(HEADERS, END_HEADERS, sid, b"\x88")
        + frame(DATA, END_STREAM, sid, b"bye")
    )
    assert events[1:] == [StreamAccepted(sid), StreamData(sid, b"bye", 3), StreamFinished(sid)]
    assert isinstance(events[0], TunnelEnded) and not events[0].error
    assert conn.capacity == 0


# ------------------------------------------------------------- flow control


def test_windows_cannot_be_pushed_past_the_maximum() -> None:
    conn = server()
    opened(conn)
    ends_tunnel(conn, window_update(1, 2**31 - 1))  # 1 MiB + 2^31 - 1 on the stream
    conn = server()
    opened(conn)
    # Our send window on stream 1 is the client's default (65535): raising the initial
    # window to the maximum takes it past 2^31 - 1 only with an update on top.
    assert conn.receive(settings((4, 2**31 - 1))) == [WindowOpened(0)]
    ends_tunnel(conn, window_update(1, 1))
    # The reserved bit of an increment is ignored, not added.
    conn = client()
    sid = conn.open_stream()
    conn.receive(window_update(sid, 2**20) + window_update(0, 2**31 | 5))
    assert conn.window(sid) == 65535 + 5


def test_a_shrunk_window_stops_sending_until_the_peer_opens_it() -> None:
    conn = client((4, 10), (5, 16384))
    sid = conn.open_stream()
    conn.data_to_send()
    assert conn.send(sid, bytes(100)) == 10
    assert conn.receive(settings((4, 0))) == []  # now at -10: nothing may be sent
    assert conn.window(sid) == 0 and conn.send(sid, b"more") == 0
    assert conn.receive(window_update(sid, 12)) == [WindowOpened(sid)]
    assert conn.send(sid, bytes(100)) == 2
    out = conn.data_to_send()
    assert len(out) == 9 + 10 + 9 + 9 + 2  # two DATA frames and the SETTINGS ACK


def test_the_send_side_keeps_to_the_peers_windows_and_frame_size() -> None:
    """A peer that never reads (never opens a window) gets the initial windows' worth,
    in frames no larger than it allows, and our buffer holds no more than that."""
    conn = client((5, 16384))
    sids = [conn.open_stream() for _ in range(4)]
    conn.data_to_send()
    sent = sum(conn.send(sid, bytes(1 << 20)) for sid in sids for _ in range(10))
    assert sent == 65535  # the connection window, shared
    out = conn.data_to_send()
    offset, frames = 0, 0
    while offset < len(out):
        length = int.from_bytes(out[offset : offset + 3], "big")
        assert out[offset + 3] == DATA and length <= 16384
        offset, frames = offset + 9 + length, frames + 1
    assert offset == len(out) == 65535 + 9 * frames


def test_data_on_a_closed_stream_still_counts_against_the_tunnel_window() -> None:
    conn = server(max_streams=2)
    opened(conn, 1)
    opened(conn, 3)
    window = b"".join(
        frame(DATA, 0, sid, bytes(FRAME_SIZE)) * (STREAM_WINDOW // FRAME_SIZE) for sid in (1, 3)
    )
    assert not any(isinstance(e, TunnelEnded) for e in conn.receive(window))
    conn.reset(1)  # nothing consumed: the tunnel window stays shut
    ended = ends_tunnel(conn, frame(DATA, 0, 1, b"x"))
    assert "beyond the tunnel" in ended.reason


# ------------------------------------------------------------------- floods


def test_connection_window_updates_wake_streams_only_when_it_was_shut() -> None:
    """Each WindowOpened(0) wakes every stream of the tunnel: a flood of 1-byte updates
    of an open window cost O(streams) each (~0.4 s of CPU per MiB at 100 streams)."""
    conn = client()
    sid = conn.open_stream()
    flood = window_update(0, 1) * 10_000
    assert conn.receive(flood) == []
    assert conn.send(sid, bytes(1 << 20)) == 65535  # the stream window (client default)
    conn.receive(window_update(sid, 100_000))
    assert conn.send(sid, bytes(1 << 20)) == 10_000  # the rest of the tunnel window
    assert conn.receive(window_update(0, 1) * 3) == [WindowOpened(0)]  # it was shut


def test_settings_floods_wake_nothing_unless_windows_grow() -> None:
    conn = server()
    for sid in range(1, 8, 2):
        opened(conn, sid)
    assert conn.receive(frame(SETTINGS, 0, 0) * 1000 + settings((3, 7)) * 1000) == []
    assert len(conn.data_to_send()) == 2000 * 9  # one ACK each
    # Many entries in one frame: the last value counts, applied once.
    many = settings(*[(4, 1000 + i) for i in range(FRAME_SIZE // 6)])
    assert conn.receive(many + window_update(0, 100_000)) == []  # the windows shrank
    assert conn.window(1) == 1000 + FRAME_SIZE // 6 - 1
    assert conn.receive(settings((4, 70_000), (99, 7))) == [WindowOpened(0)]
    assert conn.window(1) == 70_000


def test_ping_floods_are_answered_once_each_and_acks_are_not_answered() -> None:
    conn = server()
    conn.receive(frame(PING, 1, 0, bytes(8)) * 1000)  # answers to nothing we asked
    assert not conn.pending
    conn.receive(frame(PING, 0, 0, bytes(8)) * 1000)
    assert len(conn.data_to_send()) == 17 * 1000


def test_stream_ids_run_out_before_they_wrap() -> None:
    conn = client()
    conn._next_id = 2**31 - 1
    assert conn.open_stream() == 2**31 - 1
    assert conn.capacity == 0


# ------------------------------------------------------------ tunnel level


class RecordingTls:
    """The tunnel's TLS stream, keeping what was written."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def write_nowait(self, data: bytes | bytearray) -> bool:
        self.sent += data
        return False

    async def drain(self) -> None:
        pass


def silent() -> SocketReader:
    """A plaintext side that has sent nothing yet."""
    return SocketReader(cast(Any, None), cast(Any, None), FRAME_SIZE)


class StuckSink:
    """A plaintext side that never drains (or is already closing)."""

    def __init__(self, closing: bool) -> None:
        self.closing = closing
        self.written = 0
        self.transport = SimpleNamespace(get_write_buffer_size=lambda: 1 << 30)

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written += len(data)

    async def drain(self) -> None:
        await asyncio.Event().wait()

    def can_write_eof(self) -> bool:
        return False


def server_tunnel(max_streams: int) -> tuple[MuxTunnel, list[MuxStream]]:
    handled: list[MuxStream] = []
    conn = MuxConnection(client=False, max_streams=max_streams)
    carrier = MuxTunnel(
        cast(Any, RecordingTls()), cast(Any, None), conn, keepalive_s=0, rekey=RekeyBudget(),
        on_stream=handled.append,
    )  # fmt: skip
    conn.start()
    feed(carrier, PREFACE + frame(SETTINGS, 0, 0))
    return carrier, handled


def feed(carrier: MuxTunnel, data: bytes) -> list[MuxEvent]:
    events = carrier.conn.receive(data)
    for event in events:
        carrier._dispatch(event)
    return events


def stream_and_window(sid: int) -> bytes:
    """A CONNECT and a full stream window of data right behind it (as a client sends)."""
    return frame(HEADERS, END_HEADERS, sid, CONNECT) + frame(DATA, 0, sid, bytes(FRAME_SIZE)) * (
        STREAM_WINDOW // FRAME_SIZE
    )


async def test_bytes_buffered_for_a_refused_stream_go_back_to_the_tunnel_window() -> None:
    """The client sends behind its CONNECT; the server refuses (backend down: 502). What it
    buffered for the stream must return to the tunnel's window, or after a tunnel window's
    worth of refused streams (one window per stream slot) the tunnel is wedged for all."""
    carrier, handled = server_tunnel(max_streams=1)
    feed(carrier, stream_and_window(1))
    await carrier.refuse(handled[0], 502)
    events = feed(carrier, stream_and_window(3))
    assert not any(isinstance(e, TunnelEnded) for e in events), events
    assert [s.stream_id for s in handled] == [1, 3]


async def test_bytes_buffered_for_a_stream_reset_before_its_dial_go_back() -> None:
    carrier, handled = server_tunnel(max_streams=1)
    feed(carrier, stream_and_window(1) + frame(RST, 0, 1, struct.pack(">I", 8)))
    assert handled[0].error is not None
    await handled[0].reset()  # what the handler does when it finds the stream reset
    events = feed(carrier, stream_and_window(3))
    assert not any(isinstance(e, TunnelEnded) for e in events), events


@pytest.mark.parametrize("closing", [False, True])
async def test_bytes_held_for_a_stuck_or_closed_plaintext_side_go_back(closing: bool) -> None:
    """Bytes written to a backed-up plaintext side are acknowledged once it drains; a
    stream that ends before that (reset, idle) must still return them to the tunnel."""
    carrier, handled = server_tunnel(max_streams=1)
    feed(carrier, frame(HEADERS, END_HEADERS, 1, CONNECT))
    sink = StuckSink(closing)
    pumping = asyncio.ensure_future(
        pump_stream(silent(), cast(Any, sink), handled[0], Traffic(), idle_timeout_s=0)
    )
    await asyncio.sleep(0)
    feed(carrier, stream_and_window(1)[len(frame(HEADERS, END_HEADERS, 1, CONNECT)) :])
    assert sink.written == (0 if closing else STREAM_WINDOW)
    feed(carrier, frame(RST, 0, 1, struct.pack(">I", 8)))
    assert (await pumping).startswith("error")
    await handled[0].reset()
    events = feed(carrier, stream_and_window(3))
    assert not any(isinstance(e, TunnelEnded) for e in events), events


class GatedTls(RecordingTls):
    """A TLS stream whose writes wait (a backed-up transport) until the gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def drain(self) -> None:
        await self.gate.wait()


async def test_a_window_opened_while_the_sender_flushes_is_not_lost() -> None:
    """The peer's WINDOW_UPDATE can arrive while a stream waits for its flush (the
    transport backed up): the stream must see it, or it waits for an update that already
    came (until the idle timeout; the tunnel window's updates no longer wake it)."""
    tls = GatedTls()
    conn = MuxConnection(client=True, max_streams=4)
    carrier = MuxTunnel(
        cast(Any, tls), cast(Any, None), conn, keepalive_s=0, rekey=RekeyBudget()
    )  # fmt: skip
    conn.start()
    feed(carrier, settings((4, 10)))
    stream = carrier.open_stream()
    sending = asyncio.ensure_future(stream.send(b"x" * 30))
    await asyncio.sleep(0)  # 10 bytes queued, the flush waits for the transport
    assert not sending.done()
    feed(carrier, window_update(stream.stream_id, 100))
    tls.gate.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert sending.done()
    assert tls.sent.endswith(frame(DATA, 0, stream.stream_id, b"x" * 20))


def test_random_frames_never_escape_the_codec() -> None:
    """Seeded random frames (types, flags, ids, payloads, header blocks) into both roles,
    driven as the daemon drives them: only events come out, and an error ends the tunnel
    with GOAWAY; no exception escapes receive() (the tunnel's reader would die)."""
    rng = random.Random(20261202)
    blocks = [CONNECT, b"\x88", b"\x20\x88", b"\x3f\xe9\x26", b"\x87\x82", b"\x40\x01a\x01b\xbe"]
    for _ in range(3000):
        role_client = rng.random() < 0.5
        conn = MuxConnection(client=role_client, max_streams=3)
        conn.start()
        conn.receive((b"" if role_client else PREFACE) + frame(SETTINGS, 0, 0))
        if role_client:
            conn.open_stream()
            conn.open_stream()
        for _ in range(rng.randrange(1, 10)):
            kind = rng.randrange(11)
            payload = rng.randbytes(rng.choice([0, 1, 4, 5, 6, 8, 9, rng.randrange(48)]))
            if kind == HEADERS and rng.random() < 0.6:
                payload = rng.randbytes(rng.randrange(3)) + rng.choice(blocks)
            flags = rng.choice([0, END_STREAM, END_HEADERS, 0x5, PADDED, 0x24, rng.randrange(256)])
            sid = rng.choice([0, 1, 2, 3, 5, 2**31 - 1, rng.randrange(2**32)])
            for event in conn.receive(frame(kind, flags, sid, payload)):
                if isinstance(event, StreamOpened):
                    rng.choice([conn.accept, conn.reset])(event.stream_id)
                elif isinstance(event, StreamData):
                    conn.consumed(event.stream_id, event.flow)
                elif isinstance(event, TunnelEnded) and event.reason.startswith("peer broke"):
                    assert conn.data_to_send()[-17 + 3] == GOAWAY  # ours, with its code
            conn.data_to_send()


class RecordingSink(StuckSink):
    """An application side that takes everything."""

    def __init__(self) -> None:
        super().__init__(closing=False)
        self.transport = SimpleNamespace(get_write_buffer_size=lambda: 0)


async def test_a_refusal_body_never_reaches_the_application() -> None:
    """A (hostile) server answers 403 without ending the stream, then sends DATA: that is
    the refusal's body, not tunnel data, and the application must not get it."""
    conn = MuxConnection(client=True, max_streams=4)
    carrier = MuxTunnel(
        cast(Any, RecordingTls()), cast(Any, None), conn, keepalive_s=0, rekey=RekeyBudget()
    )  # fmt: skip
    conn.start()
    feed(carrier, settings())
    stream = carrier.open_stream()
    sink = RecordingSink()
    pumping = asyncio.ensure_future(
        pump_stream(silent(), cast(Any, sink), stream, Traffic(), idle_timeout_s=0)
    )
    await asyncio.sleep(0)
    refusal = Encoder().encode([(b":status", b"403")])
    feed(
        carrier,
        frame(HEADERS, END_HEADERS, stream.stream_id, refusal)
        + frame(DATA, 0, stream.stream_id, b"not tunnel data"),
    )
    assert "403" in await pumping
    assert sink.written == 0
    assert stream.refused == 403
