"""Fault matrix, KME side: a slow, failing, exhausted, restarted or absent KME.

Real ``qkdproxy kme`` and ``qkdproxy run`` processes on loopback. Each test writes down the
expected outcome in its docstring. Timeouts are short and configured in the daemons'
files; nothing sleeps to synchronise (log lines, JSON lines, the status endpoint, or a
condition polled until a deadline). docs/RELIABILITY.md summarises the results.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from tests.system.test_daemon_system import exchange, sha256
from tests.system_helpers import (
    FaultHarness,
    eventually,
    fault_pki_fixture,  # noqa: F401 - fixture
    faults_fixture,  # noqa: F401 - fixture
    free_port,
    metric,
    recovers_after_refusals,
    refused,
    works,
)


def answered(tunnel: str, status: int) -> Callable[[dict[str, Any]], bool]:
    """A connection-record predicate: ``tunnel``'s connection failed on a KME answer."""
    return lambda r: r["tunnel"] == tunnel and f"KME answered {status}" in r["reason"]


async def test_kme_slower_than_the_handshake_timeout(faults: FaultHarness) -> None:
    """Slow KME (300 ms per call). Expected: with handshake_timeout_s above the KME calls a
    connection works; below them it fails closed ("handshake timed out", failure class
    timeout) on whichever side timed out, nothing reaches the backend, and one timeout does
    not make the KME count as down."""
    kme = await faults.start_kme("--latency-ms", "300")
    backend, backend_port = await faults.backend()
    direct = {"prefetch": False}  # every handshake calls the KME
    server = await faults.node(faults.config(
        "server.toml",
        [faults.server_tunnel("patient", backend_port),
         faults.server_tunnel("impatient", backend_port, handshake_timeout_s=0.25)],
        {"local": faults.kme_table(kme.urls["kme-b"], "b", **direct)},
    ))  # fmt: skip
    client = await faults.node(faults.config(
        "client.toml",
        [faults.client_tunnel("patient", server.ports["patient"]),
         faults.client_tunnel("impatient", server.ports["patient"], handshake_timeout_s=0.25),
         faults.client_tunnel("to-impatient", server.ports["impatient"])],
        {"local": faults.kme_table(kme.urls["kme-a"], "a", **direct)},
    ))  # fmt: skip

    assert await works(client.ports["patient"])
    first = await client.proc.wait_record(lambda r: r["tunnel"] == "patient")
    assert first["reason"] == "closed"

    # Our own KME call outlasts our handshake timeout.
    assert await refused(client.ports["impatient"]) == b""
    mine = await client.proc.wait_record(lambda r: r["tunnel"] == "impatient")
    assert mine["reason"] == "handshake failed (local): handshake timed out", mine
    assert mine["failure"] == "timeout"

    # The server's dec_keys outlasts the server's handshake timeout.
    assert await refused(client.ports["to-impatient"]) == b""
    theirs = await server.proc.wait_record(lambda r: r["tunnel"] == "impatient")
    assert theirs["reason"] == "handshake failed (local): handshake timed out", theirs
    seen = await client.proc.wait_record(lambda r: r["tunnel"] == "to-impatient")
    assert seen["reason"].startswith("handshake failed (peer)"), seen

    assert backend.received == 20_000  # only the patient connection's bytes
    assert (await client.status())["kmes"][0]["up"] is True
    assert await works(client.ports["patient"])


async def test_kme_answering_500_503_or_400_fails_closed_or_falls_back_then_recovers(
    faults: FaultHarness,
) -> None:
    """A KME answering errors (the client's KME, through a front the test controls).
    Expected: 500 and 503 fail a qkd-pq-required connection closed with the KME's answer in
    the log line and nothing at the backend; a qkd-preferred tunnel on the same KME falls
    back to X25519MLKEM768 and carries the bytes intact; /readyz turns 503 naming the
    required tunnel; a tunnel whose keys were prefetched keeps working from its buffer; a
    400 "not enough keys" also fails closed. When the KME answers again, new connections
    work and /readyz is 200 again."""
    kme = await faults.start_kme()
    front = await faults.front("kme-a", "sae-a", kme.urls["kme-a"])
    backend, backend_port = await faults.backend()
    server = await faults.node(faults.config(
        "server.toml",
        [faults.server_tunnel("t", backend_port, policy="qkd-preferred",
                              groups=["qkd_mlkem768", "X25519MLKEM768"])],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    ))  # fmt: skip
    preferred = {"policy": "qkd-preferred", "groups": ["qkd_mlkem768", "X25519MLKEM768"]}
    client = await faults.node(faults.config(
        "client.toml",
        [faults.client_tunnel("required", server.ports["t"], kme="direct"),
         faults.client_tunnel("preferred", server.ports["t"], kme="direct", **preferred),
         faults.client_tunnel("buffered", server.ports["t"], kme="buffered")],
        {"direct": faults.kme_table(front.url, "a", prefetch=False),
         "buffered": faults.kme_table(front.url, "a")},
    ))  # fmt: skip
    ports = client.ports
    assert await works(ports["required"])
    assert await works(ports["buffered"])
    received = backend.received

    for status, message in ((500, "internal error"), (503, "KME failure")):
        front.answer = (status, message)
        assert await refused(ports["required"]) == b""
        record = await client.proc.wait_record(answered("required", status))
        assert record["reason"] == (
            f"handshake failed (local): ETSI 014 enc_keys: KME answered {status}: {message}"
        ), record
        assert record["failure"] == "internal_error"
    assert backend.received == received

    payload = os.urandom(30_000)
    assert sha256(await exchange(ports["preferred"], payload)) == sha256(payload)
    fell_back = await client.proc.wait_record(lambda r: r["tunnel"] == "preferred")
    assert (fell_back["fallback"], fell_back["group"]) == (True, "X25519MLKEM768")
    assert fell_back["qkd_key_id"] is None
    assert await works(ports["buffered"])  # from the keys it fetched before

    ready, reasons = await client.ready()
    assert not ready
    assert reasons[0] == "tunnel required: KME direct unreachable and the policy requires QKD"
    # The buffered KME is marked down too if its status poll (every 10 s) fell in the window.
    assert reasons[1:] in ([], ["tunnel buffered: KME buffered unreachable and the policy "
                                "requires QKD"]), reasons  # fmt: skip
    metrics = await client.metrics()
    assert metric(metrics, "qkdproxy_kme_errors_total", kme="direct", class_="http_5xx") >= 3
    assert metric(metrics, "qkdproxy_kme_up", kme="direct") == 0
    assert metric(metrics, "qkdproxy_policy_fallbacks_total", tunnel="preferred") == 1

    # Three failures opened the circuit breaker: calls fail at once for a while, then one
    # trial call goes out, answered 400 here.
    front.answer = (400, "not enough keys")
    received = backend.received

    async def answered_400() -> bool:
        assert await refused(ports["required"]) == b""
        return any("answered 400" in r["reason"] for r in client.proc.records())

    await eventually(answered_400, "a connection refused after the KME's 400")
    record = next(r for r in client.proc.records() if "answered 400" in r["reason"])
    assert record["reason"].endswith("enc_keys: KME answered 400: not enough keys"), record
    assert backend.received == received

    front.answer = None

    async def recovered() -> bool:
        return await works(ports["required"])

    await eventually(recovered, "a qkd-pq-required connection after the KME recovered")

    async def ready_again() -> bool:
        return (await client.ready())[0]

    await eventually(ready_again, "/readyz 200 after the KME recovered")


async def test_kme_exhausted_fails_closed_or_falls_back_and_is_reported(
    faults: FaultHarness,
) -> None:
    """An exhausted KME: a pool of 3 keys and no key rate. Expected: the prefetch batch is
    refused whole (503 "insufficient key material"), single keys are fetched on demand, so
    exactly 3 connections get a QKD key; the next one fails closed with the KME's answer in
    its log line; a qkd-preferred tunnel falls back to PQ; the KME still counts as up (it
    answers), so /readyz stays 200, and the errors are counted as class "exhausted"."""
    kme = await faults.start_kme("--rate-bps", "0", "--pool-bits", str(3 * 256))
    _, backend_port = await faults.backend()
    preferred = {"policy": "qkd-preferred", "groups": ["qkd_mlkem768", "X25519MLKEM768"]}
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port, **preferred)],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    ))  # fmt: skip
    client = await faults.node(faults.config(
        "client.toml",
        [faults.client_tunnel("required", server.ports["t"]),
         faults.client_tunnel("preferred", server.ports["t"], **preferred)],
        {"local": faults.kme_table(kme.urls["kme-a"], "a")},
    ))  # fmt: skip
    for _ in range(3):
        assert await works(client.ports["required"])
    assert await refused(client.ports["required"]) == b""
    record = await client.proc.wait_record(lambda r: r["reason"] != "closed")
    assert record["reason"] == (
        "handshake failed (local): ETSI 014 enc_keys: "
        "KME answered 503: insufficient key material in the KME"
    ), record
    assert await works(client.ports["preferred"])
    fell_back = await client.proc.wait_record(lambda r: r["tunnel"] == "preferred")
    assert (fell_back["fallback"], fell_back["group"]) == (True, "X25519MLKEM768")

    ready, reasons = await client.ready()
    assert not ready
    assert reasons == ["tunnel required: KME local unreachable and the policy requires QKD"]
    metrics = await client.metrics()
    assert metric(metrics, "qkdproxy_kme_errors_total", class_="http_5xx") >= 2
    assert metric(metrics, "qkdproxy_qkd_keys_total", tunnel="required", fate="consumed") == 3
    key_ids = [r["qkd_key_id"] for r in client.proc.records() if r["qkd_key_id"]]
    assert len(key_ids) == len(set(key_ids)) == 3


async def test_kme_restarted_on_the_same_port_new_connections_recover(
    faults: FaultHarness,
) -> None:
    """The KME simulator process is killed (SIGKILL) and started again on the same ports,
    with an empty key store. One tunnel fetches a key per handshake ("direct"), the other
    has a supply at its floor nobody used yet ("buffered"). Expected: while the KME is
    down both fail closed with a reason in the log line; after the restart "direct" works
    again once its circuit breaker lets a call through, and "buffered" after at most
    REFUSALS_BEFORE_FLUSH - 1 failed connections: the peer refuses the (now unknown) keys of
    the old supply, one per connection; after that many in a row the client flushes the
    supply and retries once with a new key (a warning says so). No key id is used twice."""
    ports = (free_port(), free_port())
    kme = await faults.start_kme(ports=ports)
    backend, backend_port = await faults.backend()
    kmes = {"direct": {"prefetch": False}, "buffered": {}}
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel(k, backend_port, kme=k) for k in kmes],
        {k: faults.kme_table(kme.urls["kme-b"], "b", **o) for k, o in kmes.items()},
    ))  # fmt: skip
    client = await faults.node(faults.config(
        "client.toml", [faults.client_tunnel(k, server.ports[k], kme=k) for k in kmes],
        {k: faults.kme_table(kme.urls["kme-a"], "a", **o) for k, o in kmes.items()},
    ))  # fmt: skip
    ports_of = client.ports
    assert await works(ports_of["direct"])

    async def buffer_full() -> bool:
        return {k["name"]: k["buffer_depth"] for k in (await client.status())["kmes"]} == {
            "direct": 0, "buffered": 4,
        }  # fmt: skip

    await eventually(buffer_full, "the buffered KME's supply at its floor")

    kme.proc.process.kill()
    await kme.proc.wait_exit()
    received = backend.received
    for name in kmes:
        assert await refused(ports_of[name]) == b""
    assert backend.received == received
    direct = await client.proc.wait_record(
        lambda r: r["tunnel"] == "direct" and r["reason"] != "closed"
    )
    assert re.fullmatch(
        r"handshake failed \(local\): ETSI 014 enc_keys: KME unreachable: \w+(: .+)?",
        direct["reason"],
    ), direct
    buffered = await server.proc.wait_record(lambda r: r["tunnel"] == "buffered")
    assert re.fullmatch(
        r"handshake failed \(local\): ETSI 014 dec_keys: KME unreachable: \w+(: .+)?",
        buffered["reason"],
    ), buffered

    kme = await faults.start_kme(ports=ports, name="kme-again")

    async def recovered() -> bool:
        return await works(ports_of["direct"])

    await eventually(recovered, "a direct connection after the KME restart")
    assert await recovers_after_refusals(client, "buffered") is not None
    for name in kmes:
        assert all([await works(ports_of[name]) for _ in range(3)])
    metrics = await client.metrics()
    # Each refused key is counted as such (what the flush dropped may be nothing).
    assert metric(metrics, "qkdproxy_qkd_key_fates_total", kme="buffered",
                  fate="refused") >= 3  # fmt: skip

    records = client.proc.records()
    key_ids = [r["qkd_key_id"] for r in records if r["qkd_key_id"]]
    assert len(key_ids) == len(set(key_ids)), "a QKD key was used twice"


async def test_kme_unreachable_at_daemon_start_then_appears(
    faults: FaultHarness,
) -> None:
    """No KME listens when the daemons start. Expected: they start anyway (listeners up,
    /healthz 200); /readyz turns 503 naming the qkd-pq-required tunnel; its connections
    fail closed with "KME unreachable" (or "circuit open") in the log line; a qkd-preferred
    tunnel falls back to PQ. Once the KME listens, qkd-pq-required connections work and
    /readyz returns to 200 without a restart."""
    ports = (free_port(), free_port())
    urls = {
        kme: f"https://127.0.0.1:{port}"
        for kme, port in zip(("kme-a", "kme-b"), ports, strict=True)
    }
    _, backend_port = await faults.backend()
    preferred = {"policy": "qkd-preferred", "groups": ["qkd_mlkem768", "X25519MLKEM768"]}
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port, **preferred)],
        {"local": faults.kme_table(urls["kme-b"], "b")},
    ))  # fmt: skip
    client = await faults.node(faults.config(
        "client.toml",
        [faults.client_tunnel("required", server.ports["t"]),
         faults.client_tunnel("preferred", server.ports["t"], **preferred)],
        {"local": faults.kme_table(urls["kme-a"], "a")},
    ))  # fmt: skip
    assert await client.get("/healthz") == (200, "ok\n")

    async def not_ready() -> bool:
        return not (await client.ready())[0]

    await eventually(not_ready, "/readyz 503 while the KME is unreachable")
    assert (await client.ready())[1] == [
        "tunnel required: KME local unreachable and the policy requires QKD"
    ]
    assert await refused(client.ports["required"]) == b""
    record = await client.proc.wait_record(lambda r: r["tunnel"] == "required")
    assert re.fullmatch(
        r"handshake failed \(local\): ETSI 014 enc_keys: "
        r"KME (unreachable: \w+|circuit open, next try in .*)",
        record["reason"],
    ), record
    assert await works(client.ports["preferred"])
    assert (await client.proc.wait_record(lambda r: r["tunnel"] == "preferred"))["fallback"]

    await faults.start_kme(ports=ports)

    async def recovered() -> bool:
        return await works(client.ports["required"])

    await eventually(recovered, "a qkd-pq-required connection once the KME listens")

    async def ready() -> bool:
        return (await client.ready())[0] and (await server.ready())[0]

    await eventually(ready, "/readyz 200 on both daemons once the KME listens")
