"""A hostile server against the client's resending of unprocessed streams, between real
daemons: refusing (or disowning) what it is sent must not cost the client more QKD keys
than serving it would."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from qkdproxy.core.mux import ErrorCode, MuxEvent
from qkdproxy.daemon.muxconn import MuxTunnel
from qkdproxy.daemon.tunnel import Tunnel
from tests.integration.test_mux_goaway import MUX, CountingBackend, client_streams
from tests.integration.test_tunnel_runtime import port, setup, transfer


def disown_every_stream(server: Tunnel) -> None:
    """From now on each tunnel ``server`` accepts exchanges SETTINGS, then answers the
    first stream it is sent with REFUSED_STREAM and GOAWAY naming no stream."""
    make = server._mux_tunnel

    def disowning(*args: Any) -> MuxTunnel:
        tunnel = make(*args)
        conn = tunnel.conn
        conn._goaway_last = 0  # every stream refused (RST_STREAM REFUSED_STREAM)
        receive = conn.receive

        def receive_then_go_away(data: bytes | bytearray) -> list[MuxEvent]:
            events = receive(data)
            if conn._last_peer_id:  # a stream came: GOAWAY, last id 0
                conn._goaway(ErrorCode.NO_ERROR)
            return events

        conn.receive = receive_then_go_away  # type: ignore[method-assign]
        return tunnel

    server._mux_tunnel = disowning  # type: ignore[method-assign,assignment]


async def test_a_server_disowning_every_stream_costs_a_key_per_backoff_step(
    tmp_path: Path,
) -> None:
    """Nothing processed, every tunnel gone after one stream. Without a rule, each
    connection would cost a key per attempt (1 + STREAM_RETRIES; measured 18 keys for 6
    connections); a tunnel that disowned streams and answered none is a failed
    establishment, so the keys follow the backoff, not the connections."""
    backend = CountingBackend()
    async with setup(tmp_path, backend) as s, s.daemon("server", s.server_toml(MUX)) as server:
        disown_every_stream(server.tunnels[0])
        text = s.client_toml(port(server), f"{MUX}\nmux_pool_min = 0")
        async with s.daemon("client", text) as client:
            for _ in range(6):
                with contextlib.suppress(ConnectionResetError):
                    assert await transfer(port(client), b"never processed") == b""
            pool = client.tunnels[0].pool
            assert pool is not None
            taken = client.tunnels[0].keys.ledger.taken
            assert taken >= 1
            # Every key went to a tunnel that processed nothing: each one set a backoff.
            assert taken == pool.establish_failures
    assert backend.received == []
    reasons = [r.reason for r in client_streams(s.records)]
    assert reasons and all(r.startswith("error: not processed by the peer") for r in reasons)
