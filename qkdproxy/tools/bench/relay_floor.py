"""The floor under ``qkdproxy-mux``: two bare Python relays sharing one TCP link.

``bench connrate --floor`` runs this pair as one more path. Each application connection
is carried as a stream of one long-lived loopback TCP connection between a client relay
and a server relay, like a multiplexed tunnel, but with nothing else: no TLS, no QKD, no
flow control, no limits, no logging, no metrics, no PROXY header, callbacks only (no task
per connection), on the same event loop as the daemons (uvloop when installed). It is not
a product and has none of the product's checks; it answers one question: how many
connections per second can any design that relays through two Python processes reach on
this machine? A multiplexed target above this path's rate is out of reach for the design,
not for its implementation (docs/BENCHMARKS.md, "The floor under multiplexing").

Run as ``python -m qkdproxy.tools.bench.relay_floor client|server LISTEN_PORT TARGET_PORT``:
the client relay listens for applications and dials the server relay at TARGET_PORT; the
server relay listens for the client relay and dials the backend at TARGET_PORT per stream.
Each prints ``ready`` once it listens.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from typing import cast

from qkdproxy.io.aio import run

# Stream id, frame kind, payload length: the least a stream frame needs.
FRAME = struct.Struct("!IBH")
OPEN, DATA, FIN = range(3)
MAX_PAYLOAD = 0xFFFF
HOST = "127.0.0.1"


class Link(asyncio.Protocol):
    """The shared connection between the two relays: frames in, frames out."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport, but are ones.
        self.transport = cast(asyncio.Transport, transport)
        self._relay.link = self

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= FRAME.size:
            stream_id, kind, length = FRAME.unpack_from(buffer, offset)
            end = offset + FRAME.size + length
            if end > len(buffer):
                break
            self._relay.on_frame(stream_id, kind, bytes(buffer[offset + FRAME.size : end]))
            offset = end
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.link_lost()

    def send(self, stream_id: int, kind: int, payload: bytes = b"") -> None:
        """Frame ``payload`` (split at the length field's limit) for the other relay."""
        assert self.transport is not None
        view = memoryview(payload)
        while True:
            chunk, view = view[:MAX_PAYLOAD], view[MAX_PAYLOAD:]
            self.transport.write(FRAME.pack(stream_id, kind, len(chunk)) + chunk)
            if not view:
                return


class Endpoint(asyncio.Protocol):
    """One application-side (client relay) or backend-side (server relay) connection."""

    def __init__(self, relay: Relay, stream_id: int) -> None:
        self._relay = relay
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None
        # Frames that arrived while the backend was still being dialled (server relay).
        self.early: list[bytes | None] = []
        # Each direction's end: the socket closes once both have ended.
        self._read_ended = self._write_ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport, but are ones.
        self.transport = cast(asyncio.Transport, transport)
        self._relay.opened(self)
        for payload in self.early:
            self.deliver(payload)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        self._relay.send(self.stream_id, DATA, data)

    def eof_received(self) -> bool:
        self._relay.send(self.stream_id, FIN)
        self._read_ended = True
        # Half-close: the other direction may still carry bytes.
        return not self._write_ended

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.streams.pop(self.stream_id, None)

    def deliver(self, payload: bytes | None) -> None:
        """Bytes from the other relay (None: its side ended)."""
        if self.transport is None:
            self.early.append(payload)
        elif payload is None:
            self._write_ended = True
            if self._read_ended or not self.transport.can_write_eof():
                self.transport.close()
            else:
                self.transport.write_eof()
        else:
            self.transport.write(payload)


class Relay:
    """What both relays share: the link, the streams by id, frame dispatch."""

    def __init__(self) -> None:
        self.link: Link | None = None
        self.streams: dict[int, Endpoint] = {}

    def send(self, stream_id: int, kind: int, payload: bytes = b"") -> None:
        """A frame for the other relay; dropped once the link is gone."""
        if self.link is not None:
            self.link.send(stream_id, kind, payload)

    def on_frame(self, stream_id: int, kind: int, payload: bytes) -> None:
        """A frame from the other relay."""
        endpoint = self.streams.get(stream_id)
        if endpoint is not None:
            endpoint.deliver(payload if kind == DATA else None)

    def opened(self, endpoint: Endpoint) -> None:
        """``endpoint``'s socket is connected."""

    def link_lost(self) -> None:
        """The link closed: every stream ends abruptly."""
        self.link = None
        for endpoint in list(self.streams.values()):
            if endpoint.transport is not None:
                endpoint.transport.abort()
        self.streams.clear()


class ClientRelay(Relay):
    """Accepts applications; each connection is a new stream on the link."""

    def __init__(self) -> None:
        super().__init__()
        self._next_id = 1

    def accept(self) -> Endpoint:
        """Protocol factory for the listener."""
        endpoint = Endpoint(self, self._next_id)
        self._next_id += 1
        return endpoint

    def opened(self, endpoint: Endpoint) -> None:
        self.streams[endpoint.stream_id] = endpoint
        self.send(endpoint.stream_id, OPEN)


class ServerRelay(Relay):
    """Dials the backend for each stream the client relay opens."""

    def __init__(self, backend_port: int) -> None:
        super().__init__()
        self._backend_port = backend_port

    def on_frame(self, stream_id: int, kind: int, payload: bytes) -> None:
        if kind != OPEN:
            super().on_frame(stream_id, kind, payload)
            return
        endpoint = self.streams[stream_id] = Endpoint(self, stream_id)
        loop = asyncio.get_running_loop()
        dial = loop.create_connection(lambda: endpoint, HOST, self._backend_port)
        loop.create_task(dial).add_done_callback(lambda task: self._dialled(stream_id, task))

    def _dialled(self, stream_id: int, task: asyncio.Task[object]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.streams.pop(stream_id, None)
            self.send(stream_id, FIN)


async def serve(role: str, listen_port: int, target_port: int) -> None:
    """Run one relay until the process is terminated."""
    loop = asyncio.get_running_loop()
    if role == "server":
        server_relay = ServerRelay(target_port)
        listener = await loop.create_server(lambda: Link(server_relay), HOST, listen_port)
    elif role == "client":
        client_relay = ClientRelay()
        await loop.create_connection(lambda: Link(client_relay), HOST, target_port)
        listener = await loop.create_server(client_relay.accept, HOST, listen_port)
    else:
        raise SystemExit(f"unknown role {role!r}: client or server")
    print("ready", flush=True)
    async with listener:
        await listener.serve_forever()


def main(argv: list[str]) -> None:
    """``client|server LISTEN_PORT TARGET_PORT``."""
    if len(argv) != 3:
        raise SystemExit(__doc__)
    run(serve(argv[0], int(argv[1]), int(argv[2])))


if __name__ == "__main__":
    main(sys.argv[1:])
