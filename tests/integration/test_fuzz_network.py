"""Hostile input over real sockets to real servers (and from hostile servers to real clients).

Each test starts its servers once and sends every hypothesis example to them, so what is
checked is also that a server *keeps serving*: after each hostile exchange, a valid client
completes a real call, and no key is ever handed out twice. Servers and clients under test:

- the ETSI 014 simulator (aiohttp, mutual TLS): random paths, verbs, queries and mutated
  JSON bodies; answers must be 2xx or 4xx with an ETSI Error document, never a 500;
- the ETSI 014 client against a raw "KME" sending mutated HTTP responses;
- the ETSI 004 simulator: random bytes and mutated valid frames; answers must be valid
  frames (an ERROR frame, then a close, for anything malformed);
- the TLS server endpoint: mutated real ClientHellos (plaintext alert or close, settled
  key ledger), and the TLS client endpoint behind a relay that mutates the ServerHello.

The budget comes from ``tests/unit/test_fuzz_parsers.py`` (``QKDPROXY_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
import yarl
from hypothesis import event, given
from hypothesis import strategies as st

from qkdproxy.core.etsi004.codec import (
    HEADER_SIZE,
    CloseRequest,
    CloseResponse,
    ErrorFrame,
    FrameDecoder,
    GetKeyRequest,
    GetKeyResponse,
    Message,
    OpenConnectRequest,
    OpenConnectResponse,
    QoS,
    Status,
    encode,
)
from qkdproxy.core.etsi014.models import ErrorBody, KeyContainer
from qkdproxy.core.keys import KeyNotFoundError, QkdKey, QkdKeyError
from qkdproxy.core.tls.keyexchange import QkdOptions
from qkdproxy.core.tls.wire import Alert, HandshakeType
from qkdproxy.io.tls_stream import HandshakeError, TlsEndpoint, TlsStreamError
from qkdproxy.keys.etsi004_client import Etsi004Client
from qkdproxy.keys.etsi014_client import Etsi014Client
from qkdproxy.keys.sslctx import client_context, server_context
from qkdproxy.sim.link import LinkSettings
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.certs import DevPki
from qkdproxy.tools.loopback import LoopbackPair, loopback_pair
from tests.integration.test_etsi004 import Kmes, running_kmes
from tests.integration.test_hostile import echo, kems, log_sources
from tests.integration.test_wire_hello import (
    IO_DEADLINE,
    FailureLog,
    capture_client_hello,
    first_message,
    settle,
    split_first_message,
)
from tests.unit.test_fuzz_parsers import (
    Mutation,
    apply_mutations,
    client_hello_fields,
    deep_json,
    fuzz_settings,
    handshake_piece,
    json_mutated,
    mutated,
    mutation_plans,
    record_pieces,
    server_hello_fields,
)

QKD = "qkd_mlkem768"
ALERT_HEADERS = (b"\x15\x03\x03\x00\x02", b"\x15\x03\x01\x00\x02")

LoopErrors = list[dict[str, Any]]


@pytest.fixture(autouse=True)
async def quiet_loop() -> AsyncIterator[LoopErrors]:
    """Fail the test if anything reached the event loop's exception handler."""
    loop = asyncio.get_running_loop()
    errors: LoopErrors = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)
    assert errors == []


# ================================================================= ETSI 014 simulator


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.create()


@dataclass
class Kme014:
    """The simulator pair, one mTLS session per SAE (sae-c is neither master nor slave)."""

    pair: KmePair
    sessions: dict[str, aiohttp.ClientSession]
    master: Etsi014Client
    slave: Etsi014Client
    delivered: set[str] = field(default_factory=set)


@pytest.fixture
async def kme014(pki: DevPki) -> AsyncIterator[Kme014]:
    link = LinkSettings(rate_bps=1e9, pool_bits=256 * 100_000)
    pair = KmePair(
        SimulatorSettings(link=link), [pki.kmes["kme-a"], pki.kmes["kme-b"]], [pki.ca.certificate]
    )
    await asyncio.wait_for(pair.start(), IO_DEADLINE)
    credentials = {
        **pki.saes,
        "sae-c": pki.ca.issue("sae-c", ["spiffe://qkdproxy.test/sae/sae-c"], server=False),
    }
    sessions = {
        name: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(c, [pki.ca.certificate])),
            timeout=aiohttp.ClientTimeout(total=IO_DEADLINE),
        )
        for name, c in credentials.items()
    }
    anchors = [pki.ca.certificate]
    master = Etsi014Client(pair.urls_014[0], client_context(pki.saes["sae-a"], anchors))
    slave = Etsi014Client(pair.urls_014[1], client_context(pki.saes["sae-b"], anchors))
    try:
        yield Kme014(pair, sessions, master, slave)
    finally:
        for client in (master, slave):
            await client.aclose()
        for session in sessions.values():
            await session.close()
        await asyncio.wait_for(pair.stop(), IO_DEADLINE)


SAE_NAMES = st.sampled_from(
    ["sae-a", "sae-a", "sae-a", "sae-b", "sae-b", "sae-c", "", "sae-a/x", "..", "sae%7Fb", "é"]
)


@dataclass(frozen=True, slots=True)
class HostileRequest:
    method: str
    path: str
    query: str
    body: bytes | None
    content_type: str


@st.composite
def hostile_requests(draw: st.DrawFn, key_id: str) -> HostileRequest:
    """A request aimed at the ETSI 014 API (``key_id`` is a genuine key waiting at kme-b)."""
    method = draw(st.sampled_from(["GET", "POST", "GET", "POST", "PUT", "DELETE"]))
    # Mostly well-aimed (else nearly everything is a 404), sometimes anything at all.
    sae = draw(SAE_NAMES) if draw(st.integers(0, 9)) < 8 else draw(st.text(max_size=300))
    calls = st.sampled_from(["status", "enc_keys", "dec_keys", "dec_keys"])
    call = draw(calls) if draw(st.integers(0, 9)) < 9 else draw(st.text(max_size=9))
    shape = draw(st.sampled_from(["normal"] * 7 + ["extra", "short", "prefix"]))
    segments = {
        "normal": ["api", "v1", "keys", sae, call],
        "extra": ["api", "v1", "keys", sae, call, "x"],
        "short": ["api", "v1", "keys", call],
        "prefix": ["api", "v2", "keys", sae, call],
    }[shape]
    path = "/" + "/".join(quote(s, safe="") for s in segments)
    values = st.sampled_from(
        ["1", "2", "256", "0", "-1", "9999999999", "²", key_id, key_id.upper()]
    )
    query = urlencode(
        draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["number", "size", "key_ID", "x"]),
                    values | st.text(max_size=12),
                ),
                max_size=3,
            )
        )
    )
    documents: list[Any] = [
        {"number": 1, "size": 256},
        {"key_IDs": [{"key_ID": key_id}]},
        {"key_IDs": [{"key_ID": key_id, "master_SAE_ID": "sae-a"}, {"key_ID": key_id}]},
    ]
    body = draw(
        st.none()
        | st.sampled_from(documents).flatmap(json_mutated).map(lambda d: json.dumps(d).encode())
        | st.sampled_from(documents).map(lambda d: json.dumps(d).encode())
        | st.binary(max_size=200)
        | st.builds(deep_json, st.integers(500, 20_000))
        | st.just(b'{"number": 1, "extension_optional": [{"pad": "' + b"x" * 70_000 + b'"}]}')
    )
    content_type = draw(st.sampled_from(["application/json", "application/json", "text/plain"]))
    return HostileRequest(method, path, query, body, content_type)


async def send(
    session: aiohttp.ClientSession, url: str, request: HostileRequest
) -> tuple[int, str, bytes]:
    target = yarl.URL(
        url + request.path + ("?" + request.query if request.query else ""), encoded=True
    )
    headers = {"Content-Type": request.content_type} if request.body is not None else {}
    async with session.request(
        request.method, target, data=request.body, headers=headers, allow_redirects=False
    ) as response:
        return response.status, response.content_type, await response.read()


@fuzz_settings(60)
@given(data=st.data(), sender=st.sampled_from(["sae-a", "sae-b", "sae-c"]), kme=st.integers(0, 1))
async def test_etsi014_simulator_survives_hostile_requests(
    kme014: Kme014, data: st.DataObject, sender: str, kme: int
) -> None:
    pair = kme014.pair
    [key] = await kme014.master.enc_keys("sae-b")
    key_id = str(uuid.UUID(bytes=key.key_id))
    pending = pair.link.pending_keys
    request = data.draw(hostile_requests(key_id))
    status, content_type, body = await send(kme014.sessions[sender], pair.urls_014[kme], request)
    event(f"HTTP {status}")
    assert status in (200, 400, 401, 404, 405), (status, body[:200])
    if status != 200:
        # Every refusal is an ETSI Error document, whatever was wrong.
        assert content_type == "application/json", body[:200]
        ErrorBody.from_json(json.loads(body))
        assert pair.link.pending_keys == pending
    else:
        document = json.loads(body)
        call = request.path.rsplit("/", 1)[-1]
        if call == "status":
            assert pair.link.pending_keys == pending
        else:
            size = 8 * len(base64.b64decode(document["keys"][0]["key"]))
            container = KeyContainer.from_json(document, size)
            ids = [k.key_id for k in container.keys]
            if call == "enc_keys":
                assert pair.link.pending_keys == pending + len(ids)
            else:
                assert call == "dec_keys"
                assert pair.link.pending_keys == pending - len(ids)
                assert not set(ids) & kme014.delivered, "a key was delivered twice"
                kme014.delivered.update(ids)
    # A valid slave still gets the genuine key, unless the hostile request just took it.
    if key_id in kme014.delivered:
        with pytest.raises(KeyNotFoundError):
            await kme014.slave.dec_keys("sae-a", [key.key_id])
    else:
        [again] = await kme014.slave.dec_keys("sae-a", [key.key_id])
        assert again == key
        kme014.delivered.add(key_id)


async def test_unknown_paths_and_verbs_get_an_error_document(kme014: Kme014) -> None:
    """Regression: aiohttp's own 404/405 answers were text/plain, not ETSI Error documents."""
    session, base = kme014.sessions["sae-a"], kme014.pair.urls_014[0]
    for method, path, code in [
        ("GET", "/api/v2/keys/sae-b/status", 404),
        ("GET", "/api/v1/keys/sae-b/colour", 404),
        ("DELETE", "/api/v1/keys/sae-b/enc_keys", 405),
    ]:
        status, content_type, body = await send(
            session, base, HostileRequest(method, path, "", None, "application/json")
        )
        assert (status, content_type) == (code, "application/json")
        assert ErrorBody.from_json(json.loads(body)).message


async def test_deeply_nested_json_body_is_a_bad_request(kme014: Kme014) -> None:
    """Regression: 1000 nested brackets made json.loads raise RecursionError: HTTP 500.
    (20,000 levels: Python 3.13's decoder takes 5,000 without a RecursionError.)"""
    request = HostileRequest(
        "POST", "/api/v1/keys/sae-b/enc_keys", "", deep_json(20_000), "application/json"
    )
    status, content_type, body = await send(
        kme014.sessions["sae-a"], kme014.pair.urls_014[0], request
    )
    assert (status, content_type) == (400, "application/json")
    assert json.loads(body)["message"] == "request body is not valid JSON"


# ============================================================ ETSI 014 client vs raw KME


def http_response(status: int, body: bytes, extra: bytes = b"") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 503: b"Service Unavailable"}
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n" % (status, reason.get(status, b"X"))
        + extra
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )


KEY_ID = uuid.UUID(int=0x1234)
GOOD_KEYS = json.dumps(
    {"keys": [{"key_ID": str(KEY_ID), "key": base64.b64encode(bytes(range(32))).decode()}]}
).encode()


@st.composite
def kme_answers(draw: st.DrawFn) -> bytes:
    """An HTTP response from a hostile KME: a valid answer, mutated at the HTTP or JSON level."""
    kind = draw(st.sampled_from(["http", "json", "chunked", "raw"]))
    if kind == "json":
        document = draw(json_mutated(json.loads(GOOD_KEYS)))
        status = draw(st.sampled_from([200, 200, 400, 404, 503]))
        return http_response(status, json.dumps(document).encode())
    if kind == "chunked":
        chunk = GOOD_KEYS[: draw(st.integers(0, len(GOOD_KEYS)))]
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        return draw(mutated(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    return draw(mutated(http_response(200, GOOD_KEYS)))


@dataclass
class RawKme:
    """A TLS server that answers every HTTP request with the bytes in ``answer``, then closes."""

    port: int = 0
    answer: bytes = b""
    served: int = 0


@asynccontextmanager
async def raw_kme(pki: DevPki) -> AsyncIterator[RawKme]:
    kme = RawKme()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length:")),
                0,
            )  # fmt: skip
            await reader.readexactly(length)
            kme.served += 1
            writer.write(kme.answer)
            await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    context = server_context(pki.kmes["kme-a"], [pki.ca.certificate])
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    kme.port = server.sockets[0].getsockname()[1]
    try:
        yield kme
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def hostile_kme(pki: DevPki) -> AsyncIterator[RawKme]:
    async with raw_kme(pki) as kme:
        yield kme


@fuzz_settings(100)
@given(answer=kme_answers(), call=st.sampled_from(["enc", "dec", "status"]))
async def test_etsi014_client_against_a_hostile_kme(
    pki: DevPki, hostile_kme: RawKme, answer: bytes, call: str
) -> None:
    hostile_kme.answer = answer
    context = client_context(pki.saes["sae-a"], [pki.ca.certificate])
    client = Etsi014Client(f"https://127.0.0.1:{hostile_kme.port}", context, timeout_s=IO_DEADLINE)
    keys: list[QkdKey] = []
    refused: QkdKeyError | None = None
    try:
        if call == "enc":
            keys = await client.enc_keys("sae-b")
        elif call == "dec":
            keys = await client.dec_keys("sae-b", [KEY_ID.bytes])
        else:
            await client.status("sae-b")
    except QkdKeyError as exc:
        refused = exc
    finally:
        await client.aclose()
    event(type(refused).__name__ if refused else "accepted")
    if refused is not None:
        # Liveness, not speed: the KME always answers and closes, so nothing waits it out.
        assert getattr(refused, "kind", None) != "timeout", refused
    elif call != "status":
        # enc_keys takes whatever (valid, unique) id the KME chose; dec_keys only the one asked.
        [key] = keys
        assert len(key.key_id) == 16 and len(key.material) == 32
        assert call == "enc" or key.key_id == KEY_ID.bytes


# ================================================================= ETSI 004 simulator

SMALL_PAYLOAD = 4096  # the servers' frame limit here: padding past it is cheap
IDLE_S = 2.0  # bounds a GET_KEY that a mutated QoS made wait for an absent peer


@dataclass
class Kme004:
    kmes: Kmes
    contexts: dict[str, ssl.SSLContext]
    # (app, KSID, index) -> key: every chunk each application received, by any path.
    received: dict[tuple[str, bytes, int], bytes] = field(default_factory=dict)

    def client(self, app: str, peer: str, via: str) -> Etsi004Client:
        return Etsi004Client(
            "127.0.0.1", self.kmes.ports[via], self.contexts[app], app, peer,
            server_hostname="localhost", call_timeout=IO_DEADLINE,
        )  # fmt: skip

    def got(self, app: str, ksid: bytes, index: int, key: bytes) -> None:
        """Record a delivery: never twice to one application, the same key at both ends."""
        assert (app, ksid, index) not in self.received, f"{app} got key {index} twice"
        self.received[(app, ksid, index)] = key
        for other in ("alice", "bob"):
            assert self.received.get((other, ksid, index), key) == key, "the ends disagree"


@pytest.fixture
async def kme004(ca: CertificateAuthority) -> AsyncIterator[Kme004]:
    async with running_kmes(ca, idle_timeout=IDLE_S, max_payload=SMALL_PAYLOAD) as kmes:
        contexts = {app: kmes.app_context(app) for app in ("alice", "bob", "mallory")}
        yield Kme004(kmes, contexts)


async def hostile_session(kme: Kme004, app: str, data: bytes) -> list[Message]:
    """Send ``data`` then padding that completes any frame and breaks the next one, so the
    server always reaches a verdict; return every frame it sent before closing."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", kme.kmes.ports["a"], ssl=kme.contexts[app], server_hostname="localhost"
    )
    received = bytearray()
    try:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            writer.write(data + bytes(HEADER_SIZE + SMALL_PAYLOAD))
            await writer.drain()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            async with asyncio.timeout(IO_DEADLINE):
                while chunk := await reader.read(65536):
                    received += chunk
    finally:
        writer.transport.abort()
    decoder, messages = FrameDecoder(), list[Message]()
    decoder.feed(bytes(received))
    while (message := decoder.next_message()) is not None:  # CodecError fails the test
        messages.append(message)
    assert decoder.buffered == 0, "the KME sent a partial frame"
    return messages


def etsi004_seeds(ksid: bytes) -> list[bytes]:
    qos = QoS(32, timeout_ms=0, ttl_s=600)
    return [
        encode(OpenConnectRequest("alice", "bob", qos, ksid)),
        encode(OpenConnectRequest("alice", "bob", qos)),
        *(encode(GetKeyRequest(ksid, i, 1024)) for i in range(3)),
        encode(CloseRequest(ksid)),
    ]


@fuzz_settings(60)
@given(data=st.data(), app=st.sampled_from(["alice", "alice", "alice", "mallory"]))
async def test_etsi004_simulator_survives_hostile_frames(
    kme004: Kme004, data: st.DataObject, app: str
) -> None:
    alice, bob = kme004.client("alice", "bob", "a"), kme004.client("bob", "alice", "b")
    try:
        ksid = await alice.open(None)
        assert await bob.open(ksid) == ksid
        seeds = data.draw(st.lists(st.sampled_from(etsi004_seeds(ksid)), min_size=1, max_size=4))
        stream = b"".join(seeds)
        hostile = data.draw(
            mutated(stream, [(4, 4), (16, 4)]) | st.just(stream) | st.binary(max_size=200)
        )
        answers = await hostile_session(kme004, app, hostile)
        event(f"answers: {sorted({type(m).__name__ for m in answers})}")
        # Only responses, and an ERROR frame only as the last word before the close.
        for message in answers:
            assert isinstance(
                message, OpenConnectResponse | GetKeyResponse | CloseResponse | ErrorFrame
            ), message
        assert all(not isinstance(m, ErrorFrame) for m in answers[:-1])
        for message in answers:
            if isinstance(message, GetKeyResponse) and message.status is Status.SUCCESS:
                where = json.loads(message.metadata)
                key_ksid = uuid.UUID(where["ksid"]).bytes
                kme004.got(app, key_ksid, where["index"], message.key)
        # The genuine applications: typed answers only, and the once-per-end rule holds.
        for index in range(3):
            for name, client in (("alice", alice), ("bob", bob)):
                try:
                    key = await client.get_key(ksid, index)
                except QkdKeyError as exc:
                    event(f"{name} refused: {type(exc).__name__}")
                    continue
                kme004.got(name, ksid, index, key)
    finally:
        await alice.aclose()
        await bob.aclose()
    await fresh_stream_works(kme004)


async def fresh_stream_works(kme: Kme004) -> None:
    alice, bob = kme.client("alice", "bob", "a"), kme.client("bob", "alice", "b")
    try:
        ksid = await alice.open(None)
        assert await bob.open(ksid) == ksid
        key = await alice.get_key(ksid, 0)
        assert await bob.get_key(ksid, 0) == key
        await alice.close(ksid)
        await bob.close(ksid)
    finally:
        await alice.aclose()
        await bob.aclose()


# ============================================================ ETSI 004 client vs raw KME


@dataclass
class RawKme004:
    """A TLS "KME" that reads one request per connection, answers with the next bytes in
    ``answers`` (nothing once they run out) and closes."""

    client_context: ssl.SSLContext
    port: int = 0
    answers: list[bytes] = field(default_factory=list)
    requests: list[Message] = field(default_factory=list)


@pytest.fixture
async def hostile_kme004(ca: CertificateAuthority) -> AsyncIterator[RawKme004]:
    alice = ca.issue("alice", ["spiffe://qkdproxy.test/alice"], server=False)
    kme = RawKme004(client_context(alice, [ca.certificate], ssl.TLSVersion.TLSv1_3))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        try:
            while (request := decoder.next_message()) is None:
                data = await reader.read(65536)
                if not data:
                    return
                decoder.feed(data)
            kme.requests.append(request)
            if kme.answers:
                writer.write(kme.answers.pop(0))
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.transport.abort()

    credentials = ca.issue("kme-x", ["localhost"], client=False)
    context = server_context(credentials, [ca.certificate], ssl.TLSVersion.TLSv1_3)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    kme.port = server.sockets[0].getsockname()[1]
    try:
        yield kme
    finally:
        server.close()
        await server.wait_closed()


ANSWER_KSID = uuid.UUID(int=0xABC).bytes
ANSWER_QOS = QoS(32, timeout_ms=1000, ttl_s=600)
SEED_ANSWERS = {
    "open": encode(OpenConnectResponse(Status.SUCCESS, ANSWER_QOS, ANSWER_KSID)),
    "get": encode(GetKeyResponse(Status.SUCCESS, 0, bytes(range(32)), b'{"index":0}')),
    "close": encode(CloseResponse(Status.SUCCESS)),
}


@fuzz_settings(60)
@given(call=st.sampled_from(["open", "get", "close"]), data=st.data())
async def test_etsi004_client_against_a_hostile_kme(
    hostile_kme004: RawKme004, call: str, data: st.DataObject
) -> None:
    """Mutated (or wrong, or random) answers to the client's request: a typed key-source
    error, or a result that is exactly what was asked for."""
    seed = SEED_ANSWERS[call]
    fields = [(4, 4), (16, 4), (52, 4)] if call == "get" else [(4, 4)]
    answer = st.one_of(
        mutated(seed, fields),
        st.sampled_from([*SEED_ANSWERS.values(), encode(ErrorFrame())]),
        st.binary(max_size=100),
    )
    hostile_kme004.answers = [data.draw(answer), data.draw(answer)]  # a retry gets the second
    client = Etsi004Client(
        "127.0.0.1", hostile_kme004.port, hostile_kme004.client_context, "alice", "bob",
        server_hostname="localhost", call_timeout=IO_DEADLINE,
    )  # fmt: skip
    result: bytes | None = None
    refused: QkdKeyError | None = None
    try:
        if call == "open":
            result = await client.open(None)
        elif call == "get":
            result = await client.get_key(ANSWER_KSID, 0)
        else:
            await client.close(ANSWER_KSID)
    except QkdKeyError as exc:
        refused = exc
    finally:
        await client.aclose()
    event(type(refused).__name__ if refused else "accepted")
    if refused is not None:
        # Liveness, not speed: every answer ends with a close, so nothing waits it out.
        assert "no answer in" not in str(refused), refused
    elif call == "open":
        assert result is not None and len(result) == 16 and result != bytes(16)
    elif call == "get":
        assert result is not None and len(result) == 32


# ====================================================================== TLS endpoints


@dataclass
class TlsTarget:
    """A real QKD TLS server (echo behind it) with logged key sources at both ends."""

    pair: LoopbackPair
    failures: FailureLog
    fetched: list[bytes]  # key ids the server fetched from its KME, in order
    taken: list[bytes]  # key ids the client took from its KME, in order


@pytest.fixture
async def tls_target() -> AsyncIterator[TlsTarget]:
    failures = FailureLog()
    async with loopback_pair(kems(QKD), server_failures=failures) as pair:
        server_log, client_log = log_sources(pair.server_keys), log_sources(pair.client_keys)
        yield TlsTarget(pair, failures, server_log.fetched, client_log.taken)
        await settle()


async def attack(port: int, payload: bytes) -> bytes:
    """Send ``payload`` and EOF; everything the server sent before it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        # The server may refuse (and close) before it has read everything.
        with contextlib.suppress(ConnectionError):
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(IO_DEADLINE):
                while chunk := await reader.read(65536):
                    received += chunk
    finally:
        writer.transport.abort()
    return bytes(received)


def assert_ledgers_settled(pair: LoopbackPair) -> None:
    for ledger in (pair.server_keys.ledger, pair.client_keys.ledger):
        assert ledger.outstanding == 0
        assert ledger.taken == ledger.consumed + ledger.wasted


async def wait_accepted(pair: LoopbackPair, count: int) -> None:
    """Until the server has ended ``count`` handshake attempts (bounded, no polling)."""
    async with asyncio.timeout(IO_DEADLINE):
        await pair.wait_for_server(lambda: pair.echo.accepted >= count)


async def still_serves(target: TlsTarget) -> None:
    """A valid client completes a QKD handshake and echoes through the server."""
    pair = target.pair
    stream = await asyncio.wait_for(
        pair.handshake(pair.client(kems(QKD), QkdOptions())), IO_DEADLINE
    )
    assert stream.record.qkd_key_id is not None
    await echo(stream)
    assert len(target.fetched) == len(set(target.fetched)), "a key was fetched twice"
    assert len(target.taken) == len(set(target.taken)), "a key was taken twice"


@fuzz_settings(40)
@given(data=st.data(), sizes=st.lists(st.integers(1, 1500), max_size=3))
async def test_tls_server_survives_mutated_client_hellos(
    tls_target: TlsTarget, data: st.DataObject, sizes: list[int]
) -> None:
    pair = tls_target.pair
    hello = await capture_client_hello(pair.client(kems(QKD), QkdOptions()))
    body = first_message(hello)[4:]
    message = handshake_piece(HandshakeType.CLIENT_HELLO, (body, client_hello_fields(body)))
    payload = data.draw(mutated(*record_pieces(message, sizes)))
    failed, accepted = len(tls_target.failures), pair.echo.accepted
    answer = await attack(pair.port, payload)
    await wait_accepted(pair, accepted + 1)
    [failure] = tls_target.failures[failed:]
    assert isinstance(failure, HandshakeError), repr(failure)
    event(f"alert {failure.alert}" if failure.alert is not None else "closed")
    if answer[:1] == b"\x15":  # one plaintext alert, and nothing after it: fatal, or the
        # close_notify that answers a (forged) close_notify
        assert answer[:5] in ALERT_HEADERS and len(answer) == 7, answer.hex()
        assert answer[5] == 2 or answer[5:] == b"\x01\x00", answer.hex()
    elif answer:  # the hello survived the mutation: the server answered it
        assert answer[:1] == b"\x16"
        event("server answered")
    assert_ledgers_settled(pair)
    await still_serves(tls_target)


class MutatingRelay:
    """Relays one client to the server, applying ``mutate`` to the ServerHello's records."""

    def __init__(self, upstream: int, mutate: Callable[[bytes], bytes]) -> None:
        self.upstream, self.mutate = upstream, mutate
        self.port = 0
        self.hello: bytes | None = None
        self.forged: bytes | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> MutatingRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        if self._handlers:  # each ends once both of its sides have closed
            async with asyncio.timeout(IO_DEADLINE):
                await asyncio.wait(self._handlers)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def to_client() -> None:
            buffer, hello = b"", None
            with contextlib.suppress(OSError):
                while (hello := split_first_message(buffer)) is None:
                    data = await up_reader.read(65536)
                    if not data:
                        return
                    buffer += data
            if hello is None:
                return
            self.hello, self.forged = hello, self.mutate(hello)
            writer.write(self.forged + buffer[len(hello) :])
            await pipe(up_reader, writer)

        try:
            await asyncio.gather(pipe(reader, up_writer), to_client())
        finally:
            up_writer.transport.abort()
            writer.transport.abort()


def handshake_content(data: bytes) -> bytes | None:
    """What the TLS engine makes of these records: the concatenated handshake bytes (record
    boundaries and the legacy record version do not count: TLS 1.3 ignores the version);
    None if anything else is in there."""
    content, pos = bytearray(), 0
    while pos < len(data):
        if pos + 5 > len(data) or data[pos] != 0x16:
            return None
        end = pos + 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
        if end > len(data):
            return None
        content += data[pos + 5 : end]
        pos = end
    return bytes(content)


async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    # OSError: either side reset, or shutting down a socket already closed (ENOTCONN).
    with contextlib.suppress(OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()


def mutate_server_hello(plan: list[Mutation]) -> Callable[[bytes], bytes]:
    def mutate(records: bytes) -> bytes:
        body = first_message(records)[4:]
        message = handshake_piece(HandshakeType.SERVER_HELLO, (body, server_hello_fields(body)))
        data, fields = record_pieces(message, [len(records) - 5])  # one record, as sent
        return apply_mutations(data, fields, plan)

    return mutate


@fuzz_settings(40)
@given(plan=mutation_plans)
async def test_tls_client_survives_a_mutated_server_hello(
    tls_target: TlsTarget, plan: list[Mutation]
) -> None:
    pair = tls_target.pair
    # A forged ServerHello may leave the client waiting for bytes that never come (its
    # timeout is then the typed outcome: no assertion depends on how long anything took).
    client = TlsEndpoint(
        replace(pair.client(kems(QKD), QkdOptions()).settings, handshake_timeout=0.5)
    )
    failed, accepted = len(tls_target.failures), pair.echo.accepted
    async with MutatingRelay(pair.port, mutate_server_hello(plan)) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        try:
            stream = await asyncio.wait_for(client.connect(reader, writer), IO_DEADLINE)
        except HandshakeError as exc:
            event(
                f"client: alert {exc.alert}" if exc.alert is not None else f"client: {exc.reason}"
            )
            refused = True
        else:
            # Only a ServerHello whose handshake bytes are intact may be accepted.
            assert relay.hello is not None and relay.forged is not None
            assert handshake_content(relay.forged) == handshake_content(relay.hello), "forgery"
            event("record framing changed only")
            await echo(stream)
            refused = False
        finally:
            writer.transport.abort()
        await wait_accepted(pair, accepted + 1)
    new = tls_target.failures[failed:]
    assert all(isinstance(f, HandshakeError | TlsStreamError) for f in new), new
    if refused:
        assert any(isinstance(f, HandshakeError) for f in new), new
    assert_ledgers_settled(pair)
    await still_serves(tls_target)


async def test_an_sslv2_style_record_after_the_handshake_is_a_stream_error() -> None:
    async with loopback_pair(kems("x25519")) as pair, Injector(pair.port) as injector:
        reader, writer = await asyncio.open_connection("127.0.0.1", injector.port)
        try:
            stream = await asyncio.wait_for(
                pair.client(kems("x25519"), QkdOptions()).connect(reader, writer), IO_DEADLINE
            )
            await stream.write(b"ping")
            assert await asyncio.wait_for(stream.read(), IO_DEADLINE) == b"ping"
            # What an on-path attacker can inject into any TCP stream, no keys needed.
            (await injector.to_client).write(b"\x80\x12" + bytes(18))
            with pytest.raises(TlsStreamError) as raised:
                await asyncio.wait_for(stream.read(), IO_DEADLINE)
            # Any outer type but 0x17 after the handshake is an unprotected record.
            assert raised.value.alert == Alert.UNEXPECTED_MESSAGE
        finally:
            writer.transport.abort()


class Injector:
    """A relay whose client-facing side the test can write to, as if the server sent it."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.to_client: asyncio.Future[asyncio.StreamWriter] = (
            asyncio.get_running_loop().create_future()
        )
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Injector:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        if self._handlers:
            async with asyncio.timeout(IO_DEADLINE):
                await asyncio.wait(self._handlers)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self.to_client.set_result(writer)
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            up_writer.transport.abort()
            writer.transport.abort()
