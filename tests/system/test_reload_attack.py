"""Configuration reload (SIGHUP) while connections, pooled tunnels and key supplies are in
flight, through real daemons and the KME simulator.

What each reload may change, and what it must do to the product's rules: a QKD key is used
once and only for the peer it belongs to; every drawn key is accounted; the allow-list and
the certificate checks apply to every handshake, and to every new stream of a multiplexed
tunnel; an invalid file leaves the running settings untouched. docs/RELIABILITY.md,
"Reload under attack", lists the cases and what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qkdproxy.tools.certs import DevPki
from tests.system.test_key_attacks import fates
from tests.system_helpers import (
    FaultHarness,
    Node,
    RecordingBackend,
    Transfer,
    eventually,
    fault_pki_fixture,  # noqa: F401 - fixture
    faults_fixture,  # noqa: F401 - fixture
    metric,
    works,
)

# A rule no certificate of the development PKI meets.
NOBODY = "uri:spiffe://qkdproxy.test/tunnel/nobody"
MUX = {"multiplex": True, "mux_pool_min": 1}


async def reload(node: Node, tunnels: list[dict[str, Any]], kmes: dict[str, Any]) -> str:
    """Rewrite ``node``'s file with ``tunnels`` (same status port), SIGHUP, and return the
    outcome line (``reloaded`` or ``reload refused``)."""
    done = sum(1 for line in node.proc.lines if _outcome(line))
    # Whole or not at all: a SIGHUP of a storm still on its way must not read half a file
    # (it would be refused, rightly, and the outcome awaited here would be that one).
    fresh = node.config.with_suffix(".tmp")
    fresh.write_text(_config_text(node, tunnels, kmes))
    fresh.replace(node.config)
    node.proc.signal(signal.SIGHUP)
    await node.proc.wait_line(lambda _: sum(1 for line in node.proc.lines if _outcome(line)) > done)
    return [line for line in node.proc.lines if _outcome(line)][-1]


def _outcome(line: str) -> bool:
    return "reloaded " in line or "reload refused" in line


def _config_text(node: Node, tunnels: list[dict[str, Any]], kmes: dict[str, Any]) -> str:
    harness = _HARNESS[node.config]
    # The status listener as the first file had it (a reload cannot move it).
    path = harness.config(f"{node.config.stem}.next.toml", tunnels, kmes)
    return path.read_text()


# Which harness wrote a node's file (reload writes the same file again with new tables).
_HARNESS: dict[Path, FaultHarness] = {}


async def start(faults: FaultHarness, name: str, tunnels: list[dict[str, Any]],
                kmes: dict[str, Any]) -> Node:  # fmt: skip
    node = await faults.node(faults.config(f"{name}.toml", tunnels, kmes))
    _HARNESS[node.config] = faults
    return node


async def half_sent(port: int, fill: bytes) -> Transfer:
    """A 200 KB transfer with its first half through: a connection open across a reload."""
    live = await Transfer(port, fill * 200_000).open()
    await live.send(live.payload[:100_000])
    await live.until(100_000)
    return live


async def only_the_open_one_finishes(port: int, live: Transfer, backend: RecordingBackend) -> None:
    """After the reload three new connections are refused, the open one finishes whole, and
    only the two connections made before the reload reached the backend."""
    seen = len(backend.endings) + 1  # the open one ends later
    for _ in range(3):
        assert not await works(port, 2000)
    ending = await live.finish(100_000)
    assert (ending.received, ending.how) == (live.payload, "eof")
    await backend.wait_until(lambda: len(backend.endings) >= seen)
    assert len(backend.endings) == seen == 2, backend.endings


async def mux_server(
    faults: FaultHarness,
) -> tuple[Any, RecordingBackend, Node, dict[str, Any], dict[str, Any]]:
    """The KME simulator, a multiplexing server daemon ("server", tunnel "t") in front of a
    recording backend, and its tunnel and KME tables (to reload variants of)."""
    kme = await faults.start_kme()
    backend, backend_port = await faults.recording_backend()
    kmes = {"local": faults.kme_table(kme.urls["kme-b"], "b")}
    tunnel = faults.server_tunnel("t", backend_port, **MUX)
    server = await start(faults, "server", [tunnel], kmes)
    return kme, backend, server, tunnel, kmes


async def mux_server_and_another_ca(
    faults: FaultHarness, tmp_path: Path
) -> tuple[Any, RecordingBackend, Node, dict[str, Any], dict[str, Any]]:
    """:func:`mux_server`, and a second CA's bundle in ``tmp_path / "other"``."""
    DevPki.create().write(tmp_path / "other")
    return await mux_server(faults)


async def two_servers(faults: FaultHarness, api: str = "014") -> tuple[Any, list[Node]]:
    """The KME simulator and two server daemons on its slave SAE (an HA pair) over ``api``,
    one recording backend behind both."""
    kme = await faults.start_kme()
    _, backend_port = await faults.recording_backend()
    tunnels = [faults.server_tunnel("t", backend_port)]
    kmes = {"local": faults.kme_side(kme, "b", api)}
    return kme, [await start(faults, f"server{i}", tunnels, kmes) for i in range(2)]


@pytest.mark.parametrize("api", ["014", "004"])
async def test_a_client_repointed_at_another_server_never_offers_it_the_first_ones_keys(
    faults: FaultHarness, api: str
) -> None:
    """A client tunnel's `connect` moves from server 0 to server 1 (both on the same slave
    SAE, as an HA pair would be). The keys (ETSI 004: streams) its supply announced to
    server 0 (and server 0 fetched) must not be offered to server 1: every connection after
    the reload works, no key is refused or flushed; moved back, the keys held for server 0
    serve it again."""
    kme, servers = await two_servers(faults, api)
    kmes = {"local": faults.kme_side(kme, "a", api)}
    client = await start(faults, "client", [faults.client_tunnel("c", servers[0].ports["t"])], kmes)
    for _ in range(4):
        assert await works(client.ports["c"], 2000)

    async def fetched_ahead() -> bool:
        # Server 0 fetched the ids announced to it: they are gone from its KME for anyone.
        return (await fates(servers[0]))["held"] > 0

    await eventually(fetched_ahead, "server 0 fetched the announced keys")
    for target in (1, 0):
        line = await reload(client, [faults.client_tunnel("c", servers[target].ports["t"])], kmes)
        assert "reloaded" in line, line
        outcomes = [await works(client.ports["c"], 2000) for _ in range(5)]
        assert all(outcomes), (target, outcomes, client.proc.records()[-5:])
    await client.settled()
    account = await fates(client)  # balances: drawn = fates + held
    assert account["refused"] == account["flushed"] == account["failed_handshake"] == 0, account
    used = [r["qkd_key_id"] for r in client.proc.records()]
    assert len(used) == len(set(used)) == 14


async def test_a_client_reload_that_drops_its_server_moves_new_streams_off_pooled_tunnels(
    faults: FaultHarness,
) -> None:
    """A multiplexing client's allow-list stops naming its server. Its pooled tunnel was
    authenticated under the old list: the stream open on it continues, but no new
    application connection may reach that server (before: every new connection rode the
    old tunnel until it rotated, an hour by default). Allowed again, it works."""
    kme, backend, server, _, _ = await mux_server(faults)
    kmes = {"local": faults.kme_table(kme.urls["kme-a"], "a")}
    tunnel = faults.client_tunnel("c", server.ports["t"], **MUX)
    client = await start(faults, "client", [tunnel], kmes)
    assert await works(client.ports["c"], 2000)
    live = await half_sent(client.ports["c"], b"x")

    line = await reload(client, [{**tunnel, "allow": [NOBODY]}], kmes)
    assert "reloaded" in line, line
    await only_the_open_one_finishes(client.ports["c"], live, backend)
    denied = [r for r in client.proc.records() if r.get("failure") == "access_denied"]
    assert denied, [(r["reason"], r.get("failure")) for r in client.proc.records()]

    line = await reload(client, [tunnel], kmes)
    assert "reloaded" in line, line
    assert await works(client.ports["c"], 2000)


async def test_a_server_reload_that_drops_the_clients_ca_stops_its_new_streams(
    faults: FaultHarness, tmp_path: Path
) -> None:
    """A multiplexing server's CA bundle no longer holds the CA of its client (a CA the
    operator stopped trusting). The client's pooled tunnel was authenticated under the old
    bundle: the stream open on it continues, new streams must not reach the backend (before:
    only the allow-list was checked per stream, so the tunnel carried new streams until it
    rotated)."""
    kme, backend, server, tunnel, kmes = await mux_server_and_another_ca(faults, tmp_path)
    client = await start(
        faults, "client", [faults.client_tunnel("c", server.ports["t"], **MUX)],
        {"local": faults.kme_table(kme.urls["kme-a"], "a")},
    )  # fmt: skip
    assert await works(client.ports["c"], 2000)
    live = await half_sent(client.ports["c"], b"y")

    line = await reload(server, [{**tunnel, "ca": str(tmp_path / "other" / "ca.pem")}], kmes)
    assert "reloaded" in line, line
    await only_the_open_one_finishes(client.ports["c"], live, backend)
    carrier = await server.proc.wait_record(lambda r: r["mux"] == "tunnel")
    assert carrier["reason"] == "reloaded", carrier
    # The client's new tunnels met the new bundle.
    await server.proc.wait_record(lambda r: r["failure"] is not None)
    records = server.proc.records()
    assert {r["failure"] for r in records if r["mux"] is None} == {"unknown_ca"}, records


async def test_reload_storms_change_nothing_but_the_counters(faults: FaultHarness) -> None:
    """30 SIGHUPs sent without waiting, then valid and invalid files alternating, while
    connections run: the daemon keeps serving, each reload applied is counted once (the
    kernel may merge signals sent faster than they are taken), the key account balances
    and no key is used twice; a refused file leaves the running settings and
    `config_last_reload_successful` 0, a good one sets it back to 1."""
    kme = await faults.start_kme()
    _, backend_port = await faults.recording_backend()
    server = await start(
        faults, "server", [faults.server_tunnel("t", backend_port)],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    )  # fmt: skip
    kmes = {"local": faults.kme_table(kme.urls["kme-a"], "a")}
    tunnel = faults.client_tunnel("c", server.ports["t"])
    client = await start(faults, "client", [tunnel], kmes)
    for i in range(30):
        client.proc.signal(signal.SIGHUP)
        if i % 10 == 0:
            assert await works(client.ports["c"], 5000)
    line = await reload(client, [tunnel], kmes)  # after every signal of the storm
    assert "reloaded" in line, line
    text = await client.metrics()
    applied = sum(1 for line in client.proc.lines if "reloaded " in line)
    assert metric(text, "qkdproxy_reloads_total", result="success") == applied > 1
    broken = {**tunnel, "cert": str(faults.pki / "missing.pem")}
    for i in range(6):
        line = await reload(client, [broken if i % 2 == 0 else tunnel], kmes)
        assert ("missing.pem" in line) if i % 2 == 0 else ("reloaded" in line), line
        flag = metric(await client.metrics(), "qkdproxy_config_last_reload_successful")
        assert flag == i % 2, (i, flag)
        assert await works(client.ports["c"], 5000)
    text = await client.metrics()
    assert metric(text, "qkdproxy_reloads_total", result="failure") == 3
    await client.settled()
    account = await fates(client)  # balances: drawn = fates + held
    assert account["consumed"] == 9 and account["failed_handshake"] == 0, account
    used = [r["qkd_key_id"] for r in client.proc.records()]
    assert len(used) == len(set(used)) == 9


async def test_a_reload_that_moves_the_status_listener_is_refused(faults: FaultHarness) -> None:
    """`[status] listen` is a listener: a reload cannot move it (before: `reloaded` was
    logged and counted while /metrics stayed where it was). Refused, named, and the
    running settings kept."""
    kme = await faults.start_kme()
    _, backend_port = await faults.recording_backend()
    kmes = {"local": faults.kme_table(kme.urls["kme-b"], "b")}
    tunnel = faults.server_tunnel("t", backend_port)
    server = await start(faults, "server", [tunnel], kmes)
    moved = faults.config("moved.toml", [tunnel], kmes, None, server.status_port + 1)
    server.config.write_text(moved.read_text())
    server.proc.signal(signal.SIGHUP)
    line = await server.proc.wait_line(_outcome)
    assert "reload refused" in line and "[status] listen" in line, line
    text = await server.metrics()  # still where it was
    assert metric(text, "qkdproxy_config_last_reload_successful") == 0
    assert metric(text, "qkdproxy_reloads_total", result="failure") == 1


class HeldRelay:
    """A TCP relay before ``upstream`` that holds one direction until :meth:`release`:
    ``"replies"`` (the server's bytes: a client's handshake waits for its server) or
    ``"finish"`` (the client's bytes after its ClientHello: a server's handshake waits for
    the client's Finished). A handshake straddles a reload this way, whatever its speed."""

    def __init__(self, upstream: int, hold: str) -> None:
        self.upstream, self.hold = upstream, hold
        self.heard = asyncio.Event()  # the client's first bytes (its ClientHello) passed
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def release(self) -> None:
        self._released.set()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        up = self._pass(reader, up_writer, 1 if self.hold == "finish" else None, self.heard)
        down = self._pass(up_reader, writer, 0 if self.hold == "replies" else None, None)
        tasks = [asyncio.ensure_future(up), asyncio.ensure_future(down)]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        for each in (writer, up_writer):
            each.close()

    async def _pass(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        free: int | None,
        passed: asyncio.Event | None,
    ) -> None:
        """Copy; with ``free``, hold every read after the first ``free`` until released;
        set ``passed`` once bytes went through."""
        reads = 0
        while data := await reader.read(65536):
            if free is not None and reads >= free:
                await self._released.wait()
            reads += 1
            writer.write(data)
            await writer.drain()
            if passed is not None:
                passed.set()
        with contextlib.suppress(OSError):
            writer.write_eof()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture(name="relays")
async def relays_fixture() -> AsyncIterator[list[HeldRelay]]:
    made: list[HeldRelay] = []
    try:
        yield made
    finally:
        for each in made:
            await each.close()


async def relay(relays: list[HeldRelay], upstream: int, hold: str) -> int:
    """A :class:`HeldRelay` started before ``upstream``; its port."""
    relays.append(HeldRelay(upstream, hold))
    return await relays[-1].start()


async def depth(node: Node, keys: int) -> bool:
    """``node``'s KME supplies hold at least ``keys`` keys."""
    return bool((await node.status())["kmes"][0]["buffer_depth"] >= keys)


@pytest.mark.parametrize("api", ["014", "004"])
async def test_a_handshake_in_flight_across_a_repointing_reload_announces_its_own_peers_keys(
    faults: FaultHarness, relays: list[HeldRelay], api: str
) -> None:
    """A client's handshake with server 0 is under way when a reload repoints the tunnel at
    server 1 (whose supply holds keys not yet announced). Once it completes, its channel
    must announce server 0's next keys (ETSI 004: streams), not server 1's: server 0 would
    fetch them (gone from the KME; ETSI 004: open them) and server 1 refuse them when
    offered. Before: the channel announced from the tunnel's current supply."""
    kme, servers = await two_servers(faults, api)
    ports = [await relay(relays, s.ports["t"], "replies") for s in servers]
    held = relays
    kmes = {"local": faults.kme_side(kme, "a", api, supply_floor=2, supply_ceiling=2)}
    client = await start(faults, "client", [faults.client_tunnel("c", ports[0])], kmes)
    await eventually(lambda: depth(client, 2), "server 0's supply filled to its floor")
    first = asyncio.create_task(works(client.ports["c"], 2000))  # to server 0: held
    await held[0].heard.wait()
    line = await reload(client, [faults.client_tunnel("c", ports[1])], kmes)
    assert "reloaded" in line, line
    second = asyncio.create_task(works(client.ports["c"], 2000))  # to server 1: held
    await held[1].heard.wait()

    await eventually(lambda: depth(client, 2), "server 1's supply refilled")
    held[0].release()
    assert await first
    held[1].release()
    assert await second
    outcomes = [await works(client.ports["c"], 2000) for _ in range(4)]
    assert all(outcomes), client.proc.records()[-4:]
    await client.settled()
    account = await fates(client)
    assert account["refused"] == account["flushed"] == account["failed_handshake"] == 0, account


async def test_a_pooled_tunnel_established_across_a_reload_meets_the_new_allow_list(
    faults: FaultHarness, relays: list[HeldRelay]
) -> None:
    """A multiplexing client's pool is establishing a tunnel when a reload drops its server
    from the allow-list (the handshake was checked under the old list). The tunnel must not
    join the pool and carry new connections (until rotation, an hour by default)."""
    kme, backend, server, _, _ = await mux_server(faults)
    port = await relay(relays, server.ports["t"], "replies")
    [held] = relays
    kmes = {"local": faults.kme_table(kme.urls["kme-a"], "a")}
    tunnel = faults.client_tunnel("c", port, **MUX)
    client = await start(faults, "client", [tunnel], kmes)
    await held.heard.wait()  # the pool's first tunnel (mux_pool_min 1): under way
    line = await reload(client, [{**tunnel, "allow": [NOBODY]}], kmes)
    assert "reloaded" in line, line
    held.release()
    assert not await works(client.ports["c"], 2000)
    assert backend.endings == [], backend.endings
    carrier = await client.proc.wait_record(lambda r: r["mux"] == "tunnel")
    assert carrier["reason"] == "reloaded", carrier
    await client.proc.wait_record(lambda r: r["failure"] == "access_denied")


async def test_a_carrier_established_across_a_ca_reload_takes_no_stream(
    faults: FaultHarness, tmp_path: Path, relays: list[HeldRelay]
) -> None:
    """A multiplexing server is in the handshake of a client's pooled tunnel when a reload
    drops the client's CA. The carrier was authenticated under the old bundle: it must get
    GOAWAY like those established before the reload, not carry the client's streams."""
    kme, backend, server, tunnel, kmes = await mux_server_and_another_ca(faults, tmp_path)
    port = await relay(relays, server.ports["t"], "finish")
    [held] = relays
    client = await start(
        faults, "client", [faults.client_tunnel("c", port, **MUX)],
        {"local": faults.kme_table(kme.urls["kme-a"], "a")},
    )  # fmt: skip
    await held.heard.wait()  # the server has the ClientHello; the client's Finished is held
    line = await reload(server, [{**tunnel, "ca": str(tmp_path / "other" / "ca.pem")}], kmes)
    assert "reloaded" in line, line
    held.release()
    assert not await works(client.ports["c"], 2000)
    assert backend.endings == [], backend.endings
