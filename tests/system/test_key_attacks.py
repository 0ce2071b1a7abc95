"""The key-economy attacks of issue 12, through real daemons and the KME simulator.

Each test is written from the attack's description and bounded to a few seconds of traffic:
- unauthenticated drain: ClientHellos with a valid ML-KEM share and a zero key id;
- remote downgrade: the same flood while qkd-preferred clients share the KME link;
- flush amplification: a zero-id hello, then a forged plaintext illegal_parameter (and an
  on-path forger refusing a client's keys);
- keys offered to the wrong peer: two client tunnels on one [kme] section, two servers on
  the same slave SAE (ETSI 014 keys and ETSI 004 streams);
- waste by design: what a daemon draws at start, idle and under steady traffic (and what
  an ETSI 004 server opens ahead);
- ETSI 004 streams named by the peer: late acknowledgements at the client, streams the
  client let go of at the server.
Key counts come from the daemons' /metrics (qkdproxy_qkd_keys_drawn, qkdproxy_qkd_key_fates).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from qkdproxy.core.tls.keyexchange import Flow, QkdOptions
from qkdproxy.core.tls.wire import Alert, plaintext_alert
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.sources import KeySources
from tests.integration.test_security_properties import Pki, capture, client_endpoint, first_answer
from tests.integration.test_wire_hello import close_writer, read_first_message
from tests.system_helpers import (
    FaultHarness,
    Node,
    eventually,
    fault_pki_fixture,  # noqa: F401 - fixture
    faults_fixture,  # noqa: F401 - fixture
    metric,
    works,
)

FLOOD_S = 2.0
BOTH = ["client", "server"]
# Admission control (issue 14) would reset part of a flood from one loopback address before
# any TLS work: set it out of the way, so that what is measured is the key budget alone.
OPEN_ADMISSION: dict[str, Any] = {
    "handshake_rate_per_source": 1e6,
    "handshake_burst_per_source": 1e6,
}


async def zero_id_hello(faults: FaultHarness) -> bytes:
    """A ClientHello with a valid ML-KEM-768 share and an all-zero key id (what a
    server-initiated client sends), from a client that will never finish a handshake."""
    keys = KeyContext(KeySources(), QkdOptions(flow=Flow.SERVER_INITIATED))
    hello = await capture(client_endpoint(Pki(faults.pki, faults.dev), keys=keys))
    assert hello is not None
    return hello


async def flood(port: int, hello: bytes, seconds: float, then: bytes = b"") -> int:
    """Replay ``hello`` at ``port`` for ``seconds`` (one connection at a time, each read up to
    the server's first answer, then ``then`` sent): the number of connections made."""
    count, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        if then:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(hello)
            try:
                await asyncio.wait_for(read_first_message(reader), 5)
                writer.write(then)
                await writer.drain()
            except (EOFError, ConnectionError):
                pass
            await close_writer(writer)
        else:
            await first_answer(port, hello)
        count += 1
    return count


async def fates(node: Node, kme: str = "local") -> dict[str, float]:
    """The node's key account: drawn, held and every fate."""
    text = await node.metrics()
    out = {"drawn": metric(text, "qkdproxy_qkd_keys_drawn_total", kme=kme)}
    out["held"] = metric(text, "qkdproxy_qkd_keys_held", kme=kme)
    for fate in ("consumed", "failed_handshake", "expired", "flushed", "refused", "stranded"):
        out[fate] = metric(text, "qkdproxy_qkd_key_fates_total", kme=kme, fate=fate)
    settled = sum(v for k, v in out.items() if k not in ("drawn", "held"))
    assert out["drawn"] == settled + out["held"], out  # every key drawn is accounted for
    return out


async def pair(
    faults: FaultHarness, server_flows: list[str], *kme_args: str, api: str = "014",
    kme_options: dict[str, Any] | None = None, **client: object,
) -> tuple[Node, Node]:  # fmt: skip
    """A server daemon and a client daemon, each with a [kme.local] section (``kme_options``
    in both) on one simulator."""
    kme = await faults.start_kme(*kme_args)
    _, backend_port = await faults.recording_backend()
    options = kme_options or {}
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port, flows=server_flows, **OPEN_ADMISSION)],
        {"local": faults.kme_side(kme, "b", api, **options)},
    ))  # fmt: skip
    node = await faults.node(faults.config(
        "client.toml", [faults.client_tunnel("c", server.ports["t"], **client)],
        {"local": faults.kme_side(kme, "a", api, **options)},
    ))  # fmt: skip
    return server, node


async def test_unauthenticated_drain_costs_nothing_with_the_flow_off_and_is_bounded_on(
    faults: FaultHarness,
) -> None:
    """Zero-id hellos from one source for FLOOD_S seconds. Server-initiated flow off (the
    default): no key drawn, no KME call, a handshake_failure alert. On: at most the source
    budget (burst 10 + 1/s) is spent."""
    hello = await zero_id_hello(faults)
    kme = await faults.start_kme()
    _, backend_port = await faults.recording_backend()
    server = await faults.node(faults.config(
        "server.toml",
        [faults.server_tunnel("off", backend_port, **OPEN_ADMISSION),
         faults.server_tunnel("on", backend_port, flows=BOTH, **OPEN_ADMISSION)],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    ))  # fmt: skip

    async def floor_drawn() -> bool:  # the "on" tunnel's supply, filled at start
        return (await fates(server))["drawn"] == 4

    await eventually(floor_drawn, "the server-initiated supply drew its floor")
    before = await fates(server)
    sent_off = await flood(server.ports["off"], hello, FLOOD_S / 2)
    after_off = await fates(server)
    assert after_off["drawn"] == before["drawn"], (before, after_off)
    text = await server.metrics()
    refused = metric(text, "qkdproxy_preauth_refused_total", tunnel="off", reason="flow_off")
    assert refused == sent_off > 10
    record = await server.proc.wait_record(lambda r: r["tunnel"] == "off")
    assert record["failure"] == "handshake_failure"
    assert "server-initiated QKD flow is off" in record["reason"]

    started = time.monotonic()
    sent_on = await flood(server.ports["on"], hello, FLOOD_S)
    spent_budget = 10 + (time.monotonic() - started) + 1
    after_on = await fates(server)
    # Keys handed to the flood: each failed its handshake (the client never finished).
    spent = after_on["failed_handshake"] - after_off["failed_handshake"]
    assert sent_on > spent_budget and 0 < spent <= spent_budget, (sent_on, spent)
    text = await server.metrics()
    assert metric(text, "qkdproxy_preauth_refused_total", tunnel="on", reason="source_budget")


async def test_remote_downgrade_a_flood_does_not_make_qkd_preferred_fall_back(
    faults: FaultHarness,
) -> None:
    """A realistic link (10 keys/s) shared by a qkd-preferred client and a server serving
    both flows; a zero-id flood at the server meanwhile. Every legitimate connection
    completes with QKD; none falls back. The pool holds more keys than the legitimate
    client can use in the flood's seconds (over 500 connections a second here), and the
    client tunnel's own admission control is out of the way (its per-source budget is
    200 + 100/s), so what is measured is what the flood takes, not the client's own use."""
    hello = await zero_id_hello(faults)
    server, client = await pair(
        faults, BOTH, "--rate-bps", "2560", "--pool-bits", str(4000 * 256),
        policy="qkd-preferred", groups=["qkd_mlkem768", "X25519MLKEM768"], **OPEN_ADMISSION,
    )  # fmt: skip
    attack = asyncio.create_task(flood(server.ports["t"], hello, FLOOD_S))
    outcomes = []
    while not attack.done():
        outcomes.append(await works(client.ports["c"], 2000))
    await attack
    # A count, not the list: pytest 8 on Python 3.11 once failed to render a 1,400-item
    # list here (INTERNALERROR: AST constructor recursion depth mismatch), ending the run.
    succeeded = sum(outcomes)
    assert len(outcomes) >= 5, len(outcomes)
    assert succeeded >= 0.95 * len(outcomes), f"{succeeded} of {len(outcomes)} worked"
    await client.settled()
    records = client.proc.records()
    assert not any(r["fallback"] for r in records), records
    assert all(r["group"] == "qkd_mlkem768" for r in records if r["failure"] is None)
    text = await client.metrics()
    assert metric(text, "qkdproxy_policy_fallbacks_total") == 0


async def test_flush_amplification_a_forged_refusal_costs_one_key(faults: FaultHarness) -> None:
    """Server side: zero-id hellos each followed by a forged plaintext illegal_parameter:
    every connection costs at most its own key, nothing is flushed. Client side: an
    on-path forger refusing the client's first hellos: one key each, no flush before
    several refusals in a row."""
    hello = await zero_id_hello(faults)
    server, client = await pair(faults, BOTH)
    assert await works(client.ports["c"])
    before = await fates(server)
    forged = plaintext_alert(Alert.ILLEGAL_PARAMETER)
    sent = await flood(server.ports["t"], hello, 1.0, then=forged)
    after = await fates(server)
    assert after["flushed"] == before["flushed"] == 0, after
    lost = after["refused"] + after["failed_handshake"]
    lost -= before["refused"] + before["failed_handshake"]
    assert 0 < lost <= sent, (lost, sent)

    # The forger sits between the client and the server and refuses every key it sees.
    async def forger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_first_message(reader)
            writer.write(forged)
            await writer.drain()
        except (EOFError, ConnectionError):
            pass
        await close_writer(writer)

    relay = await asyncio.start_server(forger, "127.0.0.1", 0)
    port = relay.sockets[0].getsockname()[1]
    on_path = await faults.node(faults.config(
        "onpath.toml", [faults.client_tunnel("c", port)],
        {"local": faults.kme_table(str(faults_kme_url(client)), "a")},
    ))  # fmt: skip
    try:
        for _ in range(2):
            assert not await works(on_path.ports["c"], 100)
    finally:
        relay.close()
    await on_path.settled()
    account = await fates(on_path)
    assert account["flushed"] == 0 and account["refused"] == 2, account
    failed = [r for r in on_path.proc.records() if r["failure"]]
    # Every failed handshake's log line names the key it spent.
    assert all(r["spent_key_id"] for r in failed), failed


def faults_kme_url(node: Node) -> str:
    """The ETSI 014 URL a daemon's [kme.local] section names."""
    for line in node.config.read_text().splitlines():
        if line.startswith("url = "):
            return line.split('"')[1]
    raise AssertionError("no url in the configuration")


@pytest.mark.parametrize("api", ["014", "004"])
async def test_keys_announced_to_one_peer_are_never_offered_to_another(
    faults: FaultHarness, api: str
) -> None:
    """Two client tunnels share one [kme] section and dial two server daemons that use the
    same slave SAE (an HA pair). Every request works: no refusal, no flush; each key id
    (ETSI 004: KSID) is used with the server it was announced to, and each server sees
    exactly the ids of the tunnel that dials it. Over ETSI 004 a stream announced to one
    server is opened by it at once: offered to the other, that one's OPEN_CONNECT fails
    (KSID in use by its application) and the connection with it."""
    kme = await faults.start_kme()
    _, backend_port = await faults.recording_backend()
    servers = []
    for i in range(2):
        config = faults.config(
            f"server{i}.toml", [faults.server_tunnel("t", backend_port)],
            {"local": faults.kme_side(kme, "b", api)},
        )  # fmt: skip
        servers.append(await faults.node(config))
    client = await faults.node(faults.config(
        "client.toml",
        [faults.client_tunnel(f"c{i}", s.ports["t"]) for i, s in enumerate(servers)],
        {"local": faults.kme_side(kme, "a", api)},
    ))  # fmt: skip
    outcomes = [await works(client.ports[f"c{i % 2}"], 2000) for i in range(12)]
    assert all(outcomes), client.proc.records()
    await client.settled()
    account = await fates(client)
    assert account["refused"] == account["flushed"] == account["failed_handshake"] == 0
    used = {r["qkd_key_id"] for r in client.proc.records()}
    assert len(used) == 12
    for i, server in enumerate(servers):
        await server.settled()
        assert (await fates(server))["failed_handshake"] == 0
        seen = {r["qkd_key_id"] for r in server.proc.records()}
        assert seen == {r["qkd_key_id"] for r in client.proc.records() if r["tunnel"] == f"c{i}"}


async def test_waste_by_design_start_idle_and_steady_traffic(faults: FaultHarness) -> None:
    """A server that does not serve the server-initiated flow draws nothing at start; a
    client draws its floor (4) and no more while idle; under steady traffic nearly every key
    drawn is consumed; at shutdown the rest is counted as stranded."""
    server, client = await pair(faults, ["client"])

    async def floor_drawn() -> bool:
        return (await fates(client))["drawn"] == 4

    await eventually(floor_drawn, "the client drew its floor")
    assert (await fates(server))["drawn"] == 0
    for _ in range(30):
        assert await works(client.ports["c"], 1000)
    await client.settled()
    account = await fates(client)
    assert account["consumed"] == 30
    # Whatever is not consumed is still held (the supply), never more than the ceiling
    # the demand set: a few keys, not the old 128.
    assert account["drawn"] - account["consumed"] == account["held"] <= 12, account
    text = await client.metrics()
    assert metric(text, "qkdproxy_qkd_key_yield", kme="local") == 1.0


async def test_waste_by_design_an_etsi004_server_opens_no_stream_of_its_own(
    faults: FaultHarness,
) -> None:
    """Over ETSI 004 only the client originates streams (the client-initiated flow): a
    server daemon joins the streams announced to it and opens none ahead. Every key it
    holds is key 0 of a stream its client holds ahead for it. Before: the server's supply
    opened its floor of streams at start and announced them to its clients, which opened
    them and fetched key 0, as the server then did: keys drawn at both ends for streams
    nobody would use."""
    server, client = await pair(faults, ["client"], api="004")

    async def client_ahead() -> bool:
        return bool((await client.status())["kmes"][0]["buffer_depth"] >= 4)

    await eventually(client_ahead, "the client opened its floor of streams")
    for _ in range(6):
        assert await works(client.ports["c"], 1000)
    await client.settled()
    await server.settled()

    async def joined_ahead() -> bool:
        return (await fates(server))["held"] > 0

    await eventually(joined_ahead, "the server fetched key 0 of streams announced to it")
    ahead = (await client.status())["kmes"][0]["buffer_depth"]
    assert (await server.status())["kmes"][0]["buffer_depth"] == 0
    account = await fates(server)
    assert account["consumed"] == 6
    assert account["held"] <= ahead, (account, ahead)


async def test_an_etsi004_client_joins_no_stream_its_server_names(faults: FaultHarness) -> None:
    """One stream ahead (floor = ceiling = 1): the stream a connection announces is taken by
    the next one, whose server acknowledges it only after that handshake. The client's
    every OPEN_CONNECT is a stream of its own and every KME call it makes succeeds. Before:
    it took such a late acknowledgement (a KSID no longer among its streams ahead) for a
    stream of the server's and joined it: an OPEN_CONNECT refused (KSID in use) or, once
    both ends had closed the stream, a new stream at its KME under that KSID, a GET_KEY
    that waited for a peer that never came, and the stream never closed. (A hostile server
    naming KSIDs made the client open as many.)"""
    single = {"supply_floor": 1, "supply_ceiling": 1}
    server, client = await pair(faults, ["client"], api="004", kme_options=single)
    for _ in range(8):
        assert await works(client.ports["c"], 1000)
    await client.settled()
    await server.settled()
    # The acknowledgements of the last connection's announcement: handled by now.
    assert await works(client.ports["c"], 1000)
    await client.settled()
    text = await client.metrics()

    def count(name: str, **labels: str) -> float:
        return metric(text, f"qkdproxy_{name}", kme="local", **labels)

    opened = count("qkd_prefetch_keys_total", outcome="prefetched") + count(
        "qkd_prefetch_keys_total", outcome="fetched_on_demand"
    )
    calls = count("kme_request_duration_seconds_count", call="open_connect")
    assert calls == opened, (calls, opened)
    errors = [line for line in text.splitlines() if line.startswith("qkdproxy_kme_errors_total")]
    assert errors == [], errors
    assert (await fates(client))["consumed"] == 9


async def test_an_etsi004_server_lets_go_of_streams_its_client_no_longer_holds(
    faults: FaultHarness,
) -> None:
    """The client announces its streams ahead, the server joins them and fetches key 0;
    the client then lets them age out unused (max_key_age_s) and closes them. The server
    lets go of them too (fate expired, closed at its KME) once they are twice its own
    max_key_age_s old: what it holds is again at most key 0 of the streams its client
    holds ahead. Before: it held those keys until it stopped, at most 4 x 32 per section
    (responder and KME streams alike), and once that many had piled up (32 idle spells of
    a client with the default floor of 4) it joined no announced stream again."""
    max_age_s = 0.5
    server, client = await pair(
        faults, ["client"], api="004", kme_options={"max_key_age_s": max_age_s}
    )
    assert await works(client.ports["c"], 1000)
    await client.settled()

    async def joined() -> bool:
        return (await fates(server))["held"] > 0

    await eventually(joined, "the server fetched key 0 of the streams announced to it")
    # Time for the announced streams to age, at both ends (no event marks it).
    await asyncio.sleep(2 * max_age_s + 0.2)
    assert await works(client.ports["c"], 1000)
    await client.settled()
    await server.settled()

    async def let_go() -> bool:
        account = await fates(server)
        ahead = (await client.status())["kmes"][0]["buffer_depth"]
        return account["expired"] > 0 and account["held"] <= ahead

    await eventually(let_go, "the server let go of the streams that aged out")
    assert (await fates(server))["consumed"] == 2
