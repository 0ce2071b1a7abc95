"""Security properties, each tested directly against running tunnels.

Where tests/integration/test_hostile.py attacks a bare TLS endpoint and tests/system/test_daemon_system.py
drives daemon processes through their happy paths, these tests run the daemon
(:class:`qkdproxy.daemon.app.Daemon`, built from configuration files) in this process next to the
KME simulator, whose link model is swapped for a recording one
(:class:`qkdproxy.tools.bench.soak.LedgerLink`): every QKD key it makes and delivers, its bytes
when a test needs them, and faults on demand (failed calls, lost replies, lying keys). The
properties:

1. no QKD key is ever used twice, whatever mix of good and failing handshakes runs
   (hypothesis), checked at the KME, in both daemons' ledgers and in their records;
2. no key, traffic secret or private key reaches any log at any level, in-process and in
   ``qkdproxy run`` processes at ``log_level = "debug"``;
3. a ``qkd-pq-required`` tunnel never completes a handshake without a QKD key;
4. a peer outside the allow-list never gets a byte through;
5. expired, wrong-CA and wrong-name certificates are refused with the alert
   ``qkdproxy/core/tls/verify.py`` maps them to, on both tunnel roles;
6. floods of half-open and slow clients do not stop a good client, the connection limit
   recovers once they time out, and connection churn leaves no descriptor or task behind.

Synchronisation is on connection records (an event per record), tunnel idleness and
protocol answers; nothing waits for time to pass except the handshake timeouts under test
(and the slow client's own pacing).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tlslite.recordlayer
import tlslite.tlsconnection
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

import qkdproxy.core.hybrid
import qkdproxy.core.tls.keyexchange
from qkdproxy.core.hybrid import KEY_ID_SIZE, HybridKem
from qkdproxy.core.tls import record_layer
from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.native import schedule as native_schedule
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.core.tls.wire import Alert, HandshakeType
from qkdproxy.daemon.app import Daemon
from qkdproxy.daemon.config import load_config
from qkdproxy.daemon.tunnel import ConnectionRecord
from qkdproxy.io.peer_channel import open_peer_channel
from qkdproxy.io.tls_stream import (
    EndpointSettings,
    HandshakeError,
    TlsEndpoint,
    TlsStream,
    TlsStreamError,
)
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.etsi014_client import Etsi014Client
from qkdproxy.keys.etsi014_supply import Etsi014Master, Etsi014Slave
from qkdproxy.keys.sources import KeySources
from qkdproxy.keys.sslctx import client_context
from qkdproxy.sim.faults import Burst, FaultInjector, FaultScript
from qkdproxy.sim.link import KeyUnknownError
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.bench.processes import free_port
from qkdproxy.tools.bench.soak import (
    LedgerLink,
    fd_kinds,
    install_ledger,
    settle_resources,
    snapshot_resources,
)
from qkdproxy.tools.certs import KMES, DevPki
from qkdproxy.tools.loopback import resolve_groups
from tests.integration.test_hostile import client_share, quiet_loop, with_key_id, with_share
from tests.integration.test_wire_hello import (
    FailureLog,
    close_writer,
    ext,
    handshake_message,
    read_first_message,
    records,
    server_hello_body,
    split_first_message,
    u16,
)
from tests.system.test_daemon_system import (
    CLIENT_ID,
    DEADLINE,
    SERVER_ID,
    SERVER_NAME,
    Harness,
    TomlValue,
    exchange,
    toml_table,
)

__all__ = ["quiet_loop"]  # an autouse fixture: nothing may reach the loop's error handler

QKD = "qkd_mlkem768"
QKD_BIG = "qkd_mlkem1024"
QKD_TRIPLE = "qkd_x25519mlkem768"
PQ_AND_CLASSICAL = (
    "X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024", "MLKEM768", "MLKEM1024",
    "x25519", "secp256r1", "secp384r1",
)  # fmt: skip
X25519MLKEM768_CODE = 0x11EC
EXT_KEY_SHARE, EXT_SUPPORTED_VERSIONS = 51, 43
TCP_LISTEN = "0A"


# ------------------------------------------------------------------------------ PKI


@dataclass(frozen=True)
class Pki:
    """The development PKI on disk, and in memory (the CA issues test certificates)."""

    path: Path
    dev: DevPki

    def issue(
        self, names: list[str], *, common_name: str = "test-peer", **kwargs: Any
    ) -> Credentials:
        return self.dev.ca.issue(common_name, names, **kwargs)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    path = tmp_path_factory.mktemp("pki")
    dev = DevPki.create()
    dev.write(path)
    return Pki(path, dev)


# ------------------------------------------------------------------------ the KME side


class ProbeLink(LedgerLink):
    """The recording link, plus what these tests need from a KME on demand.

    ``keep``: remember the bytes of every key drawn (014 and 004), to look for them in logs.
    ``lose``: deliver that many more dec_keys requests, then answer "not found" (a reply lost
    after the KME let the key go). ``lie``: hand slaves bytes other than the master got.
    ``short``: hand slaves 16-byte keys.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requested: Counter[bytes] = Counter()  # dec_keys asked for, delivered or not
        self.lost: set[bytes] = set()  # delivered, but the answer never reached the caller
        self.stream_deliveries: Counter[tuple[bytes, str, int]] = Counter()  # ETSI 004
        self.keep = False
        self.materials: list[bytes] = []
        self.lose = 0
        self.lie = False
        self.short = False

    def draw(self, nbytes: int, now: float) -> bytes:
        material = super().draw(nbytes, now)
        if self.keep:
            self.materials.append(material)
        return material

    def stream_key(self, ksid: bytes, app: str, index: int, now: float) -> bytes:
        chunk = super().stream_key(ksid, app, index, now)
        self.stream_deliveries[(bytes(ksid), app, index)] += 1
        return chunk

    def take_keys(
        self, caller_sae: str, master_sae: str, key_ids: list[bytes], now: float
    ) -> list[bytes]:
        self.requested.update(bytes(k) for k in key_ids)
        materials = super().take_keys(caller_sae, master_sae, key_ids, now)
        if self.lose:
            self.lose -= 1
            self.lost.update(bytes(k) for k in key_ids)
            raise KeyUnknownError("reply lost (injected)")
        if self.lie:
            materials = [bytes(b ^ 0x5A for b in m) for m in materials]
        if self.short:
            materials = [m[:16] for m in materials]
        return materials


# ------------------------------------------------------------------------------ the rig


def tunnel_files(pki: Pki, role: str) -> dict[str, TomlValue | None]:
    return {
        "cert": str(pki.path / f"tunnel-{role}.pem"),
        "key": str(pki.path / f"tunnel-{role}-key.pem"),
        "ca": str(pki.path / "ca.pem"),
    }


def server_tunnel(pki: Pki, backend_port: int, **values: TomlValue | None) -> dict[str, Any]:
    return {
        "name": "server", "role": "server", "listen": "127.0.0.1:0",
        "connect": f"127.0.0.1:{backend_port}", **tunnel_files(pki, "server"),
        "allow": [CLIENT_ID], "kme": "local", "policy": "qkd-pq-required", "groups": [QKD],
        # These properties are checked in both flows (a server serves only the
        # client-initiated one by default).
        "flows": ["client", "server"], **values,
    }  # fmt: skip


def client_tunnel(pki: Pki, server_port: int, **values: TomlValue | None) -> dict[str, Any]:
    return {
        "name": "client", "role": "client", "listen": "127.0.0.1:0",
        "connect": f"127.0.0.1:{server_port}", "server_name": SERVER_NAME,
        **tunnel_files(pki, "client"), "allow": [SERVER_ID], "kme": "local",
        "policy": "qkd-pq-required", "flow": "client-initiated", "groups": [QKD], **values,
    }  # fmt: skip


@dataclass
class Rig:
    """The KME simulator (recording link) and in-process daemons, torn down together."""

    pki: Pki
    harness: Harness
    pair: KmePair
    link: ProbeLink
    stack: AsyncExitStack
    records: list[ConnectionRecord] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def kme_section(self, side: str, api: str = "014") -> dict[str, TomlValue | None]:
        sae, peer = ("sae-a", "sae-b") if side == "a" else ("sae-b", "sae-a")
        index = 0 if side == "a" else 1
        endpoint: dict[str, TomlValue | None] = (
            {"url": self.pair.urls_014[index]}
            if api == "014"
            # Debug-mode asyncio on a loaded machine can be slower than the responder's
            # 0.5 s default wait for a KSID (that guard has its own tests).
            else {"address": f"127.0.0.1:{self.pair.ports_004[index]}", "peer_stream_wait_s": 5.0}
        )
        return {
            "api": api, **endpoint, "sae_id": sae, "peer_sae_id": peer,
            "cert": str(self.pki.path / f"{sae}.pem"),
            "key": str(self.pki.path / f"{sae}-key.pem"), "ca": str(self.pki.path / "ca.pem"),
        }  # fmt: skip

    def config(
        self,
        name: str,
        tunnels: Sequence[Mapping[str, Any]],
        kmes: Mapping[str, Mapping[str, TomlValue | None]],
        daemon: Mapping[str, TomlValue | None] | None = None,
    ) -> Path:
        text = toml_table("[daemon]", {"log_level": "info", **(daemon or {})})
        text += "".join(toml_table(f"[kme.{k}]", v) for k, v in kmes.items())
        text += "".join(toml_table("[[tunnel]]", t) for t in tunnels)
        return self.harness.write(f"{name}.toml", text)

    async def daemon(
        self,
        name: str,
        side: str,
        *tunnels: Mapping[str, Any],
        kme: Mapping[str, TomlValue | None] | None = None,
    ) -> Daemon:
        """An in-process daemon with one ``[kme.local]`` for ``side`` ("a" client, "b"
        server) and ``tunnels``; its records go to ``self.records``."""
        kmes = {"local": {**self.kme_section(side), **(kme or {})}}
        return await self.start(self.config(name, tunnels, kmes))

    async def start(self, path: Path) -> Daemon:
        daemon = Daemon(load_config(path), on_close=self._record)
        self.stack.push_async_callback(daemon.close)
        await daemon.start()
        return daemon

    def _record(self, record: ConnectionRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def wait_records(
        self, predicate: Callable[[ConnectionRecord], bool], count: int, within: float = DEADLINE
    ) -> list[ConnectionRecord]:
        """At least ``count`` records satisfying ``predicate`` (waits on each new record)."""
        async with asyncio.timeout(within):
            while len(found := [r for r in self.records if predicate(r)]) < count:
                self._changed.clear()
                await self._changed.wait()
        return found

    def fail_next(self, side: str, calls: int = 1, reset: bool = False) -> None:
        """Make the next ``calls`` calls to KME ``side`` fail (HTTP 503, or a reset)."""
        burst = (Burst(0, calls),)
        script = FaultScript(reset_bursts=burst) if reset else FaultScript(error_bursts=burst)
        self.pair.nodes[0 if side == "a" else 1].faults = FaultInjector(script)

    async def sources(self, side: str, master: bool) -> KeySources:
        """ETSI 014 key sources of SAE a or b on this KME, outside any daemon."""
        sae, peer = ("sae-a", "sae-b") if side == "a" else ("sae-b", "sae-a")
        credentials = Credentials.load(
            self.pki.path / f"{sae}.pem", self.pki.path / f"{sae}-key.pem"
        )
        client = Etsi014Client(
            self.pair.urls_014[0 if side == "a" else 1],
            client_context(credentials, [self.pki.dev.ca.certificate]),
        )
        self.stack.push_async_callback(client.aclose)
        if master:
            source = Etsi014Master(client, peer)
            self.stack.push_async_callback(source.aclose)
            return KeySources(master=source)
        return KeySources(slave=Etsi014Slave(client, peer))


@asynccontextmanager
async def rig(tmp_path: Path, pki: Pki) -> AsyncIterator[Rig]:
    credentials = [pki.dev.kmes[k] for k in KMES]
    pair = KmePair(SimulatorSettings(), credentials, [pki.dev.ca.certificate])
    link = install_ledger(pair, ProbeLink)
    async with AsyncExitStack() as stack:
        await pair.start()
        stack.push_async_callback(pair.stop)
        # The harness writes configuration files and runs daemon processes against this
        # in-process KME pair instead of starting its own.
        urls = {"kme-a": pair.urls_014[0], "kme-b": pair.urls_014[1]}
        harness = Harness(tmp_path, pki.path, _kme_urls=urls)
        stack.push_async_callback(harness.close)
        yield Rig(pki, harness, pair, link, stack)


def port(daemon: Daemon, index: int = 0) -> int:
    return int(daemon.tunnels[index].bound()[0].rsplit(":", 1)[1])


async def idle(*daemons: Daemon) -> None:
    for daemon in daemons:
        for tunnel in daemon.tunnels:
            await asyncio.wait_for(tunnel.wait_idle(), DEADLINE)


_HYBRIDS: dict[str, HybridKem] = {}


def hybrid(name: str) -> HybridKem:
    if name not in _HYBRIDS:
        [_HYBRIDS[name]] = resolve_groups([name])
    return _HYBRIDS[name]


def client_endpoint(
    pki: Pki,
    credentials: Credentials | None = None,
    groups: Sequence[str] = (QKD,),
    keys: KeyContext | None = None,
    server_name: str = SERVER_NAME,
) -> TlsEndpoint:
    """A qkdproxy client endpoint (not a daemon), trusting the development CA."""
    policy = PeerPolicy((pki.dev.ca.certificate,), AllowList.of([SERVER_ID]), server_name)
    return TlsEndpoint(
        EndpointSettings(
            credentials or pki.dev.tunnel_client, policy, [hybrid(g) for g in groups],
            keys or KeyContext(KeySources()),
        )
    )  # fmt: skip


async def dial(endpoint: TlsEndpoint, target: int) -> TlsStream:
    reader, writer = await asyncio.open_connection("127.0.0.1", target)
    return await asyncio.wait_for(endpoint.connect(reader, writer), DEADLINE)


async def first_answer(target: int, payload: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes; return the server's first handshake message (its records), or all it
    sent before it closed; then hang up (at once if not ``read``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", target)
    answer = b""
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(DEADLINE):
            while read and split_first_message(answer) is None:
                data = await reader.read(65536)
                if not data:
                    break
                answer += data
    except ConnectionError:
        pass
    finally:
        await close_writer(writer)
    return answer


async def capture(endpoint: TlsEndpoint) -> bytes | None:
    """The ClientHello ``endpoint`` sends (its key now waits for the server at the KME), or
    None if it could not send one (its KME failed)."""
    captured: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            captured.set_result(await read_first_message(reader))
        except (EOFError, ConnectionError) as exc:
            captured.set_exception(exc)
        finally:
            await close_writer(writer)

    recorder = await asyncio.start_server(record, "127.0.0.1", 0)
    try:
        with contextlib.suppress(HandshakeError):
            await dial(endpoint, recorder.sockets[0].getsockname()[1])
        # The recorder has answered by now (the client ended because it hung up), or it is
        # about to see the client's EOF.
        try:
            return await asyncio.wait_for(captured, DEADLINE)
        except (EOFError, ConnectionError):
            return None
    finally:
        recorder.close()
        await recorder.wait_closed()


async def echo_or_nothing(target: int, payload: bytes) -> bytes:
    """Through a client tunnel: the full echo, or b"" if the tunnel could not connect. Any
    other answer (partial, altered) fails the test."""
    try:
        echoed = await exchange(target, payload)
    except ConnectionError:
        echoed = b""
    assert echoed in (payload, b""), f"{len(echoed)} bytes came back for {len(payload)}"
    return echoed


def completed(records: Iterable[ConnectionRecord], role: str) -> list[ConnectionRecord]:
    return [r for r in records if r.role == role and r.group is not None]


def balanced(daemon: Daemon) -> None:
    for tunnel in daemon.tunnels:
        ledger = tunnel.keys.ledger
        assert ledger.taken == ledger.consumed + ledger.wasted, (tunnel.config.name, ledger)
        assert ledger.outstanding == 0, (tunnel.config.name, ledger)


def as_bytes(key_id: str) -> bytes:
    return uuid.UUID(key_id).bytes


@asynccontextmanager
async def rogue(
    pki: Pki, credentials: Credentials, keys: KeyContext
) -> AsyncIterator[tuple[int, FailureLog, list[bytes]]]:
    """A TLS server (not a tunnel) showing ``credentials``, accepting any client of the CA;
    yields its port, its failed handshakes, and what clients sent on completed ones."""
    policy = PeerPolicy((pki.dev.ca.certificate,), AllowList(any_peer=True))
    endpoint = TlsEndpoint(EndpointSettings(credentials, policy, [hybrid(QKD)], keys))
    failures, heard = FailureLog(), []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            stream = await endpoint.accept(reader, writer)
        except HandshakeError as exc:
            failures.append(exc)
            return
        try:
            heard.append(bytes(await asyncio.wait_for(stream.read(), DEADLINE)))
        except TlsStreamError:
            heard.append(b"")
        finally:
            await stream.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], failures, heard
    finally:
        server.close()
        await server.wait_closed()


# ======================================================= 1. no QKD key is used twice

STEPS = (
    "good", "good", "server_flow", "hrr", "etsi004", "user_abort", "capture", "replay",
    "replay_first", "abort_mid_hello", "tamper_share", "tamper_key_id", "kme_a_fails",
    "kme_b_fails", "kme_b_resets", "kme_b_loses_reply",
)  # fmt: skip


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(st.sampled_from(STEPS), min_size=4, max_size=16))
async def test_no_qkd_key_is_used_twice_whatever_mix_of_handshakes_runs(
    tmp_path: Path, pki: Pki, steps: list[str]
) -> None:
    async with rig(tmp_path, pki) as r:
        backend, backend_port = await r.harness.backend()
        server = await r.start(r.config(
            "server",
            [server_tunnel(pki, backend_port, groups=[QKD, QKD_TRIPLE]),
             server_tunnel(pki, backend_port, name="s004", kme="k004")],
            {"local": r.kme_section("b"), "k004": r.kme_section("b", "004")},
        ))  # fmt: skip
        client = await r.start(r.config(
            "client",
            [client_tunnel(pki, port(server), name="plain"),
             client_tunnel(pki, port(server), name="sflow", flow="server-initiated"),
             # The server takes qkd_mlkem768 over the share the client leads with: a retry.
             client_tunnel(pki, port(server), name="hrr", groups=[QKD_BIG, QKD]),
             client_tunnel(pki, port(server, 1), name="c004", kme="k004")],
            {"local": r.kme_section("a"), "k004": r.kme_section("a", "004")},
        ))  # fmt: skip
        # A client outside any daemon, whose hellos are replayed and tampered with.
        spy = KeyContext(await r.sources("a", master=True))
        hellos: list[bytes] = []

        async def hello() -> bytes | None:
            if not hellos and (captured := await capture(client_endpoint(pki, keys=spy))):
                hellos.append(captured)
            return hellos[-1] if hellos else None

        for step in steps:
            if step in ("good", "server_flow", "hrr", "etsi004"):
                index = {"good": 0, "server_flow": 1, "hrr": 2, "etsi004": 3}[step]
                await echo_or_nothing(port(client, index), os.urandom(3000))
            elif step == "user_abort":
                _, writer = await asyncio.open_connection("127.0.0.1", port(client))
                writer.transport.abort()
            elif step == "capture":
                if captured := await capture(client_endpoint(pki, keys=spy)):
                    hellos.append(captured)
            elif step in ("replay", "replay_first"):
                if (hello_bytes := await hello()) is not None:
                    chosen = hellos[0] if step == "replay_first" else hello_bytes
                    await first_answer(port(server), chosen)
            elif step == "abort_mid_hello":
                if (hello_bytes := await hello()) is not None:
                    await first_answer(
                        port(server), hello_bytes[: len(hello_bytes) // 2], read=False
                    )
            elif step == "tamper_share":
                if (hello_bytes := await hello()) is not None:
                    share = client_share(hello_bytes)
                    forged = os.urandom(len(share) - KEY_ID_SIZE) + share[-KEY_ID_SIZE:]
                    await first_answer(port(server), with_share(hello_bytes, forged))
            elif step == "tamper_key_id":
                if (hello_bytes := await hello()) is not None:
                    forged_id = with_key_id(hello_bytes, os.urandom(KEY_ID_SIZE))
                    await first_answer(port(server), forged_id)
            elif step == "kme_a_fails":
                r.fail_next("a")
            elif step == "kme_b_fails":
                r.fail_next("b")
            elif step == "kme_b_resets":
                r.fail_next("b", reset=True)
            else:
                r.link.lose += 1
            await idle(client, server)

        # Daemon side: each completed handshake has its own key, the same at both ends.
        client_done, server_done = completed(r.records, "client"), completed(r.records, "server")
        client_ids = [rec.qkd_key_id for rec in client_done]
        server_ids = [rec.qkd_key_id for rec in server_done]
        assert None not in client_ids and None not in server_ids, "a handshake without QKD"
        assert len(client_ids) == len(set(client_ids)), "a key id served two handshakes"
        assert len(server_ids) == len(set(server_ids)), "a key id served two handshakes"
        assert set(client_ids) == set(server_ids)
        for daemon in (client, server):
            balanced(daemon)
        assert sum(t.keys.ledger.consumed for t in client.tunnels) == len(client_done)
        assert sum(t.keys.ledger.consumed for t in server.tunnels) == len(server_done)
        assert spy.ledger.taken == spy.ledger.consumed + spy.ledger.wasted
        assert spy.ledger.consumed == 0  # its hellos never completed anywhere
        retries = [rec for rec in client_done if rec.tunnel == "hrr"]
        assert all(rec.hello_retry for rec in retries)
        hrr_ledger = client.tunnels[2].keys.ledger
        assert hrr_ledger.wasted_by_reason.get("hello_retry", 0) >= len(retries)
        # Nothing but completed handshakes reached the backend.
        assert backend.accepted == len(server_done)

        # KME side: nothing delivered twice; nothing even asked for again once the daemon
        # had it (a replayed key id is refused by the daemon itself): only a key whose
        # delivery was lost on the way may be asked for a second time (and is then refused).
        link = r.link
        assert all(count == 1 for count in link.delivered.values())
        again = {key_id for key_id, count in link.requested.items() if count > 1}
        assert again <= link.lost, "the daemon asked the KME again for a key it had"
        by_api = {api: {as_bytes(rec.qkd_key_id or "") for rec in client_done if rec.api == api}
                  for api in ("014", "004")}  # fmt: skip
        assert by_api["014"] <= set(link.made)
        assert by_api["014"] <= set(link.delivered)
        # ETSI 004: each key of each stream went once to each end; a handshake's stream
        # delivered its key 0 to both ends.
        assert all(count == 1 for count in link.stream_deliveries.values())
        for ksid in by_api["004"]:
            assert {(ksid, sae, 0) for sae in ("sae-a", "sae-b")} <= set(link.stream_deliveries)
        assert all(count == 1 for count in link.material_digests.values())


# ============================================== 2. no key or secret reaches any log


class LogCapture(logging.Handler):
    """Every record of every logger, formatted with its exception and stack if any."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def every_logger_at_debug() -> Iterator[LogCapture]:
    """Root at DEBUG, every existing logger enabled and propagating; restored afterwards."""
    handler = LogCapture()
    root = logging.getLogger()
    loggers = [
        logger for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]  # fmt: skip
    saved = [(lg, lg.level, lg.propagate, lg.disabled) for lg in loggers]
    root_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for logger in loggers:
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        logger.disabled = False
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(root_level)
        for logger, level, propagate, disabled in saved:
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled


class Secrets:
    """Secret byte strings by what they are; and where any of them shows up in text."""

    MIN_SIZE = 12

    def __init__(self) -> None:
        self.values: dict[bytes, str] = {}
        self.public: set[bytes] = set()

    def add(self, label: str, value: bytes | bytearray) -> None:
        value = bytes(value)
        if len(value) >= self.MIN_SIZE and value not in self.public:
            self.values.setdefault(value, label)

    def recorder(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            out = function(*args, **kwargs)
            self.add(label, out)
            return out

        return recorded

    def private_key(self, label: str, key: Any) -> None:
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )  # fmt: skip
        self.add(f"{label} (PKCS#8 DER)", der)
        numbers: dict[str, int] = {}
        if isinstance(key, ec.EllipticCurvePrivateKey):
            value = key.private_numbers().private_value
            self.add(f"{label} (scalar)", value.to_bytes((key.curve.key_size + 7) // 8, "big"))
            numbers["scalar"] = value
        elif isinstance(key, rsa.RSAPrivateKey):
            private = key.private_numbers()
            numbers = {"d": private.d, "p": private.p, "q": private.q}
            for name, number in numbers.items():
                self.add(f"{label} ({name})", number.to_bytes((number.bit_length() + 7) // 8))
        for name, number in numbers.items():  # as a decimal number, verbatim
            self.values.setdefault(str(number).encode(), f"{label} ({name}, decimal)")

    def pem_file(self, path: Path) -> None:
        """A PEM private key: its base64 lines count as secrets too."""
        text = path.read_text()
        key = serialization.load_pem_private_key(text.encode(), None)
        self.private_key(path.name, key)
        for line in text.splitlines():
            if line and not line.startswith("-----"):
                self.values.setdefault(line.encode(), f"{path.name} (PEM line)")

    def find(self, text: str) -> list[str]:
        """What leaked: 'label: form' for every secret found in ``text``.

        Hex: any 16 bytes of a secret, at any offset, in either case. Base64 (standard or
        URL-safe): any 15 bytes, at any alignment. Python ``repr`` of bytes or bytearray,
        and latin-1 text: the whole secret. PEM lines and decimal numbers: verbatim.
        """
        hex_windows = _windows(re.findall(r"[0-9a-f]{32,}", text.lower()), 32)
        b64_windows = _windows(re.findall(r"[A-Za-z0-9+/_-]{20,}", text), 20)
        found = []
        for value, label in self.values.items():
            if value.isascii() and value.decode().isprintable():  # a PEM line
                if value.decode() in text:
                    found.append(f"{label}: {value.decode()[:40]}")
                continue
            hexes = {value[i : i + 16].hex() for i in range(len(value) - 15)}
            b64 = {base64.b64encode(value[i : i + 15]).decode() for i in range(3)}
            b64 |= {b.replace("+", "-").replace("/", "_") for b in b64}
            # bytearray's repr escapes quotes where the bytes repr does not.
            literal = (repr(value)[2:-1], repr(bytearray(value))[12:-2], value.decode("latin-1"))
            if hexes & hex_windows:
                found.append(f"{label}: hex {value.hex()[:40]}")
            elif b64 & b64_windows:
                found.append(f"{label}: base64 {base64.b64encode(value).decode()[:40]}")
            elif any(form in text for form in literal):
                found.append(f"{label}: repr {repr(value)[:40]}")
        return found


def _windows(runs: Iterable[str], size: int) -> set[str]:
    return {run[i : i + size] for run in runs for i in range(len(run) - size + 1)}


def tls_constants() -> set[bytes]:
    """Values every TLS 1.3 handshake without a PSK derives alike (not secrets)."""
    derive = tlslite.tlsconnection.derive_secret
    extract = tlslite.tlsconnection.secureHMAC
    out = set()
    for prf, size in (("sha256", 32), ("sha384", 48)):
        early = extract(bytearray(size), bytearray(size), prf)
        out |= {bytes(early), bytes(derive(early, bytearray(b"derived"), None, prf))}
    return out


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> Secrets:
    """Records every secret TLS derives and every hybrid shared secret, as they are made."""
    found = Secrets()
    found.public = tls_constants()
    for module, name, label in (
        (tlslite.tlsconnection, "derive_secret", "TLS 1.3 secret"),
        (tlslite.tlsconnection, "secureHMAC", "TLS 1.3 extracted secret or MAC"),
        (tlslite.tlsconnection, "HKDF_expand_label", "TLS 1.3 expanded secret"),
        (tlslite.recordlayer, "HKDF_expand_label", "TLS 1.3 traffic key or IV"),
        (native_schedule, "derive_secret", "TLS 1.3 secret"),
        (native_schedule, "_extract", "TLS 1.3 extracted secret or MAC"),
        (record_layer, "hkdf_expand_label", "TLS 1.3 traffic key or IV"),
    ):
        monkeypatch.setattr(module, name, found.recorder(label, getattr(module, name)))
    combine = qkdproxy.core.hybrid.with_qkd_key

    def with_qkd_key(pq_secret: bytes, qkd_key: bytes) -> bytes:
        found.add("QKD key (handshake)", qkd_key)
        found.add("KEM shared secret", pq_secret)
        out = combine(pq_secret, qkd_key)
        found.add("hybrid shared secret", out)
        return out

    monkeypatch.setattr(qkdproxy.core.tls.keyexchange, "with_qkd_key", with_qkd_key)
    return found


def test_the_leak_detector_finds_each_form() -> None:
    secrets = Secrets()
    key = os.urandom(32)
    secrets.add("k", key)
    for text in (
        f"x {key.hex().upper()} y", f"x {key[5:21].hex()}", f"{base64.b64encode(key)!r}",
        base64.urlsafe_b64encode(b"\x07" + key).decode(), f"{key!r}", f"{bytearray(key)}",
        key.decode("latin-1"),
    ):  # fmt: skip
        assert secrets.find(text), text
    assert secrets.find("nothing " + os.urandom(32).hex()) == []


def leak_report(secrets: Secrets, text: str) -> list[str]:
    leaks = secrets.find(text)
    assert not leaks, "\n".join(leaks[:20])
    return leaks


async def test_no_key_or_secret_reaches_any_log_in_process(
    tmp_path: Path, pki: Pki, secrets: Secrets, capfd: pytest.CaptureFixture[str]
) -> None:
    loop = asyncio.get_running_loop()
    debug = loop.get_debug()
    with every_logger_at_debug() as logs:
        loop.set_debug(True)  # asyncio logs slow callbacks, with their arguments
        try:
            async with rig(tmp_path, pki) as r:
                r.link.keep = True
                backend, backend_port = await r.harness.backend()
                down = {**r.kme_section("a"), "url": f"https://127.0.0.1:{free_port()}"}
                server = await r.start(r.config(
                    "server",
                    [server_tunnel(pki, backend_port, name="s014", groups=[QKD, QKD_TRIPLE]),
                     server_tunnel(pki, backend_port, name="s004", kme="k004")],
                    {"local": r.kme_section("b"), "k004": r.kme_section("b", "004")},
                    {"log_level": "debug"},
                ))  # fmt: skip
                s014, s004 = port(server, 0), port(server, 1)
                client = await r.start(r.config(
                    "client",
                    [client_tunnel(pki, s014, name="c014", rekey_bytes=16384),
                     client_tunnel(pki, s014, name="csflow", flow="server-initiated"),
                     client_tunnel(pki, s014, name="chrr", groups=[QKD_BIG, QKD]),
                     client_tunnel(pki, s004, name="c004", kme="k004"),
                     client_tunnel(pki, s014, name="cpref", kme="down", policy="qkd-preferred",
                                   groups=[QKD, "X25519MLKEM768"])],
                    {"local": r.kme_section("a"), "k004": r.kme_section("a", "004"),
                     "down": down},
                    {"log_level": "debug"},
                ))  # fmt: skip
                payloads = [os.urandom(300_000)] + [os.urandom(5000) for _ in range(3)]
                for index, payload in enumerate(payloads):
                    assert await exchange(port(client, index), payload) == payload
                assert await echo_or_nothing(port(client, 4), b"falls back, then fails") == b""

                # Refused peers and hostile hellos.
                intruder = pki.issue(["spiffe://qkdproxy.test/intruder"], server=False)
                secrets.private_key("intruder key", intruder.private_key)
                spy = KeyContext(await r.sources("a", master=True))
                stream = await dial(client_endpoint(pki, intruder, keys=spy), s014)
                await stream.write(b"early data from an intruder")
                with pytest.raises(TlsStreamError):
                    await asyncio.wait_for(stream.read(), DEADLINE)
                await stream.close()
                hello = await capture(client_endpoint(pki, keys=spy))
                assert hello is not None
                share = client_share(hello)
                forged = os.urandom(len(share) - KEY_ID_SIZE) + share[-KEY_ID_SIZE:]
                await first_answer(s014, with_share(hello, forged))
                r.fail_next("b")
                await first_answer(s014, hello)  # the KME fails this fetch
                await first_answer(s014, hello)  # a replay: refused without a KME call
                r.link.lose = 1
                await echo_or_nothing(port(client, 0), b"the key's delivery is lost")
                await idle(client, server)
                documents = [json.dumps(d.status_document()) for d in (client, server)]
                documents += [
                    generate_latest(d.metrics.registry).decode() for d in (client, server)
                ]
        finally:
            loop.set_debug(debug)
    assert backend.received > 0
    keys_drawn = r.link.materials
    for material in keys_drawn:
        secrets.add("QKD key (KME)", material)
    for path in sorted(pki.path.glob("*-key.pem")):
        secrets.pem_file(path)
    record_lines = [json.dumps(asdict(rec)) for rec in r.records]
    out, err = capfd.readouterr()
    text = "\n".join([*logs.lines, *record_lines, *documents, out, err])

    # The search covered what it should: the keys of these handshakes, TLS secrets,
    # private keys; and the logs are the daemons' own, at every level, with the JSON lines.
    labels = set(secrets.values.values())
    assert {"QKD key (KME)", "QKD key (handshake)", "hybrid shared secret",
            "TLS 1.3 secret", "TLS 1.3 traffic key or IV"} <= labels  # fmt: skip
    assert len(keys_drawn) >= len(completed(r.records, "client"))
    levels = {line.split(" ", 1)[0] for line in logs.lines}
    assert {"DEBUG", "INFO", "WARNING"} <= levels, levels
    assert sum("qkdproxy.connection: {" in line for line in logs.lines) == len(r.records)
    leak_report(secrets, text)


async def test_no_key_or_secret_reaches_the_log_of_debug_daemon_processes(
    tmp_path: Path, pki: Pki
) -> None:
    """``qkdproxy run`` processes at ``log_level = "debug"`` with asyncio's debug mode; the
    KME stays in this process, so the keys it hands them are known here."""
    secrets = Secrets()
    async with rig(tmp_path, pki) as r:
        r.link.keep = True
        h = r.harness
        _, backend_port = await h.backend()
        env = {"PYTHONASYNCIODEBUG": "1"}
        debug: dict[str, TomlValue | None] = {"log_level": "debug"}
        server = await h.daemon(
            await h.server_config("server.toml", backend_port, {"groups": [QKD, QKD_TRIPLE]},
                                  debug), env=env,
        )  # fmt: skip
        client = await h.daemon(
            await h.client_config("client.toml", server.port, {"rekey_bytes": 16384}, debug),
            env=env,
        )
        for size in (300_000, 100):
            payload = os.urandom(size)
            assert await exchange(client.port, payload) == payload
        intruder = pki.issue(["spiffe://qkdproxy.test/intruder"], server=False)
        secrets.private_key("intruder key", intruder.private_key)
        spy = KeyContext(await r.sources("a", master=True))
        stream = await dial(client_endpoint(pki, intruder, keys=spy), server.port)
        with pytest.raises(TlsStreamError):
            await asyncio.wait_for(stream.read(), DEADLINE)
        await stream.close()
        hello = await capture(client_endpoint(pki, keys=spy))
        assert hello is not None
        r.fail_next("b")
        await first_answer(server.port, hello)
        r.link.lose = 1
        await echo_or_nothing(client.port, b"its key's delivery is lost")
        await server.proc.wait_line(lambda _line: len(server.proc.records()) >= 5)
        for proc in (client.proc, server.proc):
            await proc.terminate()
    for material in r.link.materials:
        secrets.add("QKD key (KME)", material)
    for path in sorted(pki.path.glob("*-key.pem")):
        secrets.pem_file(path)
    text = "\n".join([*client.proc.lines, *server.proc.lines])
    assert any(" DEBUG " in line for line in server.proc.lines), server.proc.stderr
    assert len(server.proc.records()) >= 5 and len(client.proc.records()) >= 3
    assert len(r.link.materials) >= 3
    leak_report(secrets, text)


# ============================== 3. qkd-pq-required never completes without QKD


async def test_qkd_pq_required_server_refuses_every_offer_without_a_qkd_group(
    tmp_path: Path, pki: Pki
) -> None:
    offers = [
        combo for size in (1, 2, 3) for combo in itertools.combinations(PQ_AND_CLASSICAL, size)
    ]
    offers += [PQ_AND_CLASSICAL, tuple(reversed(PQ_AND_CLASSICAL))]
    async with rig(tmp_path, pki) as r:
        backend, backend_port = await r.harness.backend()
        server = await r.daemon(
            "server", "b", server_tunnel(pki, backend_port, groups=[QKD, QKD_TRIPLE])
        )
        for groups in offers:
            with pytest.raises(HandshakeError) as info:
                await dial(client_endpoint(pki, groups=groups), port(server))
            assert (info.value.alert, info.value.remote) == (Alert.HANDSHAKE_FAILURE, True), (
                groups, info.value.reason,
            )  # fmt: skip
        refused = await r.wait_records(lambda rec: rec.role == "server", len(offers))
        await idle(server)
    assert {(rec.group, rec.failure, rec.bytes_from_peer) for rec in refused} == {
        (None, "handshake_failure", 0)
    }
    assert backend.accepted == 0
    assert server.tunnels[0].keys.ledger.taken == 0
    assert not r.link.delivered  # no key was even fetched


def forged_server_hello(client_hello: bytes, group: int, share_size: int) -> bytes:
    """A ServerHello choosing ``group`` (with a random share) for a captured ClientHello."""
    body = client_hello[5 + 4 :]
    session_id = body[35 : 35 + body[34]]
    extensions = [
        ext(EXT_SUPPORTED_VERSIONS, b"\x03\x04"),
        ext(EXT_KEY_SHARE, u16(group) + u16(share_size) + os.urandom(share_size)),
    ]
    return records(
        handshake_message(
            HandshakeType.SERVER_HELLO,
            server_hello_body(extensions, random=os.urandom(32), session_id=session_id),
        )
    )


@asynccontextmanager
async def liar(group: int, share_size: int) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A server answering every ClientHello with a ServerHello for ``group``; yields its port
    and, per connection, everything the client sent after that answer."""
    heard: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read_first_message(reader)
            writer.write(forged_server_hello(hello, group, share_size))
            await writer.drain()
            heard.append(await reader.read())
        except (ConnectionError, EOFError):
            heard.append(b"")
        finally:
            await close_writer(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heard
    finally:
        server.close()
        await server.wait_closed()


async def test_qkd_pq_required_client_refuses_servers_that_choose_no_qkd(
    tmp_path: Path, pki: Pki
) -> None:
    """A real server that speaks only PQ groups, and one that answers with a PQ group the
    client never offered: neither gets a handshake, nor a byte of the user's data."""
    async with rig(tmp_path, pki) as r, liar(X25519MLKEM768_CODE, 1088 + 32) as (lying, heard):
        backend, backend_port = await r.harness.backend()
        pq_only = await r.daemon(
            "pq", "b",
            server_tunnel(pki, backend_port, policy="pq-required", groups=["X25519MLKEM768"],
                          kme=None),
        )  # fmt: skip
        client = await r.daemon(
            "client", "a",
            client_tunnel(pki, port(pq_only), name="to-pq", groups=[QKD, QKD_TRIPLE]),
            client_tunnel(pki, lying, name="to-liar"),
        )  # fmt: skip
        for index in (0, 1):
            assert await echo_or_nothing(port(client, index), b"user data") == b""
        await idle(client, pq_only)
    by_tunnel = {rec.tunnel: rec for rec in r.records if rec.role == "client"}
    assert by_tunnel["to-pq"].failure == "handshake_failure"
    assert by_tunnel["to-liar"].failure == "illegal_parameter"
    for rec in by_tunnel.values():
        assert (rec.group, rec.fallback, rec.bytes_to_peer) == (None, False, 0)
    assert heard == [b"\x15\x03\x03\x00\x02\x02" + bytes([Alert.ILLEGAL_PARAMETER])]
    assert backend.accepted == 0
    ledger = client.tunnels[1].keys.ledger
    assert (ledger.taken, ledger.consumed, ledger.wasted) == (1, 0, 1)


@pytest.mark.parametrize("down", ["client", "server"])
async def test_qkd_pq_required_tunnels_fail_closed_when_their_kme_is_down(
    tmp_path: Path, pki: Pki, down: str
) -> None:
    nowhere: dict[str, TomlValue | None] = {"url": f"https://127.0.0.1:{free_port()}"}
    async with rig(tmp_path, pki) as r:
        backend, backend_port = await r.harness.backend()
        server = await r.daemon(
            "server", "b", server_tunnel(pki, backend_port),
            kme=nowhere if down == "server" else None,
        )  # fmt: skip
        client = await r.daemon(
            "client", "a", client_tunnel(pki, port(server)),
            kme=nowhere if down == "client" else None,
        )  # fmt: skip
        for _ in range(3):
            assert await echo_or_nothing(port(client), b"must not pass") == b""
        await idle(client, server)
        broken = client if down == "client" else server
        ready, reasons = broken.readiness()
    assert not ready and "requires QKD" in reasons[0], reasons
    assert not completed(r.records, "client") and not completed(r.records, "server")
    failing = [rec for rec in r.records if rec.role == down]
    assert {rec.failure for rec in failing} == {"internal_error"}, failing
    assert not any(rec.fallback for rec in r.records)
    assert backend.accepted == 0
    for daemon in (client, server):
        assert daemon.tunnels[0].keys.ledger.consumed == 0


@pytest.mark.parametrize("flow", ["client-initiated", "server-initiated"])
@pytest.mark.parametrize("bad", ["lie", "short"])
async def test_qkd_pq_required_tunnels_never_complete_with_bad_keys_from_the_kme(
    tmp_path: Path, pki: Pki, flow: str, bad: str
) -> None:
    """The KME hands the slave end other bytes than the master end got, or keys of the
    wrong size: the handshake must fail, never fall back, never carry data."""
    async with rig(tmp_path, pki) as r:
        setattr(r.link, bad, True)
        backend, backend_port = await r.harness.backend()
        server = await r.daemon("server", "b", server_tunnel(pki, backend_port))
        client = await r.daemon("client", "a", client_tunnel(pki, port(server), flow=flow))
        for _ in range(3):
            assert await echo_or_nothing(port(client), b"must not pass") == b""
        await idle(client, server)
    assert not completed(r.records, "client") and not completed(r.records, "server")
    assert all(rec.failure is not None for rec in r.records), r.records
    assert backend.accepted == 0
    assert r.link.delivered  # the bad keys were handed out: the handshakes really used them
    for daemon in (client, server):
        balanced(daemon)
        assert daemon.tunnels[0].keys.ledger.consumed == 0


async def test_a_key_mismatch_between_the_kmes_is_named_in_the_failure_reason(
    tmp_path: Path, pki: Pki
) -> None:
    async with rig(tmp_path, pki) as r:
        r.link.lie = True
        _, backend_port = await r.harness.backend()
        server = await r.daemon("server", "b", server_tunnel(pki, backend_port))
        client = await r.daemon("client", "a", client_tunnel(pki, port(server)))
        assert await echo_or_nothing(port(client), b"must not pass") == b""
        await idle(client, server)
    assert {rec.failure for rec in r.records} == {"bad_record_mac"}


# =============================== 4. a peer outside the allow-list gets nothing through

ALLOWED_URI = CLIENT_ID.removeprefix("uri:")
NEAR_MISSES: list[tuple[str, list[str]]] = [
    *((uri, [uri]) for uri in (
        f"{ALLOWED_URI}/", f"{ALLOWED_URI}/x", f"{ALLOWED_URI}x", ALLOWED_URI[:-1],
        ALLOWED_URI.replace("client", "Client"), ALLOWED_URI.rsplit("/", 1)[0],
        ALLOWED_URI.replace("/tunnel", "//tunnel"), ALLOWED_URI.replace("/client", "/./client"),
        ALLOWED_URI.replace("client", "%63lient"), ALLOWED_URI.replace("qkdproxy.test", "evil.test"),
        ALLOWED_URI.replace("qkdproxy.test", "qkdproxy.test.evil"),
        ALLOWED_URI.replace("spiffe://", "spiffe://user@"),
        ALLOWED_URI.replace("qkdproxy.test", "qkdproxy.test:443"),
        ALLOWED_URI.replace("spiffe", "https"), f"{ALLOWED_URI}?x=1", f"{ALLOWED_URI}#x",
    )),
    ("dns-only", ["qkdproxy.test", "client.qkdproxy.test"]),
    ("cn-equals-uri", ["not-the-uri.qkdproxy.test"]),  # CN is the allowed URI, SAN is not
]  # fmt: skip


async def refused_or_echoed(
    pki: Pki, target: int, credentials: Credentials, keys: KeyContext, data: bytes
) -> tuple[int | None, bytes]:
    """Handshake, then send ``data`` at once as a qkdproxy peer would; (alert, echo)."""
    stream = await dial(client_endpoint(pki, credentials, keys=keys), target)
    channel = await open_peer_channel(stream, keys.sources)
    assert channel is not None
    try:
        await channel.send(data)
        await channel.send_fin()
        echoed = bytearray()
        while chunk := await asyncio.wait_for(channel.receive(), DEADLINE):
            echoed += chunk
    except TlsStreamError as exc:
        return exc.alert, b""
    finally:
        await stream.close()
    return None, bytes(echoed)


async def test_a_peer_outside_the_allow_list_never_gets_a_byte_to_the_backend(
    tmp_path: Path, pki: Pki
) -> None:
    """Right CA, wrong identity: the client's handshake completes (TLS 1.3 clients finish
    first) and it sends framed data at once; none of it may reach the backend."""
    async with rig(tmp_path, pki) as r:
        backend, backend_port = await r.harness.backend()
        server = await r.daemon("server", "b", server_tunnel(pki, backend_port))
        keys = KeyContext(await r.sources("a", master=True))
        for name, names in NEAR_MISSES:
            common = ALLOWED_URI if name == "cn-equals-uri" else "test-peer"
            credentials = pki.issue(names, common_name=common, server=False)
            alert, echoed = await refused_or_echoed(
                pki, port(server), credentials, keys, b"for the backend"
            )
            assert (alert, echoed) == (Alert.ACCESS_DENIED, b""), name
        # The control: the allowed identity does get through.
        allowed = pki.issue([ALLOWED_URI], server=False)
        assert await refused_or_echoed(pki, port(server), allowed, keys, b"ok") == (None, b"ok")
        await r.wait_records(lambda rec: rec.role == "server", len(NEAR_MISSES) + 1)
    refused = [rec for rec in r.records if rec.failure is not None]
    assert len(refused) == len(NEAR_MISSES)
    assert {(rec.failure, rec.bytes_from_peer, rec.group) for rec in refused} == {
        ("access_denied", 0, None)
    }
    assert (backend.accepted, backend.received) == (1, 2)
    ledger = server.tunnels[0].keys.ledger
    assert (ledger.consumed, ledger.wasted) == (1, len(NEAR_MISSES))


URI_NOISE = st.text(alphabet="abcXYZ019-._~%/:@?#", min_size=1, max_size=8)


@settings(
    max_examples=5, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(
    variants=st.lists(
        st.tuples(st.sampled_from(["prefix", "suffix", "inside"]), URI_NOISE),
        min_size=3, max_size=6,
    )
)  # fmt: skip
async def test_only_the_exact_allowed_identity_reaches_the_backend(
    tmp_path: Path, pki: Pki, variants: list[tuple[str, str]]
) -> None:
    async with rig(tmp_path, pki) as r:
        backend, backend_port = await r.harness.backend()
        server = await r.daemon("server", "b", server_tunnel(pki, backend_port))
        keys = KeyContext(await r.sources("a", master=True))
        passed = 0
        for where, noise in variants:
            if where == "prefix":
                uri = noise + ALLOWED_URI
            elif where == "suffix":
                uri = ALLOWED_URI + noise
            else:
                uri = ALLOWED_URI.replace("/tunnel/", f"/tunnel{noise}/")
            credentials = pki.issue([uri], server=False)
            alert, echoed = await refused_or_echoed(pki, port(server), credentials, keys, b"d")
            if uri == ALLOWED_URI:
                assert (alert, echoed) == (None, b"d")
                passed += 1
            else:
                assert (alert, echoed) == (Alert.ACCESS_DENIED, b""), uri
        await r.wait_records(lambda rec: rec.role == "server", len(variants))
    assert backend.accepted == passed
    assert backend.received == passed


async def test_a_client_tunnel_sends_nothing_to_a_server_outside_its_allow_list(
    tmp_path: Path, pki: Pki
) -> None:
    """A server with a valid certificate for the expected name, from the right CA, but an
    identity the client tunnel does not allow: the user's bytes must never reach it."""
    async with rig(tmp_path, pki) as r:
        rogue_credentials = pki.issue(
            [SERVER_NAME, "spiffe://qkdproxy.test/tunnel/rogue"], client=False
        )
        keys = KeyContext(await r.sources("b", master=False))
        async with rogue(pki, rogue_credentials, keys) as (rogue_port, failures, heard):
            client = await r.daemon("client", "a", client_tunnel(pki, rogue_port))
            assert await echo_or_nothing(port(client), b"secret user data") == b""
            exc = await failures.wait_for(1)
            await idle(client)
    assert isinstance(exc, HandshakeError)
    assert (exc.alert, exc.remote) == (Alert.ACCESS_DENIED, True)
    assert heard == []
    [record] = [rec for rec in r.records if rec.role == "client"]
    assert (record.failure, record.bytes_to_peer, record.group) == ("access_denied", 0, None)
    ledger = client.tunnels[0].keys.ledger
    assert (ledger.taken, ledger.consumed, ledger.wasted) == (1, 0, 1)


# ============================ 5. bad certificates are refused with the right alert

SERVER_URI = SERVER_ID.removeprefix("uri:")


def rogue_ca(names: list[str], *, server: bool, chain: bool = False) -> Credentials:
    """A leaf from another CA that has the same name as the development CA."""
    other = CertificateAuthority.create()
    leaf = other.issue("test-peer", names, server=server, client=not server)
    return replace(leaf, chain=(*leaf.chain, other.certificate)) if chain else leaf


def cert_cases(pki: Pki, names: list[str], server: bool) -> dict[str, tuple[Credentials, Alert]]:
    """Certificates a peer must refuse, with the alert tls/verify.py maps each to."""
    now = datetime.now(UTC)
    role: dict[str, Any] = {"server": server, "client": not server}
    cases = {
        "expired": (pki.issue(names, now=now - timedelta(days=30), days=1, **role),
                    Alert.CERTIFICATE_EXPIRED),
        "not yet valid": (pki.issue(names, now=now + timedelta(days=30), **role),
                          Alert.CERTIFICATE_EXPIRED),
        "unknown CA of the same name": (rogue_ca(names, server=server), Alert.UNKNOWN_CA),
        "unknown CA, sent in the chain": (rogue_ca(names, server=server, chain=True),
                                          Alert.UNKNOWN_CA),
        "wrong extended key usage": (pki.issue(names, server=not server, client=server),
                                     Alert.BAD_CERTIFICATE),
    }  # fmt: skip
    if server:
        wrong_name = ["other.qkdproxy.test", *names[1:]]
        cases["wrong name"] = (pki.issue(wrong_name, client=False), Alert.BAD_CERTIFICATE)
    return cases


async def test_server_tunnel_refuses_bad_client_certificates_with_the_right_alert(
    tmp_path: Path, pki: Pki
) -> None:
    cases = cert_cases(pki, [ALLOWED_URI], server=False)
    async with rig(tmp_path, pki) as r:
        backend, backend_port = await r.harness.backend()
        server = await r.daemon("server", "b", server_tunnel(pki, backend_port))
        keys = KeyContext(await r.sources("a", master=True))
        for name, (credentials, alert) in cases.items():
            got = await refused_or_echoed(pki, port(server), credentials, keys, b"data")
            assert got == (alert, b""), name
            [record] = await r.wait_records(lambda rec: rec.role == "server", 1)
            r.records.clear()
            assert (record.failure, record.bytes_from_peer) == (alert.name.lower(), 0), name
    assert backend.accepted == 0
    ledger = server.tunnels[0].keys.ledger
    assert (ledger.consumed, ledger.wasted) == (0, len(cases))


async def test_client_tunnel_refuses_bad_server_certificates_with_the_right_alert(
    tmp_path: Path, pki: Pki
) -> None:
    cases = cert_cases(pki, [SERVER_NAME, SERVER_URI], server=True)
    async with rig(tmp_path, pki) as r, AsyncExitStack() as rogues:
        keys = KeyContext(await r.sources("b", master=False))
        tunnels, servers = [], []
        for index, (credentials, _) in enumerate(cases.values()):
            rogue_port, failures, heard = await rogues.enter_async_context(
                rogue(pki, credentials, keys)
            )
            servers.append((failures, heard))
            tunnels.append(client_tunnel(pki, rogue_port, name=f"t{index}"))
        client = await r.daemon("client", "a", *tunnels)
        for index, (name, (_, alert)) in enumerate(cases.items()):
            assert await echo_or_nothing(port(client, index), b"user data") == b"", name
            failures, heard = servers[index]
            exc = await failures.wait_for(1)
            assert isinstance(exc, HandshakeError)
            assert (exc.alert, exc.remote) == (alert, True), (name, exc.reason)
            assert heard == [], name
        await idle(client)
    for index, (name, (_, alert)) in enumerate(cases.items()):
        [record] = [rec for rec in r.records if rec.tunnel == f"t{index}"]
        assert (record.failure, record.bytes_to_peer, record.group) == (
            alert.name.lower(), 0, None,
        ), name  # fmt: skip
        ledger = client.tunnels[index].keys.ledger
        assert (ledger.taken, ledger.consumed, ledger.wasted) == (1, 0, 1), name


# ====================== 6. floods, slow clients, the connection limit, and churn


NO_ADMISSION = {"max_handshakes_per_source": 0, "first_byte_timeout_s": 0, "hello_timeout_s": 0}


def tunnel_sockets(ports: set[int]) -> list[str]:
    """TCP connections (not listeners) this process still holds from or to ``ports``."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    held = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                if fields[9] in inodes and fields[3] != TCP_LISTEN and {local, remote} & ports:
                    held.append(f"{local} -> {remote} (state {fields[3]})")
    return held


class Arrivals:
    """Attackers check in once connected; ``wait(n)`` returns when ``n`` have."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def arrive(self) -> None:
        self.count += 1
        self._changed.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Return once the server closed the connection."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


async def half_open(target: int, opened: Arrivals) -> None:
    """Connect and send nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", target)
    opened.arrive()
    await until_closed(reader)
    writer.close()


async def garbage_then_silence(target: int, opened: Arrivals) -> None:
    """The header of a 16 KiB handshake record and a few bytes of it, then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", target)
    opened.arrive()
    writer.write(b"\x16\x03\x01\x40\x00" + os.urandom(100))
    await writer.drain()
    await until_closed(reader)
    writer.close()


async def slowloris(target: int, hello: bytes, opened: Arrivals) -> None:
    """A genuine ClientHello, one byte every 50 ms, until the server hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", target)
    opened.arrive()
    closed = asyncio.ensure_future(until_closed(reader))
    try:
        for byte in hello:
            if closed.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
            # Pacing (the attack itself), ended early by the server's close.
            await asyncio.wait({closed}, timeout=0.05)
        await closed
    finally:
        closed.cancel()
        writer.close()


async def test_a_flood_of_half_open_and_slow_clients_does_not_stop_a_good_client(
    tmp_path: Path, pki: Pki
) -> None:
    per_kind = 20
    async with rig(tmp_path, pki) as r:
        backend, backend_port = await r.harness.backend()
        server = await r.daemon(
            "server", "b",
            # Per-source caps and hello deadlines off: this is about handshake_timeout and
            # the connection limit (tests/system/test_admission.py covers admission control).
            server_tunnel(pki, backend_port, handshake_timeout_s=3.0, max_connections=100,
                          **NO_ADMISSION),
        )  # fmt: skip
        client = await r.daemon("client", "a", client_tunnel(pki, port(server)))
        hello = await capture(client_endpoint(pki, keys=KeyContext(await r.sources("a", True))))
        assert hello is not None
        opened = Arrivals()
        target = port(server)
        attackers = [
            *(asyncio.ensure_future(half_open(target, opened)) for _ in range(per_kind)),
            *(asyncio.ensure_future(garbage_then_silence(target, opened)) for _ in range(per_kind)),
            *(asyncio.ensure_future(slowloris(target, hello, opened)) for _ in range(per_kind)),
        ]  # fmt: skip
        await opened.wait(len(attackers))
        # Every attacker is connected, so the server accepted them before the good client.
        payload = os.urandom(100_000)
        assert await exchange(port(client), payload) == payload
        # The attackers were all still held at that moment: each holds its slot for the
        # 3 s handshake timeout, the good exchange takes a few tens of milliseconds.
        assert server.tunnels[0].active >= len(attackers)
        await asyncio.wait_for(asyncio.gather(*attackers), DEADLINE)
        timed_out = await r.wait_records(
            lambda rec: rec.role == "server" and rec.failure == "timeout", len(attackers)
        )
        await idle(client, server)
        assert tunnel_sockets({port(server), port(client), backend_port}) == []
    assert all(rec.reason.endswith("handshake timed out") for rec in timed_out)
    assert all(rec.bytes_from_peer == 0 and rec.group is None for rec in timed_out)
    assert len(completed(r.records, "server")) == 1
    assert backend.accepted == 1
    assert server.tunnels[0].keys.ledger.taken == 1  # the flood cost no QKD key


async def test_the_connection_limit_recovers_once_half_open_clients_time_out(
    tmp_path: Path, pki: Pki
) -> None:
    limit = 6
    async with rig(tmp_path, pki) as r:
        backend, backend_port = await r.harness.backend()
        server = await r.daemon(
            "server", "b",
            server_tunnel(pki, backend_port, handshake_timeout_s=2.0, max_connections=limit,
                          **NO_ADMISSION),
        )  # fmt: skip
        client = await r.daemon("client", "a", client_tunnel(pki, port(server)))
        opened = Arrivals()
        holders = [asyncio.ensure_future(half_open(port(server), opened)) for _ in range(limit)]
        await opened.wait(limit)
        payload = os.urandom(10_000)
        assert await echo_or_nothing(port(client), payload) == b""  # refused at the limit
        await r.wait_records(lambda rec: rec.reason == "rejected: connection limit", 1)
        await asyncio.wait_for(asyncio.gather(*holders), DEADLINE)
        await r.wait_records(lambda rec: rec.failure == "timeout", limit)
        assert await exchange(port(client), payload) == payload  # room again
        await idle(client, server)
    reasons = [rec.reason for rec in r.records if rec.role == "server"]
    assert reasons.count("rejected: connection limit") == 1
    assert reasons.count("closed") == 1
    assert backend.accepted == 1


async def test_connection_churn_leaves_no_descriptor_or_task_behind(
    tmp_path: Path, pki: Pki
) -> None:
    kinds_before = fd_kinds()
    before = snapshot_resources()
    async with rig(tmp_path, pki) as r:
        _, backend_port = await r.harness.backend()
        server = await r.daemon("server", "b", server_tunnel(pki, backend_port))
        client = await r.daemon("client", "a", client_tunnel(pki, port(server)))
        keys = KeyContext(await r.sources("a", master=True))
        hello = await capture(client_endpoint(pki, keys=keys))
        assert hello is not None
        plain, tls = port(client), port(server)

        async def connect(target: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", target)

        async def reset_at_once() -> None:
            _, writer = await connect(plain)
            writer.transport.abort()

        async def close_at_once() -> None:
            await close_writer((await connect(tls))[1])

        async def half_a_hello_then_reset() -> None:
            _, writer = await connect(tls)
            writer.write(hello[: len(hello) // 2])
            await writer.drain()
            writer.transport.abort()

        async def good() -> None:
            data = os.urandom(20_000)
            assert await exchange(plain, data) == data

        async def send_and_vanish() -> None:
            _, writer = await connect(plain)
            writer.write(os.urandom(200_000))
            await writer.drain()
            writer.transport.abort()

        async def tls_then_reset() -> None:
            reader, writer = await connect(tls)
            await client_endpoint(pki, keys=keys).connect(reader, writer)
            writer.transport.abort()  # no close_notify

        async def half_close_then_reset() -> None:
            reader, writer = await connect(plain)
            writer.write(os.urandom(50_000))
            writer.write_eof()
            await reader.read(1000)
            writer.transport.abort()

        actions = [reset_at_once, close_at_once, half_a_hello_then_reset, good,
                   send_and_vanish, tls_then_reset, half_close_then_reset]  # fmt: skip
        for round_ in range(4):
            await asyncio.gather(*(action() for action in actions))
            await asyncio.gather(*(action() for action in reversed(actions)))
            del round_
        await idle(client, server)
        # While both daemons still run, nothing is held for any of those connections.
        assert tunnel_sockets({plain, tls, backend_port}) == []
        balanced(client)
        balanced(server)
    await settle_resources(before)
    after = snapshot_resources()
    assert after.fds <= before.fds, fd_kinds() - kinds_before
    assert after.tasks <= before.tasks, asyncio.all_tasks()
