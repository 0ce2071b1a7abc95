"""The native engine (named explicitly, not by default) against a modern OpenSSL (pyOpenSSL
on the OpenSSL in `cryptography`), in both roles, where the other interop suites do not
reach: RSA-PSS and P-384 identities both ways, each TLS 1.3 suite (the SHA-256 key
schedule of AES-128-GCM and ChaCha20 included), and HelloRetryRequest with mutual TLS on
those identities.

Both roles always authenticate with certificates; each test moves data both ways."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import socket
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib

from qkdproxy.core.tls.connection import TlsConnection
from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.engine import DEFAULT_ENGINE
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.io.tls_stream import EndpointSettings, HandshakeError, TlsEndpoint, TlsStream
from qkdproxy.keys.context import KeyContext
from qkdproxy.sim.inprocess import InProcessQkdLink
from qkdproxy.sim.pki import CertificateAuthority, KeyType
from tests.conftest import groups
from tests.integration.test_interop_openssl import (
    PeerResult,
    close_cleanly,
    complete,
    recv_exactly,
)
from tests.integration.test_interop_stdlib import (
    CLIENT_URI,
    SERVER_NAME,
    ca_file,
    deadline,
    write_pems,
)

PAYLOAD = 100_000
SUITE_NAMES = {
    "TLS_AES_256_GCM_SHA384": "aes256gcm",
    "TLS_AES_128_GCM_SHA256": "aes128gcm",
    "TLS_CHACHA20_POLY1305_SHA256": "chacha20-poly1305",
}


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    key_type: KeyType

    def issue(self, who: str) -> Credentials:
        if who == "client":
            return self.ca.issue("client", [CLIENT_URI], server=False, key_type=self.key_type)
        return self.ca.issue(who, [SERVER_NAME], client=False, key_type=self.key_type)


@pytest.fixture(scope="module", params=["rsa-2048", "ecdsa-p384"])
def pki(request: pytest.FixtureRequest) -> Pki:
    """A CA and leaves of one key type (the CA signs with the same kind of key)."""
    return Pki(CertificateAuthority.create(key_type=request.param), request.param)


def openssl_context(
    tmp_path: Path,
    pki: Pki,
    *,
    server: bool,
    group_list: str,
    suites: str | None = None,
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.load_verify_locations(str(ca_file(tmp_path, pki.ca)))
    flags = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if server else 0)
    ctx.set_verify(flags, None)
    stem = "openssl-server" if server else "openssl-client"
    cert, key = write_pems(tmp_path, stem, pki.issue("openssl server" if server else "client"))
    ctx.use_certificate_chain_file(str(cert))
    ctx.use_privatekey_file(str(key))
    assert lib.SSL_CTX_set1_curves_list(ctx._context, group_list.encode()) == 1
    if suites is not None:
        assert lib.SSL_CTX_set_ciphersuites(ctx._context, suites.encode()) == 1
    return ctx


def echo_with(conn: SSL.Connection, result: PeerResult) -> None:
    """Send PAYLOAD random bytes, read them back, close."""
    complete(conn, conn.do_handshake)
    result.group = conn.get_group_name()
    payload = os.urandom(PAYLOAD)
    complete(conn, partial(conn.sendall, payload))
    assert recv_exactly(conn, PAYLOAD) == payload
    result.peer_uri = conn.get_cipher_name()  # the suite, for the test to compare
    close_cleanly(conn)


def openssl_client(port: int, ctx: SSL.Context, result: PeerResult) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(SERVER_NAME.encode())
        conn.set_connect_state()
        try:
            echo_with(conn, result)
        except BaseException as exc:
            result.error = exc


def openssl_echo_server(listener: socket.socket, ctx: SSL.Context, result: PeerResult) -> None:
    raw, _ = listener.accept()
    raw.settimeout(30)
    conn = SSL.Connection(ctx, raw)
    conn.set_accept_state()
    try:
        complete(conn, conn.do_handshake)
        result.group = conn.get_group_name()
        result.peer_uri = conn.get_cipher_name()
        received = recv_exactly(conn, PAYLOAD)
        complete(conn, partial(conn.sendall, received))
        close_cleanly(conn)
    except BaseException as exc:
        result.error = exc
    finally:
        raw.close()


def native_settings(pki: Pki, who: str, group_names: tuple[str, ...]) -> EndpointSettings:
    if who == "client":
        policy = PeerPolicy(
            (pki.ca.certificate,), AllowList.of([f"dns:{SERVER_NAME}"]), SERVER_NAME
        )
    else:
        policy = PeerPolicy((pki.ca.certificate,), AllowList.of([f"uri:{CLIENT_URI}"]))
    keys = KeyContext(InProcessQkdLink().sources("a" if who == "client" else "b"))
    return EndpointSettings(pki.issue(who), policy, groups(*group_names), keys, tls_engine="native")


@asynccontextmanager
async def native_echo_server(
    pki: Pki, group_names: tuple[str, ...]
) -> AsyncIterator[tuple[int, asyncio.Queue[TlsStream | HandshakeError]]]:
    endpoint = TlsEndpoint(native_settings(pki, "server", group_names))
    results: asyncio.Queue[TlsStream | HandshakeError] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            stream = await endpoint.accept(reader, writer)
        except HandshakeError as exc:
            results.put_nowait(exc)
            return
        results.put_nowait(stream)
        try:
            while data := await stream.read():
                await stream.write(data)
        finally:
            await stream.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], results
    finally:
        listener.close()
        await listener.wait_closed()
        if tasks:
            await deadline(asyncio.gather(*tasks))


async def openssl_to_native(
    tmp_path: Path, pki: Pki, server_groups: tuple[str, ...], ctx: SSL.Context
) -> tuple[TlsStream, PeerResult]:
    result = PeerResult()
    async with native_echo_server(pki, server_groups) as (port, results):
        await deadline(asyncio.to_thread(openssl_client, port, ctx, result), 40)
        stream = await deadline(results.get())
    assert result.error is None, repr(result.error)
    assert isinstance(stream, TlsStream), stream
    return stream, result


async def native_to_openssl(
    pki: Pki, client_groups: tuple[str, ...], ctx: SSL.Context
) -> tuple[TlsStream, PeerResult]:
    result = PeerResult()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        thread = threading.Thread(target=openssl_echo_server, args=(listener, ctx, result))
        thread.start()
        try:
            endpoint = TlsEndpoint(native_settings(pki, "client", client_groups))
            port = listener.getsockname()[1]
            reader, writer = await deadline(asyncio.open_connection("127.0.0.1", port))
            stream = await deadline(endpoint.connect(reader, writer))
            payload = os.urandom(PAYLOAD)
            await stream.write(payload)
            received = bytearray()
            while len(received) < PAYLOAD:
                chunk = await deadline(stream.read())
                assert chunk, "EOF from the OpenSSL server"
                received += chunk
            assert bytes(received) == payload
            await deadline(stream.close())
        finally:
            await deadline(asyncio.to_thread(thread.join), 40)
    assert result.error is None, repr(result.error)
    return stream, result


@pytest.mark.parametrize("suite", list(SUITE_NAMES))
async def test_openssl_client_each_suite(tmp_path: Path, pki: Pki, suite: str) -> None:
    ctx = openssl_context(tmp_path, pki, server=False, group_list="x25519", suites=suite)
    stream, result = await openssl_to_native(tmp_path, pki, ("x25519",), ctx)
    assert stream.cipher == SUITE_NAMES[suite] and result.peer_uri == suite
    assert stream.peer.uris == (CLIENT_URI,)


@pytest.mark.parametrize("suite", list(SUITE_NAMES))
async def test_openssl_server_each_suite(tmp_path: Path, pki: Pki, suite: str) -> None:
    ctx = openssl_context(tmp_path, pki, server=True, group_list="x25519", suites=suite)
    stream, result = await native_to_openssl(pki, ("x25519",), ctx)
    assert stream.cipher == SUITE_NAMES[suite] and result.peer_uri == suite
    assert stream.peer.dns_names == (SERVER_NAME,)


async def test_hello_retry_with_mutual_tls_openssl_client(tmp_path: Path, pki: Pki) -> None:
    """OpenSSL's share is for x25519; the native server wants secp384r1 (and retries),
    then checks OpenSSL's certificate."""
    ctx = openssl_context(tmp_path, pki, server=False, group_list="x25519:secp384r1")
    stream, result = await openssl_to_native(tmp_path, pki, ("secp384r1",), ctx)
    assert stream.record.hello_retry and stream.record.group == "secp384r1"
    assert result.group is not None and result.group.lower() == "secp384r1"


async def test_hello_retry_with_mutual_tls_openssl_server(tmp_path: Path, pki: Pki) -> None:
    ctx = openssl_context(tmp_path, pki, server=True, group_list="secp384r1")
    stream, result = await native_to_openssl(pki, ("x25519", "secp384r1"), ctx)
    assert stream.record.hello_retry and stream.record.group == "secp384r1"
    assert result.group is not None and result.group.lower() == "secp384r1"


def test_the_other_interop_suites_run_the_native_engine() -> None:
    """test_interop_openssl and test_interop_stdlib build endpoints with the default
    engine: it must be the native one for them to test it."""
    fields = {f.name: f.default for f in dataclasses.fields(EndpointSettings)}
    assert fields["tls_engine"] == DEFAULT_ENGINE == "native"


async def test_no_handshake_state_outlives_the_handshake(
    monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    """The engines keep the main secret and the first traffic secrets until they are
    dropped; the stream driver keeps only the record layer, so once a stream is up no
    TlsConnection (engine, key schedule, first-generation keys) is reachable."""
    alive: list[weakref.ref[TlsConnection]] = []
    original = TlsConnection.__init__

    def tracked(self: TlsConnection, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        alive.append(weakref.ref(self))

    monkeypatch.setattr(TlsConnection, "__init__", tracked)
    async with native_echo_server(pki, ("x25519",)) as (port, results):
        endpoint = TlsEndpoint(native_settings(pki, "client", ("x25519",)))
        reader, writer = await deadline(asyncio.open_connection("127.0.0.1", port))
        stream = await deadline(endpoint.connect(reader, writer))
        served = await deadline(results.get())
        await stream.write(b"ping")
        assert await deadline(stream.read()) == b"ping"
        gc.collect()
        assert len(alive) == 2 and all(ref() is None for ref in alive)
        await deadline(stream.close())
    assert isinstance(served, TlsStream)
