"""Streams the server did not process (RFC 9113 section 8.7): GOAWAY's last stream id and
REFUSED_STREAM in the sans-I/O protocol, and what the client keeps to send them again."""

from __future__ import annotations

import struct
from typing import Any, cast

from hpack import Encoder

from qkdproxy.core.mux import (
    ResetCode,
    StreamAccepted,
    StreamBroken,
    StreamData,
    StreamOpened,
    StreamRefused,
    StreamUnprocessed,
    TunnelEnded,
)
from qkdproxy.daemon.muxconn import REPLAY_LIMIT, MuxTunnel
from qkdproxy.daemon.pump import RekeyBudget
from tests.unit.test_mux_codec import frame
from tests.unit.test_mux_hostile import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    RST,
    WINDOW,
    client,
)
from tests.unit.test_mux_protocol import exchange, pair


def goaway(last: int, code: int = 0) -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">2I", last, code))


def goaways_sent(data: bytes | bytearray) -> list[tuple[int, int]]:
    """(last stream id, code) of every GOAWAY frame in ``data``, in order."""
    found, offset = [], 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        if data[offset + 3] == GOAWAY:
            found.append(struct.unpack_from(">2I", data, offset + 9))
        offset += 9 + length
    return found


def test_streams_above_the_last_id_of_a_draining_server_are_unprocessed() -> None:
    client_conn, server = pair()
    first = client_conn.open_stream()
    assert exchange(client_conn, server) == [StreamOpened(first)]
    server.goaway()  # draining: it took stream 1, nothing after it
    # The client has not read the GOAWAY yet: it opens two more and sends on one.
    late, later = client_conn.open_stream(), client_conn.open_stream()
    assert client_conn.send(late, b"never processed") == 15
    seen_by_server = server.receive(client_conn.data_to_send())
    assert seen_by_server == []  # no StreamOpened, no StreamData: nothing for a backend
    seen_by_client = client_conn.receive(server.data_to_send())
    assert seen_by_client[:2] == [
        StreamUnprocessed(late, "GOAWAY"),
        StreamUnprocessed(later, "GOAWAY"),
    ]
    assert isinstance(seen_by_client[-1], TunnelEnded) and not seen_by_client[-1].error
    assert client_conn.capacity == 0
    # The stream it took carries on both ways.
    server.accept(first)
    assert client_conn.send(first, b"ping") == 4
    events = exchange(client_conn, server)
    assert StreamAccepted(first) in events and StreamData(first, b"ping", 4) in events
    # The server's refusals (RST_STREAM REFUSED_STREAM) crossed the GOAWAY: ignored.
    assert not any(isinstance(e, StreamBroken) for e in events)


def test_the_server_names_the_last_stream_it_took_and_never_more() -> None:
    client_conn, server = pair()
    for _ in range(3):
        client_conn.open_stream()
    exchange(client_conn, server)
    server.goaway()
    client_conn.open_stream()  # stream 7: refused, yet it must not raise the last id
    server.receive(client_conn.data_to_send())
    server.close()  # the drain's end: its GOAWAY (if any) repeats the first id
    server.receive(b"\x00" * 9)  # a protocol error (DATA on stream 0): GOAWAY again
    assert goaways_sent(server.data_to_send()) == [(5, 0), (5, 1)]  # NO_ERROR, PROTOCOL_ERROR


def test_a_last_id_naming_streams_never_opened_disowns_nothing() -> None:
    conn = client()
    sid = conn.open_stream()
    events = conn.receive(goaway(2**31 - 1))
    assert not any(isinstance(e, StreamUnprocessed) for e in events)
    assert conn.window(sid) > 0  # still open


def test_a_second_goaway_may_lower_the_last_id_but_not_raise_it() -> None:
    conn = client()
    first, second, third = conn.open_stream(), conn.open_stream(), conn.open_stream()
    assert conn.receive(goaway(second))[0] == StreamUnprocessed(third, "GOAWAY")
    assert conn.receive(goaway(first))[0] == StreamUnprocessed(second, "GOAWAY")
    conn.data_to_send()
    [ended] = conn.receive(goaway(second))
    assert isinstance(ended, TunnelEnded) and ended.error
    assert "higher last stream id" in ended.reason
    assert goaways_sent(conn.data_to_send())[-1][1] == 1  # our GOAWAY: PROTOCOL_ERROR


def test_a_goaway_disowning_an_answered_stream_is_a_protocol_error() -> None:
    client_conn, server = pair()
    sid = client_conn.open_stream()
    exchange(client_conn, server)
    server.accept(sid)
    assert StreamAccepted(sid) in exchange(client_conn, server)
    events = client_conn.receive(goaway(0))
    assert not any(isinstance(e, StreamUnprocessed) for e in events)
    assert isinstance(events[-1], TunnelEnded) and events[-1].error


def test_refused_stream_before_the_answer_is_unprocessed() -> None:
    client_conn, server = pair()
    sid = client_conn.open_stream()
    exchange(client_conn, server)
    server.reset(sid, ResetCode.REFUSED_STREAM)  # the handler cap of muxconn._dispatch
    assert exchange(client_conn, server) == [StreamUnprocessed(sid, "REFUSED_STREAM")]


def test_a_stream_accepted_then_reset_is_broken_not_unprocessed() -> None:
    client_conn, server = pair()
    sid = client_conn.open_stream()
    exchange(client_conn, server)
    server.accept(sid)
    server.reset(sid, ResetCode.REFUSED_STREAM)  # whatever the code says: it was answered
    events = exchange(client_conn, server)
    assert StreamAccepted(sid) in events
    assert StreamBroken(sid, ResetCode.REFUSED_STREAM) in events
    assert not any(isinstance(e, StreamUnprocessed) for e in events)


def test_a_refusal_with_a_status_is_not_unprocessed() -> None:
    client_conn, server = pair()
    forbidden, backend_down = client_conn.open_stream(), client_conn.open_stream()
    exchange(client_conn, server)
    server.refuse(forbidden, 403)
    server.refuse(backend_down, 502)
    events = exchange(client_conn, server)
    assert StreamRefused(forbidden, 403) in events and StreamRefused(backend_down, 502) in events
    assert not any(isinstance(e, StreamUnprocessed) for e in events)


def test_goaway_floods_cost_only_the_streams_they_close() -> None:
    conn = client()
    sids = [conn.open_stream() for _ in range(4)]
    events = [e for _ in range(1000) for e in conn.receive(goaway(sids[1]))]
    unprocessed = [e for e in events if isinstance(e, StreamUnprocessed)]
    assert [e.stream_id for e in unprocessed] == sids[2:]  # each reported once
    assert conn.window(sids[1]) > 0


def test_a_reset_for_a_stream_a_goaway_closed_is_ignored() -> None:
    conn = client()
    sid = conn.open_stream()
    conn.receive(goaway(0))
    assert conn.receive(frame(RST, 0, sid, struct.pack(">I", 7))) == []


def test_a_disowned_stream_s_late_answer_and_data_reach_nobody() -> None:
    # The server answered and sent on a stream its (crossing) GOAWAY disowned: the client
    # already gave the stream up for a resend, so none of it may surface.
    for answer in ("accept", "refuse"):
        client_conn, server = pair()
        sid = client_conn.open_stream()
        exchange(client_conn, server)
        assert client_conn.receive(goaway(0))[0] == StreamUnprocessed(sid, "GOAWAY")
        if answer == "accept":
            server.accept(sid)
            server.send(sid, b"late")
            server.finish(sid)
        else:
            server.refuse(sid, 403)
        assert client_conn.receive(server.data_to_send()) == []


def test_the_reserved_bit_of_a_goaway_last_id_is_ignored() -> None:
    conn = client()
    first, second, third = conn.open_stream(), conn.open_stream(), conn.open_stream()
    assert conn.receive(goaway(0x8000_0000 | second))[0] == StreamUnprocessed(third, "GOAWAY")
    assert conn.window(first) > 0 and conn.window(second) > 0


def test_streams_refused_after_our_goaway_keep_hpack_in_step_and_carry_nothing() -> None:
    client_conn, server = pair()
    client_conn.open_stream()
    exchange(client_conn, server)
    server.goaway()
    server.data_to_send()
    encoder = Encoder()
    fields = [(b":method", b"CONNECT"), (b":authority", b"elsewhere:1"), (b"x-pad", b"v" * 64)]
    indexing = encoder.encode(fields)  # enters the fields into the dynamic table
    indexed = encoder.encode(fields)  # refers to those entries
    assert len(indexed) < 8
    hostile = (
        frame(HEADERS, END_HEADERS | END_STREAM, 3, indexing)
        + frame(DATA, END_STREAM, 3, b"upload")
        + frame(HEADERS, END_HEADERS, 5, indexed)
        + frame(DATA, 0, 5, b"more")
        + frame(WINDOW, 0, 5, struct.pack(">I", 10))
        + frame(RST, 0, 5, struct.pack(">I", ResetCode.CANCEL))
    )
    assert server.receive(hostile) == []  # no stream, no data, no error
    assert server.ended is None
    # Decoded though refused: the next block of the peer's encoder still decodes right.
    table = server._decoder.header_table.dynamic_entries
    assert table == encoder.header_table.dynamic_entries
    [ended] = server.receive(frame(HEADERS, END_HEADERS, 7, b"\xff\xff\xff\xff"))
    assert isinstance(ended, TunnelEnded) and ended.error and "HPACK" in ended.reason
    assert goaways_sent(server.data_to_send())[-1] == (1, 9)  # same last id, COMPRESSION_ERROR


# ----------------------------------------------------- what the client keeps to retry


def client_tunnel() -> MuxTunnel:
    # No I/O happens here: dispatching events only decides and records.
    return MuxTunnel(cast(Any, None), cast(Any, None), client(), keepalive_s=0, rekey=RekeyBudget())


def test_an_unprocessed_stream_gives_back_exactly_what_the_application_sent() -> None:
    carrier = client_tunnel()
    stream = carrier.open_stream()
    stream._keep(memoryview(b"GET / HTTP/1.1\r\n"))
    stream._keep(b"\r\n")
    stream._kept_fin = True
    carrier._dispatch(StreamUnprocessed(stream.stream_id, "REFUSED_STREAM"))
    assert stream.kept() == (b"GET / HTTP/1.1\r\n\r\n", True)
    assert stream.error == "not processed by the peer (REFUSED_STREAM)"


def test_an_accepted_stream_keeps_nothing_and_is_never_retried() -> None:
    carrier = client_tunnel()
    stream = carrier.open_stream()
    stream._keep(b"request")
    carrier._dispatch(StreamAccepted(stream.stream_id))
    stream._keep(b"more")
    carrier._dispatch(StreamBroken(stream.stream_id, ResetCode.REFUSED_STREAM))
    assert stream.kept() is None and stream.unprocessed is None


def test_a_refusal_with_a_status_is_never_retried() -> None:
    carrier = client_tunnel()
    stream = carrier.open_stream()
    stream._keep(b"request")
    carrier._dispatch(StreamRefused(stream.stream_id, 502))
    assert stream.kept() is None


def test_a_stream_past_the_replay_limit_is_not_retried() -> None:
    # Only a peer that opens a stream's window before accepting it lets this much through.
    carrier = client_tunnel()
    stream = carrier.open_stream()
    stream._keep(bytes(REPLAY_LIMIT))
    stream._keep(b"x")
    carrier._dispatch(StreamUnprocessed(stream.stream_id, "GOAWAY"))
    assert stream.kept() is None


def test_a_resend_refused_before_its_pump_ran_gives_back_what_it_carried() -> None:
    # The stream carrying a resend may be disowned before its preload was sent (or even
    # started): what it was loaded with must still come back whole, never lost.
    carrier = client_tunnel()
    stream = carrier.open_stream()
    stream.preload(b"kept from the first attempt", True)
    carrier._dispatch(StreamUnprocessed(stream.stream_id, "GOAWAY"))
    assert stream.kept() == (b"kept from the first attempt", True)
