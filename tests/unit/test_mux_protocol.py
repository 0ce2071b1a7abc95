"""The sans-I/O multiplexing protocol: two MuxConnections in memory, and hostile bytes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes

from qkdproxy.core.mux import (
    STREAM_WINDOW,
    MuxConnection,
    MuxError,
    MuxEvent,
    PeerSettled,
    StreamAccepted,
    StreamBroken,
    StreamData,
    StreamFinished,
    StreamOpened,
    StreamRefused,
    TunnelEnded,
)
from qkdproxy.daemon.metrics import Metrics, mux_tunnel_reason
from qkdproxy.daemon.tunnel import ConnectionRecord

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def pair(max_streams: int = 4) -> tuple[MuxConnection, MuxConnection]:
    client = MuxConnection(client=True, max_streams=max_streams)
    server = MuxConnection(client=False, max_streams=max_streams)
    client.start()
    server.start()
    exchange(client, server)
    return client, server


def exchange(a: MuxConnection, b: MuxConnection) -> list[MuxEvent]:
    """Move bytes both ways until quiet; the events ``b`` then ``a`` saw."""
    seen: list[MuxEvent] = []
    while (out := a.data_to_send()) or (back := b.data_to_send()):
        if out:
            seen += b.receive(out)
        else:
            seen += a.receive(back)
    return seen


def test_a_stream_opens_carries_data_both_ways_and_half_closes() -> None:
    client, server = pair()
    sid = client.open_stream()
    assert exchange(client, server) == [StreamOpened(sid)]
    server.accept(sid)
    assert StreamAccepted(sid) in exchange(client, server)
    assert client.send(sid, memoryview(b"hello")) == 5
    client.finish(sid)
    events = exchange(client, server)
    assert StreamData(sid, b"hello", 5) in events and StreamFinished(sid) in events
    assert server.send(sid, memoryview(b"answer")) == 6
    server.finish(sid)
    events = exchange(client, server)
    assert StreamData(sid, b"answer", 6) in events and StreamFinished(sid) in events


def test_unread_data_stops_the_sender_at_the_stream_window() -> None:
    client, server = pair()
    sid = client.open_stream()
    exchange(client, server)
    server.accept(sid)
    exchange(client, server)
    big = memoryview(bytes(STREAM_WINDOW * 2))
    sent = client.send(sid, big)
    assert sent == STREAM_WINDOW
    received = sum(e.flow for e in exchange(client, server) if isinstance(e, StreamData))
    assert client.send(sid, big[sent:]) == 0  # nothing consumed yet: no window
    server.consumed(sid, received)
    exchange(client, server)
    assert client.send(sid, big[sent:]) > 0


def test_a_reset_reaches_the_peer_and_refusals_carry_their_status() -> None:
    client, server = pair()
    first, second = client.open_stream(), client.open_stream()
    exchange(client, server)
    server.refuse(first, 403)
    client.reset(second)
    events = exchange(client, server)
    assert StreamRefused(first, 403) in events
    assert any(isinstance(e, StreamBroken) and e.stream_id == second for e in events)
    with pytest.raises(MuxError):
        client.send(second, memoryview(b"late"))


def test_only_connect_requests_open_streams() -> None:
    raw = H2Connection(H2Configuration(client_side=True))
    raw.initiate_connection()
    raw.send_headers(
        1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")]
    )
    server = MuxConnection(client=False, max_streams=4)
    server.start()
    events = server.receive(raw.data_to_send())
    assert not any(isinstance(e, StreamOpened) for e in events)
    answers = raw.receive_data(server.data_to_send())
    statuses = [dict(e.headers).get(b":status") for e in answers if hasattr(e, "headers")]
    assert statuses == [b"405"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,  # no preface
        PREFACE + b"\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # DATA on stream 0
        PREFACE + b"\x02\x00\x00\x04\x00\x00\x00\x00\x00" + bytes(0x20000),  # oversized
        PREFACE + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + bytes(5),  # truncated setting
    ],
)
def test_hostile_bytes_end_the_tunnel_with_a_reason(garbage: bytes) -> None:
    server = MuxConnection(client=False, max_streams=4)
    server.start()
    [ended] = server.receive(garbage)
    assert isinstance(ended, TunnelEnded) and ended.error
    assert server.receive(b"more") == []


def test_too_many_streams_end_the_tunnel() -> None:
    server = MuxConnection(client=False, max_streams=2)
    server.start()
    raw = H2Connection(H2Configuration(client_side=True))
    raw.initiate_connection()
    server.receive(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    server.receive(raw.data_to_send())  # our settings acknowledged: the limit holds
    # A client that ignores the announced limit.
    raw.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 100
    raw.remote_settings.acknowledge()
    for sid in (1, 3, 5):
        raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "x:0")])
    events = server.receive(raw.data_to_send())
    assert isinstance(events[-1], TunnelEnded) and events[-1].error


def test_a_client_opens_no_more_streams_than_the_server_allows() -> None:
    client = MuxConnection(client=True, max_streams=100)
    server = MuxConnection(client=False, max_streams=4)
    client.start()
    server.start()
    # Before the server's SETTINGS, h2 would assume no limit: we assume no room.
    assert client.capacity == 0
    with pytest.raises(MuxError, match="no room"):
        client.open_stream()
    events = exchange(client, server)
    assert events.count(PeerSettled()) == 2  # each side heard the other's settings once
    assert client.capacity == 4
    opened = [client.open_stream() for _ in range(4)]
    assert client.capacity == 0
    with pytest.raises(MuxError, match="no room"):
        client.open_stream()
    events = exchange(client, server)
    assert [e for e in events if isinstance(e, StreamOpened)] == [StreamOpened(i) for i in opened]
    assert not any(isinstance(e, TunnelEnded) for e in events)
    # A stream that ends makes room for the next.
    client.reset(opened[0])
    exchange(client, server)
    assert client.capacity == 1
    client.open_stream()
    assert not any(isinstance(e, TunnelEnded) for e in exchange(client, server))


def test_stream_and_tunnel_lines_feed_their_own_metrics() -> None:
    metrics = Metrics()
    stream = ConnectionRecord(1, "t", "server", reason="closed", mux="stream", mux_tunnel=2)
    tunnel = ConnectionRecord(2, "t", "server", reason="error: dead peer: 5.0s", mux="tunnel")
    idle = replace(stream, reason="idle_timeout")
    # The same labels twice: a cached child must count both, and only under its labels.
    for record in (stream, idle, stream, tunnel, replace(tunnel, reason="rotated")):
        metrics.observe(record)
    value = metrics.registry.get_sample_value
    for reason, count in (("closed", 2), ("idle_timeout", 1)):
        labels = {"tunnel": "t", "role": "server", "reason": reason}
        assert value("qkdproxy_mux_streams_closed_total", labels) == count
        assert value("qkdproxy_connections_closed_total", labels) == count
    for reason in ("dead_peer", "rotated"):
        assert value("qkdproxy_mux_tunnels_closed_total",
                     {"tunnel": "t", "role": "server", "reason": reason}) == 1  # fmt: skip
    assert mux_tunnel_reason("handshake failed (peer): access_denied") == "handshake_failed"
    assert mux_tunnel_reason("peer closed with streams open") == "error"
