"""The operator surfaces of real daemons under attack: the status listener, the metrics and
the log (docs/RELIABILITY.md, "Operator surfaces under attack").

An attacker who can reach a tunnel's port (unauthenticated hellos of every shape, from many
source addresses, certificates with made-up names), a hostile KME (any status code, any
message) and anyone who can reach an exposed status listener (the shipped Kubernetes
manifests bind it to 0.0.0.0) must not be able to: grow the set of metric series, put
their text into /metrics, break the one-JSON-object-per-line log, turn a flood into a
flood of warnings, or take the descriptors the tunnels need.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import string
from collections.abc import Awaitable, Iterable

from aiohttp import web

from qkdproxy.core.tls.hello import EXT_KEY_SHARE, parse_client_hello
from qkdproxy.core.tls.wire import HandshakeType
from qkdproxy.daemon.status import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE
from qkdproxy.sim.pki import CertificateAuthority
from tests.integration.test_security_properties import Pki, client_endpoint
from tests.integration.test_wire_hello import (
    IO_DEADLINE,
    client_key_share_ext,
    first_message,
    handshake_message,
    join_client_hello,
    records,
    split_client_hello,
    u16,
    vec,
)
from tests.system.test_daemon_system import CLIENT_ID, DEADLINE
from tests.system.test_key_attacks import OPEN_ADMISSION, zero_id_hello
from tests.system_helpers import (
    FaultHarness,
    KmeFront,
    Node,
    eventually,
    fault_pki_fixture,  # noqa: F401 - fixture
    faults_fixture,  # noqa: F401 - fixture
    works,
)

PQ = {"policy": "pq-required", "groups": ["X25519MLKEM768"], "kme": None}
# Every string an attacker chooses starts with this: it must never reach /metrics.
MARK = "zqx"
EXT_SERVER_NAME, EXT_GROUPS, EXT_ALPN = 0, 10, 16
# ETSI 014 answers by class (docs/OBSERVABILITY.md, kme_errors_total): each round sends three
# of each, a class the breaker counts as the KME failing (3xx: not ETSI 014; 5xx) always
# followed by one that proves it alive (unknown key; another 4xx), so the breaker does not
# open on the order alone. Completions may still reorder: hostile_round makes sure every
# answer was given before it returns.
KME_CODES = ([302, 399], [400, 401, 404], [500, 503, 504, 599], [403, 409, 418, 451, 499])


def hostile_text(rng: random.Random, longest: int, ascii_only: bool = False) -> str:
    """``MARK``, then printable, control, separator and (unless ``ascii_only``: names in
    a certificate's SAN) non-ASCII characters."""
    alphabet = string.printable + "\x00\x1b\x7f"
    if not ascii_only:
        alphabet += "\x85\u2028\u202e\ufffd\U0001f4a5"
    return MARK + "".join(rng.choice(alphabet) for _ in range(rng.randrange(longest)))


def varied_hello(base: bytes, rng: random.Random) -> bytes:
    """``base`` (a ClientHello's records) with a made-up server name, ALPN list, group list,
    cipher suites and key id."""
    body = first_message(base)[4:]
    prefix, extensions = split_client_hello(body)
    [share] = parse_client_hello(body).key_shares
    suites_at = 35 + body[34]
    old = int.from_bytes(prefix[suites_at : suites_at + 2], "big")
    suites = b"".join(
        u16(rng.choice([0x1301, 0x1302, 0x1303, rng.randrange(65536)]))
        for _ in range(rng.randrange(1, 16))
    )
    prefix = prefix[:suites_at] + vec(2, suites) + prefix[suites_at + 2 + old :]
    name = hostile_text(rng, 200).encode(errors="surrogateescape")[:250]
    protocols = [hostile_text(rng, 40).encode()[:255] for _ in range(rng.randrange(1, 4))]
    groups = [share.group, *(rng.randrange(65536) for _ in range(rng.randrange(4)))]
    key_id = os.urandom(16)
    replaced = {
        EXT_SERVER_NAME: vec(2, b"\x00" + vec(2, name)),
        EXT_ALPN: vec(2, b"".join(vec(1, p) for p in protocols)),
        EXT_GROUPS: vec(2, b"".join(u16(g) for g in groups)),
        EXT_KEY_SHARE: client_key_share_ext([(share.group, share.key_exchange[:-16] + key_id)])[4:],
    }
    kept = [(t, replaced.pop(t, d)) for t, d in extensions]
    hello = join_client_hello(prefix, [*replaced.items(), *kept])
    return records(handshake_message(HandshakeType.CLIENT_HELLO, hello))


async def send_and_read(port: int, payload: bytes, source: str) -> None:
    """Send ``payload`` and EOF from ``source``; read whatever comes back until the close."""
    with contextlib.suppress(OSError, TimeoutError):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        try:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            await asyncio.wait_for(reader.read(), IO_DEADLINE)
        finally:
            writer.close()


async def bounded(jobs: Iterable[Awaitable[None]], at_once: int = 16) -> None:
    """Run ``jobs`` with at most ``at_once`` in flight."""
    slots = asyncio.Semaphore(at_once)

    async def run(job: Awaitable[None]) -> None:
        async with slots:
            await job

    await asyncio.gather(*(run(j) for j in jobs))


def series(text: str) -> set[str]:
    """The series of an exposition: name and labels, without values or comments."""
    return {line.rpartition(" ")[0] for line in text.splitlines() if not line.startswith("#")}


class HostileKme(KmeFront):
    """A KME front whose ``dec_keys`` answers are ``answers`` in turn (status code and
    message); other calls reach the simulator, so its status poll never varies the set of
    series by when it happens to run."""

    answers: list[tuple[int, str]]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/dec_keys") and self.answers:
            status, message = self.answers.pop(0)
            return web.json_response({"message": message}, status=status)
        self.answer = None
        return await super()._handle(request)


async def hostile_server(faults: FaultHarness) -> tuple[Node, HostileKme]:
    kme = await faults.start_kme()
    front = HostileKme(faults.pki, "kme-b", "sae-b", kme.urls["kme-b"])
    front.answers = []
    faults.fronts.append(front)
    await front.start()
    _, backend_port = await faults.backend()
    server = await faults.node(faults.config(
        "server.toml",
        [faults.server_tunnel("t", backend_port, **OPEN_ADMISSION),
         faults.server_tunnel("pq", backend_port, **PQ, **OPEN_ADMISSION)],
        {"local": faults.kme_table(front.url, "b")},
        daemon={"log_format": "json"},
    ))  # fmt: skip
    return server, front


async def hostile_round(
    server: Node, front: HostileKme, hello: bytes, pki: Pki, seed: int, count: int
) -> None:
    """``count`` varied hellos and as many garbage openings from many sources, one hostile
    KME answer per class, and certificates with hostile names (our CA, and an unknown
    one) on the PQ tunnel."""
    rng = random.Random(seed)
    front.answers = [
        (rng.choice(codes), hostile_text(rng, 600)) for _ in range(3) for codes in KME_CODES
    ]

    def source() -> str:
        return f"127.0.{rng.randrange(256)}.{rng.randrange(1, 255)}"

    jobs = [
        send_and_read(server.ports["t"], varied_hello(hello, rng), source()) for _ in range(count)
    ]
    jobs += [
        send_and_read(rng.choice(list(server.ports.values())),
                      bytes([rng.choice([22, 23, 21, 0x16, 0x80, 71])]) + os.urandom(rng.randrange(600))
                      + hostile_text(rng, 100).encode(), source())
        for _ in range(count)
    ]  # fmt: skip
    await bounded(jobs)

    async def all_answers_given() -> bool:
        # An open breaker fails hellos without a KME call for up to a few backoffs (three
        # failures completed in a row open it): without this, how many answers a round gave
        # depended on how fast the machine ran it, and so did the set of series.
        if front.answers:
            await send_and_read(server.ports["t"], varied_hello(hello, rng), source())
        return not front.answers

    await eventually(all_answers_given, "the KME gave every hostile answer")
    strangers = CertificateAuthority.create()
    for _ in range(10):
        names = [f"spiffe://qkdproxy.test/{hostile_text(rng, 60, ascii_only=True)}"]
        for credentials in (
            pki.issue(names, common_name=hostile_text(rng, 15)),
            strangers.issue(hostile_text(rng, 15), names),
        ):
            endpoint = client_endpoint(pki, credentials, groups=["X25519MLKEM768"])
            with contextlib.suppress(Exception):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["pq"])
                try:
                    stream = await asyncio.wait_for(endpoint.connect(reader, writer), DEADLINE)
                    await stream.write(b"x")
                    await asyncio.wait_for(stream.read(), DEADLINE)
                finally:
                    writer.close()


async def test_hostile_input_adds_no_series_and_no_attacker_text_to_the_metrics(
    faults: FaultHarness,
) -> None:
    """Two rounds of the same kinds of hostile input with fresh made-up values (400 varied
    hellos and 400 garbage openings from up to 65,000 source addresses, 12 hostile KME
    answers with random status codes of every class and 600-character messages, 20
    certificates with hostile names): the second round adds no series, /metrics grows only
    by digits, and no attacker text is in it. The JSON log stays one object per line with
    bounded lines, and the warnings stay rate-limited."""
    hello = await zero_id_hello(faults)
    server, front = await hostile_server(faults)
    pki = Pki(faults.pki, faults.dev)
    before = await server.metrics()
    await hostile_round(server, front, hello, pki, seed=1, count=400)
    first = await server.metrics()
    await hostile_round(server, front, hello, pki, seed=2, count=400)
    second = await server.metrics()
    assert series(second) == series(first), sorted(series(second) ^ series(first))
    assert len(second) - len(first) < 2_000, (len(before), len(first), len(second))
    assert MARK not in second
    failures = [line for line in second.splitlines() if "handshake_failures_total{" in line]
    assert len(failures) > 3, failures  # the input did reach the handshake
    assert 'class="http_5xx"' in second and 'class="not_found"' in second

    lines = server.proc.lines
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    connections = [p for p in parsed if p.get("event") == "connection"]
    warnings = [p for p in parsed if p["level"] == "WARNING"]
    assert len(connections) > 500
    assert len(warnings) < 40, len(warnings)
    assert max(map(len, lines)) < 4_000
    assert all(len(c["reason"]) <= 300 for c in connections)


async def held_connections(port: int, sources: list[str]) -> list[asyncio.StreamWriter]:
    """Open one silent connection per entry of ``sources`` (its local address)."""
    held = []
    for source in sources:
        _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        held.append(writer)
    return held


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_status_connections_cannot_take_the_tunnels_descriptors(
    faults: FaultHarness,
) -> None:
    """The client daemon may open 128 descriptors (systemd's default is 1,024). 200 silent
    connections to its status listener from one address, then 200 from 100 addresses: the
    tunnel keeps carrying connections, the daemon holds at most MAX_CONNECTIONS of them, and
    another address still gets /healthz while one address holds its share. (Before: every
    connection was held for aiohttp's keep-alive hour; the tunnel's next connection failed.)"""
    _, backend_port = await faults.backend()
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port, **PQ)], {}
    ))  # fmt: skip
    client = await faults.node(faults.config(
        "client.toml", [faults.client_tunnel("t", server.ports["t"], **PQ)], {}
    ))  # fmt: skip
    pid = client.proc.process.pid
    assert await works(client.ports["t"])
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (128, 128))
    baseline = open_descriptors(pid)

    held = await held_connections(client.status_port, ["127.0.0.1"] * 200)
    try:
        assert await works(client.ports["t"])
        other = StatusFrom("127.0.0.2", client.status_port)
        assert await other.get("/healthz") == (200, "ok\n")
        held += await held_connections(
            client.status_port, [f"127.0.1.{i}" for i in range(1, 101) for _ in range(2)]
        )

        async def bounded_descriptors() -> bool:
            return open_descriptors(pid) <= baseline + MAX_CONNECTIONS

        await eventually(bounded_descriptors, "at most MAX_CONNECTIONS status sockets held")
        assert await works(client.ports["t"])
    finally:
        for writer in held:
            writer.close()
    assert MAX_CONNECTIONS_PER_SOURCE < 200


class StatusFrom:
    """GET on a status listener from a chosen local address, over a raw socket."""

    def __init__(self, source: str, port: int) -> None:
        self.source, self.port = source, port

    async def get(self, path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(self.source, 0)
        )
        try:
            writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), DEADLINE)
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode()


async def test_malformed_status_requests_are_logged_once_per_interval(
    faults: FaultHarness,
) -> None:
    """300 malformed requests of 6 kinds (hostile bytes in header values, header names and
    the request line, oversized lines, too many headers, a bad method after a good
    request) to the status listener: at most one line per kind of problem per interval,
    each short, and the listener keeps answering. (Before: one ERROR line with a
    traceback quoting the request for each, 300 lines and 4.4 MB.)"""
    _, backend_port = await faults.backend()
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port, **PQ)], {}
    ))  # fmt: skip
    rng = random.Random(3)
    garbage = "\x1b[2J\x00\u2028" * 500

    def request(i: int) -> bytes:
        kinds = [
            f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-{i}: {garbage}\r\n\r\n",
            f"GET /healthz HTTP/1.1\r\nHost: x\r\n{garbage}: {i}\r\n\r\n",
            f"GET /{garbage}{i} HTTP/1.1\r\nHost: x\r\n\r\n",
            f"GET /{'a' * 9000}{i} HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /healthz HTTP/1.1\r\n" + "".join(f"X{n}: y\r\n" for n in range(200)) + "\r\n",
            f"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n{MARK}\x01{i} / HTTP/1.1\r\n\r\n",
        ]
        return rng.choice(kinds).encode("utf-8", "surrogateescape")

    count = len(server.proc.lines)
    await bounded(send_and_read(server.status_port, request(i), "127.0.0.1") for i in range(300))
    assert await server.get("/healthz") == (200, "ok\n")
    lines = server.proc.lines[count:]
    assert len(lines) <= 2, lines
    assert all(len(line) < 1_000 for line in lines), lines


async def test_a_peer_certificate_name_is_cut_in_its_connection_line(
    faults: FaultHarness,
) -> None:
    """A client certificate from the tunnel's own CA whose first URI name is 20,000
    characters long (the allowed name comes second) connects, sends a byte and closes; the
    connection's line names the peer with at most logsafe's 1,000 characters and a cut mark,
    not the whole name (found by the operator-surfaces review: a line could be 64 KB)."""
    _, backend_port = await faults.backend()
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("pq", backend_port, **PQ)], {},
        daemon={"log_format": "json"},
    ))  # fmt: skip
    pki = Pki(faults.pki, faults.dev)
    long_name = "spiffe://qkdproxy.test/" + "n" * 20_000
    credentials = pki.issue([long_name, CLIENT_ID.removeprefix("uri:")], common_name="client")
    endpoint = client_endpoint(pki, credentials, groups=["X25519MLKEM768"])
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["pq"])
    try:
        stream = await asyncio.wait_for(endpoint.connect(reader, writer), DEADLINE)
        await stream.write(b"x")
        await stream.close()
    finally:
        writer.close()
    line = await server.proc.wait_line(lambda text: '"event":"connection"' in text)
    peer = json.loads(line)["peer"]
    assert peer.startswith(long_name[:900])
    assert peer.endswith("...(cut)")
    assert len(peer) <= 1_000 + len("...(cut)")


async def test_non_http_bytes_logged_at_debug_do_not_hide_the_next_bad_request(
    faults: FaultHarness,
) -> None:
    """aiohttp logs non-HTTP bytes on a new connection (TLS to the HTTP port, say) at DEBUG
    with the exception. That line is not shown at log_level info, so it must not take the
    interval's one bad-request WARNING: before, one such connection every 10 s hid every
    malformed request from the operator (a DEBUG line nobody saw carried their count)."""
    _, backend_port = await faults.backend()
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port, **PQ)], {}
    ))  # fmt: skip
    await send_and_read(server.status_port, b"\x16\x03\x01\x00\x05hello\r\n\r\n", "127.0.0.1")
    bad = b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad\x01Name: y\r\n\r\n"
    await send_and_read(server.status_port, bad, "127.0.0.1")
    line = await server.proc.wait_line(lambda text: "status listener" in text)
    assert "WARNING" in line and "Bad" in line and "(0 more" in line, line
