"""A client and a server endpoint on loopback, sharing a development CA and a QKD link.

Used by the benchmarks and the tests; everything in it is real (TCP sockets, TLS, keys).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from qkdproxy.core.groups import DEFAULT_GROUPS
from qkdproxy.core.hybrid import HybridKem, resolve
from qkdproxy.core.kem import default_registry
from qkdproxy.core.tls.engine import DEFAULT_ENGINE
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.keyexchange import QkdOptions
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.io.peer_channel import open_peer_channel
from qkdproxy.io.tls_stream import EndpointSettings, TlsEndpoint, TlsStream, TlsStreamError
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.sources import KeySources
from qkdproxy.sim.inprocess import InProcessQkdLink
from qkdproxy.sim.pki import CertificateAuthority, KeyType

SERVER_NAME = "server.qkdproxy.test"
STOP_TIMEOUT = 5.0
CLIENT_URI = "spiffe://qkdproxy.test/client"


def resolve_groups(names: Sequence[str]) -> list[HybridKem]:
    """Bind group names to this machine's KEMs (raises if one cannot run here)."""
    registry = default_registry()
    return [resolve(DEFAULT_GROUPS.by_name(name), registry) for name in names]


class _EchoServer:
    """Accepts TLS connections and echoes their bytes; tracks handlers to stop them cleanly."""

    def __init__(
        self, endpoint: TlsEndpoint, failures: list[BaseException], sources: KeySources
    ) -> None:
        self._endpoint = endpoint
        self._sources = sources
        self.failures = failures
        self.accepted = 0
        self.changed = asyncio.Condition()
        self._handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            stream = await self._endpoint.accept(reader, writer)
        except Exception as exc:
            self.failures.append(exc)
            return
        finally:
            self._handlers.discard(task)
            async with self.changed:
                self.accepted += 1
                self.changed.notify_all()
        self._handlers.add(task)
        try:
            channel = await open_peer_channel(stream, self._sources)
            if channel is None:
                while data := await stream.read():
                    await stream.write(data)
            else:
                while payload := await channel.receive():
                    await channel.send(payload)
                await channel.close()  # FIN, then close_notify: a clean end for the client
        except TlsStreamError as exc:
            self.failures.append(exc)
        finally:
            await stream.close()
            self._handlers.discard(task)

    async def stop(self) -> None:
        """Let running handlers finish (bounded), then cancel what is left."""
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=STOP_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


@dataclass(slots=True)
class LoopbackPair:
    """A server endpoint listening on 127.0.0.1 and a client endpoint to dial it."""

    server: TlsEndpoint
    ca: CertificateAuthority
    link: InProcessQkdLink
    port: int
    client_keys: KeyContext
    server_keys: KeyContext
    echo: _EchoServer
    _client_credentials_key_type: KeyType
    tls_engine: str = DEFAULT_ENGINE

    @property
    def server_failures(self) -> list[BaseException]:
        """Server handshakes that failed, in order."""
        return self.echo.failures

    async def wait_for_server(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` holds after some server handshake ended (no polling)."""
        async with self.echo.changed:
            await self.echo.changed.wait_for(predicate)

    def client(self, groups: Sequence[HybridKem], options: QkdOptions) -> TlsEndpoint:
        """A client endpoint offering ``groups`` (first one gets the key share)."""
        self.client_keys.options = options
        credentials = self.ca.issue(
            "client", [CLIENT_URI], server=False, key_type=self._client_credentials_key_type
        )
        peer = PeerPolicy((self.ca.certificate,), AllowList.of([f"dns:{SERVER_NAME}"]), SERVER_NAME)
        return TlsEndpoint(
            EndpointSettings(
                credentials, peer, groups, self.client_keys, tls_engine=self.tls_engine
            )
        )

    async def handshake(self, client: TlsEndpoint) -> TlsStream:
        """Dial the server and complete a client handshake."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return await client.connect(reader, writer)


@asynccontextmanager
async def loopback_pair(
    server_groups: Sequence[HybridKem],
    *,
    key_type: KeyType = "ecdsa-p256",
    link: InProcessQkdLink | None = None,
    server_failures: list[BaseException] | None = None,
    sources: tuple[KeySources, KeySources] | None = None,
    peer_protocol: bool = False,
    tls_engine: str = DEFAULT_ENGINE,
) -> AsyncIterator[LoopbackPair]:
    """Start an echo server behind a TLS endpoint; yield the pair; stop the server.

    Keys come from ``sources`` (client's, server's) when given, else from ``link``. With
    ``peer_protocol`` the server speaks ``qkdproxy/1`` (framing, key announcements) to
    clients that offer it; otherwise it echoes raw bytes. Both ends (and every
    :meth:`LoopbackPair.client`) run the ``tls_engine`` handshake engine.
    """
    ca = CertificateAuthority.create()
    link = link or InProcessQkdLink()
    client_sources, server_sources = sources or (link.sources("a"), link.sources("b"))
    server_keys = KeyContext(server_sources)
    credentials = ca.issue("server", [SERVER_NAME, "127.0.0.1"], client=False, key_type=key_type)
    policy = PeerPolicy((ca.certificate,), AllowList.of([f"uri:{CLIENT_URI}"]))
    server = TlsEndpoint(
        EndpointSettings(
            credentials,
            policy,
            server_groups,
            server_keys,
            peer_protocol=peer_protocol,
            tls_engine=tls_engine,
        )
    )
    failures = server_failures if server_failures is not None else []
    echo = _EchoServer(server, failures, server_sources)
    listener = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield LoopbackPair(
            server,
            ca,
            link,
            port,
            KeyContext(client_sources),
            server_keys,
            echo,
            key_type,
            tls_engine,
        )
    finally:
        listener.close()
        await listener.wait_closed()
        await echo.stop()
