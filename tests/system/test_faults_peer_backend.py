"""Fault matrix, peer and backend side: a peer daemon killed, a backend down, slow or
resetting, reload and drain under load, certificates outside their validity, logs going
to a full disk.

Real ``qkdproxy run`` processes and the KME simulator on loopback. Each test writes down
the expected outcome in its docstring; docs/RELIABILITY.md summarises the results. Nothing
sleeps to synchronise: log lines, JSON lines, the status endpoint, events, or a condition
polled until a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.system.test_daemon_system import sha256
from tests.system_helpers import (
    DEADLINE,
    FaultHarness,
    Node,
    Transfer,
    eventually,
    fault_pki_fixture,  # noqa: F401 - fixture
    faults_fixture,  # noqa: F401 - fixture
    free_port,
    metric,
    recovers_after_refusals,
    refused,
    works,
)

MB = 1024 * 1024


def key_accounting(clients: list[Node], servers: list[Node], unlogged: set[str]) -> None:
    """No QKD key id was used twice, on either side; every key a server used is one a client
    used (``unlogged``: the ids of connections a killed client never got to log)."""
    used = [r["qkd_key_id"] for c in clients for r in c.proc.records() if r["qkd_key_id"]]
    assert len(used) == len(set(used)), "a QKD key was used twice"
    served = [r["qkd_key_id"] for s in servers for r in s.proc.records() if r["qkd_key_id"]]
    assert len(served) == len(set(served)), "a QKD key was used twice"
    assert set(served) - set(used) <= unlogged


async def ledger_balances(node: Node) -> None:
    """Every key a tunnel took ended consumed or wasted (no handshake is in progress)."""
    metrics = await node.metrics()
    for tunnel in node.ports:
        taken = metric(metrics, "qkdproxy_qkd_keys_total", tunnel=tunnel, fate="taken")
        consumed = metric(metrics, "qkdproxy_qkd_keys_total", tunnel=tunnel, fate="consumed")
        wasted = metric(metrics, "qkdproxy_qkd_keys_total", tunnel=tunnel, fate="wasted")
        assert taken == consumed + wasted, (tunnel, taken, consumed, wasted)


# --------------------------------------------------------------------------- peer killed


async def test_peer_daemon_killed_mid_transfer_then_restarted(faults: FaultHarness) -> None:
    """SIGKILL of a peer daemon during a 4 MiB checksummed transfer, then a restart on the
    same port. Expected:
    - server killed: the client application's connection is reset (RST, not a FIN that
      would pass a truncated stream off as complete) after a prefix of the echo, never a
      wrong byte; the client daemon logs "error: TlsStreamError ...". After the restart
      the peer refuses the keys announced to (and fetched by) the dead process. A refusal is
      an unauthenticated alert, so each costs only its key and its connection; after
      REFUSALS_BEFORE_FLUSH in a row the client drops its supply and retries once: from
      then on every connection works.
    - client killed mid-upload: the backend's connection is reset, not closed with a FIN
      (it must not take a truncated upload for a whole one). After the restart, with the
      server-initiated flow, every connection works at once (a server's supply is offered
      to whichever client connects, so it never announces its ids to one of them).
    - no QKD key is used twice; every key taken ended consumed or wasted."""
    kme = await faults.start_kme()
    backend, backend_port = await faults.recording_backend()
    server_port = free_port()
    server_config = faults.config(
        "server.toml",
        [faults.server_tunnel("t", backend_port, listen=f"127.0.0.1:{server_port}",
                              flows=["client", "server"])],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    )  # fmt: skip
    flows = {"ci": "client-initiated", "si": "server-initiated"}
    client_config = faults.config(
        "client.toml",
        [faults.client_tunnel(name, server_port, flow=flow, listen=f"127.0.0.1:{free_port()}")
         for name, flow in flows.items()],
        {"local": faults.kme_table(kme.urls["kme-a"], "a")},
    )  # fmt: skip
    servers = [await faults.node(server_config)]
    client = await faults.node(client_config)
    for name in flows:
        for _ in range(2):  # announcements made and fetched
            assert await works(client.ports[name])

    # The server daemon dies in the middle of a transfer.
    payload = os.urandom(4 * MB)
    transfer = await Transfer(client.ports["ci"], payload).open()
    await transfer.send(payload[:MB])
    await transfer.until(MB // 2)
    servers[0].proc.process.kill()
    await servers[0].proc.wait_exit()
    ending = await transfer.finish(MB)
    assert ending.how == "reset"
    assert 0 < len(ending.received) < len(payload)
    assert payload.startswith(ending.received)
    cut = await client.proc.wait_record(lambda r: r["bytes_to_peer"] >= MB)
    assert cut["reason"].startswith("error: TlsStreamError"), cut

    servers.append(await faults.node(server_config))
    await recovers_after_refusals(client, "ci")
    assert all([await works(client.ports["si"]) for _ in range(2)]), client.proc.records()

    # The client daemon dies in the middle of an upload.
    ended, start = len(backend.endings), backend.received
    upload = await Transfer(client.ports["si"], payload).open()
    await upload.send(payload[: 2 * MB])
    await backend.wait_until(lambda: backend.received >= start + MB)
    client.proc.process.kill()
    await client.proc.wait_exit()
    await backend.wait_until(lambda: len(backend.endings) > ended)
    how, size = backend.endings[-1]
    assert how == "reset" and MB <= size < len(payload), backend.endings
    await upload.end()
    killed = await servers[1].proc.wait_record(lambda r: r["reason"].startswith("error"))
    assert killed["reason"].startswith("error: TlsStreamError"), killed

    first_client = client
    client = await faults.node(client_config)
    for name in flows:
        assert all([await works(client.ports[name]) for _ in range(3)]), client.proc.records()

    for node in (client, servers[1]):
        await node.settled()
    key_accounting([first_client, client], servers, {killed["qkd_key_id"]})
    for node in (client, *servers[1:]):
        await ledger_balances(node)


async def test_peer_daemon_restarted_with_etsi004_streams_open_ahead(
    faults: FaultHarness,
) -> None:
    """The same restart over ETSI 004: the client opens key streams ahead and announces them;
    the server daemon opened them at its KME. Killed and restarted, the new server process
    cannot join those streams (its KME answers status 5, Key_stream_ID in use).
    Expected: connections after the restart are refused with internal_error, each costing
    its stream only, until REFUSALS_BEFORE_FLUSH in a row: the client closes the streams it
    held ahead, opens new ones and retries once; every later connection works. Regression:
    every stream announced before the restart used to cost a failed connection (31 of them
    with the default pool of 32)."""
    kme = await faults.start_kme()
    _, backend_port = await faults.recording_backend()
    server_port = free_port()
    server_config = faults.config(
        "server.toml",
        [faults.server_tunnel("t", backend_port, listen=f"127.0.0.1:{server_port}")],
        {"local": faults.kme004_table(kme.etsi004["kme-b"], "b")},
    )
    client = await faults.node(faults.config(
        "client.toml", [faults.client_tunnel("t", server_port)],
        {"local": faults.kme004_table(kme.etsi004["kme-a"], "a")},
    ))  # fmt: skip
    server = await faults.node(server_config)
    for _ in range(3):
        assert await works(client.ports["t"])
    server.proc.process.kill()
    await server.proc.wait_exit()
    server = await faults.node(server_config)
    warning = await recovers_after_refusals(client, "t")
    assert warning is None or "Key_stream_ID is in use" not in warning  # only the alert is seen
    refused_open = await server.proc.wait_record()
    assert (
        "ETSI 004 OPEN_CONNECT: status 5 (OPEN_CONNECT failed because the Key_stream_ID is in use"
        in refused_open["reason"]
    ), refused_open


async def test_killed_outright_a_daemon_has_logged_every_key_it_spent(
    faults: FaultHarness,
) -> None:
    """Both daemons hold connection lines for shared writes for up to a second
    (``log_flush_ms = 1000``) and are killed with SIGKILL right after their connections
    closed. Expected: every line recording a spent QKD key was written before the kill
    (where a key went must survive a crash); the same key ids on both sides. Regression:
    with the shared write such lines waited, and the lines of the connections just before
    a kill were lost."""
    kme = await faults.start_kme()
    _, backend_port = await faults.recording_backend()
    held = {"log_flush_ms": 1000}
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port)],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")}, held,
    ))  # fmt: skip
    client = await faults.node(faults.config(
        "client.toml", [faults.client_tunnel("t", server.ports["t"])],
        {"local": faults.kme_table(kme.urls["kme-a"], "a")}, held,
    ))  # fmt: skip
    for _ in range(3):
        assert await works(client.ports["t"])

    for node in (client, server):

        async def closed_all(node: Node = node) -> bool:
            # A connection is counted closed in the step that hands its line to logging.
            tunnel = (await node.status())["tunnels"][0]
            return bool(tunnel["active"] == 0 and tunnel["closed"] == 3)

        await eventually(closed_all, f"{node.proc.name}: 3 closed")
    for node in (client, server):
        node.proc.process.kill()
        await node.proc.wait_exit()
    keys = [{r["qkd_key_id"] for r in node.proc.records()} for node in (client, server)]
    assert len(keys[0]) == 3 and keys[0] == keys[1], keys


# --------------------------------------------------------------------------- backend


async def test_backend_down_slow_or_resetting(faults: FaultHarness) -> None:
    """One server daemon, one tunnel per backend behaviour. Expected:
    - down (connection refused): the application gets an empty answer and a close; the
      server logs "backend unreachable: ..." after a successful handshake.
    - late (accepts, answers only when released): the answer arrives whole; meanwhile other
      connections are served.
    - stalled (never answers; idle_timeout_s 0.5 on the server tunnel): closed with reason
      idle_timeout on the server; the application gets an empty answer and a close.
    - resetting (echoes 100 kB, then RST): the application gets exactly that echo, then a
      reset (the server daemon aborts the TLS connection without close_notify, the client
      daemon resets the plaintext one); both daemons log "error: ...". (A backend that
      resets before sending anything gives the application a plain close, as a failed
      handshake does: nothing was delivered that could pass for complete.)
    - the daemons keep serving: a normal connection works after all of it, and no connection
      is left open."""
    kme = await faults.start_kme()
    _, ok_port = await faults.recording_backend()
    late, late_port = await faults.recording_backend("gated")
    _, stalled_port = await faults.recording_backend("gated")
    resetting, reset_port = await faults.recording_backend("reset", reset_after=100_000)
    backends = {"ok": ok_port, "down": free_port(), "late": late_port, "stalled": stalled_port,
                "reset": reset_port}  # fmt: skip
    server = await faults.node(faults.config(
        "server.toml",
        [faults.server_tunnel(name, port, idle_timeout_s=0.5 if name == "stalled" else 60)
         for name, port in backends.items()],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    ))  # fmt: skip
    client = await faults.node(faults.config(
        "client.toml", [faults.client_tunnel(name, server.ports[name]) for name in backends],
        {"local": faults.kme_table(kme.urls["kme-a"], "a")},
    ))  # fmt: skip
    ports = client.ports
    assert await works(ports["ok"])

    assert await refused(ports["down"]) == b""
    down = await server.proc.wait_record(lambda r: r["tunnel"] == "down")
    assert down["reason"].startswith("backend unreachable: "), down
    assert down["group"] == "qkd_mlkem768"

    payload = os.urandom(300_000)
    slow = await Transfer(ports["late"], payload).open()
    await slow.send(payload, eof=True)
    await late.wait_until(lambda: late.received == len(payload))
    assert await works(ports["ok"])  # served while the late one waits
    late.release.set()
    answer = await slow.end()
    assert (answer.how, sha256(answer.received)) == ("eof", sha256(payload))

    assert await refused(ports["stalled"]) == b""
    idle = await server.proc.wait_record(lambda r: r["tunnel"] == "stalled")
    assert idle["reason"] == "idle_timeout", idle

    data = os.urandom(400_000)
    cut = await Transfer(ports["reset"], data).open()
    await cut.send(data, eof=True)
    await cut.until(100_000)
    resetting.release.set()
    ending = await cut.end()
    assert (ending.how, ending.received) == ("reset", data[:100_000])
    assert resetting.endings == [("reset-by-us", resetting.endings[0][1])]
    reset = await server.proc.wait_record(lambda r: r["tunnel"] == "reset")
    assert reset["reason"].startswith("error: ConnectionResetError"), reset
    seen = await client.proc.wait_record(lambda r: r["tunnel"] == "reset")
    assert seen["reason"].startswith("error: TlsStreamError"), seen

    assert await works(ports["ok"])
    for node in (server, client):
        await node.settled()
    reasons = {r["tunnel"]: r["reason"] for r in client.proc.records()}
    # The client's own line for "down" and "stalled" says "closed", or names the write that
    # failed when the server had closed first; only the server's line says why.
    assert {reasons["ok"], reasons["late"]} == {"closed"}
    for name in ("down", "stalled"):
        assert reasons[name] == "closed" or reasons[name].startswith("error: "), reasons
    assert all(t["active"] == 0 for t in (await server.status())["tunnels"])


# --------------------------------------------------------------------------- reload, drain


async def half_sent(port: int, count: int, size: int = MB) -> list[Transfer]:
    """``count`` transfers in flight: half of each payload sent and its echo back."""
    transfers = [await Transfer(port, os.urandom(size)).open() for _ in range(count)]
    for transfer in transfers:
        await transfer.send(transfer.payload[: size // 2])
    for transfer in transfers:
        await transfer.until(size // 2)
    return transfers


async def completed_intact(transfers: list[Transfer]) -> None:
    endings = await asyncio.gather(*(t.finish(len(t.payload) // 2) for t in transfers))
    for transfer, ending in zip(transfers, endings, strict=True):
        assert ending.how == "eof"
        assert sha256(ending.received) == sha256(transfer.payload)


async def test_reload_and_drain_under_load(faults: FaultHarness) -> None:
    """SIGHUP to both daemons while 1 MiB transfers are half done and new connections keep
    coming; then SIGTERM to the server daemon with transfers half done. Expected:
    - reload: the in-flight transfers complete intact; every connection opened during or
      after the reload works; the new settings apply (reloads_total success = 1).
    - drain: the listener closes at once (a new connection through the client tunnel gets
      nothing back; the client logs "peer unreachable", or a reset during the handshake if
      the connection sat in the listen backlog); the in-flight transfers complete intact and
      are logged "closed"; the server exits 0 as soon as they are done."""
    kme = await faults.start_kme()
    _, backend_port = await faults.recording_backend()
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port, idle_timeout_s=60)],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    ))  # fmt: skip
    client = await faults.node(faults.config(
        "client.toml", [faults.client_tunnel("t", server.ports["t"], idle_timeout_s=60)],
        {"local": faults.kme_table(kme.urls["kme-a"], "a")},
    ))  # fmt: skip
    port = client.ports["t"]

    results: list[bool] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            results.append(await works(port, 50_000))

    in_flight = await half_sent(port, 6)
    workers = [asyncio.create_task(load()) for _ in range(2)]
    try:

        async def loaded() -> bool:
            return len(results) >= 4

        await eventually(loaded, "load before the reload")
        for node in (server, client):
            node.config.write_text(
                node.config.read_text().replace("idle_timeout_s = 60", "idle_timeout_s = 120")
            )
            node.proc.signal(signal.SIGHUP)
            line = await node.proc.wait_line(
                lambda text: "reloaded" in text or "reload refused" in text
            )
            assert "reloaded" in line, line
        during = len(results)

        async def more_after_reload() -> bool:
            return len(results) >= during + 6

        await eventually(more_after_reload, "new connections after the reload")
        await completed_intact(in_flight)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert results and all(results), results
    for node in (server, client):
        metrics = await node.metrics()
        assert metric(metrics, "qkdproxy_reloads_total", result="success") == 1

    in_flight = await half_sent(port, 4)
    server.proc.signal(signal.SIGTERM)
    await server.proc.wait_line(lambda line: "draining" in line)
    assert await refused(port) == b""
    unreachable = await client.proc.wait_record(lambda r: r["reason"] != "closed")
    # Refused, or reset if it was in the listen backlog when the listener closed: the
    # server logs "draining" just before it closes its listener, and a loaded machine may
    # run this connection's TCP handshake in between. The kernel resets what the closed
    # listener had not accepted; the client sees that RST as a failed connect
    # (ECONNRESET, when it came before the client's loop looked at its socket) or during
    # the TLS handshake. None of these was a connection the drain had to let finish: it
    # was opened after SIGTERM and never reached the daemon.
    assert unreachable["reason"] in (
        "peer unreachable: Connection refused",
        "peer unreachable: Connection reset by peer",
        "handshake failed (peer): peer closed the connection during the handshake",
    ), unreachable
    await completed_intact(in_flight)
    assert await server.proc.wait_exit() == 0
    drained = [r for r in server.proc.records() if r["bytes_from_peer"] == MB]
    assert len(drained) == 10 and {r["reason"] for r in drained} == {"closed"}


async def test_sighup_as_soon_as_the_daemon_listens(faults: FaultHarness) -> None:
    """A SIGHUP sent the moment the daemon logs "listening on" (before it finished
    starting). Expected: it reloads (or, arriving mid-start, reloads once started); it is
    never killed (SIGHUP's default action). Regression: the handlers used to be installed
    only after start-up, and such a SIGHUP ended the process silently."""
    _, backend_port = await faults.recording_backend()
    tunnel = faults.server_tunnel(
        "t", backend_port, kme=None, policy="pq-required", groups=["X25519MLKEM768"]
    )
    config = faults.config("server.toml", [tunnel])
    for attempt in range(3):
        proc = await faults.spawn(f"server-{attempt}", "run", "--config", config)
        await proc.wait_line(lambda line: "listening on" in line)
        proc.signal(signal.SIGHUP)
        line = await proc.wait_line(lambda text: "reloaded" in text or "reload" in text)
        assert "reloaded" in line, proc.stderr
        assert proc.process.returncode is None


# --------------------------------------------------------------------------- clock skew


def write_credentials(faults: FaultHarness, name: str, server: bool, offset: timedelta,
                      days: int) -> tuple[str, str]:  # fmt: skip
    """A tunnel certificate from the test CA issued as if the clock read now + ``offset``
    (the development CA backdates notBefore by 5 minutes); its (cert, key) file names."""
    names = (
        ["server.qkdproxy.test", "spiffe://qkdproxy.test/tunnel/server"] if server
        else ["spiffe://qkdproxy.test/tunnel/client"]
    )  # fmt: skip
    issued = faults.dev.ca.issue(
        f"tunnel-{name}", names, server=server, client=not server,
        now=datetime.now(UTC) + offset, days=days,
    )  # fmt: skip
    cert, key = faults.tmp / f"{name}.pem", faults.tmp / f"{name}-key.pem"
    cert.write_bytes(issued.chain[0].public_bytes(serialization.Encoding.PEM))
    key.touch(mode=0o600)  # the daemon refuses key files others can read
    key.write_bytes(issued.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    return str(cert), str(key)


async def test_peer_certificate_expired_or_not_yet_valid(faults: FaultHarness) -> None:
    """Certificates outside their validity on either side: expired a month ago, or valid
    only from an hour from now (a peer clock an hour fast issued it). Expected: the daemons
    start with them; the side that checks refuses the handshake with the certificate_expired
    alert (TLS has no "not yet valid" alert) and logs "peer certificate outside its
    validity" (failure certificate_expired); the other side logs the alert it received (a
    client refused after its handshake may log the reset of its first write instead);
    nothing reaches the backend; good certificates keep working. There is no skew
    tolerance in the check itself (qkdproxy/core/tls/verify.py compares notBefore <= now <=
    notAfter exactly); the development CA backdates notBefore by 5 minutes."""
    kme = await faults.start_kme()
    backend, backend_port = await faults.recording_backend()
    past, future = timedelta(days=-30), timedelta(hours=1)
    bad = {"expired": (past, 1), "future": (future, 30)}
    server_tunnels = [faults.server_tunnel("good", backend_port)]
    client_tunnels = []
    for name, (offset, days) in bad.items():
        cert, key = write_credentials(faults, f"server-{name}", True, offset, days)
        server_tunnels.append(faults.server_tunnel(name, backend_port, cert=cert, key=key))
        cert, key = write_credentials(faults, f"client-{name}", False, offset, days)
        client_tunnels.append(faults.client_tunnel(f"{name}-client", 0, cert=cert, key=key))
    server = await faults.node(faults.config(
        "server.toml", server_tunnels, {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    ))  # fmt: skip
    for tunnel in client_tunnels:
        tunnel["connect"] = f"127.0.0.1:{server.ports['good']}"
    client_tunnels += [faults.client_tunnel("ok", server.ports["good"])]
    client_tunnels += [faults.client_tunnel(f"to-{n}", server.ports[n]) for n in bad]
    client = await faults.node(faults.config(
        "client.toml", client_tunnels, {"local": faults.kme_table(kme.urls["kme-a"], "a")},
    ))  # fmt: skip
    for name in (*(f"{n}-client" for n in bad), *(f"to-{n}" for n in bad)):
        assert await refused(client.ports[name]) == b""
    assert await works(client.ports["ok"])
    for node in (server, client):
        await node.settled()
    outside = "peer certificate outside its validity"
    seen = {r["tunnel"]: (r["reason"], r["failure"]) for r in client.proc.records()}
    for name in bad:
        # The client checks the server's chain during the handshake ...
        assert seen[f"to-{name}"] == (f"handshake failed (local): {outside}",
                                      "certificate_expired")  # fmt: skip
        # ... the server checks the client's right after it, then sends an encrypted alert;
        # the client logs that alert, or the reset, if its first write hit the closed
        # connection before it read the alert.
        assert seen[f"{name}-client"][0] in (
            "error: TlsStreamError: peer sent alert certificate_expired",
            "error: TlsStreamError: ConnectionResetError: Connection lost",
        ), seen
    assert seen["ok"] == ("closed", None)
    logged = [(r["tunnel"], r["reason"]) for r in server.proc.records()]
    assert sorted(logged) == sorted([
        ("good", f"handshake failed (local): {outside}"),
        ("good", f"handshake failed (local): {outside}"),
        ("expired", "handshake failed (peer): peer sent alert certificate_expired"),
        ("future", "handshake failed (peer): peer sent alert certificate_expired"),
        ("good", "closed"),
    ])  # fmt: skip
    assert backend.received == 20_000  # the good connection's bytes only


# --------------------------------------------------------------------------- disk full


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_logs_to_a_full_disk(faults: FaultHarness) -> None:
    """Both daemons write their logs (stdout and stderr) to /dev/full, where every write
    fails with ENOSPC. Expected: they start, tunnel intact bytes, log failures (a refused
    peer) without crashing; Python's logging reports each failed write on stderr, which
    fails too and is dropped: no crash, no spinning (CPU use while idle stays near 0);
    /status still counts every connection; SIGTERM still stops them."""
    kme = await faults.start_kme()
    _, backend_port = await faults.recording_backend()
    server_port, client_port, lonely_port = free_port(), free_port(), free_port()
    status_ports = free_port(), free_port()
    server_config = faults.config(
        "server.toml",
        [faults.server_tunnel("t", backend_port, listen=f"127.0.0.1:{server_port}")],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")}, status_port=status_ports[0],
    )  # fmt: skip
    client_config = faults.config(
        "client.toml",
        [faults.client_tunnel("t", server_port, listen=f"127.0.0.1:{client_port}"),
         faults.client_tunnel("lonely", free_port(), listen=f"127.0.0.1:{lonely_port}")],
        {"local": faults.kme_table(kme.urls["kme-a"], "a")}, status_port=status_ports[1],
    )  # fmt: skip
    full = Path("/dev/full")
    server, server_status = await faults.silent_node(server_config, status_ports[0], full)
    client, client_status = await faults.silent_node(client_config, status_ports[1], full)

    for size in (1, 100_000, 4 * MB):
        assert await works(client_port, size)
    assert await refused(lonely_port) == b""  # logged: peer unreachable
    results = await asyncio.gather(*(works(client_port, 30_000) for _ in range(20)))
    assert all(results)

    async def counted() -> bool:
        tunnels = {t["name"]: t for t in (await client_status.status())["tunnels"]}
        counts = {name: (t["closed"], t["active"]) for name, t in tunnels.items()}
        [served] = (await server_status.status())["tunnels"]
        return (counts, served["closed"], served["active"]) == (
            {"t": (23, 0), "lonely": (1, 0)},
            23,
            0,
        )

    await eventually(counted, "every connection counted in /status")
    assert server.returncode is None and client.returncode is None
    # A measurement window, not synchronisation: an idle daemon that spins on failed log
    # writes would burn a whole second of CPU here.
    before = [cpu_seconds(p.pid) for p in (server, client)]
    await asyncio.sleep(1.0)
    after = [cpu_seconds(p.pid) for p in (server, client)]
    assert all(b - a < 0.5 for a, b in zip(before, after, strict=True)), (before, after)

    for process in (server, client):
        process.send_signal(signal.SIGTERM)
    codes = await asyncio.wait_for(asyncio.gather(server.wait(), client.wait()), DEADLINE)
    assert list(codes) == [0, 0]
