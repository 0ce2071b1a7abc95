"""A client and a server endpoint on loopback, sharing a development CA and a QKD link.

Used by the benchmarks and the tests; everything in it is real (TCP sockets, TLS, keys).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from qkdproxy.groups import DEFAULT_GROUPS
from qkdproxy.hybrid import HybridKem, resolve
from qkdproxy.kem import default_registry
from qkdproxy.pki import CertificateAuthority, KeyType
from qkdproxy.qkd.inprocess import InProcessQkdLink
from qkdproxy.tls.identity import AllowList
from qkdproxy.tls.keyexchange import KeyContext, QkdOptions
from qkdproxy.tls.session import EndpointSettings, TlsEndpoint, TlsStream
from qkdproxy.tls.verify import PeerPolicy

SERVER_NAME = "server.qkdproxy.test"
CLIENT_URI = "spiffe://qkdproxy.test/client"


def resolve_groups(names: Sequence[str]) -> list[HybridKem]:
    """Bind group names to this machine's KEMs (raises if one cannot run here)."""
    registry = default_registry()
    return [resolve(DEFAULT_GROUPS.by_name(name), registry) for name in names]


@dataclass(slots=True)
class LoopbackPair:
    """A server endpoint listening on 127.0.0.1 and a client endpoint to dial it."""

    server: TlsEndpoint
    ca: CertificateAuthority
    link: InProcessQkdLink
    port: int
    client_keys: KeyContext
    server_keys: KeyContext
    _client_credentials_key_type: KeyType

    def client(self, groups: Sequence[HybridKem], options: QkdOptions) -> TlsEndpoint:
        """A client endpoint offering ``groups`` (first one gets the key share)."""
        self.client_keys.options = options
        credentials = self.ca.issue(
            "client", [CLIENT_URI], server=False, key_type=self._client_credentials_key_type
        )
        peer = PeerPolicy((self.ca.certificate,), AllowList.of([f"dns:{SERVER_NAME}"]), SERVER_NAME)
        return TlsEndpoint(EndpointSettings(credentials, peer, groups, self.client_keys))

    async def handshake(self, client: TlsEndpoint) -> TlsStream:
        """Dial the server and complete a client handshake."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return await client.connect(reader, writer)


async def _serve_echo(endpoint: TlsEndpoint, failures: list[BaseException]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            stream = await endpoint.accept(reader, writer)
        except Exception as exc:
            failures.append(exc)
            return
        try:
            while data := await stream.read():
                await stream.write(data)
        finally:
            await stream.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@asynccontextmanager
async def loopback_pair(
    server_groups: Sequence[HybridKem],
    key_type: KeyType = "ecdsa-p256",
    link: InProcessQkdLink | None = None,
    server_failures: list[BaseException] | None = None,
) -> AsyncIterator[LoopbackPair]:
    """Start an echo server behind a TLS endpoint; yield the pair; stop the server."""
    ca = CertificateAuthority.create()
    link = link or InProcessQkdLink()
    server_keys = KeyContext(link.sources("b"))
    credentials = ca.issue("server", [SERVER_NAME, "127.0.0.1"], client=False, key_type=key_type)
    policy = PeerPolicy((ca.certificate,), AllowList.of([f"uri:{CLIENT_URI}"]))
    server = TlsEndpoint(EndpointSettings(credentials, policy, server_groups, server_keys))
    failures = server_failures if server_failures is not None else []
    listener = await _serve_echo(server, failures)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield LoopbackPair(
            server, ca, link, port, KeyContext(link.sources("a")), server_keys, key_type
        )
    finally:
        listener.close()
        await listener.wait_closed()
