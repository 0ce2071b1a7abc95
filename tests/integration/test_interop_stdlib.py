"""Interop with another TLS 1.3 stack: Python's ``ssl`` module (OpenSSL), over real sockets.

qkdproxy server <- stdlib client, and qkdproxy client -> stdlib server, on the standard
groups OpenSSL 3.0 speaks (x25519, secp256r1, secp384r1).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.core.tls.wire import Alert
from qkdproxy.io.tls_stream import EndpointSettings, HandshakeError, TlsEndpoint, TlsStream
from qkdproxy.keys.context import KeyContext
from qkdproxy.sim.inprocess import InProcessQkdLink
from qkdproxy.sim.pki import CertificateAuthority, KeyType
from tests.conftest import groups

SERVER_NAME = "server.qkdproxy.test"
CLIENT_URI = "spiffe://qkdproxy.test/client"
SERVER_GROUPS = ("X25519MLKEM768", "x25519", "secp256r1", "secp384r1")
DEADLINE = 15.0
SIZES = (1, 1000, 16384, 16385, 100_003, 1 << 20)

T = TypeVar("T")

# qkdproxy group name -> the name OpenSSL's set_ecdh_curve (SSL_CTX_set1_groups) takes.
OPENSSL_CURVES = {"x25519": "X25519", "secp256r1": "prime256v1", "secp384r1": "secp384r1"}


async def deadline(aw: Awaitable[T], seconds: float = DEADLINE) -> T:
    return await asyncio.wait_for(aw, seconds)


def write_pems(tmp_path: Path, stem: str, creds: Credentials) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key"
    cert.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in creds.chain))
    key.write_bytes(
        creds.private_key.private_bytes(
            Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


def ca_file(tmp_path: Path, ca: CertificateAuthority) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.certificate.public_bytes(Encoding.PEM))
    return path


# ------------------------------------------------------------ qkdproxy server side


@dataclass
class Accepted:
    """What the qkdproxy server saw: one entry per accepted (or refused) connection."""

    results: asyncio.Queue[TlsStream | HandshakeError] = field(default_factory=asyncio.Queue)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class QkdServer:
    port: int
    accepted: Accepted

    async def next_result(self) -> TlsStream | HandshakeError:
        return await deadline(self.accepted.results.get())


@asynccontextmanager
async def qkdproxy_echo_server(
    ca: CertificateAuthority, key_type: KeyType
) -> AsyncIterator[QkdServer]:
    """A qkdproxy server endpoint (echo handler) on 127.0.0.1."""
    credentials = ca.issue("server", [SERVER_NAME, "127.0.0.1"], client=False, key_type=key_type)
    policy = PeerPolicy((ca.certificate,), AllowList.of([f"uri:{CLIENT_URI}"]))
    keys = KeyContext(InProcessQkdLink().sources("b"))
    endpoint = TlsEndpoint(EndpointSettings(credentials, policy, groups(*SERVER_GROUPS), keys))
    accepted = Accepted()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        accepted.handlers.add(task)
        try:
            stream = await endpoint.accept(reader, writer)
        except HandshakeError as exc:
            accepted.results.put_nowait(exc)
            return
        accepted.results.put_nowait(stream)
        try:
            while data := await stream.read():
                await stream.write(data)
        finally:
            await stream.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield QkdServer(listener.sockets[0].getsockname()[1], accepted)
    finally:
        listener.close()
        await listener.wait_closed()
        if accepted.handlers:
            await deadline(asyncio.gather(*accepted.handlers))


def stdlib_client_context(
    tmp_path: Path, ca: CertificateAuthority, client: Credentials | None, curve: str | None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=ca_file(tmp_path, ca))
    if client is not None:
        cert, key = write_pems(tmp_path, "client", client)
        ctx.load_cert_chain(cert, key)
    if curve is not None:
        # OpenSSL 3: SSL_CTX_set1_groups with this one group (Python 3.11 has no set_groups).
        ctx.set_ecdh_curve(curve)
    return ctx


async def stdlib_connect(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await deadline(
        asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=ctx,
            server_hostname=SERVER_NAME,
            ssl_handshake_timeout=DEADLINE,
            ssl_shutdown_timeout=5.0,
        )
    )


async def echo_through(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sizes: tuple[int, ...]
) -> None:
    """Send each payload and read it back in full (reading concurrently with writing)."""
    for size in sizes:
        payload = os.urandom(size)

        async def send(data: bytes = payload) -> None:
            writer.write(data)
            await writer.drain()

        _, echoed = await deadline(asyncio.gather(send(), reader.readexactly(size)))
        assert echoed == payload, f"echo of {size} bytes differs"


async def close_stdlib(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(ssl.SSLError, ConnectionError):
        await deadline(writer.wait_closed())


def client_credentials(ca: CertificateAuthority) -> Credentials:
    return ca.issue("client", [CLIENT_URI], server=False)


# ------------------------------------------------------- stdlib client -> qkdproxy


@pytest.mark.parametrize("group", ["x25519", "secp256r1", "secp384r1"])
async def test_stdlib_client_per_group(
    ca: CertificateAuthority, tmp_path: Path, group: str
) -> None:
    ctx = stdlib_client_context(tmp_path, ca, client_credentials(ca), OPENSSL_CURVES[group])
    async with qkdproxy_echo_server(ca, "ecdsa-p256") as server:
        reader, writer = await stdlib_connect(server.port, ctx)
        try:
            stream = await server.next_result()
            assert isinstance(stream, TlsStream), stream
            assert stream.record.group == group
            assert stream.peer.uris == (CLIENT_URI,)
            assert stream.cipher
            ssl_object = writer.get_extra_info("ssl_object")
            assert isinstance(ssl_object, ssl.SSLObject)
            assert ssl_object.version() == "TLSv1.3"
            peercert = ssl_object.getpeercert()
            assert peercert is not None
            assert ("DNS", SERVER_NAME) in peercert["subjectAltName"]
            await echo_through(reader, writer, SIZES)
        finally:
            await close_stdlib(writer)


async def test_stdlib_client_default_groups_prefers_x25519(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """OpenSSL 3.0's default list (no ML-KEM) lands on the server's first common group."""
    ctx = stdlib_client_context(tmp_path, ca, client_credentials(ca), None)
    async with qkdproxy_echo_server(ca, "ecdsa-p256") as server:
        reader, writer = await stdlib_connect(server.port, ctx)
        try:
            stream = await server.next_result()
            assert isinstance(stream, TlsStream), stream
            assert stream.record.group == "x25519"
            await echo_through(reader, writer, (5, 70_000))
        finally:
            await close_stdlib(writer)


async def test_stdlib_client_offering_alpn_is_served_without_alpn(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """tlslite 0.8.2 servers crash on client ALPN unless given a list; ours answer plainly."""
    ctx = stdlib_client_context(tmp_path, ca, client_credentials(ca), None)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    async with qkdproxy_echo_server(ca, "ecdsa-p256") as server:
        reader, writer = await stdlib_connect(server.port, ctx)
        try:
            stream = await server.next_result()
            assert isinstance(stream, TlsStream), stream
            assert stream.alpn is None
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
            await echo_through(reader, writer, (5,))
        finally:
            await close_stdlib(writer)


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
async def test_stdlib_client_server_key_types(
    ca: CertificateAuthority, tmp_path: Path, key_type: KeyType
) -> None:
    ctx = stdlib_client_context(tmp_path, ca, client_credentials(ca), "secp384r1")
    async with qkdproxy_echo_server(ca, key_type) as server:
        reader, writer = await stdlib_connect(server.port, ctx)
        try:
            stream = await server.next_result()
            assert isinstance(stream, TlsStream), stream
            assert stream.record.group == "secp384r1"
            await echo_through(reader, writer, (1, 16385, 200_000))
        finally:
            await close_stdlib(writer)


async def test_stdlib_client_with_rsa_client_certificate(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    client = ca.issue("client", [CLIENT_URI], server=False, key_type="rsa-2048")
    ctx = stdlib_client_context(tmp_path, ca, client, "X25519")
    async with qkdproxy_echo_server(ca, "ecdsa-p256") as server:
        reader, writer = await stdlib_connect(server.port, ctx)
        try:
            stream = await server.next_result()
            assert isinstance(stream, TlsStream), stream
            assert stream.peer.uris == (CLIENT_URI,)
            await echo_through(reader, writer, (123,))
        finally:
            await close_stdlib(writer)


async def expect_refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The client learns of the refusal when it reads: an SSL error, a reset, or EOF."""
    try:
        data = await deadline(reader.read(100))
    except (ssl.SSLError, ConnectionError):
        pass
    else:
        assert data == b""
    await close_stdlib(writer)


async def test_stdlib_client_without_certificate_is_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    ctx = stdlib_client_context(tmp_path, ca, None, "X25519")
    async with qkdproxy_echo_server(ca, "ecdsa-p256") as server:
        try:
            # TLS 1.3: the client finishes its side before the server has checked it.
            reader, writer = await stdlib_connect(server.port, ctx)
        except (ssl.SSLError, ConnectionError):
            writer = None
        error = await server.next_result()
        assert isinstance(error, HandshakeError), error
        assert error.alert == Alert.CERTIFICATE_REQUIRED
        assert not error.remote
        if writer is not None:
            await expect_refused(reader, writer)


async def test_stdlib_client_outside_allow_list_is_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    intruder = ca.issue("intruder", ["spiffe://qkdproxy.test/intruder"], server=False)
    ctx = stdlib_client_context(tmp_path, ca, intruder, "X25519")
    async with qkdproxy_echo_server(ca, "ecdsa-p256") as server:
        try:
            reader, writer = await stdlib_connect(server.port, ctx)
        except (ssl.SSLError, ConnectionError):
            writer = None
        error = await server.next_result()
        assert isinstance(error, HandshakeError), error
        assert error.alert == Alert.ACCESS_DENIED
        if writer is not None:
            await expect_refused(reader, writer)


def blocking_handshake(port: int, ctx: ssl.SSLContext) -> ssl.SSLError | None:
    """A blocking stdlib handshake (it flushes its fatal alert, unlike asyncio's SSL)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        try:
            ctx.wrap_socket(raw, server_hostname=SERVER_NAME).close()
        except ssl.SSLError as exc:
            return exc
    return None


async def test_stdlib_client_rejects_server_from_unknown_ca(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The stdlib client checks the qkdproxy server's chain; the server hears its alert."""
    ctx = stdlib_client_context(
        tmp_path, CertificateAuthority.create("stranger"), client_credentials(ca), "X25519"
    )
    async with qkdproxy_echo_server(ca, "ecdsa-p256") as server:
        client_error = await deadline(asyncio.to_thread(blocking_handshake, server.port, ctx))
        assert isinstance(client_error, ssl.SSLCertVerificationError), client_error
        error = await server.next_result()
        assert isinstance(error, HandshakeError), error
        assert error.remote
        assert error.alert == Alert.UNKNOWN_CA


# ------------------------------------------------------- qkdproxy client -> stdlib


@dataclass
class StdlibServer:
    port: int
    peercerts: list[dict[str, object] | None]


@asynccontextmanager
async def stdlib_echo_server(
    tmp_path: Path, ca: CertificateAuthority, names: list[str], *, require_client_cert: bool
) -> AsyncIterator[StdlibServer]:
    """An OpenSSL TLS 1.3 echo server (x25519 only) behind asyncio's SSL transport."""
    creds = ca.issue("stdlib server", names, client=False)
    cert, key = write_pems(tmp_path, "stdlib-server", creds)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    if require_client_cert:
        ctx.load_verify_locations(cafile=ca_file(tmp_path, ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_ecdh_curve("X25519")
    peercerts: list[dict[str, object] | None] = []
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        peercerts.append(writer.get_extra_info("peercert"))
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            await close_stdlib(writer)

    listener = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=ctx, ssl_handshake_timeout=DEADLINE
    )
    try:
        yield StdlibServer(listener.sockets[0].getsockname()[1], peercerts)
    finally:
        listener.close()
        await listener.wait_closed()
        if handlers:
            await deadline(asyncio.gather(*handlers))


def qkdproxy_client(ca: CertificateAuthority) -> TlsEndpoint:
    policy = PeerPolicy((ca.certificate,), AllowList.of([f"dns:{SERVER_NAME}"]), SERVER_NAME)
    keys = KeyContext(InProcessQkdLink().sources("a"))
    return TlsEndpoint(EndpointSettings(client_credentials(ca), policy, groups("x25519"), keys))


async def qkdproxy_echo(stream: TlsStream, size: int) -> None:
    payload = os.urandom(size)
    received = bytearray()

    async def collect() -> None:
        while len(received) < size:
            chunk = await stream.read()
            assert chunk, f"EOF after {len(received)} of {size} bytes"
            received.extend(chunk)

    await deadline(asyncio.gather(stream.write(payload), collect()))
    assert bytes(received) == payload


async def check_qkdproxy_client_echo(
    ca: CertificateAuthority, tmp_path: Path, *, require_client_cert: bool
) -> StdlibServer:
    async with stdlib_echo_server(
        tmp_path, ca, [SERVER_NAME], require_client_cert=require_client_cert
    ) as server:
        reader, writer = await deadline(asyncio.open_connection("127.0.0.1", server.port))
        stream = await deadline(qkdproxy_client(ca).connect(reader, writer))
        try:
            assert stream.record.group == "x25519"
            assert stream.peer.dns_names == (SERVER_NAME,)
            assert stream.peer.common_name == "stdlib server"
            assert stream.cipher
            for size in (1, 16384, 16385, 300_000):
                await qkdproxy_echo(stream, size)
        finally:
            await deadline(stream.close())
    assert len(server.peercerts) == 1
    return server


async def test_qkdproxy_client_against_stdlib_server_without_client_auth(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    server = await check_qkdproxy_client_echo(ca, tmp_path, require_client_cert=False)
    assert not server.peercerts[0]


async def test_qkdproxy_client_against_stdlib_server_requiring_client_cert(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    server = await check_qkdproxy_client_echo(ca, tmp_path, require_client_cert=True)
    peercert = server.peercerts[0]
    assert peercert is not None
    assert ("URI", CLIENT_URI) in peercert["subjectAltName"]  # type: ignore[operator]


@pytest.mark.parametrize("require_client_cert", [False, True])
async def test_qkdproxy_client_rejects_stdlib_server_with_wrong_name(
    ca: CertificateAuthority, tmp_path: Path, require_client_cert: bool
) -> None:
    async with stdlib_echo_server(
        tmp_path, ca, ["wrong.qkdproxy.test"], require_client_cert=require_client_cert
    ) as server:
        reader, writer = await deadline(asyncio.open_connection("127.0.0.1", server.port))
        with pytest.raises(HandshakeError) as info:
            await deadline(qkdproxy_client(ca).connect(reader, writer))
        assert info.value.alert == Alert.BAD_CERTIFICATE
        assert info.value.alert == 42
        assert not info.value.remote
        assert "subjectAltName" in info.value.reason
    assert server.peercerts == []
