"""Key sources for a ``[kme.NAME]`` section: ETSI 014 or 004 clients with prefetching,
plus the health the daemon reports (last call outcome, breaker, pool level)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Protocol

from qkdproxy.config import KmeConfig
from qkdproxy.errors import SettingError
from qkdproxy.etsi004.client import Etsi004Client, Etsi004ClientPool
from qkdproxy.etsi014.client import KME_DOWN_CLASSES, Etsi014Client
from qkdproxy.kmeidentity import ExpectedKme
from qkdproxy.observability.logformat import event
from qkdproxy.qkd.announce import AnnouncedSlave
from qkdproxy.qkd.breaker import BreakerState, CircuitBreaker
from qkdproxy.qkd.etsi004_sources import PrefetchingStreams
from qkdproxy.qkd.etsi014_sources import Etsi014Master, Etsi014Slave, PrefetchSettings
from qkdproxy.qkd.keys import QkdKeyError
from qkdproxy.qkd.responder import GuardedStreams, ResponderLimits
from qkdproxy.qkd.sources import KeySources, KmeCallObserver, no_observer
from qkdproxy.sslctx import client_context
from qkdproxy.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.tls.keyexchange import KeyApi
from qkdproxy.tunnel.addresses import TcpAddress, parse_address

STATUS_POLL_S = 10.0
log = logging.getLogger("qkdproxy.kme")


class _Closable(Protocol):
    async def aclose(self) -> None: ...


@dataclass(slots=True)
class KmeConnection:
    """The clients and sources of one KME section; shared by the tunnels that name it."""

    config: KmeConfig
    sources: KeySources
    credentials: Credentials
    client014: Etsi014Client | None = None
    last_ok: bool | None = None
    pool_keys: int | None = None
    _closers: list[_Closable] = field(default_factory=list)
    _poller: asyncio.Task[None] | None = None
    # What was last logged: one line per transition, however many calls see the state.
    _logged_up: bool = True
    _logged_breaker: BreakerState = BreakerState.CLOSED
    _down_since: float = 0.0

    @classmethod
    def open(cls, config: KmeConfig, observer: KmeCallObserver = no_observer) -> KmeConnection:
        """Build the clients (no network traffic until :meth:`start`)."""
        credentials = Credentials.load(config.cert, config.key)
        anchors = load_trust_anchors(config.ca)
        connection = cls(config, KeySources(), credentials)
        watched = connection._watch(observer)
        expected = ExpectedKme.parse(config.kme_identity) if config.kme_identity else None
        if config.api is KeyApi.ETSI_014:
            breaker = CircuitBreaker(max_backoff_s=config.max_retry_interval_s)
            client = Etsi014Client(
                config.endpoint,
                client_context(credentials, anchors, policy=config.cert_policy),
                observer=watched,
                breaker=breaker,
                expected_kme=expected,
            )
            master = Etsi014Master(
                client, config.peer_sae_id, PrefetchSettings() if config.prefetch else None
            )
            slave = AnnouncedSlave(Etsi014Slave(client, config.peer_sae_id))
            connection.sources = KeySources(master=master, slave=slave)
            connection.client014 = client
            connection._closers = [master, slave, client]
            return connection
        address = parse_address(config.endpoint)
        if not isinstance(address, TcpAddress):
            raise SettingError(f"kme.{config.name}.address must be host:port")
        context = client_context(credentials, anchors, ssl.TLSVersion.TLSv1_3, config.cert_policy)
        factory = functools.partial(
            Etsi004Client, address.host, address.port, context,
            source=config.sae_id, destination=config.peer_sae_id, observer=watched,
            expected_kme=expected, qos=config.qos,
        )  # fmt: skip
        limits = ResponderLimits(
            config.peer_streams_per_source, config.peer_streams_max, config.peer_stream_wait_s
        )
        pool = GuardedStreams(Etsi004ClientPool(factory), limits)
        stream: GuardedStreams | PrefetchingStreams = pool
        connection._closers = [pool]
        if config.prefetch:
            stream = PrefetchingStreams(pool)
            connection._closers.insert(0, stream)
        connection.sources = KeySources(stream=stream)
        return connection

    def _watch(self, observer: KmeCallObserver) -> KmeCallObserver:
        def watched(call: str, seconds: float, error: str | None) -> None:
            # Any answer that is not a server error (no such key, not authorised, pool
            # empty over 004) still shows a working KME.
            self.last_ok = error not in KME_DOWN_CLASSES
            observer(call, seconds, error)
            # The client updates its breaker after telling us: look once it has.
            asyncio.get_running_loop().call_soon(self.log_transitions, error)

        return watched

    def log_transitions(self, error: str | None = None) -> None:
        """Log KME up/down and breaker changes since the last call, once each.

        Called after every KME call and by the daemon's monitor (a breaker moves from open
        to half-open with time alone)."""
        breaker, up, name = self.breaker, self.up, self.config.name
        if breaker is not None and breaker is not self._logged_breaker:
            level = logging.INFO if breaker is BreakerState.CLOSED else logging.WARNING
            log.log(level, "KME %s circuit breaker %s -> %s", name,
                    self._logged_breaker.value, breaker.value,
                    extra=event("kme_breaker", kme=name, state=breaker.value))  # fmt: skip
            self._logged_breaker = breaker
        if up is self._logged_up:
            return
        self._logged_up = up
        if not up:
            self._down_since = time.monotonic()
            log.warning("KME %s down (%s)", name, error or "circuit breaker open",
                        extra=event("kme_down", kme=name, error=error))  # fmt: skip
            return
        down_s = round(time.monotonic() - self._down_since, 3)
        log.info("KME %s up again after %ss", name, down_s,
                 extra=event("kme_up", kme=name, down_s=down_s))  # fmt: skip

    @property
    def up(self) -> bool:
        """The KME answers (unknown until the first call counts as up)."""
        breaker = self.breaker
        return self.last_ok is not False and breaker is not BreakerState.OPEN

    @property
    def breaker(self) -> BreakerState | None:
        """The ETSI 014 client's circuit breaker state."""
        return self.client014.breaker.state if self.client014 else None

    def start(self) -> None:
        """Start background prefetching and, for ETSI 014, status polling."""
        for source in (self.sources.master, self.sources.stream):
            refill = getattr(source, "ensure_refill", None)
            if refill is not None:
                refill()
        if self.client014 is not None:
            self._poller = asyncio.create_task(self._poll_status(self.client014))

    async def _poll_status(self, client: Etsi014Client) -> None:
        reported: str | None = None
        while True:
            with contextlib.suppress(QkdKeyError):
                status = await client.status(self.config.peer_sae_id)
                self.pool_keys = status.stored_key_count
                if client.key_size_problem != reported:
                    reported = client.key_size_problem
                    if reported is not None:
                        log.error("kme %s: %s", self.config.name, reported)
            await asyncio.sleep(STATUS_POLL_S)

    async def aclose(self) -> None:
        """Stop polling and prefetching and close the KME connections."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for closer in self._closers:
            await closer.aclose()
