"""The server tunnel's stream handlers: the cap on how many may hold a backend."""

from __future__ import annotations

from typing import Any, cast

from qkdproxy.core.mux import MuxConnection, StreamOpened
from qkdproxy.daemon.muxconn import MuxStream, MuxTunnel
from qkdproxy.daemon.pump import RekeyBudget


def tunnel(max_streams: int) -> tuple[MuxTunnel, list[MuxStream]]:
    handled: list[MuxStream] = []
    conn = MuxConnection(client=False, max_streams=max_streams)
    # No I/O happens here: the dispatch of an opened stream only decides and records.
    carrier = MuxTunnel(
        cast(Any, None), cast(Any, None), conn, keepalive_s=0, rekey=RekeyBudget(),
        on_stream=handled.append,
    )  # fmt: skip
    return carrier, handled


def test_handlers_of_reset_streams_count_against_the_limit() -> None:
    # Open-then-reset: the protocol's slots are free at once, the handlers are not.
    carrier, handled = tunnel(max_streams=2)
    for sid in (1, 3, 5, 7):
        carrier._dispatch(StreamOpened(sid))
        if sid in carrier.streams:
            carrier.streams[sid]._fail("reset by the peer (code 8)")
    assert [s.stream_id for s in handled] == [1, 3]
    assert set(carrier.streams) == {1, 3}  # 5 and 7 were refused


def test_handlers_of_cleanly_ended_streams_do_not_refuse_the_next() -> None:
    # The client saw stream 1 end both ways and reuses its slot while our handler is still
    # winding up (closing its backend, writing its line): that must not be refused.
    carrier, handled = tunnel(max_streams=1)
    carrier._dispatch(StreamOpened(1))
    first = handled[0]
    first.finished = True
    first._peer_end()
    carrier._dispatch(StreamOpened(3))
    assert [s.stream_id for s in handled] == [1, 3]
    carrier._dispatch(StreamOpened(5))  # stream 3 still busy: over the limit
    assert [s.stream_id for s in handled] == [1, 3]
