"""``qkdproxy bench soak``: integrity, key accounting and resource leaks under sustained load.

Everything runs in this process, on loopback: the KME simulator pair (ETSI 014 over mutual
TLS, as :mod:`qkdproxy.sim.simulator` serves it), a checksumming echo backend, and a server
and a client tunnel built by :class:`qkdproxy.daemon.app.Daemon` from configuration files, as
``qkdproxy run`` builds them. Running the daemons in-process is what lets the soak read their
per-connection records, their key ledgers and their file descriptors directly.

``concurrency`` clients loop until the deadline: each opens a connection through the tunnel
pair, sends messages of seeded random length and content, reads every byte back, then
half-closes. The backend answers the half-close with a trailer: the SHA-256 and length of
everything it received. The client checks both directions independently: the trailer against
what it sent (client to backend) and the SHA-256 of what came back (backend to client). Some
connections stay open for many exchanges, most carry one message (churn).

Keys are checked at three places: the daemons' connection records (each handshake's key id,
on both tunnels), the daemons' key ledgers (taken = consumed + wasted), and the KME
simulator itself, whose link model records every key it makes and every key it delivers to a
slave. File descriptors (``/proc/self/fd``), asyncio tasks, RSS and (optionally) tracemalloc
are measured before anything starts and after everything has closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import math
import os
import random
import struct
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from qkdproxy.core.tls import records
from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.core.tls.keyexchange import Flow
from qkdproxy.daemon.app import Daemon
from qkdproxy.daemon.config import load_config
from qkdproxy.daemon.tunnel import ConnectionRecord
from qkdproxy.io import socket_reader
from qkdproxy.sim.link import QkdLinkModel
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.bench.kme_setup import SAE_CLIENT, SAE_SERVER
from qkdproxy.tools.bench.processes import BENCH_ADMISSION, BENCH_BUDGET
from qkdproxy.tools.certs import KMES, TRUST_DOMAIN, TUNNEL_SERVER_NAME, write_dev_pki

TRAILER = struct.Struct("!32sQ")  # SHA-256 of what the backend received, and its length
READ_CHUNK = 65536
CLOSED = "closed"
# How a multiplexed tunnel ends when nothing went wrong.
TUNNEL_ENDS = (CLOSED, "rotated", "idle")
PROGRESS_INTERVAL_S = 1.0
SETTLE_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 30.0
TOP_ALLOCATIONS = 5


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class SoakSettings:
    """What to run.

    ``seconds``: how long clients keep starting connections (the run then finishes the
    connections in progress). ``long_lived_fraction`` of connections carry between
    ``long_lived_exchanges`` messages; the others carry one. Message lengths are
    log-uniform between 1 byte and ``max_message_bytes``. ``rekey_bytes`` (0: off) makes
    long flows renew their TLS keys. ``group`` must be a QKD group: both tunnels run
    ``qkd-pq-required``. ``trace_memory`` runs tracemalloc (about 3x slower, but live
    allocations are then measured, not only RSS). ``warmup`` runs one short cycle before
    the baseline is taken, so one-time start-up costs (imports, caches) are not counted as
    growth. ``multiplex`` carries the connections as streams of pooled tunnels (issue 18),
    rotated every ``mux_rotate_s`` seconds (0: the default budget).
    """

    seconds: float = 10.0
    concurrency: int = 8
    seed: int = 1
    long_lived_fraction: float = 0.2
    long_lived_exchanges: tuple[int, int] = (5, 40)
    max_message_bytes: int = 1024 * 1024
    group: str = "qkd_mlkem768"
    flow: Flow = Flow.CLIENT_INITIATED
    rekey_bytes: int = 256 * 1024
    io_timeout_s: float = 30.0
    trace_memory: bool = True
    warmup: bool = True
    # Live Python allocations that may remain after everything closed and still count as
    # "back to baseline": bounded caches that do not grow with the run (aiohttp keeps the
    # stopped simulator's applications, tlslite and asyncio a few lists), about 0.15 MB
    # after 200 connections as after 4000.
    memory_tolerance_bytes: int = 2 * 1024 * 1024
    multiplex: bool = False
    mux_rotate_s: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.long_lived_exchanges
        if self.seconds < 0 or self.concurrency < 1 or self.max_message_bytes < 1:
            raise ValueError("seconds >= 0, concurrency >= 1 and max_message_bytes >= 1")
        if not 0.0 <= self.long_lived_fraction <= 1.0 or not 1 <= low <= high:
            raise ValueError("long_lived_fraction in [0, 1] and 1 <= exchanges low <= high")
        if self.io_timeout_s <= 0 or self.rekey_bytes < 0 or self.mux_rotate_s < 0:
            raise ValueError("io_timeout_s > 0, rekey_bytes >= 0 and mux_rotate_s >= 0")


@dataclass(frozen=True, slots=True)
class SoakProgress:
    """Figures so far, reported about once a second while the load runs."""

    elapsed_s: float
    seconds: float
    connections: int
    bytes_up: int
    bytes_down: int
    mismatches: int
    errors: int
    handshakes: int


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ResourceSnapshot:
    """Process resources at one moment."""

    fds: int
    tasks: int
    rss_bytes: int
    traced_bytes: int | None


@dataclass(frozen=True, slots=True)
class ResourceReport:
    """Resources before the run started and after everything was closed."""

    before: ResourceSnapshot
    after: ResourceSnapshot
    # Descriptor kinds (socket, pipe, anon_inode:..., or a path) open after but not before.
    leaked_fds: tuple[str, ...]
    # Where traced memory grew most (file:line +bytes), when tracemalloc ran.
    memory_growth_sites: tuple[str, ...]

    @property
    def fd_delta(self) -> int:
        """Open descriptors after minus before."""
        return self.after.fds - self.before.fds

    @property
    def task_delta(self) -> int:
        """Live asyncio tasks after minus before."""
        return self.after.tasks - self.before.tasks

    @property
    def rss_delta(self) -> int:
        """Resident set size after minus before (allocators rarely give memory back)."""
        return self.after.rss_bytes - self.before.rss_bytes

    @property
    def traced_delta(self) -> int | None:
        """Python allocations still live after minus before (None: not traced)."""
        if self.before.traced_bytes is None or self.after.traced_bytes is None:
            return None
        return self.after.traced_bytes - self.before.traced_bytes


@dataclass(frozen=True, slots=True)
class KeyReport:
    """Where the QKD keys went, seen from both daemons and from the KME simulator."""

    client_handshakes: int
    server_handshakes: int
    client_ledger: tuple[int, int, int, int]  # taken, consumed, wasted, outstanding
    server_ledger: tuple[int, int, int, int]
    distinct_key_ids: int
    # A key id named by two completed handshakes of the same tunnel (must be 0).
    reused_key_ids: int
    # Completed handshakes whose key id only one tunnel recorded (must be 0).
    unmatched_key_ids: int
    # KME side: keys made by a master, keys delivered to a slave, a key delivered twice,
    # and handshake key ids the KME never made or never delivered (all but the first two 0).
    kme_keys_made: int
    kme_keys_delivered: int
    kme_delivered_twice: int
    kme_unknown_key_ids: int
    kme_duplicate_material: int

    @property
    def problems(self) -> list[str]:
        """Every violated accounting rule, in words."""
        out = []
        if self.reused_key_ids:
            out.append(f"{self.reused_key_ids} key ids used by more than one handshake")
        if self.unmatched_key_ids:
            out.append(f"{self.unmatched_key_ids} key ids recorded by one tunnel only")
        for side, (taken, consumed, wasted, outstanding) in (
            ("client", self.client_ledger),
            ("server", self.server_ledger),
        ):
            if taken != consumed + wasted or outstanding:
                out.append(f"{side} ledger does not balance: {taken} != {consumed} + {wasted}")
        if self.client_ledger[1] != self.client_handshakes:
            out.append(
                f"client consumed {self.client_ledger[1]} keys for "
                f"{self.client_handshakes} handshakes"
            )
        if self.server_ledger[1] != self.server_handshakes:
            out.append(
                f"server consumed {self.server_ledger[1]} keys for "
                f"{self.server_handshakes} handshakes"
            )
        if self.kme_delivered_twice:
            out.append(f"the KME delivered {self.kme_delivered_twice} keys twice")
        if self.kme_unknown_key_ids:
            out.append(f"{self.kme_unknown_key_ids} handshake key ids unknown to the KME")
        if self.kme_duplicate_material:
            out.append(f"{self.kme_duplicate_material} keys share their bytes with another")
        return out


@dataclass(frozen=True, slots=True)
class SoakResult:
    """Everything one soak run measured."""

    settings: SoakSettings
    seconds: float
    connections: int
    long_lived: int
    exchanges: int
    bytes_up: int
    bytes_down: int
    mismatches: int
    mismatch_kinds: Mapping[str, int]
    errors: Mapping[str, int]
    backend_connections: int
    keys: KeyReport
    kme_errors: Mapping[str, int]
    key_updates: int
    resources: ResourceReport
    # Application connections the server carried as streams of multiplexed tunnels.
    server_streams: int = 0

    @property
    def backend_expected(self) -> int:
        """Backend connections the server should have made: one per handshake, or with
        multiplexing one per stream."""
        return self.server_streams if self.settings.multiplex else self.keys.server_handshakes

    @property
    def problems(self) -> list[str]:
        """Why the run failed (empty: it passed)."""
        out = []
        if self.mismatches:
            out.append(f"{self.mismatches} checksum mismatches: {dict(self.mismatch_kinds)}")
        if self.errors:
            out.append(f"{sum(self.errors.values())} errors: {dict(self.errors)}")
        if self.connections == 0:
            out.append("no connection completed")
        out += self.keys.problems
        if self.backend_connections != self.backend_expected:
            what = "streams" if self.settings.multiplex else "handshakes"
            out.append(
                f"the backend saw {self.backend_connections} connections for "
                f"{self.backend_expected} server {what}"
            )
        res = self.resources
        if res.fd_delta > 0:
            out.append(f"{res.fd_delta} file descriptors leaked: {list(res.leaked_fds)}")
        if res.task_delta > 0:
            out.append(f"{res.task_delta} asyncio tasks left running")
        traced = res.traced_delta
        if traced is not None and traced > self.settings.memory_tolerance_bytes:
            out.append(
                f"traced memory grew by {traced} bytes "
                f"(tolerance {self.settings.memory_tolerance_bytes})"
            )
        return out

    @property
    def ok(self) -> bool:
        """No mismatch, no error, every key accounted for once, nothing leaked."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (``problems`` and ``ok`` included)."""
        res = self.resources
        settings = asdict(self.settings)
        settings["flow"] = self.settings.flow.value
        settings["long_lived_exchanges"] = list(self.settings.long_lived_exchanges)
        return {
            "ok": self.ok,
            "problems": self.problems,
            "settings": settings,
            "seconds": round(self.seconds, 3),
            "connections": self.connections,
            "long_lived_connections": self.long_lived,
            "exchanges": self.exchanges,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "mismatches": self.mismatches,
            "mismatch_kinds": dict(self.mismatch_kinds),
            "errors": dict(self.errors),
            "backend_connections": self.backend_connections,
            "kme_errors": dict(self.kme_errors),
            "tls_key_updates": self.key_updates,
            "server_streams": self.server_streams,
            "keys": {
                "client_handshakes": self.keys.client_handshakes,
                "server_handshakes": self.keys.server_handshakes,
                "client_ledger": dict(zip(_LEDGER, self.keys.client_ledger, strict=True)),
                "server_ledger": dict(zip(_LEDGER, self.keys.server_ledger, strict=True)),
                "distinct_key_ids": self.keys.distinct_key_ids,
                "reused_key_ids": self.keys.reused_key_ids,
                "unmatched_key_ids": self.keys.unmatched_key_ids,
                "kme_keys_made": self.keys.kme_keys_made,
                "kme_keys_delivered": self.keys.kme_keys_delivered,
                "kme_delivered_twice": self.keys.kme_delivered_twice,
                "kme_unknown_key_ids": self.keys.kme_unknown_key_ids,
                "kme_duplicate_material": self.keys.kme_duplicate_material,
            },
            "resources": {
                "before": asdict(res.before),
                "after": asdict(res.after),
                "fd_delta": res.fd_delta,
                "task_delta": res.task_delta,
                "rss_delta_bytes": res.rss_delta,
                "traced_delta_bytes": res.traced_delta,
                "leaked_fds": list(res.leaked_fds),
                "memory_growth_sites": list(res.memory_growth_sites),
            },
        }

    def format_table(self) -> str:
        """A summary a person reads at a glance."""
        s, k, res = self.settings, self.keys, self.resources
        moved = self.bytes_up + self.bytes_down
        rate = moved / self.seconds / 1e6 if self.seconds else 0.0
        traced = res.traced_delta
        rows = [
            ("run", f"{self.seconds:.1f} s, {s.concurrency} clients, {s.group}, "
                    f"{s.flow.value}, seed {s.seed}"),
            ("connections", f"{self.connections} ({self.long_lived} long-lived), "
                            f"{self.exchanges} exchanges, "
                            f"{self.connections / self.seconds if self.seconds else 0:.1f}/s"),
            ("bytes", f"up {_size(self.bytes_up)}, down {_size(self.bytes_down)}, "
                      f"total {_size(moved)} ({rate:.1f} MB/s)"),
            ("mismatches", str(self.mismatches) + _kinds(self.mismatch_kinds)),
            ("errors", str(sum(self.errors.values())) + _kinds(self.errors)),
            ("handshakes", f"client {k.client_handshakes}, server {k.server_handshakes}, "
                           f"backend connections {self.backend_connections}"
                           + (f", server streams {self.server_streams}"
                              if s.multiplex else "")),
            ("QKD keys", f"client taken/consumed/wasted {_ledger(k.client_ledger)}, "
                         f"server {_ledger(k.server_ledger)}"),
            ("key ids", f"{k.distinct_key_ids} distinct, {k.reused_key_ids} reused, "
                        f"{k.unmatched_key_ids} unmatched"),
            ("KME ledger", f"made {k.kme_keys_made}, delivered {k.kme_keys_delivered}, "
                           f"delivered twice {k.kme_delivered_twice}, unknown ids "
                           f"{k.kme_unknown_key_ids}, same bytes {k.kme_duplicate_material}"),
            ("KME errors", str(sum(self.kme_errors.values())) + _kinds(self.kme_errors)),
            ("TLS KeyUpdates", str(self.key_updates)),
            ("fds", f"{res.before.fds} -> {res.after.fds} ({res.fd_delta:+d})"),
            ("tasks", f"{res.before.tasks} -> {res.after.tasks} ({res.task_delta:+d})"),
            ("RSS", f"{_size(res.before.rss_bytes)} -> {_size(res.after.rss_bytes)} "
                    f"({res.rss_delta / 1e6:+.1f} MB)"),
            ("traced memory", "not traced" if traced is None else
             f"{_size(res.before.traced_bytes or 0)} -> {_size(res.after.traced_bytes or 0)} "
             f"({traced / 1e6:+.2f} MB)"),
            ("verdict", "OK" if self.ok else "FAILED: " + "; ".join(self.problems)),
        ]  # fmt: skip
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


_LEDGER = ("taken", "consumed", "wasted", "outstanding")


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def _kinds(counts: Mapping[str, int]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")"


def _ledger(values: tuple[int, int, int, int]) -> str:
    taken, consumed, wasted, outstanding = values
    extra = f", {outstanding} outstanding" if outstanding else ""
    return f"{taken}/{consumed}/{wasted}{extra}"


# ---------------------------------------------------------------------------- the KME side


L = TypeVar("L", bound="LedgerLink")


class LedgerLink(QkdLinkModel):
    """The simulator's link model, also recording every ETSI 014 key made and delivered.

    The model already refuses a second delivery; the ledger shows the refusal was never
    needed, and lets handshake key ids be checked against what the KME really produced.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made: dict[bytes, str] = {}
        self.delivered: Counter[bytes] = Counter()
        self.material_digests: Counter[bytes] = Counter()

    def make_keys(
        self, master_sae: str, slave_saes: frozenset[str], number: int, size_bits: int, now: float
    ) -> list[tuple[bytes, bytes]]:
        """enc_keys, recorded."""
        keys = super().make_keys(master_sae, slave_saes, number, size_bits, now)
        for key_id, material in keys:
            self.made[key_id] = master_sae
            # A digest, so the ledger itself holds no key bytes.
            self.material_digests[hashlib.sha256(material).digest()] += 1
        return keys

    def take_keys(
        self, caller_sae: str, master_sae: str, key_ids: list[bytes], now: float
    ) -> list[bytes]:
        """dec_keys, recorded (only deliveries that happened)."""
        materials = super().take_keys(caller_sae, master_sae, key_ids, now)
        self.delivered.update(bytes(k) for k in key_ids)
        return materials

    def forget(self) -> None:
        """Drop the pool, the keys waiting for a slave, and the ledger.

        aiohttp keeps recent applications in a bounded cache (its middleware cache), and
        with them the KME nodes and this link: a stopped simulator must not keep key
        material (nor count as memory growth of the run).
        """
        self.exhaust(time.monotonic())
        self._pending.clear()
        self.made.clear()
        self.delivered.clear()
        self.material_digests.clear()


def recording_kme_pair(
    pki: Path, settings: SimulatorSettings | None = None
) -> tuple[KmePair, LedgerLink]:
    """A development PKI written to ``pki`` and a KME simulator pair (not started) whose
    link model records every key it makes and delivers."""
    write_dev_pki(pki)
    anchors = load_trust_anchors(pki / "ca.pem")
    credentials = [Credentials.load(pki / f"{k}.pem", pki / f"{k}-key.pem") for k in KMES]
    pair = KmePair(settings or SimulatorSettings(), credentials, anchors)
    return pair, install_ledger(pair, LedgerLink)


def install_ledger(pair: KmePair, link_type: type[L]) -> L:
    """Swap a not yet started pair's link model for a recording one with the same settings."""
    link = link_type(pair.settings.link, time.monotonic())
    pair.link = link
    for node in pair.nodes:
        node.link = link
    return link


# ------------------------------------------------------------------------- the backend


@dataclass(slots=True)
class ChecksumEcho:
    """Echoes every byte; on the client's half-close sends SHA-256 and length of what it got."""

    connections: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One backend connection."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self.connections += 1
        digest, total = hashlib.sha256(), 0
        try:
            while data := await reader.read(READ_CHUNK):
                digest.update(data)
                total += len(data)
                writer.write(data)
                await writer.drain()
            writer.write(TRAILER.pack(digest.digest(), total))
            await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError) as exc:
            self.errors[f"backend: {type(exc).__name__}"] += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)

    async def stop(self) -> None:
        """Wait (bounded) for handlers still running, then cancel the rest."""
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


# ------------------------------------------------------------------------ the tallies


@dataclass(slots=True)
class _Tally:
    """Mutable counters of one cycle (client side and both daemons' records)."""

    connections: int = 0
    long_lived: int = 0
    exchanges: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    mismatches: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    key_ids: dict[str, Counter[str]] = field(
        default_factory=lambda: {"client": Counter(), "server": Counter()}
    )
    handshakes: Counter[str] = field(default_factory=Counter)
    streams: Counter[str] = field(default_factory=Counter)
    key_updates: int = 0

    def record(self, record: ConnectionRecord) -> None:
        """A connection record from either daemon (with multiplexing, a stream's line names
        its tunnel's key: the tunnel's own line counts the handshake)."""
        if record.mux == "stream":
            self.streams[record.role] += 1
        elif record.group is not None:
            self.handshakes[record.role] += 1
            if record.qkd_key_id is not None:
                self.key_ids[record.role][record.qkd_key_id] += 1
        self.key_updates += record.key_updates
        normal = TUNNEL_ENDS if record.mux == "tunnel" else (CLOSED,)
        if record.reason not in normal:
            self.errors[f"{record.role} tunnel: {_reason_class(record.reason)}"] += 1


def _reason_class(reason: str) -> str:
    """A connection record's reason without its variable details."""
    return reason.split(": ", 1)[0] if reason.startswith("handshake failed") else reason[:80]


# ------------------------------------------------------------------------- the clients


class _MismatchError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _message_length(rng: random.Random, maximum: int) -> int:
    """Log-uniform in [1, maximum]: many small messages, some large ones."""
    return min(maximum, max(1, int(math.exp(rng.random() * math.log(maximum + 1)))))


async def _connection(
    port: int, exchanges: int, *, rng: random.Random, pool: bytes, s: SoakSettings, t: _Tally
) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), s.io_timeout_s
    )
    sent, received = hashlib.sha256(), hashlib.sha256()
    total = 0
    try:
        for _ in range(exchanges):
            length = _message_length(rng, s.max_message_bytes)
            start = rng.randrange(len(pool) - length + 1)
            data = pool[start : start + length]
            async with asyncio.timeout(s.io_timeout_s):
                # write() buffers everything; reading the echo meanwhile keeps both
                # directions moving whatever the message size.
                writer.write(data)
                echoed = await reader.readexactly(length)
                await writer.drain()
            sent.update(data)
            received.update(echoed)
            total += length
            t.exchanges += 1
        async with asyncio.timeout(s.io_timeout_s):
            writer.write_eof()
            digest, count = TRAILER.unpack(await reader.readexactly(TRAILER.size))
            extra = await reader.read()
        if count != total:
            raise _MismatchError("length seen by the backend")
        if digest != sent.digest():
            raise _MismatchError("client to backend")
        if received.digest() != sent.digest():
            raise _MismatchError("backend to client")
        if extra:
            raise _MismatchError("bytes after the trailer")
        t.bytes_up += total
        t.bytes_down += total
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection ended early"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionError):
        return f"connection error ({type(exc).__name__})"
    return f"{type(exc).__name__}"


async def _client(index: int, port: int, deadline: float, s: SoakSettings, t: _Tally) -> None:
    rng = random.Random(s.seed * 1_000_003 + index)  # noqa: S311 - test data, not secrets
    pool = rng.randbytes(max(1 << 20, 2 * s.max_message_bytes))
    first = True
    while first or time.monotonic() < deadline:
        first = False
        long_lived = rng.random() < s.long_lived_fraction
        exchanges = rng.randint(*s.long_lived_exchanges) if long_lived else 1
        try:
            await _connection(port, exchanges, rng=rng, pool=pool, s=s, t=t)
        except _MismatchError as exc:
            t.mismatches[exc.kind] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            t.errors[f"client: {_error_kind(exc)}"] += 1
        else:
            t.connections += 1
            t.long_lived += long_lived


# ------------------------------------------------------------------------ the set-up


def _kme_table(url: str, sae: str, peer: str) -> str:
    return (
        f'[kme.local]\nurl = "{url}"\nsae_id = "{sae}"\npeer_sae_id = "{peer}"\n'
        f'cert = "pki/{sae}.pem"\nkey = "pki/{sae}-key.pem"\nca = "pki/ca.pem"\n'
        # The soak's loopback clients are trusted: no pre-authentication limit.
        "preauth_keys_per_s = 1e6\npreauth_keys_burst = 1e6\n"
    )


def _tunnel_table(role: str, connect: int, s: SoakSettings, extra: str) -> str:
    return (
        f'[[tunnel]]\nname = "soak"\nrole = "{role}"\nlisten = "127.0.0.1:0"\n'
        f'connect = "127.0.0.1:{connect}"\ncert = "pki/tunnel-{role}.pem"\n'
        f'key = "pki/tunnel-{role}-key.pem"\nca = "pki/ca.pem"\nkme = "local"\n'
        f'policy = "qkd-pq-required"\ngroups = ["{s.group}"]\n'
        f"max_connections = {max(100, 4 * s.concurrency)}\n"
        f"rekey_bytes = {s.rekey_bytes}\n{_mux_settings(s)}{extra}"
    )


def _mux_settings(s: SoakSettings) -> str:
    if not s.multiplex:
        return ""
    rotate = f"mux_rotate_s = {s.mux_rotate_s}\n" if s.mux_rotate_s else ""
    return f"multiplex = true\n{rotate}"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def _daemon(stack: AsyncExitStack, path: Path, text: str, t: _Tally) -> Daemon:
    _write(path, text)
    daemon = Daemon(load_config(path), on_close=t.record)
    stack.push_async_callback(daemon.close)
    await daemon.start()
    return daemon


async def _drain(daemon: Daemon) -> None:
    for tunnel in daemon.tunnels:
        tunnel.stop_accepting()
        await tunnel.drain(STOP_TIMEOUT_S)
    await daemon.close()


def _port(daemon: Daemon) -> int:
    return int(daemon.tunnels[0].bound()[0].rsplit(":", 1)[1])


def _kme_errors(daemons: Iterable[Daemon]) -> Counter[str]:
    errors: Counter[str] = Counter()
    for daemon in daemons:
        for metric in daemon.metrics.registry.collect():
            for sample in metric.samples:
                if sample.name == "qkdproxy_kme_errors_total" and sample.value:
                    labels = sample.labels
                    errors[f"{labels['call']}: {labels['class']}"] += int(sample.value)
    return errors


def _key_report(t: _Tally, link: LedgerLink, client: Daemon, server: Daemon) -> KeyReport:
    ids = t.key_ids
    used = set(ids["client"]) | set(ids["server"])
    binary = {bytes.fromhex(k.replace("-", "")) for k in used}

    def ledger(daemon: Daemon) -> tuple[int, int, int, int]:
        book = daemon.tunnels[0].keys.ledger
        return book.taken, book.consumed, book.wasted, book.outstanding

    return KeyReport(
        client_handshakes=t.handshakes["client"],
        server_handshakes=t.handshakes["server"],
        client_ledger=ledger(client),
        server_ledger=ledger(server),
        distinct_key_ids=len(used),
        reused_key_ids=sum(n - 1 for side in ids.values() for n in side.values() if n > 1),
        unmatched_key_ids=len(set(ids["client"]) ^ set(ids["server"])),
        kme_keys_made=len(link.made),
        kme_keys_delivered=len(link.delivered),
        kme_delivered_twice=sum(1 for n in link.delivered.values() if n > 1),
        kme_unknown_key_ids=len(binary - (set(link.made) & set(link.delivered))),
        kme_duplicate_material=sum(n - 1 for n in link.material_digests.values() if n > 1),
    )


@dataclass(frozen=True, slots=True)
class _CycleOutcome:
    seconds: float
    tally: _Tally
    backend_connections: int
    keys: KeyReport
    kme_errors: Counter[str]


async def _cycle(s: SoakSettings, progress: Callable[[SoakProgress], None] | None) -> _CycleOutcome:
    """Start everything, run the load, stop everything; figures of this one cycle."""
    t = _Tally()
    backend = ChecksumEcho()
    with tempfile.TemporaryDirectory(prefix="qkdproxy-soak-") as tmp:
        base = Path(tmp)
        pair, link = recording_kme_pair(base / "pki")
        async with AsyncExitStack() as stack:
            await pair.start()
            stack.push_async_callback(pair.stop)
            listener = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
            stack.push_async_callback(backend.stop)
            stack.push_async_callback(listener.wait_closed)
            stack.callback(listener.close)
            backend_port = listener.sockets[0].getsockname()[1]
            server = await _daemon(
                stack, base / "server.toml",
                _kme_table(pair.urls_014[1], SAE_SERVER, SAE_CLIENT)
                + _tunnel_table("server", backend_port, s,
                                f'allow = ["uri:spiffe://{TRUST_DOMAIN}/tunnel/client"]\n'
                                f'flows = ["client", "server"]\n{BENCH_BUDGET}\n'),
                t,
            )  # fmt: skip
            client = await _daemon(
                stack, base / "client.toml",
                _kme_table(pair.urls_014[0], SAE_CLIENT, SAE_SERVER)
                + _tunnel_table("client", _port(server), s,
                                f'server_name = "{TUNNEL_SERVER_NAME}"\nflow = "{s.flow.value}"\n'
                                f"{BENCH_ADMISSION}\n"),
                t,
            )  # fmt: skip
            started = time.monotonic()
            deadline = started + s.seconds
            reporter = (
                asyncio.create_task(_report(progress, t, started, s.seconds))
                if progress is not None
                else None
            )
            try:
                await asyncio.gather(
                    *(_client(i, _port(client), deadline, s, t) for i in range(s.concurrency))
                )
            finally:
                if reporter is not None:
                    reporter.cancel()
                    await asyncio.gather(reporter, return_exceptions=True)
            seconds = time.monotonic() - started
            if s.multiplex:
                # Pooled tunnels live until their daemon stops: stop both (the client's
                # first), so that every tunnel's line is written too. Drained as on
                # SIGTERM: the pool rotates in the background, and an immediate stop would
                # cut a rotation's handshake (a wasted key, a failed line) at a moment the
                # load does not choose.
                for daemon in (client, server):
                    await _drain(daemon)
            # Every connection record is written before its task ends.
            for daemon in (client, server):
                try:
                    await asyncio.wait_for(daemon.tunnels[0].wait_idle(), STOP_TIMEOUT_S)
                except TimeoutError:
                    t.errors["tunnel still busy after the load ended"] += 1
            if progress is not None:
                progress(_snapshot(t, started, s.seconds))
            keys = _key_report(t, link, client, server)
            kme_errors = _kme_errors((client, server))
            t.key_ids.clear()  # only the report needs them; not growth of the run
        t.errors.update(backend.errors)
        link.forget()
    return _CycleOutcome(seconds, t, backend.connections, keys, kme_errors)


def _snapshot(t: _Tally, started: float, seconds: float) -> SoakProgress:
    return SoakProgress(
        elapsed_s=time.monotonic() - started,
        seconds=seconds,
        connections=t.connections,
        bytes_up=t.bytes_up,
        bytes_down=t.bytes_down,
        mismatches=sum(t.mismatches.values()),
        errors=sum(t.errors.values()),
        handshakes=t.handshakes["client"],
    )


async def _report(
    progress: Callable[[SoakProgress], None], t: _Tally, started: float, seconds: float
) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        progress(_snapshot(t, started, seconds))


# --------------------------------------------------------------------------- resources


def fd_kinds() -> Counter[str]:
    """This process's open descriptors by kind: socket, pipe, anon_inode:..., or a path."""
    kinds: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the descriptor listdir itself used, already closed
        kinds[target.split(":[", 1)[0] if ":[" in target else target] += 1
    return kinds


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def snapshot_resources() -> ResourceSnapshot:
    """Open descriptors, live tasks of the running loop, RSS and traced memory (after a
    garbage collection, and without the bounded caches of data-path buffers: they belong
    to no connection, and what they hold depends on how many streams ran at once)."""
    socket_reader.drop_spare_buffers()
    records.drop_pooled_buffers()
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
    return ResourceSnapshot(
        fds=sum(fd_kinds().values()),
        tasks=len(asyncio.all_tasks()),
        rss_bytes=_rss_bytes(),
        traced_bytes=traced,
    )


async def settle_resources(before: ResourceSnapshot) -> None:
    """Give closing transports the loop turns they need, until descriptors and tasks are back
    to ``before`` or ``SETTLE_TIMEOUT_S`` passed (the figures are then read as they are)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        for _ in range(10):
            await asyncio.sleep(0)
        gc.collect()
        if sum(fd_kinds().values()) <= before.fds and len(asyncio.all_tasks()) <= before.tasks:
            return
        await asyncio.sleep(0.01)


def _growth_sites(start: tracemalloc.Snapshot | None) -> tuple[str, ...]:
    if start is None or not tracemalloc.is_tracing():
        return ()
    end = tracemalloc.take_snapshot()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = end.filter_traces(ignore).compare_to(start.filter_traces(ignore), "lineno")
    return tuple(
        f"{stat.traceback[0].filename}:{stat.traceback[0].lineno} {stat.size_diff:+d} B"
        for stat in stats[:TOP_ALLOCATIONS]
        if stat.size_diff > 0
    )


# ------------------------------------------------------------------------------- entry


async def run_soak(
    settings: SoakSettings, progress: Callable[[SoakProgress], None] | None = None
) -> SoakResult:
    """Run the soak described by ``settings``; ``progress`` is called about once a second.

    The result's ``ok`` / ``problems`` say whether it passed: no mismatch, no error, every
    QKD key used at most once and accounted for on both daemons and at the KME, and no file
    descriptor or task left behind (traced memory within ``memory_tolerance_bytes``).
    """
    if settings.warmup:
        await _cycle(replace(settings, seconds=0.0), None)
    started_tracing = settings.trace_memory and not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    loop = asyncio.get_running_loop()
    loop_errors: Counter[str] = Counter()
    previous_handler = loop.get_exception_handler()

    def on_loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        loop_errors[f"event loop: {type(exc).__name__ if exc else context['message'][:80]}"] += 1

    try:
        # The start snapshot first, so both measurements include it.
        start_snapshot = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        kinds_before = fd_kinds()
        before = snapshot_resources()
        loop.set_exception_handler(on_loop_error)
        try:
            outcome = await _cycle(settings, progress)
        finally:
            loop.set_exception_handler(previous_handler)
        await settle_resources(before)
        kinds_after = fd_kinds()
        after = snapshot_resources()
        sites = _growth_sites(start_snapshot)
        del start_snapshot
    finally:
        if started_tracing:
            tracemalloc.stop()
    leaked = tuple(sorted(f"{kind} x{n}" for kind, n in (kinds_after - kinds_before).items()))
    t = outcome.tally
    return SoakResult(
        settings=settings,
        seconds=outcome.seconds,
        connections=t.connections,
        long_lived=t.long_lived,
        exchanges=t.exchanges,
        bytes_up=t.bytes_up,
        bytes_down=t.bytes_down,
        mismatches=sum(t.mismatches.values()),
        mismatch_kinds=dict(t.mismatches),
        errors=dict(t.errors + loop_errors),
        backend_connections=outcome.backend_connections,
        keys=outcome.keys,
        kme_errors=dict(outcome.kme_errors),
        key_updates=t.key_updates,
        resources=ResourceReport(before, after, leaked, sites),
        server_streams=t.streams["server"],
    )
