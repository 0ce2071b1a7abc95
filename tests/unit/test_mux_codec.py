"""Hostile input to the qkdproxy-mux/1 codec (an authenticated but misbehaving peer), and
wire compatibility with a standard HTTP/2 implementation (``h2``, as older qkdproxy used)."""

from __future__ import annotations

import struct

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived
from hpack import Encoder

from qkdproxy.core.mux import (
    CONNECT_BLOCK,
    FRAME_SIZE,
    MAX_HEADER_LIST,
    PREFACE,
    STREAM_WINDOW,
    MuxConnection,
    PeerSettled,
    ResetCode,
    StreamAccepted,
    StreamBroken,
    StreamData,
    StreamFinished,
    StreamOpened,
    TunnelEnded,
)

DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONTINUATION = range(10)
CONNECT = Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"qkdproxy-backend:0")])


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(
        ">I", stream_id
    ) + payload  # fmt: skip


def server(max_streams: int = 4) -> MuxConnection:
    """A server tunnel that heard a client's preface and (empty) SETTINGS."""
    conn = MuxConnection(client=False, max_streams=max_streams)
    conn.start()
    assert conn.receive(PREFACE + frame(SETTINGS, 0, 0)) == [PeerSettled()]
    conn.data_to_send()
    return conn


def opened(conn: MuxConnection, stream_id: int = 1) -> None:
    assert conn.receive(frame(HEADERS, 0x4, stream_id, CONNECT)) == [StreamOpened(stream_id)]


def ends_tunnel(conn: MuxConnection, data: bytes) -> TunnelEnded:
    events = conn.receive(data)
    assert events and isinstance(events[-1], TunnelEnded) and events[-1].error, events
    out = conn.data_to_send()  # last: GOAWAY with an error code
    assert out[-14] == GOAWAY and struct.unpack(">I", out[-4:])[0] != 0
    assert conn.receive(frame(PING, 0, 0, bytes(8))) == []  # nothing more is taken
    return events[-1]


@pytest.mark.parametrize(
    "bad",
    [
        frame(PING, 0, 0, bytes(7)),
        frame(PING, 0, 1, bytes(8)),
        frame(WINDOW, 0, 0, bytes(3)),
        frame(RST, 0, 1, bytes(5)),
        frame(SETTINGS, 0, 0, bytes(7)),
        frame(SETTINGS, 0, 1, b""),
        frame(SETTINGS, 1, 0, bytes(6)),  # an ACK with a payload
        frame(GOAWAY, 0, 0, bytes(4)),
        frame(PRIORITY, 0, 1, bytes(4)),
        frame(DATA, 0, 0, b"x"),
        frame(HEADERS, 0x4, 0, CONNECT),
        frame(CONTINUATION, 0x4, 1, b""),
        frame(PUSH, 0x4, 1, bytes(4)),
        frame(0x42, 0, 0, b"extension"),
        frame(HEADERS, 0x0, 1, CONNECT),  # no END_HEADERS: CONTINUATION would follow
        frame(HEADERS, 0x4 | 0x8, 1, b"\xff" + CONNECT),  # padding longer than the frame
        frame(HEADERS, 0x4, 1, b"\xff\xff\xff\xff"),  # not HPACK
        frame(HEADERS, 0x4, 1, Encoder().encode([(b"X-Upper", b"1"), (b":method", b"GET")])),
        frame(HEADERS, 0x4, 1, Encoder().encode([(b":method", b"CONNECT"), (b":path", b"/")])),
        frame(WINDOW, 0, 0, bytes(4)),  # an increment of 0
        frame(WINDOW, 0, 0, struct.pack(">I", 2**31 - 1)),  # the tunnel window overflows
        frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 2**31)),  # initial window too large
        frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 100)),  # frame size below the minimum
        frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 2)),  # ENABLE_PUSH neither 0 nor 1
    ],
)
def test_malformed_frames_end_the_tunnel(bad: bytes) -> None:
    ends_tunnel(server(), bad)


def test_an_oversized_frame_ends_the_tunnel_before_its_body_arrives() -> None:
    conn = server()
    # Only the 9-byte header of a 16 MiB frame: nothing of it is buffered or awaited.
    ended = ends_tunnel(conn, b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")
    assert "frame of" in ended.reason


def test_the_peer_must_start_with_the_preface_and_settings() -> None:
    fresh = MuxConnection(client=False, max_streams=4)
    fresh.start()
    ends_tunnel(fresh, PREFACE + frame(PING, 0, 0, bytes(8)))
    client = MuxConnection(client=True, max_streams=4)
    client.start()
    ends_tunnel(client, frame(WINDOW, 0, 0, struct.pack(">I", 1)))


def test_a_header_list_over_the_limit_ends_the_tunnel() -> None:
    big = Encoder().encode(
        [(b":method", b"CONNECT"), (b":authority", b"x"), (b"pad", b"p" * MAX_HEADER_LIST)]
    )
    ended = ends_tunnel(server(), frame(HEADERS, 0x4, 1, big))
    assert "HPACK" in ended.reason


def test_a_header_flood_beyond_the_stream_limit_ends_the_tunnel() -> None:
    conn = server(max_streams=3)
    flood = b"".join(frame(HEADERS, 0x4, sid, CONNECT) for sid in range(1, 200, 2))
    events = conn.receive(flood)
    assert events.count(StreamOpened(1)) == 1 and len(events) == 4  # three, then the end
    assert isinstance(events[-1], TunnelEnded) and events[-1].error


def test_trailers_and_repeated_responses_are_not_part_of_the_protocol() -> None:
    conn = server()
    opened(conn)
    ends_tunnel(conn, frame(HEADERS, 0x4, 1, CONNECT))
    client = MuxConnection(client=True, max_streams=4)
    client.start()
    client.receive(frame(SETTINGS, 0, 0))
    sid = client.open_stream()
    assert client.receive(frame(HEADERS, 0x4, sid, b"\x88")) == [StreamAccepted(sid)]
    ends_tunnel(client, frame(HEADERS, 0x4, sid, b"\x88"))


@pytest.mark.parametrize(
    "games",
    [
        frame(DATA, 0, 5, b"x"),  # a stream never opened
        frame(WINDOW, 0, 7, struct.pack(">I", 1)),
        frame(RST, 0, 9, struct.pack(">I", 8)),
        frame(HEADERS, 0x4, 2, CONNECT),  # a server-side (even) id
        frame(HEADERS, 0x4, 1, CONNECT),  # an id used before
        frame(HEADERS, 0x4, 5, CONNECT) + frame(DATA, 1, 5, b"x") + frame(DATA, 0, 5, b"y"),
    ],
)
def test_stream_id_games_end_the_tunnel(games: bytes) -> None:
    conn = server()
    opened(conn, 3)
    conn.reset(3)
    ends_tunnel(conn, games)


def test_data_beyond_a_stream_window_ends_the_tunnel() -> None:
    conn = server()
    opened(conn)
    chunk = bytes(FRAME_SIZE)
    within = frame(DATA, 0, 1, chunk) * (STREAM_WINDOW // FRAME_SIZE)
    events = conn.receive(within)
    assert sum(e.flow for e in events if isinstance(e, StreamData)) == STREAM_WINDOW
    ended = ends_tunnel(conn, frame(DATA, 0, 1, b"x"))
    assert "beyond" in ended.reason


def test_data_on_a_stream_we_reset_is_dropped_but_keeps_the_tunnel_window() -> None:
    conn = server(max_streams=1)
    opened(conn)
    conn.reset(1, ResetCode.CANCEL)
    conn.data_to_send()
    # In flight when our reset left: twice the tunnel's window in total, all ignored.
    for _ in range(2 * STREAM_WINDOW // FRAME_SIZE):
        assert conn.receive(frame(DATA, 0, 1, bytes(FRAME_SIZE))) == []
    assert conn.receive(frame(RST, 0, 1, struct.pack(">I", 8))) == []
    assert b"\x08\x00\x00\x00\x00\x00" in conn.data_to_send()  # WINDOW_UPDATE on stream 0


def test_a_reset_flood_frees_every_slot_and_the_tunnel_carries_on() -> None:
    conn = server(max_streams=2)
    flood = b"".join(
        frame(HEADERS, 0x4, sid, CONNECT) + frame(RST, 0, sid, struct.pack(">I", 8))
        for sid in range(1, 2001, 2)
    )
    events = conn.receive(flood)
    assert sum(isinstance(e, StreamBroken) for e in events) == 1000
    assert not any(isinstance(e, TunnelEnded) for e in events)
    opened(conn, 2001)
    opened(conn, 2003)  # both slots free again


def test_settings_and_ping_floods_are_answered_in_proportion() -> None:
    conn = server()
    flood = (frame(SETTINGS, 0, 0) + frame(PING, 0, 0, bytes(8))) * 1000
    conn.receive(flood)
    assert len(conn.data_to_send()) == len(flood)  # one ACK per frame, no more


def test_frames_split_anywhere_give_the_same_events() -> None:
    stream = frame(HEADERS, 0x4, 1, CONNECT) + frame(DATA, 0x1 | 0x8, 1, b"\x02abc\x00\x00")
    whole = server().receive(stream)
    assert whole == [StreamOpened(1), StreamData(1, b"abc", 6), StreamFinished(1)]
    conn = server()
    pieces = [event for byte in stream for event in conn.receive(bytes((byte,)))]
    assert pieces == whole
    early = MuxConnection(client=False, max_streams=4)
    early.start()
    preface = PREFACE + frame(SETTINGS, 0, 0)
    assert [e for b in preface for e in early.receive(bytes((b,)))] == [PeerSettled()]


def test_an_h2_client_with_dynamic_table_headers_opens_streams() -> None:
    """An older qkdproxy (the h2 library) indexes its headers: the second request refers to
    the first one's dynamic-table entries, so the decoder must have seen both."""
    raw = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    raw.initiate_connection()
    conn = MuxConnection(client=False, max_streams=4)
    conn.start()
    conn.receive(raw.data_to_send())
    raw.receive_data(conn.data_to_send())
    request = [(b":method", b"CONNECT"), (b":authority", b"qkdproxy-backend:0")]
    raw.send_headers(1, request)
    raw.send_headers(3, request)
    sent = raw.data_to_send()
    assert CONNECT_BLOCK not in sent  # h2's own encoding, not ours
    events = conn.receive(sent)
    assert [e for e in events if isinstance(e, StreamOpened)] == [StreamOpened(1), StreamOpened(3)]
    conn.accept(1)
    answers = raw.receive_data(conn.data_to_send())
    assert [dict(e.headers)[b":status"] for e in answers if isinstance(e, ResponseReceived)] == [
        b"200"
    ]


def test_an_h2_server_answer_is_understood() -> None:
    raw = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    raw.initiate_connection()
    client = MuxConnection(client=True, max_streams=4)
    client.start()
    client.receive(raw.data_to_send())
    raw.receive_data(client.data_to_send())
    sid = client.open_stream()
    raw.receive_data(client.data_to_send())
    raw.send_headers(sid, [(b":status", b"200"), (b"server", b"old")])
    raw.send_data(sid, b"hi", end_stream=True)
    assert client.receive(raw.data_to_send()) == [
        StreamAccepted(sid), StreamData(sid, b"hi", 2), StreamFinished(sid)
    ]  # fmt: skip
