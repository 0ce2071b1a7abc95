"""The daemon: builds KME connections and tunnels from a configuration, runs them, and
handles reload (SIGHUP), drain (SIGTERM) and systemd notifications.

Exit codes: 0 stopped cleanly; 1 could not start (e.g. a listener address in use); 2 bad
configuration, including certificate, key or CA files that cannot be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable

from qkdproxy.config import Config, ConfigError, TunnelConfig, load_config
from qkdproxy.groups import GroupSpec
from qkdproxy.hybrid import resolve
from qkdproxy.kem import default_registry
from qkdproxy.qkd.sources import KeySources
from qkdproxy.sdnotify import Notifier, inherited_sockets, watchdog_interval_s
from qkdproxy.tls.credentials import CredentialError, Credentials, load_trust_anchors
from qkdproxy.tls.identity import AllowList
from qkdproxy.tls.keyexchange import KeyContext, QkdOptions
from qkdproxy.tls.session import EndpointSettings, TlsEndpoint
from qkdproxy.tls.verify import PeerPolicy
from qkdproxy.tunnel.kmeconn import KmeConnection
from qkdproxy.tunnel.runtime import ConnectionRecord, Tunnel

EXIT_OK, EXIT_START_FAILED, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("qkdproxy.daemon")


def build_endpoint(
    config: TunnelConfig, keys: KeyContext, groups: tuple[GroupSpec, ...]
) -> TlsEndpoint:
    """The TLS endpoint of a tunnel: credentials, trust, allow-list and groups, from files."""
    credentials = Credentials.load(config.cert, config.key)
    anchors = load_trust_anchors(config.ca)
    rules = AllowList.of(config.allow).rules
    # A client that names its server checks that name; an allow-list narrows it further.
    any_peer = config.allow_any_peer or (config.role == "client" and not rules)
    peer = PeerPolicy(anchors, AllowList(rules, any_peer), config.server_name)
    registry = default_registry()
    hybrids = [resolve(g, registry) for g in groups]
    return TlsEndpoint(
        EndpointSettings(
            credentials, peer, hybrids, keys, handshake_timeout=config.handshake_timeout_s
        )
    )


class Daemon:
    """Everything one configuration file describes."""

    def __init__(
        self, config: Config, on_close: Callable[[ConnectionRecord], None] | None = None
    ) -> None:
        self.config = config
        self.kmes: dict[str, KmeConnection] = {}
        self.tunnels: list[Tunnel] = []
        self.notifier = Notifier()
        self._on_close = on_close
        self._stop = asyncio.Event()
        self._terms = 0
        self._stopping = False
        self.healthy = False

    async def start(self) -> None:
        """Open KME clients and listeners; raise on anything that prevents serving."""
        for name, kme_config in self.config.kmes.items():
            self.kmes[name] = KmeConnection.open(kme_config)
        inherited = inherited_sockets()
        for tunnel_config in self.config.tunnels:
            tunnel = self._tunnel(tunnel_config)
            await tunnel.start(inherited)
            self.tunnels.append(tunnel)
            log.info("tunnel %s (%s) listening on %s", tunnel_config.name,
                     tunnel_config.role, ", ".join(tunnel.bound()))  # fmt: skip
        for kme in self.kmes.values():
            kme.start()
        self.healthy = True

    def _tunnel(self, config: TunnelConfig) -> Tunnel:
        kme = self.kmes.get(config.kme) if config.kme else None
        options = QkdOptions(flow=config.flow, api=kme.config.api) if kme else QkdOptions()
        keys = KeyContext(kme.sources if kme else KeySources(), options)
        endpoint, fallback = self._endpoints(config, keys)
        return Tunnel(config, endpoint, keys, fallback, self._on_close)

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
        problems: list[str] = []
        try:
            fresh = load_config(self.config.path)
            by_name = {t.name: t for t in fresh.tunnels}
            running = {t.config.name for t in self.tunnels}
            problems += [
                f"tunnel {n}: new tunnels need a restart" for n in by_name if n not in running
            ]
            if fresh.kmes != self.config.kmes:
                problems.append("kme sections changed: KME changes need a restart")
            replacements = []
            for tunnel in self.tunnels:
                config = by_name.get(tunnel.config.name)
                if config is None or (config.listen, config.role) != (
                    tunnel.config.listen,
                    tunnel.config.role,
                ):
                    problems.append(f"tunnel {tunnel.config.name}: listener changes need a restart")
                    continue
                replacements.append((tunnel, config, *self._endpoints(config, tunnel.keys)))
        except ConfigError as exc:
            problems.extend(exc.problems)
        except (CredentialError, ValueError, OSError) as exc:
            problems.append(str(exc))
        if not problems:
            for tunnel, config, endpoint, fallback in replacements:
                tunnel.config, tunnel.endpoint, tunnel.fallback = config, endpoint, fallback
            self.config = fresh
            log.info("reloaded %s", self.config.path)
        else:
            for problem in problems:
                log.error("reload refused, keeping the running settings: %s", problem)
        self.notifier.notify(READY="1", STATUS=self.status_line())
        return problems

    def status_line(self) -> str:
        """A one-line summary for systemd's STATUS."""
        active = sum(t.active for t in self.tunnels)
        return f"{len(self.tunnels)} tunnels, {active} connections"

    def request_stop(self) -> None:
        """First call: drain. Second call: stop at once."""
        self._terms += 1
        self._stop.set()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; drain; return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.notifier.notify(READY="1", STATUS=self.status_line())
        watchdog = asyncio.create_task(self._watchdog())
        await self._stop.wait()
        # SIGHUP keeps its handler (the default would kill us); reload() ignores it now.
        self._stopping = True
        self.healthy = False
        self.notifier.notify(STOPPING="1", STATUS="draining")
        log.info("draining (up to %ss; send SIGTERM again to stop now)",
                 self.config.daemon.drain_timeout_s)  # fmt: skip
        for tunnel in self.tunnels:
            tunnel.stop_accepting()
        drain = asyncio.ensure_future(self._drain_all(self.config.daemon.drain_timeout_s))
        self._stop.clear()
        stop_now = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({drain, stop_now}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            drain.cancel()
            for tunnel in self.tunnels:
                await tunnel.drain(0)
        stop_now.cancel()
        watchdog.cancel()
        await self.close()
        return EXIT_OK

    async def _drain_all(self, timeout_s: float) -> None:
        await asyncio.gather(*(t.drain(timeout_s) for t in self.tunnels))

    async def _watchdog(self) -> None:
        interval = watchdog_interval_s()
        if interval is None:
            return
        while True:
            if self.healthy:
                self.notifier.notify(WATCHDOG="1", STATUS=self.status_line())
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop tunnels and KME clients."""
        for tunnel in self.tunnels:
            tunnel.stop_accepting()
            await tunnel.drain(0)
        for kme in self.kmes.values():
            with contextlib.suppress(Exception):
                await kme.aclose()
