"""ETSI GS QKD 004: the binary codec, and the KME server and client over real mTLS sockets.

Two simulated KMEs ("kme-a", "kme-b") share one link model and each run an ETSI 004 server;
application "alice" talks to kme-a and "bob" to kme-b, all certificates from one CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdproxy.core.etsi004.codec import (
    HEADER_SIZE,
    KSID_SIZE,
    MAX_PAYLOAD,
    MIMETYPE_SIZE,
    VERSION,
    ZERO_KSID,
    CloseRequest,
    CloseResponse,
    CloseServer,
    CodecError,
    ErrorFrame,
    FrameDecoder,
    GetKeyRequest,
    GetKeyResponse,
    Message,
    OpenConnectRequest,
    OpenConnectResponse,
    QoS,
    ServiceType,
    Status,
    decode,
    encode,
)
from qkdproxy.core.keys import (
    KeyExhaustedError,
    KeySourceUnavailableError,
    KsidInUseError,
    PeerNotConnectedError,
)
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.keyexchange import Flow, HandshakeRecord, KeyApi, QkdOptions
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.io.tls_stream import EndpointSettings, TlsEndpoint, TlsStream
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.etsi004_client import Etsi004Client, QosNotMetError, RequestRefusedError
from qkdproxy.keys.sources import KeySources, StreamKeySource
from qkdproxy.keys.sslctx import client_context, server_context
from qkdproxy.sim.faults import (
    Burst,
    Decision,
    FaultInjector,
    FaultScript,
    Window,
)
from qkdproxy.sim.link import LinkSettings, QkdLinkModel
from qkdproxy.sim.node import IdentitySource, KmeNode
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.sim.server004 import Etsi004Server
from qkdproxy.tools.loopback import CLIENT_URI, SERVER_NAME
from tests.conftest import groups

DEADLINE = 10.0
ERROR_FRAME = encode(ErrorFrame())

# ------------------------------------------------------------------------------ codec

u32 = st.integers(0, 2**32 - 1)
ksids = st.binary(min_size=KSID_SIZE, max_size=KSID_SIZE)
names = st.text(st.characters(blacklist_characters="\0", codec="utf-8"), max_size=40)
mimetypes = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=MIMETYPE_SIZE - 1)
qos_values = st.builds(QoS, u32, u32, u32, u32, u32, u32, u32, mimetypes)
statuses = st.sampled_from(Status)


@st.composite
def get_key_responses(draw: st.DrawFn) -> GetKeyResponse:
    status, index, key = draw(statuses), draw(u32), draw(st.binary(max_size=64))
    if status is Status.METADATA_TOO_SMALL:
        return GetKeyResponse(status, index, key, metadata_needed=draw(st.integers(1, 2**32 - 1)))
    return GetKeyResponse(status, index, key, draw(st.binary(max_size=64)))


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(OpenConnectRequest, names, names, qos_values, ksids),
    st.builds(OpenConnectResponse, statuses, qos_values, ksids),
    st.builds(GetKeyRequest, ksids, u32, u32),
    get_key_responses(),
    st.builds(CloseRequest, ksids),
    st.builds(CloseResponse, statuses),
    st.just(ErrorFrame()),
    st.just(CloseServer()),
)


@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    frame = encode(message)
    assert frame[:3] == VERSION and ServiceType(frame[3]) is message.SERVICE
    assert struct.unpack(">I", frame[4:8])[0] == len(frame) - HEADER_SIZE
    assert decode(frame) == message


@settings(max_examples=60)
@given(st.lists(messages, max_size=6), st.data())
def test_frame_decoder_reassembles_any_chunking(batch: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder, received = FrameDecoder(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
        while (message := decoder.next_message()) is not None:
            received.append(message)
    assert received == batch and decoder.buffered == 0


def frame(service: int, payload: bytes, version: bytes = VERSION) -> bytes:
    return version + bytes([service]) + struct.pack(">I", len(payload)) + payload


QOS = QoS(32, timeout_ms=0, ttl_s=600)
KSID = uuid.uuid4().bytes
OPEN = encode(OpenConnectRequest("alice", "bob", QOS, KSID))
GOOD_FRAMES = [
    OPEN,
    encode(OpenConnectResponse(Status.SUCCESS, QOS, KSID)),
    encode(GetKeyRequest(KSID, 1, 100)),
    encode(GetKeyResponse(Status.SUCCESS, 1, bytes(32), b"{}")),
    encode(GetKeyResponse(Status.METADATA_TOO_SMALL, 1, metadata_needed=70)),
    encode(CloseRequest(KSID)),
    encode(CloseResponse(Status.SUCCESS)),
]
QOS_BYTES = struct.pack(">7I", 32, 0, 0, 0, 0, 0, 600)
MIMETYPE = b"application/json".ljust(MIMETYPE_SIZE, b"\0")


@pytest.mark.parametrize("good", GOOD_FRAMES)
def test_every_truncation_is_refused(good: bytes) -> None:
    for size in range(len(good)):
        with pytest.raises(CodecError):
            decode(good[:size])
    payload = good[HEADER_SIZE:]
    for size in range(len(payload)):  # a header that agrees with a short payload
        with pytest.raises(CodecError):
            decode(frame(good[3], payload[:size]))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (frame(0x02, b"", version=b"\x02\x00\x01"), "version"),
        (frame(0x07, b""), "service type"),
        (frame(0x04, bytes(MAX_PAYLOAD + 1)), "exceeds"),
        (frame(0x02, b"alice"), "NUL"),
        (frame(0x02, b"alice\0bob"), "NUL"),
        (frame(0x02, b"\xff\0bob\0" + QOS_BYTES + MIMETYPE + KSID), "UTF-8"),
        (frame(0x02, b"a\0b\0" + QOS_BYTES + b"x" * MIMETYPE_SIZE + KSID), "mimetype"),
        (frame(0x02, b"a\0b\0" + QOS_BYTES + b"a\0x".ljust(MIMETYPE_SIZE, b"\0") + KSID), "mime"),
        (frame(0x02, b"a\0b\0" + QOS_BYTES + b"\xe9".ljust(MIMETYPE_SIZE, b"\0") + KSID), "ASCII"),
        (frame(0x08, KSID + b"\0"), "trailing"),
        (frame(0x00, b"\0"), "trailing"),
        (frame(0xFF, b"bye"), "trailing"),
        (encode(CloseRequest(KSID)) + b"\x01", "trailing bytes after"),
        (frame(0x09, struct.pack(">I", 9)), "unknown status"),
        (frame(0x05, struct.pack(">IIII", 8, 0, 0, 0)), "status 8"),
    ],
)
def test_malformed_frames_are_refused(bad: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode(bad)


def test_decoder_refuses_early_and_stays_failed() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"G")  # not version 1.0.1: no need to wait for a whole header
    with pytest.raises(CodecError, match="version"):
        decoder.next_message()
    with pytest.raises(CodecError):
        decoder.feed(OPEN)
    decoder = FrameDecoder(max_payload=16)
    decoder.feed(OPEN[:HEADER_SIZE])  # the length alone condemns it, no payload buffered
    with pytest.raises(CodecError, match="exceeds"):
        decoder.next_message()
    decoder = FrameDecoder()
    decoder.feed(b"\x01\x00\x01\x06")
    with pytest.raises(CodecError, match="service type"):
        decoder.next_message()


def test_constructors_enforce_bounds() -> None:
    with pytest.raises(CodecError):
        CloseRequest(b"short")
    with pytest.raises(CodecError):
        GetKeyRequest(KSID, 2**32, 0)
    with pytest.raises(CodecError):
        QoS(32, metadata_mimetype="x" * MIMETYPE_SIZE)
    with pytest.raises(CodecError):
        OpenConnectRequest("al\0ice", "bob", QOS)
    with pytest.raises(CodecError):
        GetKeyResponse(Status.METADATA_TOO_SMALL, 0)  # the size needed is missing
    assert "secret" not in repr(GetKeyResponse(Status.SUCCESS, 0, b"secret!"))


# ------------------------------------------------------------------------------ servers


class ObservedNode(KmeNode):
    """A KME node that signals every admitted call, so tests wait instead of sleeping."""

    admitted: asyncio.Condition

    async def admit(self) -> Decision:
        decision = await super().admit()
        async with self.admitted:
            self.admitted.notify_all()
        return decision

    async def wait_calls(self, calls: int) -> None:
        async with asyncio.timeout(DEADLINE), self.admitted:
            await self.admitted.wait_for(lambda: self.faults.calls >= calls)


def observed_node(kme_id: str, peer: str, link: QkdLinkModel) -> ObservedNode:
    node = ObservedNode(kme_id, peer, link)
    node.admitted = asyncio.Condition()
    return node


@dataclass
class Kmes:
    ca: CertificateAuthority
    link: QkdLinkModel
    nodes: dict[str, ObservedNode]
    servers: dict[str, Etsi004Server]
    ports: dict[str, int] = field(default_factory=dict)
    clients: list[Etsi004Client] = field(default_factory=list)

    def app_context(self, cn: str) -> ssl.SSLContext:
        credentials = self.ca.issue(cn, [f"spiffe://qkdproxy.test/{cn}"], server=False)
        return client_context(credentials, [self.ca.certificate], ssl.TLSVersion.TLSv1_3)

    def client(
        self,
        app: str,
        peer: str,
        via: str = "a",
        *,
        cn: str | None = None,
        context: ssl.SSLContext | None = None,
        **options: Any,
    ) -> Etsi004Client:
        client = Etsi004Client(
            "127.0.0.1",
            self.ports[via],
            context or self.app_context(cn or app),
            app,
            peer,
            server_hostname="localhost",
            **options,
        )
        self.clients.append(client)
        return client

    @asynccontextmanager
    async def raw(self, cn: str = "alice", via: str = "a") -> AsyncIterator[RawSession]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                self.ports[via],
                ssl=self.app_context(cn),
                server_hostname="localhost",
            ),
            DEADLINE,
        )
        try:
            yield RawSession(reader, writer)
        finally:
            writer.transport.abort()


@dataclass
class RawSession:
    """Bytes over an authenticated TLS connection, for status checks and hostile input."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def call(self, request: Message) -> Message:
        self.writer.write(encode(request))
        decoder = FrameDecoder()
        async with asyncio.timeout(DEADLINE):
            while (message := decoder.next_message()) is None:
                data = await self.reader.read(4096)
                assert data, "the KME closed the connection"
                decoder.feed(data)
        return message

    async def send_and_drain(self, data: bytes) -> bytes:
        """Send ``data``; everything the KME sends until it closes (or resets)."""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            self.writer.write(data)
            await self.writer.drain()
        received = bytearray()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            async with asyncio.timeout(DEADLINE):
                while chunk := await self.reader.read(4096):
                    received += chunk
        return bytes(received)


@asynccontextmanager
async def running_kmes(
    ca: CertificateAuthority, link_settings: LinkSettings | None = None, **server: Any
) -> AsyncIterator[Kmes]:
    link = QkdLinkModel(link_settings or LinkSettings(), asyncio.get_running_loop().time())
    nodes = {"a": observed_node("kme-a", "kme-b", link), "b": observed_node("kme-b", "kme-a", link)}
    servers = {}
    for name, node in nodes.items():
        credentials = ca.issue(node.kme_id, ["localhost", "127.0.0.1"], client=False)
        servers[name] = Etsi004Server(
            node,
            server_context(credentials, [ca.certificate], ssl.TLSVersion.TLSv1_3),
            **server,
        )
    kmes = Kmes(ca, link, nodes, servers)
    try:
        for name, srv in servers.items():
            kmes.ports[name] = await srv.start("127.0.0.1", 0)
        yield kmes
    finally:
        for client in kmes.clients:
            await client.aclose()
        for srv in servers.values():
            await asyncio.wait_for(srv.stop(), DEADLINE)


@pytest.fixture
async def kmes(ca: CertificateAuthority) -> AsyncIterator[Kmes]:
    async with running_kmes(ca) as running:
        yield running


def pair(kmes: Kmes, **options: Any) -> tuple[Etsi004Client, Etsi004Client]:
    return kmes.client("alice", "bob", "a", **options), kmes.client("bob", "alice", "b", **options)


# ------------------------------------------------------------------------------ semantics


async def test_client_initiated_rendezvous(kmes: Kmes) -> None:
    alice, bob = pair(kmes)
    source: StreamKeySource = alice  # the client is a key source for the handshake engine
    ksid = await source.open(None)
    assert len(ksid) == KSID_SIZE and ksid != ZERO_KSID
    assert await bob.open(ksid) == ksid
    key = await alice.get_key(ksid, 0)
    assert len(key) == 32 and await bob.get_key(ksid, 0) == key
    with pytest.raises(KeyExhaustedError):
        await alice.get_key(ksid, 0)  # delivered once per end
    assert await bob.get_key(ksid, 1) == await alice.get_key(ksid, 1) != key
    await alice.close(ksid)
    with pytest.raises(KeyExhaustedError):
        await bob.get_key(ksid, 2)  # no new key after a CLOSE
    await bob.close(ksid)
    assert kmes.link.stream(ksid) is None
    with pytest.raises(KeySourceUnavailableError):
        await bob.close(ksid)


async def test_status_codes_on_the_wire(kmes: Kmes) -> None:
    async with kmes.raw("alice", "a") as alice, kmes.raw("bob", "b") as bob:
        opened = await alice.call(OpenConnectRequest("alice", "bob", QoS(32, ttl_s=0)))
        assert isinstance(opened, OpenConnectResponse)
        assert opened.status is Status.PEER_NOT_CONNECTED and opened.ksid != ZERO_KSID
        assert opened.qos == QoS(32, ttl_s=600)  # TTL 0 means the default
        ksid = opened.ksid
        assert await alice.call(GetKeyRequest(ksid, 0, 1024)) == GetKeyResponse(
            Status.PEER_APP_NOT_CONNECTED, 0
        )
        joined = await bob.call(OpenConnectRequest("bob", "alice", QoS(32), ksid))
        assert isinstance(joined, OpenConnectResponse)
        assert (joined.status, joined.ksid) == (Status.SUCCESS, ksid)
        small = await alice.call(GetKeyRequest(ksid, 0, 10))
        assert isinstance(small, GetKeyResponse)
        assert small.status is Status.METADATA_TOO_SMALL and small.metadata_needed > 10
        got = await alice.call(GetKeyRequest(ksid, 0, small.metadata_needed))
        assert isinstance(got, GetKeyResponse) and got.status is Status.SUCCESS
        assert len(got.key) == 32
        assert json.loads(got.metadata) == {
            "index": 0,
            "ksid": str(uuid.UUID(bytes=ksid)),
            "chunk_size": 32,
        }
        unknown = uuid.uuid4().bytes
        assert await bob.call(GetKeyRequest(unknown, 0, 1024)) == GetKeyResponse(
            Status.NO_QKD_CONNECTION, 0
        )
        assert await bob.call(CloseRequest(unknown)) == CloseResponse(Status.NO_QKD_CONNECTION)
        wide = await alice.call(OpenConnectRequest("alice", "bob", QoS(2048)))
        assert wide == OpenConnectResponse(Status.QOS_NOT_MET, QoS(32, ttl_s=600), ZERO_KSID)
        xml = await alice.call(OpenConnectRequest("alice", "bob", QoS(32, metadata_mimetype="a/x")))
        assert isinstance(xml, OpenConnectResponse) and xml.status is Status.QOS_NOT_MET
        assert xml.qos.metadata_mimetype == "application/json"
        other = await alice.call(OpenConnectRequest("alice", "bob", QoS(16), unknown))
        assert isinstance(other, OpenConnectResponse) and other.status is Status.PEER_NOT_CONNECTED
        mismatch = await bob.call(OpenConnectRequest("bob", "alice", QoS(32), unknown))
        assert mismatch == OpenConnectResponse(Status.QOS_NOT_MET, QoS(16, ttl_s=600), unknown)
        assert await alice.call(CloseRequest(ksid)) == CloseResponse(Status.SUCCESS)
        assert await alice.call(CloseRequest(ksid)) == CloseResponse(Status.NO_QKD_CONNECTION)


async def test_get_key_before_the_peer_opens(kmes: Kmes) -> None:
    alice, bob = pair(kmes, timeout_ms=0)
    ksid = await alice.open(None)
    with pytest.raises(PeerNotConnectedError):
        await alice.get_key(ksid, 0)
    await bob.open(ksid)
    assert await alice.get_key(ksid, 0) == await bob.get_key(ksid, 0)


async def test_get_key_waits_for_the_peer_within_the_qos_timeout(kmes: Kmes) -> None:
    alice, bob = pair(kmes, timeout_ms=4000)
    ksid = await alice.open(None)
    waiting = asyncio.create_task(alice.get_key(ksid, 0))
    await kmes.nodes["a"].wait_calls(2)  # the GET_KEY is now waiting inside kme-a
    assert not waiting.done()
    await bob.open(ksid)
    key = await asyncio.wait_for(waiting, DEADLINE)
    assert await bob.get_key(ksid, 0) == key


async def test_a_cancelled_call_leaves_no_stale_answer_behind(kmes: Kmes) -> None:
    alice, bob = pair(kmes, timeout_ms=60_000, call_timeout=30)
    ksid = await alice.open(None)
    waiting = asyncio.create_task(alice.get_key(ksid, 0))
    await kmes.nodes["a"].wait_calls(2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    other = await asyncio.wait_for(alice.open(None), DEADLINE)  # on a new connection
    await bob.open(other)
    assert await alice.get_key(other, 0) == await bob.get_key(other, 0)


async def test_ksid_in_use(kmes: Kmes, ca: CertificateAuthority) -> None:
    alice, bob = pair(kmes)
    ksid = await alice.open(None)
    with pytest.raises(KsidInUseError):
        await alice.open(ksid)
    carol = kmes.client("carol", "alice", "b")
    with pytest.raises(KsidInUseError):
        await carol.open(ksid)  # alice's stream was declared for bob
    assert await bob.open(ksid) == ksid
    with pytest.raises(KsidInUseError):
        await bob.open(ksid)


async def test_exhausted_pool(ca: CertificateAuthority) -> None:
    one_chunk = LinkSettings(rate_bps=0, pool_bits=256, start_full=True)
    async with running_kmes(ca, one_chunk) as kmes:
        alice, bob = pair(kmes)
        ksid = await alice.open(None)
        await bob.open(ksid)
        assert await alice.get_key(ksid, 0) == await bob.get_key(ksid, 0)
        with pytest.raises(KeyExhaustedError):
            await alice.get_key(ksid, 1)


async def test_link_down(kmes: Kmes) -> None:
    alice, bob = pair(kmes)
    ksid = await alice.open(None)
    await bob.open(ksid)
    down = FaultInjector(FaultScript(link_down=(Window(0, 3600),)))
    kmes.nodes["a"].faults = down
    with pytest.raises(KeySourceUnavailableError, match="no QKD connection"):
        await alice.get_key(ksid, 0)
    with pytest.raises(KeySourceUnavailableError):
        await alice.open(None)


async def test_error_burst(kmes: Kmes) -> None:
    kmes.nodes["a"].faults = FaultInjector(FaultScript(error_bursts=(Burst(0, 2),)))
    alice, bob = pair(kmes)
    with pytest.raises(KeySourceUnavailableError):
        await alice.open(None)
    ksid = await bob.open(None)  # kme-b is not affected
    with pytest.raises(KeySourceUnavailableError):
        await alice.open(ksid)
    assert await alice.open(ksid) == ksid


async def test_reset_burst_on_get_key_is_not_retried(kmes: Kmes) -> None:
    alice, bob = pair(kmes)
    ksid = await alice.open(None)
    await bob.open(ksid)
    node = kmes.nodes["a"]
    node.faults = FaultInjector(FaultScript(reset_bursts=(Burst(0, 1),)))
    with pytest.raises(KeySourceUnavailableError):
        await alice.get_key(ksid, 0)
    assert node.faults.calls == 1  # a GET_KEY is never replayed blindly
    second = await alice.open(None)  # reconnects
    assert second != ksid
    assert await alice.get_key(ksid, 0) == await bob.get_key(ksid, 0)  # index 0 never left


async def test_reset_burst_on_open_is_retried_once(kmes: Kmes) -> None:
    alice, _ = pair(kmes)
    node = kmes.nodes["a"]
    node.faults = FaultInjector(FaultScript(reset_bursts=(Burst(0, 2),)))
    with pytest.raises(KeySourceUnavailableError):
        await alice.open(None)
    assert node.faults.calls == 2
    node.faults = FaultInjector(FaultScript(reset_bursts=(Burst(0, 1),)))
    assert len(await alice.open(None)) == KSID_SIZE  # the replay on a new connection works
    assert node.faults.calls == 2


async def test_metadata_buffer_too_small_is_retried_with_the_size_needed(kmes: Kmes) -> None:
    alice, bob = pair(kmes, metadata_size=0)
    ksid = await alice.open(None)
    await bob.open(ksid)
    calls = kmes.nodes["a"].faults.calls
    assert await alice.get_key(ksid, 0) == await bob.get_key(ksid, 0)
    assert kmes.nodes["a"].faults.calls == calls + 2


async def test_qos_not_met_reports_the_counter_proposal(kmes: Kmes) -> None:
    alice, _ = pair(kmes, chunk_size=4096)
    with pytest.raises(
        QosNotMetError, match=r"bounds: Key_chunk_size 32 \(we need 4096\)$"
    ) as info:
        await alice.open(None)
    assert info.value.counter_proposal.key_chunk_size == 32


async def test_source_must_be_the_certificate_name(kmes: Kmes) -> None:
    mallory = kmes.client("alice", "bob", "a", cn="mallory")
    with pytest.raises(RequestRefusedError):
        await mallory.open(KSID)
    assert kmes.nodes["a"].faults.calls == 1  # admitted, then refused: no retry
    assert kmes.link.stream(KSID) is None


async def test_application_id_from_the_uri_san(kmes: Kmes) -> None:
    """With URI identities the id is the URI's last path segment, not the CN."""
    for node in kmes.nodes.values():
        node.identity = IdentitySource.URI

    def context(cn: str, uri: str) -> ssl.SSLContext:
        credentials = kmes.ca.issue(cn, [uri], server=False)
        return client_context(credentials, [kmes.ca.certificate], ssl.TLSVersion.TLSv1_3)

    alice_ctx = context("alice-cn", "spiffe://qkdproxy.test/app/alice")
    alice = kmes.client("alice", "bob", "a", context=alice_ctx)
    bob_ctx = context("bob-cn", "spiffe://qkdproxy.test/app/bob")
    bob = kmes.client("bob", "alice", "b", context=bob_ctx)
    ksid = await alice.open(None)
    await bob.open(ksid)
    assert await alice.get_key(ksid, 0) == await bob.get_key(ksid, 0)
    with pytest.raises(RequestRefusedError):
        await kmes.client("alice-cn", "bob", "a", context=alice_ctx).open(None)


async def test_client_without_certificate_is_refused(kmes: Kmes) -> None:
    pem = kmes.ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
    anonymous = ssl.create_default_context(cadata=pem)
    anonymous.minimum_version = ssl.TLSVersion.TLSv1_3
    client = kmes.client("alice", "bob", "a", context=anonymous)
    with pytest.raises(KeySourceUnavailableError):
        await client.open(None)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", kmes.ports["a"], ssl=anonymous, server_hostname="localhost"
        ),
        DEADLINE,
    )
    received = await RawSession(reader, writer).send_and_drain(OPEN)
    writer.transport.abort()
    assert received == b""
    assert kmes.nodes["a"].faults.calls == 0  # no request ever reached the KME


@pytest.mark.parametrize(
    ("hostile", "answer"),
    [
        (b"GET / HTTP/1.1\r\nHost: kme\r\n\r\n", ERROR_FRAME),
        (b"\x01\x00", b""),
        (VERSION + b"\x04" + struct.pack(">I", 100) + b"\0" * 10, b""),
        (VERSION + b"\x04" + struct.pack(">I", MAX_PAYLOAD + 1), ERROR_FRAME),
        (frame(0x07, b""), ERROR_FRAME),
        (encode(CloseResponse(Status.SUCCESS)), ERROR_FRAME),
        (frame(0x02, b"alice"), ERROR_FRAME),
        (encode(CloseServer()), b""),
        (bytes(300_000), ERROR_FRAME),
    ],
    ids=[
        "http",
        "short-header",
        "truncated-payload",
        "oversized",
        "unknown-type",
        "response-frame",
        "missing-nul",
        "close-server",
        "flood",
    ],
)
async def test_hostile_input_gets_an_error_frame_and_the_server_survives(
    kmes: Kmes, hostile: bytes, answer: bytes
) -> None:
    async with kmes.raw() as raw:
        raw.writer.write(hostile)
        if answer == b"":
            # Nothing is owed for an incomplete frame: end the connection as a client would.
            await raw.writer.drain()
            raw.writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await asyncio.wait_for(raw.writer.wait_closed(), DEADLINE)
        else:
            assert await raw.send_and_drain(b"") == answer
    assert kmes.nodes["a"].faults.calls == 0
    alice, bob = pair(kmes)
    ksid = await alice.open(None)
    assert await bob.open(ksid) == ksid


async def test_idle_connections_are_closed(ca: CertificateAuthority) -> None:
    async with running_kmes(ca, idle_timeout=0.2) as kmes, kmes.raw() as raw:
        assert await raw.send_and_drain(b"") == b""


async def test_stop_is_bounded_with_connections_open(ca: CertificateAuthority) -> None:
    async with running_kmes(ca) as kmes:
        alice, _ = pair(kmes, timeout_ms=60_000, call_timeout=30)
        ksid = await alice.open(None)
        waiting = asyncio.create_task(alice.get_key(ksid, 0))
        await kmes.nodes["a"].wait_calls(2)
        await asyncio.wait_for(kmes.servers["a"].stop(), DEADLINE)
        assert kmes.servers["a"].connections == 0
        with pytest.raises(KeySourceUnavailableError):
            await asyncio.wait_for(waiting, DEADLINE)


def test_server_requires_client_certificates(ca: CertificateAuthority) -> None:
    link = QkdLinkModel(LinkSettings(), 0.0)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises(ValueError, match="client certificates"):
        Etsi004Server(KmeNode("kme-a", "kme-b", link), context)
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError, match=r"TLS 1\.3"):
        Etsi004Server(KmeNode("kme-a", "kme-b", link), context)


# ------------------------------------------------------------------------------ handshake


async def test_qkd_handshake_over_etsi_004(kmes: Kmes) -> None:
    ca = kmes.ca
    options = QkdOptions(flow=Flow.CLIENT_INITIATED, api=KeyApi.ETSI_004)
    client_keys = KeyContext(KeySources(stream=kmes.client("alice", "bob", "a")), options)
    server_keys = KeyContext(KeySources(stream=kmes.client("bob", "alice", "b")), options)
    hybrids = groups("qkd_mlkem768")
    server = TlsEndpoint(
        EndpointSettings(
            ca.issue("server", [SERVER_NAME], client=False),
            PeerPolicy((ca.certificate,), AllowList.of([f"uri:{CLIENT_URI}"])),
            hybrids,
            server_keys,
        )
    )
    served: asyncio.Future[HandshakeRecord] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            stream = await server.accept(reader, writer)
        except Exception as exc:
            served.set_exception(exc)
            return
        served.set_result(stream.record)
        await stream.write(await stream.read())
        await stream.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        client = TlsEndpoint(
            EndpointSettings(
                ca.issue("client", [CLIENT_URI], server=False),
                PeerPolicy((ca.certificate,), AllowList.of([f"dns:{SERVER_NAME}"]), SERVER_NAME),
                hybrids,
                client_keys,
            )
        )
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listener.sockets[0].getsockname()[1]
        )
        stream: TlsStream = await asyncio.wait_for(client.connect(reader, writer), 20)
        await stream.write(b"over QKD")
        assert await asyncio.wait_for(stream.read(), DEADLINE) == b"over QKD"
        await stream.close()
        server_record = await asyncio.wait_for(served, DEADLINE)
    finally:
        listener.close()
        await listener.wait_closed()
    for record in (stream.record, server_record):
        assert record.group == "qkd_mlkem768"
        assert (record.flow, record.api) == (Flow.CLIENT_INITIATED, KeyApi.ETSI_004)
    assert stream.record.qkd_key_id == server_record.qkd_key_id is not None
    for ledger in (client_keys.ledger, server_keys.ledger):
        assert (ledger.taken, ledger.consumed, ledger.wasted) == (1, 1, 0)
    for keys in (client_keys, server_keys):
        await asyncio.wait_for(keys.drain(), DEADLINE)  # CLOSE runs after the handshake
    ksid = uuid.UUID(stream.record.qkd_key_id).bytes
    assert kmes.link.stream(ksid) is None  # both ends closed their stream
