"""Real handshakes over loopback sockets: every available group, both flows, both APIs."""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime, timedelta

import pytest

from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.keyexchange import Flow, KeyApi, QkdOptions
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.core.tls.wire import Alert
from qkdproxy.io.tls_stream import (
    EndpointSettings,
    HandshakeError,
    TlsEndpoint,
    TlsStream,
    TlsStreamError,
)
from qkdproxy.sim.pki import CertificateAuthority, KeyType
from qkdproxy.tools.loopback import CLIENT_URI, SERVER_NAME, LoopbackPair, loopback_pair
from tests.conftest import available_group_names, groups

ALL_GROUPS = available_group_names()
FLOWS = [
    (Flow.CLIENT_INITIATED, KeyApi.ETSI_014),
    (Flow.CLIENT_INITIATED, KeyApi.ETSI_004),
    (Flow.SERVER_INITIATED, KeyApi.ETSI_014),
]


async def echo(stream: TlsStream, payload: bytes) -> bytes:
    await stream.write(payload)
    received = bytearray()
    while len(received) < len(payload):
        chunk = await asyncio.wait_for(stream.read(), 10)
        assert chunk, "connection closed before the echo completed"
        received += chunk
    return bytes(received)


async def handshake(pair: LoopbackPair, client: TlsEndpoint) -> TlsStream:
    return await asyncio.wait_for(pair.handshake(client), 20)


async def settled(pair: LoopbackPair, handshakes: int = 1) -> None:
    """Wait (with a deadline) until the server ended ``handshakes`` handshakes."""
    async with asyncio.timeout(10):
        await pair.wait_for_server(lambda: pair.echo.accepted >= handshakes)
    assert pair.server_keys.ledger.outstanding == 0


@pytest.mark.parametrize("name", ALL_GROUPS)
@pytest.mark.parametrize(("flow", "api"), FLOWS, ids=["client-014", "client-004", "server-014"])
async def test_every_group_in_every_flow(name: str, flow: Flow, api: KeyApi) -> None:
    hybrids = groups(name)
    async with loopback_pair(hybrids) as pair:
        pair.server_keys.options = QkdOptions(api=api)
        client = pair.client(hybrids, QkdOptions(flow=flow, api=api))
        stream = await handshake(pair, client)
        payload = os.urandom(3000)
        assert await echo(stream, payload) == payload
        record = stream.record
        await stream.close()
        await settled(pair)
    assert record.group == name
    assert (
        stream.peer.dns_names == (SERVER_NAME, "127.0.0.1") or SERVER_NAME in stream.peer.dns_names
    )
    if hybrids[0].group.qkd:
        assert (record.flow, record.api) == (flow, api)
        assert record.qkd_key_id is not None
        for ledger in (pair.client_keys.ledger, pair.server_keys.ledger):
            assert (ledger.taken, ledger.consumed, ledger.wasted) == (1, 1, 0)
    else:
        assert record.qkd_key_id is None and pair.client_keys.ledger.taken == 0


async def test_ip_address_as_server_name_is_checked_but_not_sent_as_sni() -> None:
    hybrids = groups("qkd_mlkem768")
    async with loopback_pair(hybrids) as pair:
        client = endpoint(pair.ca, ("qkd_mlkem768",), server_name="127.0.0.1", pair=pair)
        stream = await handshake(pair, client)
        assert "127.0.0.1" in stream.peer.dns_names or stream.peer.common_name == "server"
        await stream.close()


async def test_bare_tcp_close_is_reported_as_truncation_not_eof() -> None:
    hybrids = groups("x25519")
    async with loopback_pair(hybrids) as pair:
        stream = await handshake(pair, pair.client(hybrids, QkdOptions()))
        server_stream_closed = pair.echo.accepted
        stream._driver.writer.transport.abort()  # the peer sees a TCP close, no close_notify
        await settled(pair, server_stream_closed)
    with pytest.raises(TlsStreamError):
        await stream.read()


async def test_large_transfer_both_ways_is_byte_exact() -> None:
    hybrids = groups("qkd_mlkem768")
    async with loopback_pair(hybrids) as pair:
        stream = await handshake(pair, pair.client(hybrids, QkdOptions()))
        payload = os.urandom(4 * 1024 * 1024 + 17)
        writer = asyncio.create_task(stream.write(payload))
        digest, received = hashlib.sha256(), 0
        while received < len(payload):
            chunk = await asyncio.wait_for(stream.read(), 10)
            assert chunk
            digest.update(chunk)
            received += len(chunk)
        await writer
        await stream.close()
    assert digest.digest() == hashlib.sha256(payload).digest()


async def test_hello_retry_over_the_wire_uses_fresh_keys() -> None:
    """The client's key share is for a group the server does not take: HRR, then QKD."""
    server_groups = groups("qkd_mlkem768", "x25519")
    async with loopback_pair(server_groups) as pair:
        client = pair.client(groups("qkd_mlkem1024", "qkd_mlkem768"), QkdOptions())
        stream = await handshake(pair, client)
        assert stream.record.hello_retry and stream.record.group == "qkd_mlkem768"
        assert await echo(stream, b"after retry") == b"after retry"
        await stream.close()
        await settled(pair)
    ledger = pair.client_keys.ledger
    assert (ledger.taken, ledger.consumed, ledger.wasted_by_reason) == (2, 1, {"hello_retry": 1})


@pytest.mark.parametrize("key_type", ["rsa-2048", "ecdsa-p384"])
async def test_rsa_and_ecdsa_certificates(key_type: KeyType) -> None:
    hybrids = groups("X25519MLKEM768")
    async with loopback_pair(hybrids, key_type=key_type) as pair:
        stream = await handshake(pair, pair.client(hybrids, QkdOptions()))
        assert await echo(stream, b"ping") == b"ping"
        await stream.close()


async def refused(pair: LoopbackPair, client: TlsEndpoint) -> None:
    """The client may finish its side (TLS 1.3), but gets no byte through: only an alert."""
    try:
        stream = await handshake(pair, client)
    except HandshakeError:
        return
    try:
        await stream.write(b"let me in")
        with pytest.raises(TlsStreamError) as info:
            await asyncio.wait_for(stream.read(), 10)
        assert info.value.alert is not None, "the refusal must arrive as a TLS alert"
    finally:
        await stream.close()


def endpoint(
    ca: CertificateAuthority,
    hybrid_names: tuple[str, ...],
    *,
    trust: CertificateAuthority | None = None,
    allow: AllowList | None = None,
    server_name: str | None = None,
    names: list[str] | None = None,
    now: datetime | None = None,
    pair: LoopbackPair | None = None,
) -> TlsEndpoint:
    credentials = ca.issue("peer", names or [CLIENT_URI], now=now, days=1)
    policy = PeerPolicy(
        ((trust or ca).certificate,), allow or AllowList(any_peer=True), server_name
    )
    keys = pair.client_keys if pair else None
    assert keys is not None
    return TlsEndpoint(EndpointSettings(credentials, policy, groups(*hybrid_names), keys))


async def test_server_refuses_client_from_another_ca() -> None:
    failures: list[BaseException] = []
    hybrids = groups("qkd_mlkem768")
    async with loopback_pair(hybrids, server_failures=failures) as pair:
        rogue = endpoint(
            CertificateAuthority.create(),
            ("qkd_mlkem768",),
            trust=pair.ca,
            server_name=SERVER_NAME,
            pair=pair,
        )
        await refused(pair, rogue)
        await settled(pair)
    assert isinstance(failures[0], HandshakeError)
    assert failures[0].alert in (Alert.UNKNOWN_CA, Alert.BAD_CERTIFICATE)


async def test_client_refuses_wrong_server_name_with_bad_certificate() -> None:
    hybrids = groups("qkd_mlkem768")
    async with loopback_pair(hybrids) as pair:
        client = endpoint(pair.ca, ("qkd_mlkem768",), server_name="other.qkdproxy.test", pair=pair)
        with pytest.raises(HandshakeError) as info:
            await handshake(pair, client)
        await settled(pair)
    assert info.value.alert == Alert.BAD_CERTIFICATE
    ledger = pair.client_keys.ledger
    assert ledger.consumed == 0 and ledger.wasted == 1 and ledger.outstanding == 0


async def test_client_refuses_server_outside_its_allow_list() -> None:
    hybrids = groups("x25519")
    async with loopback_pair(hybrids) as pair:
        client = endpoint(
            pair.ca,
            ("x25519",),
            server_name=SERVER_NAME,
            allow=AllowList.of(["dns:someone-else.qkdproxy.test"]),
            pair=pair,
        )
        with pytest.raises(HandshakeError) as info:
            await handshake(pair, client)
    assert info.value.alert == Alert.ACCESS_DENIED


async def test_expired_client_certificate_is_refused() -> None:
    failures: list[BaseException] = []
    hybrids = groups("x25519")
    async with loopback_pair(hybrids, server_failures=failures) as pair:
        stale = endpoint(
            pair.ca,
            ("x25519",),
            server_name=SERVER_NAME,
            now=datetime.now(UTC) - timedelta(days=30),
            pair=pair,
        )
        await refused(pair, stale)
        await settled(pair)
    assert isinstance(failures[0], HandshakeError)
    assert failures[0].alert == Alert.CERTIFICATE_EXPIRED


async def test_client_allow_list_rejection_sends_no_application_data() -> None:
    failures: list[BaseException] = []
    hybrids = groups("qkd_mlkem768")
    async with loopback_pair(hybrids, server_failures=failures) as pair:
        outsider = endpoint(
            pair.ca,
            ("qkd_mlkem768",),
            server_name=SERVER_NAME,
            names=["spiffe://qkdproxy.test/outsider"],
            pair=pair,
        )
        await refused(pair, outsider)
        await settled(pair)
    assert isinstance(failures[0], HandshakeError)
    assert failures[0].alert == Alert.ACCESS_DENIED
    assert pair.server_keys.ledger.consumed == 0 and pair.server_keys.ledger.wasted == 1


async def _dial_counting_writes(
    pair: LoopbackPair, client: TlsEndpoint
) -> tuple[TlsStream, list[bytes]]:
    """A client handshake whose transport records each write it is given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.port)
    writes: list[bytes] = []
    # The transport's own write: the stream hands its records to the transport directly.
    transport = writer.transport
    write = transport.write

    def counted(data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        write(data)

    transport.write = counted  # type: ignore[method-assign]
    async with asyncio.timeout(20):  # not wait_for: its task would end the loop round
        stream = await client.connect(reader, writer)
    return stream, writes


@pytest.mark.parametrize("engine", ["native", "tlslite"])
async def test_the_clients_finished_leaves_with_its_first_bytes(engine: str) -> None:
    """Data the client has at hand when its handshake ends shares the write (and the
    server's wake-up) of its Finished flight: ClientHello, then one write."""
    hybrids = groups("qkd_mlkem768")
    async with loopback_pair(hybrids, tls_engine=engine) as pair:
        stream, writes = await _dial_counting_writes(pair, pair.client(hybrids, QkdOptions()))
        assert len(writes) == 1  # the ClientHello; the Finished flight waits for this round
        assert await echo(stream, b"ping") == b"ping"
        assert len(writes) == 2
        await stream.close()


async def test_a_client_that_sends_nothing_still_finishes_its_handshake() -> None:
    """A server-speaks-first application: the Finished flight leaves on its own."""
    hybrids = groups("qkd_mlkem768")
    async with loopback_pair(hybrids) as pair:
        stream, writes = await _dial_counting_writes(pair, pair.client(hybrids, QkdOptions()))
        await settled(pair)  # the server completed: it got our Finished without any data
        assert len(writes) == 2
        await stream.close()


async def test_a_clients_next_handshake_takes_the_key_pair_made_after_the_last_hello() -> None:
    hybrids = groups("qkd_mlkem768")
    code = hybrids[0].group.code_point
    async with loopback_pair(hybrids) as pair:
        client = pair.client(hybrids, QkdOptions())
        reserve = client._config.spares
        assert reserve is not None and reserve.held == 0
        seen = []
        for n in range(3):
            stream = await handshake(pair, client)
            assert await echo(stream, b"spare") == b"spare"
            await stream.close()
            await settled(pair, n + 1)
            # Made once the hello had left, for the next handshake, and a new one each time.
            assert reserve.held == 1
            seen.append(reserve._spares[code][1])
        assert len(set(seen)) == 3


async def test_a_pools_tunnel_handshake_makes_no_spare() -> None:
    # Rotations come minutes apart: a spare made after one would only go stale.
    hybrids = groups("qkd_mlkem768")
    async with loopback_pair(hybrids) as pair:
        client = pair.client(hybrids, QkdOptions())
        reserve = client._config.spares
        assert reserve is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", pair.port)
        stream = await asyncio.wait_for(client.connect(reader, writer, mux=True), 20)
        await stream.close()
        await settled(pair)
        assert reserve.held == 0
        stream = await handshake(pair, client)  # a per-connection dial does
        await stream.close()
        await settled(pair, 2)
        assert reserve.held == 1
