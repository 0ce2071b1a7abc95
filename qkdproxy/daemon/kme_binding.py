"""Key sources for a ``[kme.NAME]`` section: ETSI 014 or 004 clients with demand-sized
supplies, plus the health the daemon reports (last call outcome, breaker, pool level).

Keys belong to one peer: every client tunnel gets its own master supply (ETSI 014) or its own
streams opened ahead (ETSI 004), keyed by the peer it dials (a KME section shared by tunnels
to different servers keeps one supply per (slave SAE, peer)), so ids and KSIDs announced to
one server are never offered to another. A server tunnel gets a master supply only if it
serves the server-initiated flow, and that supply never announces; over ETSI 004 the server
tunnels share one responder, which joins the streams clients announce and opens none ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Protocol

from qkdproxy.core.accounting import KeyAccount
from qkdproxy.core.addresses import TcpAddress, parse_address
from qkdproxy.core.breaker import BreakerState, CircuitBreaker
from qkdproxy.core.errors import SettingError
from qkdproxy.core.keys import QkdKeyError
from qkdproxy.core.ratelimit import TokenBucket
from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.core.tls.keyexchange import Flow, KeyApi
from qkdproxy.daemon.config import KmeConfig, TunnelConfig
from qkdproxy.daemon.logformat import event
from qkdproxy.keys.announce import AnnouncedSlave
from qkdproxy.keys.etsi004_client import Etsi004Client, Etsi004ClientPool
from qkdproxy.keys.etsi004_supply import PrefetchingStreams
from qkdproxy.keys.etsi014_client import KME_DOWN_CLASSES, Etsi014Client
from qkdproxy.keys.etsi014_supply import Etsi014Master, Etsi014Slave
from qkdproxy.keys.kme_identity import ExpectedKme
from qkdproxy.keys.preauth import SERVER_INITIATED, GatedSlave, SpendGate
from qkdproxy.keys.responder import GuardedStreams, ResponderLimits
from qkdproxy.keys.sources import KeySources, KmeCallObserver, no_observer
from qkdproxy.keys.sslctx import client_context

STATUS_POLL_S = 10.0
log = logging.getLogger("qkdproxy.kme")
# Most ETSI 004 streams opened ahead, whatever the demand.
STREAMS_AHEAD = 32
# The supply key of a server tunnel's master: offered to whichever client connects.
SERVER_SUPPLY = "(server-initiated)"


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
    # Every key drawn from this KME, by fate.
    account: KeyAccount = field(default_factory=KeyAccount)
    # One master supply per peer (ETSI 014), created as tunnels ask for them.
    masters: dict[str, Etsi014Master] = field(default_factory=dict)
    # One initiator supply of streams opened ahead per peer (ETSI 004), likewise.
    streams: dict[str, PrefetchingStreams] = field(default_factory=dict)
    # Pre-authentication budget of the whole link (server-initiated fresh keys).
    link_budget: TokenBucket | None = None
    # Net change of the KME pool per second between the last two status polls.
    pool_trend: float | None = None
    _closers: list[_Closable] = field(default_factory=list)
    # ETSI 004: makes a supply of streams over the section's one KME connection pool.
    _new_streams: functools.partial[PrefetchingStreams] | None = None
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
        connection.link_budget = TokenBucket(config.preauth_link.rate, config.preauth_link.burst)
        account = connection.account
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
            )  # fmt: skip
            slave = AnnouncedSlave(
                Etsi014Slave(client, config.peer_sae_id, account),
                max_age_s=config.supply.max_age_s, account=account,
            )  # fmt: skip
            connection.sources = KeySources(slave=slave)
            connection.client014 = client
            connection._closers = [slave, client]
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
        # Without prefetch no stream is opened ahead (pool 0), but the keys are still counted.
        connection._new_streams = functools.partial(
            PrefetchingStreams, pool, pool=STREAMS_AHEAD if config.prefetch else 0,
            max_age_s=config.supply.max_age_s, supply=config.supply, account=account,
        )  # fmt: skip
        # The server tunnels' responder opens (and announces) no stream of its own: no client
        # of the client-initiated flow would use it, and one announced to a client and then
        # used with another (a server's Extended Key Update) would be refused by that one.
        responder = connection._new_streams(opens_ahead=False)
        connection._closers = [responder, pool]
        connection.sources = KeySources(stream=responder)
        return connection

    def master_for(self, peer: str, announces: bool = True) -> Etsi014Master | None:
        """The master supply dedicated to ``peer`` (None for ETSI 004)."""
        if self.client014 is None:
            return None
        master = self.masters.get(peer)
        if master is None:
            supply = self.config.supply if self.config.prefetch else None
            master = Etsi014Master(
                self.client014, self.config.peer_sae_id, supply,
                account=self.account, announces=announces,
            )  # fmt: skip
            self.masters[peer] = master
            self._closers.insert(0, master)
        return master

    def streams_for(self, peer: str) -> PrefetchingStreams | None:
        """The ETSI 004 streams opened ahead for ``peer`` (None for ETSI 014)."""
        if self._new_streams is None:
            return None
        streams = self.streams.get(peer)
        if streams is None:
            streams = self.streams[peer] = self._new_streams()
            # Closed before the pool their CLOSE calls go through.
            self._closers.insert(0, streams)
        return streams

    def sources_for(self, tunnel: TunnelConfig) -> KeySources:
        """The key sources of one tunnel: a master (ETSI 014) or streams opened ahead (ETSI
        004) of its own peer only where it originates keys; the section's slave and ETSI 004
        responder otherwise."""
        if tunnel.role == "client":
            if tunnel.flow is not Flow.CLIENT_INITIATED:
                return KeySources(None, self.sources.slave, self.sources.stream)
            peer = f"{tunnel.server_name}@{tunnel.connect}"
            return KeySources(self.master_for(peer), self.sources.slave, self.streams_for(peer))
        served = SERVER_INITIATED in tunnel.preauth.flows
        master = self.master_for(SERVER_SUPPLY, announces=False) if served else None
        return KeySources(master, self.sources.slave, self.sources.stream)

    def gate_for(self, tunnel: TunnelConfig) -> SpendGate:
        """A server tunnel's pre-authentication gate (the link budget is shared)."""
        assert self.link_budget is not None
        return SpendGate(tunnel.preauth, self.link_budget)

    @staticmethod
    def gated(sources: KeySources, gate: SpendGate) -> KeySources:
        """``sources`` whose slave charges unknown ids to the source that named them."""
        slave = GatedSlave(sources.slave, gate) if sources.slave is not None else None
        return KeySources(sources.master, slave, sources.stream)

    @property
    def depth(self) -> int | None:
        """Keys (or streams) held ahead, over every supply."""
        if self.client014 is None and self._new_streams is None:
            return None
        return sum(supply.depth for supply in self._supplies())

    def _supplies(self) -> list[Etsi014Master | PrefetchingStreams]:
        """Every supply a peer's keys or streams are held ahead in."""
        return [*self.masters.values(), *self.streams.values()]

    def consumption_per_s(self) -> float:
        """Keys (ETSI 004: streams) taken from every supply per second (last minute)."""
        return sum(supply.consumption_per_s() for supply in self._supplies())

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
        """Fill every supply to its floor; for ETSI 014, start status polling."""
        for supply in self._supplies():
            supply.ensure_refill()
        if self.client014 is not None:
            self._poller = asyncio.create_task(self._poll_status(self.client014))

    async def _poll_status(self, client: Etsi014Client) -> None:
        previous: tuple[float, int] | None = None
        reported: str | None = None
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(QkdKeyError):
                status = await client.status(self.config.peer_sae_id)
                now, stored = loop.time(), status.stored_key_count
                if previous is not None and now > previous[0]:
                    # Refill by the link minus every consumer's draw: the net trend.
                    self.pool_trend = (stored - previous[1]) / (now - previous[0])
                previous = (now, stored)
                self.pool_keys = stored
                if client.key_size_problem != reported:
                    reported = client.key_size_problem
                    if reported is not None:
                        log.error("kme %s: %s", self.config.name, reported)
            await asyncio.sleep(STATUS_POLL_S)

    async def aclose(self) -> None:
        """Stop polling and prefetching and close the KME connections."""
        if self._poller is not None:
            self._poller.cancel()
            # Not a suppressed CancelledError: a cut of this close must not be swallowed.
            await asyncio.gather(self._poller, return_exceptions=True)
        for closer in self._closers:
            await closer.aclose()
