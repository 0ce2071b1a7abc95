"""Tunnels in one process (real sockets, real KME simulator): rekey, PROXY v2, reload."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qkdproxy.core.proxyv2 import (
    PP2_TYPE_QKDPROXY_GROUP,
    PP2_TYPE_QKDPROXY_PEER,
    PP2_TYPE_SSL,
    SIGNATURE,
    ProxyInfo,
    encode_proxy_v2,
)
from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.core.tls.wire import Alert
from qkdproxy.daemon import tunnel as runtime
from qkdproxy.daemon.app import Daemon
from qkdproxy.daemon.config import load_config
from qkdproxy.daemon.tunnel import ConnectionRecord
from qkdproxy.io.tls_stream import HandshakeError
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.certs import KMES, write_dev_pki


@dataclass
class Backend:
    """Echoes, and keeps the first bytes of every connection (for PROXY headers)."""

    strip_proxy_header: bool = False
    heads: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.strip_proxy_header:
                fixed = await reader.readexactly(16)
                rest = await reader.readexactly(struct.unpack("!H", fixed[14:16])[0])
                self.heads.append(fixed + rest)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def kme_table(pair: KmePair, side: int, sae: str, peer: str) -> str:
    return f"""
[kme.local]
url = "{pair.urls_014[side]}"
sae_id = "{sae}"
peer_sae_id = "{peer}"
cert = "pki/{sae}.pem"
key = "pki/{sae}-key.pem"
ca = "pki/ca.pem"
"""


@dataclass
class Setup:
    base: Path
    pair: KmePair
    backend: Backend
    backend_port: int
    records: list[ConnectionRecord] = field(default_factory=list)

    def server_toml(
        self, extra: str = "", allow: str = "uri:spiffe://qkdproxy.test/tunnel/client"
    ) -> str:
        return (
            kme_table(self.pair, 1, "sae-b", "sae-a")
            + f"""
[[tunnel]]
name = "t"
role = "server"
listen = "127.0.0.1:0"
connect = "127.0.0.1:{self.backend_port}"
cert = "pki/tunnel-server.pem"
key = "pki/tunnel-server-key.pem"
ca = "pki/ca.pem"
allow = ["{allow}"]
kme = "local"
{extra}
"""
        )

    def client_toml(self, server_port: int, extra: str = "") -> str:
        return (
            kme_table(self.pair, 0, "sae-a", "sae-b")
            + f"""
[[tunnel]]
name = "t"
role = "client"
listen = "127.0.0.1:0"
connect = "127.0.0.1:{server_port}"
server_name = "server.qkdproxy.test"
cert = "pki/tunnel-client.pem"
key = "pki/tunnel-client-key.pem"
ca = "pki/ca.pem"
kme = "local"
{extra}
"""
        )

    @asynccontextmanager
    async def daemon(self, name: str, text: str) -> AsyncIterator[Daemon]:
        path = self.base / f"{name}.toml"
        path.write_text(text)
        daemon = Daemon(load_config(path), on_close=self.records.append)
        await daemon.start()
        try:
            yield daemon
        finally:
            await daemon.close()


@asynccontextmanager
async def setup(tmp_path: Path, backend: Backend | None = None) -> AsyncIterator[Setup]:
    write_dev_pki(tmp_path / "pki")
    anchors = load_trust_anchors(tmp_path / "pki/ca.pem")
    creds = [
        Credentials.load(tmp_path / f"pki/{k}.pem", tmp_path / f"pki/{k}-key.pem") for k in KMES
    ]
    pair = KmePair(SimulatorSettings(), creds, anchors)
    backend = backend or Backend()
    async with AsyncExitStack() as stack:
        await pair.start()
        stack.push_async_callback(pair.stop)
        server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
        stack.callback(server.close)
        yield Setup(tmp_path, pair, backend, server.sockets[0].getsockname()[1])


def port(daemon: Daemon) -> int:
    return int(daemon.tunnels[0].bound()[0].rsplit(":", 1)[1])


async def transfer(client_port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", client_port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    received = bytearray()
    while data := await asyncio.wait_for(reader.read(65536), 20):
        received += data
    writer.close()
    return bytes(received)


async def test_long_flows_get_fresh_keys(tmp_path: Path) -> None:
    async with setup(tmp_path) as s, s.daemon("server", s.server_toml()) as server:
        text = s.client_toml(port(server), "rekey_bytes = 65536")
        async with s.daemon("client", text) as client:
            payload = os.urandom(1 << 20)
            assert (
                hashlib.sha256(await transfer(port(client), payload)).digest()
                == hashlib.sha256(payload).digest()
            )
            await asyncio.wait_for(client.tunnels[0].wait_idle(), 10)
            await asyncio.wait_for(server.tunnels[0].wait_idle(), 10)
    client_record = next(r for r in s.records if r.role == "client")
    assert client_record.key_updates >= 10
    assert client_record.reason == "closed"


async def test_proxy_protocol_v2_tells_the_backend_who_came(tmp_path: Path) -> None:
    backend = Backend(strip_proxy_header=True)
    async with (
        setup(tmp_path, backend) as s,
        s.daemon("server", s.server_toml("proxy_protocol = true")) as server,
        s.daemon("client", s.client_toml(port(server))) as client,
    ):
        assert await transfer(port(client), b"after the header") == b"after the header"
    [head] = backend.heads
    assert head.startswith(SIGNATURE) and head[12] == 0x21 and head[13] == 0x11
    assert ipaddress.ip_address(head[16:20]) == ipaddress.ip_address("127.0.0.1")
    tlvs = parse_tlvs(head[16 + 12 :])
    assert tlvs[PP2_TYPE_QKDPROXY_PEER] == b"spiffe://qkdproxy.test/tunnel/client"
    assert tlvs[PP2_TYPE_QKDPROXY_GROUP] == b"qkd_mlkem768"
    assert tlvs[PP2_TYPE_SSL][0] & 0x03 == 0x03  # TLS, with a verified client certificate


def parse_tlvs(data: bytes) -> dict[int, bytes]:
    out, offset = {}, 0
    while offset < len(data):
        kind, length = struct.unpack("!BH", data[offset : offset + 3])
        out[kind] = data[offset + 3 : offset + 3 + length]
        offset += 3 + length
    assert offset == len(data)
    return out


@pytest.mark.parametrize(
    ("source", "destination", "family", "length"),
    [
        (("10.0.0.1", 1000), ("10.0.0.2", 443), 0x11, 12),
        (("::1", 1000), ("::1", 443), 0x21, 36),
        (("10.0.0.1", 1000), ("::1", 443), 0x21, 36),
        (None, None, 0x00, 0),
    ],
)
def test_proxy_v2_address_blocks(
    source: tuple[str, int] | None, destination: tuple[str, int] | None, family: int, length: int
) -> None:
    header = encode_proxy_v2(
        ProxyInfo(source, destination, 7, "spiffe://x/y", "cn", "aes256gcm", None)
    )
    assert header[13] == family
    body = header[16:]
    assert struct.unpack("!H", header[14:16])[0] == len(body)
    tlvs = parse_tlvs(body[length:])
    assert tlvs[PP2_TYPE_QKDPROXY_PEER] == b"spiffe://x/y"


async def test_reload_swaps_credentials_or_keeps_the_old_ones(tmp_path: Path) -> None:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml()) as server,
        s.daemon("client", s.client_toml(port(server))) as client,
    ):
        before = server.tunnels[0].endpoint
        broken = s.server_toml().replace("pki/tunnel-server.pem", "pki/missing.pem")
        (tmp_path / "server.toml").write_text(broken)
        problems = server.reload()
        assert problems and "missing.pem" in problems[0]
        assert server.tunnels[0].endpoint is before
        assert await transfer(port(client), b"still fine") == b"still fine"
        outsider_only = s.server_toml(allow="uri:spiffe://qkdproxy.test/someone-else")
        (tmp_path / "server.toml").write_text(outsider_only)
        assert server.reload() == []
        assert server.tunnels[0].endpoint is not before
        assert await transfer(port(client), b"refused now") == b""


async def test_unix_sockets_on_both_plaintext_sides(tmp_path: Path) -> None:
    backend = Backend()
    backend_path = str(tmp_path / "backend.sock")
    unix_backend = await asyncio.start_unix_server(backend.handle, backend_path)
    client_path = tmp_path / "client.sock"
    try:
        async with setup(tmp_path, backend) as s:
            server_text = s.server_toml().replace(
                f'connect = "127.0.0.1:{s.backend_port}"', f'connect = "unix:{backend_path}"'
            )
            async with s.daemon("server", server_text) as server:
                client_text = s.client_toml(port(server)).replace(
                    'listen = "127.0.0.1:0"', f'listen = "unix:{client_path}"'
                )
                async with s.daemon("client", client_text):
                    reader, writer = await asyncio.open_unix_connection(str(client_path))
                    writer.write(b"over unix sockets")
                    writer.write_eof()
                    assert await asyncio.wait_for(reader.read(), 10) == b"over unix sockets"
                    writer.close()
    finally:
        unix_backend.close()


async def test_maximum_lifetime_ends_a_busy_connection(tmp_path: Path) -> None:
    async with (
        setup(tmp_path) as s,
        s.daemon("server", s.server_toml()) as server,
        s.daemon("client", s.client_toml(port(server), "max_lifetime_s = 0.3")) as client,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port(client))
        writer.write(b"still talking")
        assert await asyncio.wait_for(reader.readexactly(13), 10) == b"still talking"
        # Open and answered, but older than its lifetime: the daemon cuts it, with a reset
        # so that the application cannot take the cut for the end of a complete stream.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await asyncio.wait_for(client.tunnels[0].wait_idle(), 10)
    assert any(r.role == "client" and r.reason == "max_lifetime" for r in s.records)


async def test_reload_refuses_changes_that_need_a_restart(tmp_path: Path) -> None:
    async with setup(tmp_path) as s, s.daemon("server", s.server_toml()) as server:
        before = server.tunnels[0].endpoint
        (tmp_path / "server.toml").write_text(s.server_toml('flow = "server-initiated"'))
        problems = server.reload()
        assert problems == ["tunnel t: listen/role/kme/flow changes need a restart"]
        assert server.tunnels[0].endpoint is before
        (tmp_path / "server.toml").write_text(s.server_toml('flows = ["client", "server"]'))
        assert server.reload() == [
            "tunnel t: flows and pre-authentication budget changes need a restart"
        ]
        (tmp_path / "server.toml").write_text(s.server_toml().replace('name = "t"', 'name = "u"'))
        assert "tunnel t: removing a tunnel needs a restart" in server.reload()


async def test_an_injected_alert_does_not_downgrade_a_qkd_preferred_tunnel(
    tmp_path: Path,
) -> None:
    """Before the handshake completes a peer's alert is unauthenticated: an on-path attacker
    answering the ClientHello with internal_error must not push us onto the fallback group."""
    hellos = 0

    async def attacker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hellos
        if await reader.read(65536):
            hellos += 1
        writer.write(bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 80]))  # fatal internal_error
        await writer.drain()
        writer.close()

    fake = await asyncio.start_server(attacker, "127.0.0.1", 0)
    preferred = 'policy = "qkd-preferred"\ngroups = ["qkd_mlkem768", "X25519MLKEM768"]'
    try:
        async with setup(tmp_path) as s:
            text = s.client_toml(fake.sockets[0].getsockname()[1], preferred)
            async with s.daemon("client", text) as client:
                assert client.tunnels[0].fallback is not None
                assert await transfer(port(client), b"never sent") == b""
                await asyncio.wait_for(client.tunnels[0].wait_idle(), 10)
    finally:
        fake.close()
    [record] = s.records
    assert hellos == 1
    assert record.fallback is False and record.group is None


@pytest.mark.parametrize(
    ("offered", "alert", "remote", "flushes"),
    [
        (True, Alert.ILLEGAL_PARAMETER, True, True),
        # A bare alert before any key of ours was on the wire proves nothing: anyone who can
        # reach the tunnel could send it, and a flush on its word would drain the KME.
        (False, Alert.ILLEGAL_PARAMETER, True, False),
        (True, Alert.ILLEGAL_PARAMETER, False, False),  # our own alert, not the peer's
        (True, Alert.HANDSHAKE_FAILURE, True, False),
    ],
)
def test_only_a_refusal_of_a_key_we_sent_flushes_keys_held_ahead(
    offered: bool, alert: Alert, remote: bool, flushes: bool
) -> None:
    class Held:
        refusal_alerts = frozenset({"illegal_parameter"})

    error = HandshakeError("refused", int(alert), remote=remote)
    if offered:
        error.record.offered_key_id = "00000000-0000-0000-0000-000000000001"
    assert runtime._refused(error, Held()) is flushes  # type: ignore[arg-type]
