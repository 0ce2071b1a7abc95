"""Every qkdproxy metric, in a registry that is passed in (nothing registers at import).

Event metrics (handshake and KME-call latency, connection outcomes) are observed as things
happen; state metrics (key ledgers, buffers, breakers, certificates) are read from the
running objects at scrape time by :class:`StateCollector`. Label values are bounded: tunnel
and KME names come from the configuration, the rest from small fixed sets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qkdproxy import __version__
from qkdproxy.core.accounting import FATES, KeyAccount
from qkdproxy.core.breaker import BreakerState
from qkdproxy.daemon.tunnel import ConnectionRecord
from qkdproxy.keys.preauth import SpendGate
from qkdproxy.keys.sources import KmeCallObserver

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CLOSE_REASONS = (
    "closed", "idle_timeout", "max_lifetime", "drained", "handshake_failed",
    "peer_unreachable", "backend_unreachable", "rejected_limit", "error",
)  # fmt: skip
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


_CLOSE_REASON_SET = frozenset(CLOSE_REASONS)
_CLOSE_REASON_PREFIXES = (
    ("handshake failed", "handshake_failed"), ("peer unreachable", "peer_unreachable"),
    ("backend unreachable", "backend_unreachable"), ("rejected", "rejected_limit"),
)  # fmt: skip


def close_reason_class(reason: str) -> str:
    """Map a connection's close reason (free text) onto the bounded label set."""
    if reason in _CLOSE_REASON_SET:
        return reason  # the common case (no label is a prefix of another's reason text)
    for prefix, label in _CLOSE_REASON_PREFIXES:
        if reason.startswith(prefix):
            return label
    return "error"


MUX_TUNNEL_REASONS = (
    "closed",
    "rotated",
    "idle",
    "reloaded",
    "dead_peer",
    "handshake_failed",
    "error",
)


def mux_tunnel_reason(reason: str) -> str:
    """Map a carrying tunnel's end onto a bounded label set."""
    if "dead peer" in reason:
        return "dead_peer"
    if reason in MUX_TUNNEL_REASONS:
        return reason
    return "handshake_failed" if reason.startswith("handshake failed") else "error"


M = TypeVar("M", Counter, Histogram)


class Children(Generic[M]):
    """A labelled metric's children, each looked up once: ``labels()`` checks the values
    and takes a lock on every call, a measurable share of a multiplexed stream's cost.
    Bounded because label values are (see the module docstring)."""

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        """The child for ``values`` (created on first use, as ``labels()`` would)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """The event metrics; state metrics come from a :class:`StateCollector`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A *_created series per counter doubles the series count and no rule uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        Info("qkdproxy_build", "qkdproxy version", registry=r).info({"version": __version__})
        self.tunnel_info = Info(
            "qkdproxy_tunnel", "Configuration of each tunnel", ["tunnel"], registry=r
        )
        self.handshake_seconds = Histogram(
            "qkdproxy_handshake_duration_seconds", "TLS handshake duration, KME calls included",
            ["tunnel", "role", "group", "flow", "result"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.handshakes = Counter(
            "qkdproxy_handshakes", "Handshakes by outcome",
            ["tunnel", "role", "group", "flow", "result"], registry=r,
        )  # fmt: skip
        self.handshake_failures = Counter(
            "qkdproxy_handshake_failures", "Failed handshakes by reason",
            ["tunnel", "role", "reason"], registry=r,
        )  # fmt: skip
        self.closed = Counter(
            "qkdproxy_connections_closed", "Connections ended, by reason",
            ["tunnel", "role", "reason"], registry=r,
        )  # fmt: skip
        self.key_updates = Counter(
            "qkdproxy_tls_key_updates", "TLS 1.3 KeyUpdates sent on long flows", ["tunnel"],
            registry=r,
        )  # fmt: skip
        self.fresh_key_updates = Counter(
            "qkdproxy_fresh_key_updates", "Extended Key Updates (fresh key exchanges) by result",
            ["tunnel", "result"], registry=r,
        )  # fmt: skip
        self.fresh_key_update_keys = Counter(
            "qkdproxy_fresh_key_update_qkd_keys", "QKD keys spent by completed Extended Key "
            "Updates", ["tunnel"], registry=r,
        )  # fmt: skip
        self.kme_seconds = Histogram(
            "qkdproxy_kme_request_duration_seconds", "KME call duration",
            ["kme", "call"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.kme_errors = Counter(
            "qkdproxy_kme_errors", "Failed KME calls by class", ["kme", "call", "class"],
            registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "qkdproxy_reloads", "Configuration reloads by result", ["result"], registry=r
        )
        self.reload_ok = Gauge(
            "qkdproxy_config_last_reload_successful",
            "1 if the last reload (or the start) succeeded, 0 if the running settings are "
            "older than the files", registry=r,
        )  # fmt: skip
        self.reload_ok.set(1)
        # Multiplexing (docs/OBSERVABILITY.md): streams are application connections and
        # count in qkdproxy_connections_closed too; carrying tunnels count only here.
        self.mux_streams = Counter(
            "qkdproxy_mux_streams_closed", "Streams of multiplexed tunnels ended, by reason",
            ["tunnel", "role", "reason"], registry=r,
        )  # fmt: skip
        self.mux_tunnels = Counter(
            "qkdproxy_mux_tunnels_closed",
            "Multiplexed (carrying) tunnels ended, by reason (rotated, idle, dead_peer...)",
            ["tunnel", "role", "reason"], registry=r,
        )  # fmt: skip
        self.mux_retried = Counter(
            "qkdproxy_mux_streams_retried",
            "Client streams sent again because the server did not process them "
            "(REFUSED_STREAM, or above its GOAWAY's last stream id)", ["tunnel"], registry=r,
        )  # fmt: skip
        self.mux_open = Gauge(
            "qkdproxy_mux_tunnels_open", "Established tunnels in a client's multiplexing pool",
            ["tunnel"], registry=r,
        )  # fmt: skip
        # process_* (memory, CPU, descriptors, start time): the daemon's own footprint.
        ProcessCollector(registry=r)
        # Observed for every connection: their children are cached.
        self._closed = Children(self.closed)
        self._mux_streams = Children(self.mux_streams)
        self._handshakes = Children(self.handshakes)
        self._handshake_seconds = Children(self.handshake_seconds)

    def observe(self, record: ConnectionRecord) -> None:
        """Account one closed connection."""
        labels = (record.tunnel, record.role)
        if record.mux == "tunnel":
            self.mux_tunnels.labels(*labels, mux_tunnel_reason(record.reason)).inc()
        else:
            reason = close_reason_class(record.reason)
            self._closed(*labels, reason).inc()
            if record.mux == "stream":
                self._mux_streams(*labels, reason).inc()
                if record.mux_retries:
                    self.mux_retried.labels(record.tunnel).inc(record.mux_retries)
        if record.key_updates:
            self.key_updates.labels(record.tunnel).inc(record.key_updates)
        fresh = record.fresh_key_updates, record.fresh_key_update_failures
        if any(fresh) or record.fresh_key_updates_abandoned:
            self._fresh_key_updates(record)
        if record.fresh_key_ids:
            self.fresh_key_update_keys.labels(record.tunnel).inc(len(record.fresh_key_ids))
        if record.failure is not None:
            group, flow = record.group or "none", record.flow or "none"
            self.handshakes.labels(*labels, group, flow, "failure").inc()
            self.handshake_failures.labels(*labels, record.failure).inc()

    def _fresh_key_updates(self, record: ConnectionRecord) -> None:
        for result, count in (
            ("ok", record.fresh_key_updates),
            ("failed", record.fresh_key_update_failures),
            ("abandoned", record.fresh_key_updates_abandoned),
        ):
            if count:
                self.fresh_key_updates.labels(record.tunnel, result).inc(count)

    def observe_handshake(self, record: ConnectionRecord) -> None:
        """Account a completed handshake as it completes (not when its connection ends)."""
        labels = (record.tunnel, record.role, record.group or "none", record.flow or "none")
        self._handshakes(*labels, "success").inc()
        if record.handshake_ms is not None:
            self._handshake_seconds(*labels, "success").observe(record.handshake_ms / 1000)

    def kme_observer(self, kme: str) -> KmeCallObserver:
        """An observer to give a KME client."""

        def observe(call: str, seconds: float, error: str | None) -> None:
            self.kme_seconds.labels(kme, call).observe(seconds)
            if error is not None:
                self.kme_errors.labels(kme, call, error).inc()

        return observe


@dataclass(slots=True)
class KmeState:
    """What the collector reads about one KME."""

    name: str
    up: Callable[[], bool]
    breaker: Callable[[], BreakerState | None]
    buffer_depth: Callable[[], int | None]
    consumption_per_s: Callable[[], float]
    pool_keys: Callable[[], int | None]
    counters: Callable[[], dict[str, int]]
    # Every key drawn from this KME, by fate (issue 12).
    account: KeyAccount | None = None
    # Net change of the KME pool per second (link refill minus every consumer), if known.
    pool_trend: Callable[[], float | None] = lambda: None


@dataclass(slots=True)
class TunnelState:
    """What the collector reads about one tunnel."""

    name: str
    role: str
    active: Callable[[], int]
    ledger: Callable[[], dict[str, int]]
    # opened, rejected (at the connection limit), fallbacks (qkd-preferred)
    counts: Callable[[], dict[str, int]]
    # Plaintext bytes (to the peer, from the peer), live connections included.
    traffic: Callable[[], tuple[int, int]] = lambda: (0, 0)
    # Connections refused or cut by admission control, by reason.
    refusals: Callable[[], dict[str, int]] = dict
    # qkd-preferred fallbacks by reason (kme_exhausted, kme_unavailable, ...).
    fallback_reasons: Callable[[], dict[str, int]] = dict
    # Seconds since the stalest live connection with Extended Key Update got fresh keys.
    fresh_key_age: Callable[[], float | None] = lambda: None


@dataclass(slots=True, eq=False)  # the registry keys collectors by identity
class StateCollector(Collector):
    """Reads the running daemon's state at scrape time."""

    tunnels: list[TunnelState] = field(default_factory=list)
    kmes: list[KmeState] = field(default_factory=list)
    certificates: list[tuple[str, str, Callable[[], float]]] = field(default_factory=list)
    # Pre-authentication gates of server tunnels, by tunnel name.
    gates: list[tuple[str, SpendGate]] = field(default_factory=list)

    def collect(self) -> Iterator[Metric]:
        """Yield the state metric families."""
        yield from self._tunnel_metrics()
        yield from self._kme_metrics()
        yield from self._key_account_metrics()
        yield from self._preauth_metrics()
        expiry = GaugeMetricFamily(
            "qkdproxy_certificate_expiration_timestamp_seconds",
            "notAfter of each loaded certificate, seconds since the epoch",
            labels=["owner", "certificate"],
        )
        for owner, kind, not_after in self.certificates:
            expiry.add_metric([owner, kind], not_after())
        yield expiry

    def _tunnel_metrics(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "qkdproxy_connections_active", "Connections in progress", labels=["tunnel", "role"]
        )
        keys = CounterMetricFamily(
            "qkdproxy_qkd_keys", "QKD keys by fate (taken, consumed, wasted) per tunnel",
            labels=["tunnel", "fate"],
        )  # fmt: skip
        key_bytes = CounterMetricFamily(
            "qkdproxy_qkd_key_bytes", "QKD key bytes by fate per tunnel",
            labels=["tunnel", "fate"],
        )  # fmt: skip
        opened = CounterMetricFamily(
            "qkdproxy_connections_opened", "Connections accepted", labels=["tunnel", "role"]
        )
        rejected = CounterMetricFamily(
            "qkdproxy_connections_rejected", "Connections refused at the connection limit",
            labels=["tunnel", "role"],
        )  # fmt: skip
        fallbacks = CounterMetricFamily(
            "qkdproxy_policy_fallbacks",
            "Connections that fell back from QKD to a PQ group (qkd-preferred policy)",
            labels=["tunnel", "role"],
        )
        fallback_reasons = CounterMetricFamily(
            "qkdproxy_policy_fallback_reasons",
            "qkd-preferred fallbacks by why QKD was unavailable (local KME exhausted, down...)",
            labels=["tunnel", "role", "reason"],
        )
        sent = CounterMetricFamily(
            "qkdproxy_sent_bytes", "Plaintext bytes sent through the tunnel towards the peer "
            "(live connections included)", labels=["tunnel", "role"],
        )  # fmt: skip
        received = CounterMetricFamily(
            "qkdproxy_received_bytes", "Plaintext bytes received through the tunnel "
            "(live connections included)", labels=["tunnel", "role"],
        )  # fmt: skip
        refusals = CounterMetricFamily(
            "qkdproxy_admission_refusals",
            "Connections refused at accept, or cut for a late hello, by admission control",
            labels=["tunnel", "role", "reason"],
        )
        fresh_age = GaugeMetricFamily(
            "qkdproxy_fresh_key_age_seconds",
            "Seconds since the live connection that waited longest got its last fresh key "
            "(handshake or Extended Key Update); absent without such connections",
            labels=["tunnel", "role"],
        )
        for tunnel in self.tunnels:
            active.add_metric([tunnel.name, tunnel.role], tunnel.active())
            if (age := tunnel.fresh_key_age()) is not None:
                fresh_age.add_metric([tunnel.name, tunnel.role], age)
            for reason, count in tunnel.refusals().items():
                refusals.add_metric([tunnel.name, tunnel.role, reason], count)
            for fate, count in tunnel.ledger().items():
                keys.add_metric([tunnel.name, fate], count)
                key_bytes.add_metric([tunnel.name, fate], count * 32)
            counts = tunnel.counts()
            opened.add_metric([tunnel.name, tunnel.role], counts["opened"])
            rejected.add_metric([tunnel.name, tunnel.role], counts["rejected"])
            fallbacks.add_metric([tunnel.name, tunnel.role], counts["fallbacks"])
            for reason, count in tunnel.fallback_reasons().items():
                fallback_reasons.add_metric([tunnel.name, tunnel.role, reason], count)
            to_peer, from_peer = tunnel.traffic()
            sent.add_metric([tunnel.name, tunnel.role], to_peer)
            received.add_metric([tunnel.name, tunnel.role], from_peer)
        yield from (
            active, keys, key_bytes, opened, rejected, fallbacks, fallback_reasons, sent,
            received, refusals,
        )  # fmt: skip
        yield fresh_age

    def _kme_metrics(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("qkdproxy_kme_up", "1 if the KME answers", labels=["kme"])
        breaker = GaugeMetricFamily(
            "qkdproxy_kme_circuit_breaker_state", "0 closed, 1 half-open, 2 open", labels=["kme"]
        )
        depth = GaugeMetricFamily(
            "qkdproxy_qkd_key_buffer_depth", "Prefetched keys ready in memory", labels=["kme"]
        )
        pool = GaugeMetricFamily(
            "qkdproxy_kme_pool_keys", "Keys in the KME pool (ETSI 014 status)", labels=["kme"]
        )
        buffer_left = GaugeMetricFamily(
            "qkdproxy_qkd_key_buffer_exhaustion_seconds",
            "Seconds until the local key buffer runs out at the current rate (+Inf if idle)",
            labels=["kme"],
        )
        pool_left = GaugeMetricFamily(
            "qkdproxy_kme_pool_exhaustion_seconds",
            "Seconds until the KME pool runs out, net of the link's refill (+Inf if not shrinking)",
            labels=["kme"],
        )
        prefetch = CounterMetricFamily(
            "qkdproxy_qkd_prefetch_keys", "Keys by prefetch outcome per KME",
            labels=["kme", "outcome"],
        )  # fmt: skip
        for kme in self.kmes:
            rate = kme.consumption_per_s()
            up.add_metric([kme.name], 1.0 if kme.up() else 0.0)
            if (state := kme.breaker()) is not None:
                breaker.add_metric([kme.name], BREAKER_VALUES[state])
            if (level := kme.buffer_depth()) is not None:
                depth.add_metric([kme.name], level)
                buffer_left.add_metric([kme.name], level / rate if rate else math.inf)
            if (stored := kme.pool_keys()) is not None:
                pool.add_metric([kme.name], stored)
                pool_left.add_metric([kme.name], _pool_left(stored, kme.pool_trend(), rate))
            for outcome, count in kme.counters().items():
                prefetch.add_metric([kme.name, outcome], count)
        yield from (up, breaker, depth, pool, buffer_left, pool_left, prefetch)

    def _key_account_metrics(self) -> Iterator[Metric]:
        drawn = CounterMetricFamily(
            "qkdproxy_qkd_keys_drawn", "QKD keys drawn from the KME (enc_keys, dec_keys, "
            "GET_KEY), by any supply, cache or handshake", labels=["kme"],
        )  # fmt: skip
        fates = CounterMetricFamily(
            "qkdproxy_qkd_key_fates", "Drawn QKD keys by fate; drawn = sum of fates + held",
            labels=["kme", "fate"],
        )  # fmt: skip
        held = GaugeMetricFamily(
            "qkdproxy_qkd_keys_held", "Drawn QKD keys without a fate yet (in a supply, a "
            "cache or a handshake)", labels=["kme"],
        )  # fmt: skip
        key_yield = GaugeMetricFamily(
            "qkdproxy_qkd_key_yield", "Consumed over settled drawn keys since start",
            labels=["kme"],
        )  # fmt: skip
        for kme in self.kmes:
            account = kme.account
            if account is None:
                continue
            # One consistent reading: every fate and ``held`` from the same moment.
            snapshot = dict(account.fates)
            total = account.drawn
            drawn.add_metric([kme.name], total)
            for fate in FATES:
                fates.add_metric([kme.name, fate], snapshot[fate])
            held.add_metric([kme.name], total - sum(snapshot.values()))
            if (value := account.key_yield) is not None:
                key_yield.add_metric([kme.name], value)
        yield from (drawn, fates, held, key_yield)

    def _preauth_metrics(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "qkdproxy_preauth_refused", "ClientHellos refused before any KME call (flow off, "
            "source or link budget spent, too many unknown key ids)",
            labels=["tunnel", "reason"],
        )  # fmt: skip
        for name, gate in self.gates:
            for reason, count in gate.counters.refused.items():
                refused.add_metric([name, reason], count)
        yield refused


def _pool_left(stored: int, trend: float | None, rate: float) -> float:
    """Seconds until the pool is empty: from the measured net trend when there is one (the
    link's refill included), else at our own take rate alone."""
    if trend is not None:
        return stored / -trend if trend < 0 else math.inf
    return stored / rate if rate else math.inf
