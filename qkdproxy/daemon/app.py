"""The daemon: builds KME connections and tunnels from a configuration, runs them, and
handles reload (SIGHUP), drain (SIGTERM) and systemd notifications.

Exit codes: 0 stopped cleanly; 1 could not start (e.g. a listener address in use); 2 bad
configuration, including certificate, key or CA files that cannot be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qkdproxy import __version__
from qkdproxy.core.accounting import KeyLedger
from qkdproxy.core.groups import GroupSpec
from qkdproxy.core.hybrid import resolve
from qkdproxy.core.kem import default_registry
from qkdproxy.core.policy import Policy
from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.core.tls.identity import AllowList
from qkdproxy.core.tls.keyexchange import QkdOptions
from qkdproxy.core.tls.verify import PeerPolicy
from qkdproxy.daemon.config import Config, ConfigError, KmeConfig, TunnelConfig, load_config
from qkdproxy.daemon.kme_binding import KmeConnection
from qkdproxy.daemon.logformat import event
from qkdproxy.daemon.metrics import KmeState, Metrics, StateCollector, TunnelState
from qkdproxy.daemon.risk import assess
from qkdproxy.daemon.sdnotify import Notifier, inherited_sockets, watchdog_interval_s
from qkdproxy.daemon.status import StatusServer, create_app
from qkdproxy.daemon.tunnel import ConnectionRecord, Tunnel
from qkdproxy.io.tls_stream import EndpointSettings, TlsEndpoint
from qkdproxy.keys.announce import AnnouncedSlave
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.etsi004_supply import PrefetchingStreams
from qkdproxy.keys.preauth import SpendGate
from qkdproxy.keys.sources import KeySources

EXIT_OK, EXIT_START_FAILED, EXIT_CONFIG = 0, 1, 2
MONITOR_INTERVAL_S = 1.0
log = logging.getLogger("qkdproxy.daemon.app")


def tunnel_qkd_options(config: TunnelConfig, kme: KmeConfig | None) -> QkdOptions:
    """The QKD options of a tunnel (daemon and probe alike)."""
    if kme is None:
        return QkdOptions()
    return QkdOptions(
        flow=config.flow, api=kme.api, accept_unechoed_key_id=config.accept_unechoed_key_id
    )


def build_endpoint(
    config: TunnelConfig, keys: KeyContext, groups: tuple[GroupSpec, ...]
) -> TlsEndpoint:
    """The TLS endpoint of a tunnel: credentials, trust, allow-list and groups, from files."""
    credentials = Credentials.load(config.cert, config.key)
    anchors = load_trust_anchors(config.ca)
    rules = AllowList.of(config.allow).rules
    # A client that names its server checks that name; an allow-list narrows it further.
    any_peer = config.allow_any_peer or (config.role == "client" and not rules)
    peer = PeerPolicy(anchors, AllowList(rules, any_peer), config.server_name, config.cert_policy)
    registry = default_registry()
    hybrids = [resolve(g, registry) for g in groups]
    return TlsEndpoint(
        EndpointSettings(
            credentials,
            peer,
            hybrids,
            keys,
            handshake_timeout=config.handshake_timeout_s,
            fresh_key_update=config.fresh_key_update or config.require_fresh_key_update,
            require_fresh_key_update=config.require_fresh_key_update,
            # An update may take as long as the period it keeps: keys at most twice as old.
            fresh_key_deadline=max(config.handshake_timeout_s, config.fresh_key_interval_s),
            mux_protocol=config.mux.enabled,
            tls_engine=config.tls_engine,
        )
    )


def _expiry(credentials: Callable[[], Credentials]) -> Callable[[], float]:
    # Read at scrape time, so a reload's new certificate is what gets reported.
    def not_after() -> float:
        return credentials().chain[0].not_valid_after_utc.timestamp()

    return not_after


def _endpoint_credentials(tunnel: Tunnel) -> Credentials:
    return tunnel.endpoint.settings.credentials


def _ca_expiry(tunnel: Tunnel) -> float:
    # The first CA of the bundle to expire: after it, peers it signed are refused.
    anchors = tunnel.endpoint.settings.peer.trust_anchors
    return min(a.not_valid_after_utc.timestamp() for a in anchors)


def tunnel_state(tunnel: Tunnel) -> TunnelState:
    """How the metrics collector reads a tunnel."""
    ledger = tunnel.keys.ledger
    return TunnelState(
        tunnel.config.name, tunnel.config.role, lambda: tunnel.active,
        lambda: {"taken": ledger.taken, "consumed": ledger.consumed, "wasted": ledger.wasted},
        lambda: {"opened": tunnel.stats.opened, "rejected": tunnel.stats.rejected_at_limit,
                 "fallbacks": tunnel.stats.fallbacks},
        tunnel.bytes_moved,
        lambda: dict(tunnel.admission.refused),
        lambda: dict(tunnel.stats.fallback_reasons),
        tunnel.fresh_key_age,
    )  # fmt: skip


def tunnel_keys(
    kme: KmeConnection, config: TunnelConfig, options: QkdOptions
) -> tuple[KeyContext, SpendGate | None]:
    """A tunnel's key context: its own sources (see KmeConnection.sources_for), the KME's
    key account, and for a server the pre-authentication gate (returned too)."""
    sources = kme.sources_for(config)
    ledger = KeyLedger(account=kme.account)
    if config.role != "server":
        return KeyContext(sources, options, ledger), None
    gate = kme.gate_for(config)
    return KeyContext(kme.gated(sources, gate), options, ledger, gate=gate), gate


# qkd_prefetch_keys_total outcomes of a client's supplies: the counter each sums. Over ETSI
# 004 a stream is the unit a handshake takes (one key each), so streams opened ahead count
# under the outcomes ETSI 014 keys do.
MASTER_OUTCOMES = {
    "prefetched": "prefetched", "served_from_buffer": "served_from_buffer",
    "fetched_on_demand": "fetched_on_demand", "expired": "expired", "flushed": "flushed",
}  # fmt: skip
STREAM_OUTCOMES = MASTER_OUTCOMES | {
    "prefetched": "opened_ahead", "served_from_buffer": "served_open",
    "fetched_on_demand": "opened_on_demand",
}  # fmt: skip


def _summed(counters: Sequence[object], outcomes: Mapping[str, str]) -> dict[str, int]:
    """Each outcome's counter summed over ``counters`` (one set per supply)."""
    return {
        outcome: sum(int(getattr(c, field)) for c in counters)
        for outcome, field in outcomes.items()
    }


def kme_state(kme: KmeConnection) -> KmeState:
    """How the metrics collector reads a KME connection."""

    def counters() -> dict[str, int]:
        out: dict[str, int] = {}
        if kme.masters:
            out |= _summed([m.counters for m in kme.masters.values()], MASTER_OUTCOMES)
        if isinstance(kme.sources.slave, AnnouncedSlave):
            a = kme.sources.slave.counters
            out |= {"announced": a.announced, "served_from_cache": a.served_from_cache,
                    "announced_expired": a.expired, "served_after_wait": a.served_after_wait,
                    "fetched_unannounced": a.fetched_unannounced}  # fmt: skip
        if kme.streams:
            out |= _summed([s.counters for s in kme.streams.values()], STREAM_OUTCOMES)
        if isinstance(responder := kme.sources.stream, PrefetchingStreams):
            r = responder.counters
            out |= {"announced": r.keys_ahead, "served_from_cache": r.keys_served_from_cache}
        return out

    return KmeState(
        kme.config.name, lambda: kme.up, lambda: kme.breaker, lambda: kme.depth,
        kme.consumption_per_s, lambda: kme.pool_keys, counters,
        account=kme.account, pool_trend=lambda: kme.pool_trend,
    )  # fmt: skip


def _tunnel_status(tunnel: Tunnel) -> dict[str, Any]:
    config, stats = tunnel.config, tunnel.stats
    return {
        "name": config.name, "role": config.role, "listen": tunnel.bound(),
        "policy": config.policy.value, "groups": [g.name for g in config.plan.groups],
        "kme": config.kme, "active": tunnel.active, "opened": stats.opened,
        "closed": stats.closed, "rejected_at_limit": stats.rejected_at_limit,
        "handshake_failures": stats.handshake_failures, "fallbacks": stats.fallbacks,
        "qkd_keys_consumed": tunnel.keys.ledger.consumed,
        "qkd_keys_wasted": tunnel.keys.ledger.wasted,
        "refused": dict(tunnel.admission.refused),
    }  # fmt: skip


def _kme_status(kme: KmeConnection) -> dict[str, Any]:
    state = kme_state(kme)
    return {
        "name": kme.config.name, "api": kme.config.api.value, "endpoint": kme.config.endpoint,
        "up": kme.up, "breaker": kme.breaker.value if kme.breaker else None,
        "buffer_depth": state.buffer_depth(), "pool_keys": kme.pool_keys,
        "keys_drawn": kme.account.drawn, "keys_held": kme.account.held,
        "key_fates": dict(kme.account.fates),
    }  # fmt: skip


def _log_settings(config: Config) -> tuple[str, str, float]:
    daemon = config.daemon
    return daemon.log_level, daemon.log_format, daemon.log_flush_ms


class Daemon:
    """Everything one configuration file describes."""

    def __init__(
        self, config: Config, on_close: Callable[[ConnectionRecord], None] | None = None
    ) -> None:
        self.config = config
        self.kmes: dict[str, KmeConnection] = {}
        self.tunnels: list[Tunnel] = []
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.collector = StateCollector()
        self.metrics.registry.register(self.collector)
        self.status_server: StatusServer | None = None
        self._started = False
        self._on_close = on_close
        self._stop = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._terms = 0
        self._stopping = False
        self._reload_pending = False
        self.healthy = False
        # Set by `run --strict`: a reload refuses risky settings too.
        self.strict = False
        # Set by `run`: applies a configuration's [daemon] log settings (the command line's
        # own --log-level and --log-format still win), at start and on each reload.
        self.apply_logging: Callable[[Config], None] | None = None

    async def start(self) -> None:
        """Open KME clients and listeners; raise on anything that prevents serving."""
        for name, kme_config in self.config.kmes.items():
            kme = KmeConnection.open(kme_config, self.metrics.kme_observer(name))
            self.kmes[name] = kme
            self.collector.kmes.append(kme_state(kme))
            self.collector.certificates.append(
                (f"kme:{name}", "client", _expiry(functools.partial(getattr, kme, "credentials")))
            )
            # KME changes need a restart: the KME's CA bundle is read once.
            ca_expiry = min(a.not_valid_after_utc.timestamp()
                            for a in load_trust_anchors(kme_config.ca))  # fmt: skip
            self.collector.certificates.append(
                (f"kme:{name}", "ca", functools.partial(float, ca_expiry))
            )
        inherited = inherited_sockets()
        for tunnel_config in self.config.tunnels:
            tunnel = self._tunnel(tunnel_config)
            await tunnel.start(inherited)
            self.tunnels.append(tunnel)
            self._observe_tunnel(tunnel)
            log.info("tunnel %s (%s) listening on %s", tunnel_config.name,
                     tunnel_config.role, ", ".join(tunnel.bound()))  # fmt: skip
        for kme in self.kmes.values():
            kme.start()
        await self._start_status()
        self._started = True
        self.healthy = True

    def _observe_tunnel(self, tunnel: Tunnel) -> None:
        self.collector.tunnels.append(tunnel_state(tunnel))
        if tunnel.pool is not None:
            pool = tunnel.pool
            self.metrics.mux_open.labels(tunnel.config.name).set_function(lambda: len(pool.tunnels))
        self.collector.certificates.append(
            (f"tunnel:{tunnel.config.name}", "server" if tunnel.config.role == "server"
             else "client", _expiry(functools.partial(_endpoint_credentials, tunnel))),
        )  # fmt: skip
        self.collector.certificates.append(
            (f"tunnel:{tunnel.config.name}", "ca", functools.partial(_ca_expiry, tunnel))
        )
        self._publish_info(tunnel)

    def _publish_info(self, tunnel: Tunnel) -> None:
        config = tunnel.config
        self.metrics.tunnel_info.labels(config.name).info({
            "role": config.role, "policy": config.policy.value,
            "groups": ",".join(g.name for g in config.plan.groups),
            "fallback_groups": ",".join(g.name for g in config.plan.fallback),
            "flow": config.flow.value, "kme": config.kme or "",
            "listen": str(config.listen),
        })  # fmt: skip

    async def _start_status(self) -> None:
        address = self.config.daemon.status_listen
        if address is None:
            return
        app = create_app(self.metrics.registry, self.readiness, self.status_document)
        self.status_server = StatusServer(app)
        await self.status_server.start(address.host, address.port)
        log.info("status on http://%s (/metrics /healthz /readyz /status)",
                 self.status_server.address)  # fmt: skip

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready to carry traffic, and if not, why (for /readyz)."""
        if not self._started:
            return False, ["starting"]
        if self._stopping:
            return False, ["draining"]
        reasons = []
        for tunnel in self.tunnels:
            config = tunnel.config
            kme = self.kmes.get(config.kme) if config.kme else None
            if config.policy is Policy.QKD_PQ_REQUIRED and kme is not None and not kme.up:
                reasons.append(
                    f"tunnel {config.name}: KME {kme.config.name} unreachable and the policy "
                    "requires QKD"
                )
        return not reasons, reasons

    def status_document(self) -> dict[str, Any]:
        """The /status JSON."""
        ready, reasons = self.readiness()
        return {
            "version": __version__,
            "ready": ready,
            "reasons": reasons,
            "tunnels": [_tunnel_status(t) for t in self.tunnels],
            "kmes": [_kme_status(k) for k in self.kmes.values()],
        }

    def _record(self, record: ConnectionRecord) -> None:
        self.metrics.observe(record)
        if self._on_close is not None:
            self._on_close(record)

    def _tunnel(self, config: TunnelConfig) -> Tunnel:
        kme = self.kmes.get(config.kme) if config.kme else None
        # accept_unechoed_key_id is a risky setting: warned at start-up (qkdproxy.daemon.risk).
        options = tunnel_qkd_options(config, kme.config if kme else None)
        keys = KeyContext(KeySources(), options)
        if kme is not None:
            keys, gate = tunnel_keys(kme, config, options)
            if gate is not None:
                self.collector.gates.append((config.name, gate))
        endpoint, fallback = self._endpoints(config, keys)
        return Tunnel(
            config,
            endpoint,
            keys,
            fallback,
            on_close=self._record,
            on_handshake=self.metrics.observe_handshake,
        )

    @staticmethod
    def _endpoints(
        config: TunnelConfig, keys: KeyContext
    ) -> tuple[TlsEndpoint, TlsEndpoint | None]:
        endpoint = build_endpoint(config, keys, config.plan.groups)
        fallback = None
        if config.role == "client" and config.plan.fallback:
            fallback = build_endpoint(config, keys, config.plan.fallback)
        return endpoint, fallback

    def reload(self) -> list[str]:
        """Re-read the configuration file and every tunnel's certificates, keys, CA bundles
        and allow-lists. All or nothing: on any problem the old settings stay."""
        if self._stopping:
            log.warning("reload ignored: the daemon is stopping")
            return ["the daemon is stopping"]
        self.notifier.notify(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))
        try:
            problems = self._apply_reload()
        finally:
            self.notifier.notify(READY="1", STATUS=self.status_line())
        return problems

    def _apply_reload(self) -> list[str]:
        problems: list[str] = []
        replacements = []
        try:
            fresh = load_config(self.config.path)
            problems += self._restart_only_changes(fresh)
            # The same checks as at start: key files others can read, risky settings.
            assessment = assess(fresh)
            problems += assessment.refusals(self.strict or fresh.daemon.strict)
            for risk in assessment.warnings:
                log.warning("WARNING: risky setting: %s", risk)
            if not problems:
                # Every running tunnel is in ``fresh``: _restart_only_changes checked that.
                by_name = {t.name: t for t in fresh.tunnels}
                for tunnel in self.tunnels:
                    config = by_name[tunnel.config.name]
                    keys = self._keys_after_reload(tunnel, config)
                    replacements.append((tunnel, config, keys, *self._endpoints(config, keys)))
        except ConfigError as exc:
            problems.extend(exc.problems)
        except Exception as exc:  # a reload must never take the daemon down
            problems.append(f"{type(exc).__name__}: {exc}")
        if problems:
            self.metrics.reloads.labels("failure").inc()
            self.metrics.reload_ok.set(0)
            for problem in problems:
                log.error("reload refused, keeping the running settings: %s", problem,
                          extra=event("reload", result="failure", problem=problem))  # fmt: skip
            return problems
        for tunnel, config, keys, endpoint, fallback in replacements:
            tunnel.reconfigure(config, endpoint, fallback, keys)
            self._publish_info(tunnel)
        if self.apply_logging is not None and _log_settings(fresh) != _log_settings(self.config):
            self.apply_logging(fresh)
        self.config = fresh
        self.metrics.reloads.labels("success").inc()
        self.metrics.reload_ok.set(1)
        log.info("reloaded %s", self.config.path, extra=event("reload", result="success"))
        return []

    def _keys_after_reload(self, tunnel: Tunnel, config: TunnelConfig) -> KeyContext:
        """The key context of a reloaded tunnel's new handshakes. A client's keys belong to
        the peer it dials (``KmeConnection.sources_for``): one that now dials another
        draws from that peer's supply (ETSI 014 keys or ETSI 004 streams), with the same
        ledger. The old supply keeps the ids it announced to the old peer (held and counted;
        used again if the tunnel dials that peer again), and connections still open to it
        keep theirs."""
        kme = self.kmes.get(config.kme) if config.kme else None
        if kme is None or config.role != "client":
            return tunnel.keys
        sources = kme.sources_for(config)
        old = tunnel.keys
        if sources.master is old.sources.master and sources.stream is old.sources.stream:
            return old
        return KeyContext(sources, old.options, old.ledger, old.guard)

    def _restart_only_changes(self, fresh: Config) -> list[str]:
        """Changes a running tunnel cannot take: listeners, roles, KMEs and key flows are
        bound to sockets and KME sessions opened at start."""
        problems: list[str] = []
        by_name = {t.name: t for t in fresh.tunnels}
        running = {t.config.name for t in self.tunnels}
        problems += [f"tunnel {n}: new tunnels need a restart" for n in by_name if n not in running]
        if fresh.kmes != self.config.kmes:
            problems.append("kme sections changed: KME changes need a restart")
        if fresh.daemon.status_listen != self.config.daemon.status_listen:
            problems.append("[status] listen changed: listener changes need a restart")
        for tunnel in self.tunnels:
            config = by_name.get(tunnel.config.name)
            old = tunnel.config
            if config is None:
                problems.append(f"tunnel {old.name}: removing a tunnel needs a restart")
            elif (config.listen, config.role, config.kme, config.flow) != (
                old.listen,
                old.role,
                old.kme,
                old.flow,
            ):
                problems.append(f"tunnel {old.name}: listen/role/kme/flow changes need a restart")
            elif config.accept_unechoed_key_id != old.accept_unechoed_key_id:
                problems.append(f"tunnel {old.name}: accept_unechoed_key_id needs a restart")
            elif config.preauth != old.preauth:
                # The spend gate and the master supplies are built at start.
                problems.append(
                    f"tunnel {old.name}: flows and pre-authentication budget changes need a restart"
                )
            elif config.mux != old.mux:
                # The pool, its ALPN offer and its limits are built at start.
                problems.append(f"tunnel {old.name}: multiplex and mux_* changes need a restart")
        return problems

    def status_line(self) -> str:
        """A one-line summary for systemd's STATUS."""
        active = sum(t.active for t in self.tunnels)
        return f"{len(self.tunnels)} tunnels, {active} connections"

    def request_stop(self) -> None:
        """First call: drain. Second call (however soon after): stop at once."""
        self._terms += 1
        (self._stop if self._terms == 1 else self._stop_now).set()

    def handle_signals(self) -> None:
        """Take over SIGTERM, SIGINT and SIGHUP. Called before :meth:`start`: once a
        listener is open (and "listening on" logged) a SIGHUP must reload, not kill the
        process, which is the default action of SIGHUP."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        if self._started:
            self.reload()
        else:
            # Still opening listeners and KME connections: reload once started.
            self._reload_pending = True

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; drain; return the exit code."""
        self.handle_signals()
        self.notifier.notify(READY="1", STATUS=self.status_line())
        if self._reload_pending:
            self._reload_pending = False
            self.reload()
        watchdog = asyncio.create_task(self._watchdog())
        monitor = asyncio.create_task(self._monitor())
        await self._stop.wait()
        # SIGHUP keeps its handler (the default would kill us); reload() ignores it now.
        self._stopping = True
        self.healthy = False
        self.notifier.notify(STOPPING="1", STATUS="draining")
        active = sum(t.active for t in self.tunnels)
        timeout_s = self.config.daemon.drain_timeout_s
        log.info("draining %d connections (up to %ss; send SIGTERM again to stop now)",
                 active, timeout_s,
                 extra=event("drain_start", connections=active, timeout_s=timeout_s))  # fmt: skip
        started = time.monotonic()
        for tunnel in self.tunnels:
            tunnel.stop_accepting()
        drain = asyncio.ensure_future(self._drain_all(timeout_s))
        stop_now = asyncio.ensure_future(self._stop_now.wait())
        await asyncio.wait({drain, stop_now}, return_when=asyncio.FIRST_COMPLETED)
        if drain.done():
            cut = drain.result()
        else:
            drain.cancel()
            cut = sum([await tunnel.drain(0) for tunnel in self.tunnels])
        elapsed = round(time.monotonic() - started, 3)
        fields = {"seconds": elapsed, "finished": active - cut, "cut": cut}
        log.info("drain ended after %ss: %d connections finished, %d cut", elapsed,
                 active - cut, cut, extra=event("drain_end", **fields))  # fmt: skip
        stop_now.cancel()
        watchdog.cancel()
        monitor.cancel()
        await self.close()
        return EXIT_OK

    async def _drain_all(self, timeout_s: float) -> int:
        return sum(await asyncio.gather(*(t.drain(timeout_s) for t in self.tunnels)))

    async def _monitor(self) -> None:
        # A breaker turns half-open with time alone: look for transitions between calls.
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            for kme in self.kmes.values():
                kme.log_transitions()

    async def _watchdog(self) -> None:
        interval = watchdog_interval_s()
        if interval is None:
            return
        while True:
            if self.healthy:
                self.notifier.notify(WATCHDOG="1", STATUS=self.status_line())
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop tunnels, KME clients and the status listener."""
        if self.status_server is not None:
            await self.status_server.stop()
            self.status_server = None
        for tunnel in self.tunnels:
            tunnel.stop_accepting()
            await tunnel.drain(0)
        for kme in self.kmes.values():
            with contextlib.suppress(Exception):
                await kme.aclose()
