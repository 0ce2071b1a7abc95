"""Interop with a modern TLS 1.3 stack: pyOpenSSL on the OpenSSL bundled with `cryptography`.

The system OpenSSL (3.0) predates ML-KEM and RFC 8879 certificate compression; the one inside
`cryptography` wheels is 3.5 or newer. It runs here in a thread with blocking sockets, as
client against a qkdproxy server and as server for a qkdproxy client: every standard group
both support, mutual TLS, HelloRetryRequest, KeyUpdate (sent by qkdproxy, and sent by OpenSSL
when asked), 1 MiB each way.
A message callback records the handshake messages OpenSSL saw, so the CertificateRequest's
extensions can be checked byte for byte (RFC 8879: compress_certificate never empty).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.backends.openssl.backend import backend
from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from tlslite.constants import KeyUpdateMessageType

from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.io.tls_stream import EndpointSettings, HandshakeError, TlsEndpoint, TlsStream
from qkdproxy.keys.context import KeyContext
from qkdproxy.sim.inprocess import InProcessQkdLink
from qkdproxy.sim.pki import CertificateAuthority
from tests.conftest import available_group_names, groups
from tests.integration.test_interop_stdlib import (
    CLIENT_URI,
    SERVER_NAME,
    ca_file,
    client_credentials,
    deadline,
    write_pems,
)

MIB = 1 << 20
CHUNK = 64 * 1024
# qkdproxy sends a KeyUpdate after every this many bytes (several per MiB).
REKEY_EVERY = 256 * 1024
HANDSHAKE = 22
CERTIFICATE_REQUEST, KEY_UPDATE = 13, 24
COMPRESS_CERTIFICATE = 27

# qkdproxy group name -> OpenSSL's name, for the standard groups both implement.
STANDARD_GROUPS = {
    "X25519MLKEM768": "X25519MLKEM768",
    "SecP256r1MLKEM768": "SecP256r1MLKEM768",
    "SecP384r1MLKEM1024": "SecP384r1MLKEM1024",
    "MLKEM768": "MLKEM768",
    "MLKEM1024": "MLKEM1024",
    "x25519": "X25519",
    "secp256r1": "secp256r1",
    "secp384r1": "secp384r1",
}
COMMON_GROUPS = [g for g in STANDARD_GROUPS if g in available_group_names()]


def openssl_version() -> tuple[int, int]:
    major, minor = backend.openssl_version_text().split()[1].split(".")[:2]
    return int(major), int(minor)


def test_peer_is_a_modern_openssl() -> None:
    """The point of this suite: a peer that parses RFC 8879 and speaks ML-KEM."""
    assert openssl_version() >= (3, 2), backend.openssl_version_text()
    assert {"X25519MLKEM768", "x25519", "secp256r1"} <= set(COMMON_GROUPS)


# ------------------------------------------------------------------- the OpenSSL peer


@dataclass
class Seen:
    """Handshake messages the OpenSSL peer received and sent (type, body), via its message
    callback."""

    received: list[tuple[int, bytes]] = field(default_factory=list)
    sent: list[tuple[int, bytes]] = field(default_factory=list)

    def bodies(self, msg_type: int) -> list[bytes]:
        return [body for t, body in self.received if t == msg_type]


def openssl_context(
    tmp_path: Path,
    ca: CertificateAuthority,
    *,
    server: bool,
    group_list: str | None,
    seen: Seen,
    client_cert: bool = True,
) -> tuple[SSL.Context, Any]:
    """A TLS 1.3-only context; also returns the callback handle, which must stay alive."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.load_verify_locations(str(ca_file(tmp_path, ca)))
    if server:
        creds = ca.issue("openssl server", [SERVER_NAME], client=False)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, None)
    else:
        creds = client_credentials(ca)
        ctx.set_verify(SSL.VERIFY_PEER, None)
    if server or client_cert:
        cert, key = write_pems(tmp_path, "openssl-server" if server else "openssl-client", creds)
        ctx.use_certificate_chain_file(str(cert))
        ctx.use_privatekey_file(str(key))
    if group_list is not None:
        # pyOpenSSL has no set_groups; SSL_CTX_set1_curves_list is SSL_CTX_set1_groups_list.
        assert lib.SSL_CTX_set1_curves_list(ctx._context, group_list.encode()) == 1

    def on_message(write_p: int, _v: int, ctype: int, buf: Any, size: int, *_: Any) -> None:
        data = bytes(ffi.buffer(buf, size))
        if ctype == HANDSHAKE and len(data) >= 4:
            (seen.sent if write_p else seen.received).append((data[0], data[4:]))

    callback = ffi.callback("void(int, int, int, void *, size_t, SSL *, void *)")(on_message)
    lib.SSL_CTX_set_msg_callback(ctx._context, callback)
    return ctx, callback


def complete(conn: SSL.Connection, action: Callable[[], Any]) -> Any:
    """Run a pyOpenSSL call on a blocking socket (it still asks to retry after KeyUpdate)."""
    while True:
        try:
            return action()
        except (SSL.WantReadError, SSL.WantWriteError):
            continue


def recv_exactly(conn: SSL.Connection, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += complete(conn, partial(conn.recv, min(CHUNK, size - len(data))))
    return bytes(data)


def close_cleanly(conn: SSL.Connection) -> None:
    """close_notify, then read up to the peer's (closing with unread bytes would reset)."""
    with suppress(SSL.Error):
        conn.shutdown()
    with suppress(SSL.ZeroReturnError, SSL.SysCallError):
        while complete(conn, partial(conn.recv, CHUNK)):
            pass


@dataclass
class PeerResult:
    group: str | None = None
    peer_uri: str | None = None
    error: BaseException | None = None


def openssl_client_run(port: int, ctx: SSL.Context, total: int, result: PeerResult) -> None:
    """Connect, then send ``total`` random bytes in chunks, each read back before the next."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(SERVER_NAME.encode())
        conn.set_connect_state()
        try:
            complete(conn, conn.do_handshake)
            result.group = conn.get_group_name()
            for start in range(0, total, CHUNK):
                payload = os.urandom(min(CHUNK, total - start))
                complete(conn, partial(conn.sendall, payload))
                assert recv_exactly(conn, len(payload)) == payload, f"echo differs at {start}"
            close_cleanly(conn)
        except BaseException as exc:
            result.error = exc


# ---------------------------------------------------------- OpenSSL -> qkdproxy server


@asynccontextmanager
async def qkdproxy_server(
    ca: CertificateAuthority, group_names: tuple[str, ...]
) -> AsyncIterator[tuple[int, asyncio.Queue[TlsStream | HandshakeError]]]:
    """A qkdproxy echo server that sends a KeyUpdate every REKEY_EVERY bytes it echoes."""
    credentials = ca.issue("server", [SERVER_NAME, "127.0.0.1"], client=False)
    policy = PeerPolicy((ca.certificate,), AllowList.of([f"uri:{CLIENT_URI}"]))
    keys = KeyContext(InProcessQkdLink().sources("b"))
    endpoint = TlsEndpoint(EndpointSettings(credentials, policy, groups(*group_names), keys))
    results: asyncio.Queue[TlsStream | HandshakeError] = asyncio.Queue()
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            stream = await endpoint.accept(reader, writer)
        except HandshakeError as exc:
            results.put_nowait(exc)
            return
        results.put_nowait(stream)
        echoed = 0
        try:
            while data := await stream.read():
                await stream.write(data)
                echoed += len(data)
                if echoed >= REKEY_EVERY:
                    echoed = 0
                    await stream.update_keys()
        finally:
            await stream.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], results
    finally:
        listener.close()
        await listener.wait_closed()
        if handlers:
            await deadline(asyncio.gather(*handlers))


async def run_openssl_client(
    tmp_path: Path,
    ca: CertificateAuthority,
    server_groups: tuple[str, ...],
    client_groups: str | None,
) -> tuple[TlsStream, PeerResult, Seen]:
    seen, result = Seen(), PeerResult()
    ctx, _keep = openssl_context(tmp_path, ca, server=False, group_list=client_groups, seen=seen)
    async with qkdproxy_server(ca, server_groups) as (port, results):
        await deadline(asyncio.to_thread(openssl_client_run, port, ctx, MIB, result), 60)
        stream = await deadline(results.get())
    assert result.error is None, repr(result.error)
    assert isinstance(stream, TlsStream), stream
    return stream, result, seen


def assert_certificate_request_well_formed(seen: Seen) -> None:
    """RFC 8879: compress_certificate, when present, lists 1..127 algorithms."""
    [body] = seen.bodies(CERTIFICATE_REQUEST)
    context_len = body[0]
    extensions = body[1 + context_len + 2 :]
    while extensions:
        ext_type = int.from_bytes(extensions[:2], "big")
        size = int.from_bytes(extensions[2:4], "big")
        data = extensions[4 : 4 + size]
        if ext_type == COMPRESS_CERTIFICATE:
            assert size >= 3 and data[0] >= 2, f"malformed compress_certificate {data.hex()}"
        extensions = extensions[4 + size :]


@pytest.mark.parametrize("group", COMMON_GROUPS)
async def test_openssl_client_per_group(
    ca: CertificateAuthority, tmp_path: Path, group: str
) -> None:
    stream, result, seen = await run_openssl_client(tmp_path, ca, (group,), STANDARD_GROUPS[group])
    assert stream.record.group == group
    assert not stream.record.hello_retry
    assert stream.peer.uris == (CLIENT_URI,)
    assert result.group is not None
    assert result.group.lower() == STANDARD_GROUPS[group].lower()
    assert_certificate_request_well_formed(seen)
    # 1 MiB echoed: the server rekeyed every 256 KiB and OpenSSL followed each time.
    assert len(seen.bodies(KEY_UPDATE)) == MIB // REKEY_EVERY


async def test_openssl_client_default_groups_get_x25519mlkem768(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """OpenSSL's defaults (3.5+) send an X25519MLKEM768 share: no retry needed."""
    stream, result, _ = await run_openssl_client(
        tmp_path, ca, ("X25519MLKEM768", "x25519", "secp256r1"), None
    )
    assert stream.record.group == result.group == "X25519MLKEM768"
    assert not stream.record.hello_retry


@pytest.mark.parametrize("server_group", ["secp256r1", "secp384r1"])
async def test_openssl_client_hello_retry(
    ca: CertificateAuthority, tmp_path: Path, server_group: str
) -> None:
    """OpenSSL sends shares for X25519MLKEM768 and X25519; a server without them retries."""
    stream, result, _ = await run_openssl_client(tmp_path, ca, (server_group,), None)
    assert stream.record.hello_retry
    assert stream.record.group == server_group
    assert result.group is not None and result.group.lower() == server_group.lower()


async def test_openssl_client_without_certificate_is_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    seen, result = Seen(), PeerResult()
    ctx, _keep = openssl_context(
        tmp_path, ca, server=False, group_list="X25519MLKEM768", seen=seen, client_cert=False
    )
    async with qkdproxy_server(ca, ("X25519MLKEM768",)) as (port, results):
        await deadline(asyncio.to_thread(openssl_client_run, port, ctx, 10, result))
        error = await deadline(results.get())
    assert isinstance(error, HandshakeError), error
    assert result.error is not None
    assert_certificate_request_well_formed(seen)


# ---------------------------------------------------------- qkdproxy client -> OpenSSL


@dataclass
class OpenSslServer:
    port: int
    seen: Seen
    result: PeerResult


def openssl_serve_one(listener: socket.socket, ctx: SSL.Context, result: PeerResult) -> None:
    """Accept one connection, handshake, echo until the peer closes."""
    raw, _ = listener.accept()
    raw.settimeout(30)
    conn = SSL.Connection(ctx, raw)
    conn.set_accept_state()
    try:
        complete(conn, conn.do_handshake)
        result.group = conn.get_group_name()
        peer = conn.get_peer_certificate()
        assert peer is not None
        result.peer_uri = peer.to_cryptography().subject.rfc4514_string()
        while True:
            try:
                data = complete(conn, partial(conn.recv, CHUNK))
            except SSL.ZeroReturnError:
                break
            complete(conn, partial(conn.sendall, data))
        with suppress(SSL.Error):
            conn.shutdown()
    except BaseException as exc:
        result.error = exc
    finally:
        raw.close()


@asynccontextmanager
async def openssl_server(
    tmp_path: Path, ca: CertificateAuthority, group_list: str
) -> AsyncIterator[OpenSslServer]:
    seen, result = Seen(), PeerResult()
    ctx, keep = openssl_context(tmp_path, ca, server=True, group_list=group_list, seen=seen)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        thread = threading.Thread(target=openssl_serve_one, args=(listener, ctx, result))
        thread.start()
        try:
            yield OpenSslServer(listener.getsockname()[1], seen, result)
        finally:
            await deadline(asyncio.to_thread(thread.join), 40)
    del keep


async def qkdproxy_client_exchange(
    ca: CertificateAuthority,
    port: int,
    client_groups: tuple[str, ...],
    update: KeyUpdateMessageType = KeyUpdateMessageType.update_not_requested,
) -> TlsStream:
    """Connect and push 1 MiB through the echo, chunk by chunk, with a KeyUpdate every
    REKEY_EVERY bytes (``update_requested``: the peer must answer with its own)."""
    policy = PeerPolicy((ca.certificate,), AllowList.of([f"dns:{SERVER_NAME}"]), SERVER_NAME)
    keys = KeyContext(InProcessQkdLink().sources("a"))
    endpoint = TlsEndpoint(
        EndpointSettings(client_credentials(ca), policy, groups(*client_groups), keys)
    )
    reader, writer = await deadline(asyncio.open_connection("127.0.0.1", port))
    stream = await deadline(endpoint.connect(reader, writer))
    try:
        for start in range(0, MIB, CHUNK):
            payload = os.urandom(CHUNK)
            await stream.write(payload)
            received = bytearray()
            while len(received) < CHUNK:
                chunk = await deadline(stream.read())
                assert chunk, "EOF from the OpenSSL server"
                received += chunk
            assert bytes(received) == payload
            if (start + CHUNK) % REKEY_EVERY == 0:
                if update == KeyUpdateMessageType.update_not_requested:
                    await stream.update_keys()
                else:
                    # Not something qkdproxy does on its own: here it makes OpenSSL update
                    # its sending keys, so qkdproxy's reading side must follow a peer's.
                    await stream.update_keys(request_peer=True)
    finally:
        await deadline(stream.close())
    return stream


async def run_qkdproxy_client(
    tmp_path: Path,
    ca: CertificateAuthority,
    client_groups: tuple[str, ...],
    server_groups: str,
    update: KeyUpdateMessageType = KeyUpdateMessageType.update_not_requested,
) -> tuple[TlsStream, OpenSslServer]:
    async with openssl_server(tmp_path, ca, server_groups) as server:
        stream = await qkdproxy_client_exchange(ca, server.port, client_groups, update)
    assert server.result.error is None, repr(server.result.error)
    return stream, server


@pytest.mark.parametrize("group", COMMON_GROUPS)
async def test_qkdproxy_client_per_group(
    ca: CertificateAuthority, tmp_path: Path, group: str
) -> None:
    stream, server = await run_qkdproxy_client(tmp_path, ca, (group,), STANDARD_GROUPS[group])
    assert stream.record.group == group
    assert not stream.record.hello_retry
    assert stream.peer.dns_names == (SERVER_NAME,)
    assert server.result.group is not None
    assert server.result.group.lower() == STANDARD_GROUPS[group].lower()
    assert server.result.peer_uri == "CN=client"
    assert len(server.seen.bodies(KEY_UPDATE)) == MIB // REKEY_EVERY


@pytest.mark.parametrize(
    ("client_groups", "server_group"),
    [
        (("X25519MLKEM768", "secp256r1"), "secp256r1"),
        (("x25519", "X25519MLKEM768"), "X25519MLKEM768"),
    ],
)
async def test_qkdproxy_client_hello_retry(
    ca: CertificateAuthority, tmp_path: Path, client_groups: tuple[str, str], server_group: str
) -> None:
    """qkdproxy sends one share (its first group); the OpenSSL server asks for its own."""
    stream, server = await run_qkdproxy_client(
        tmp_path, ca, client_groups, STANDARD_GROUPS[server_group]
    )
    assert stream.record.hello_retry
    assert stream.record.group == server_group
    assert server.result.group is not None
    assert server.result.group.lower() == server_group.lower()


async def test_qkdproxy_follows_keyupdates_sent_by_openssl(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """OpenSSL answers KeyUpdate(update_requested) with its own KeyUpdate: qkdproxy's reading
    side switches keys mid-stream and the echo stays intact."""
    _, server = await run_qkdproxy_client(
        tmp_path, ca, ("X25519MLKEM768",), "X25519MLKEM768",
        KeyUpdateMessageType.update_requested,
    )  # fmt: skip
    rounds = MIB // REKEY_EVERY
    assert server.seen.bodies(KEY_UPDATE) == [b"\x01"] * rounds
    # OpenSSL answers when it next sends data: the last request, after the last echo, is
    # followed by close_notify only.
    answers = [b for t, b in server.seen.sent if t == KEY_UPDATE]
    assert answers in ([b"\x00"] * (rounds - 1), [b"\x00"] * rounds)
