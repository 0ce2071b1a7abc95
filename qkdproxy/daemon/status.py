"""The status listener (aiohttp): /metrics, /healthz, /readyz and /status.

Operators sometimes expose it beyond loopback (a container's or a pod's status port), so
whoever can reach it is treated as hostile: it holds at most ``MAX_CONNECTIONS`` sockets
(``MAX_CONNECTIONS_PER_SOURCE`` from one address, or IPv6 /64), each for at most
``CONNECTION_LIFETIME_S``, answers each address's requests at a bounded rate (and the
costly /metrics and /status at a bounded rate overall), and what aiohttp logs about bad
requests is rate-limited to one line per interval. Without these an idle or trickling
client kept a socket for aiohttp's default hour, so a few hundred of them took every
descriptor the daemon may open and the tunnels could no longer accept or dial; a few
clients asking for /metrics back to back took the event loop the tunnels run on; and
every malformed request wrote an ERROR line with a traceback quoting the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from qkdproxy.core.addresses import format_sockname
from qkdproxy.core.logsafe import escape
from qkdproxy.core.ratelimit import SourceBuckets, TokenBucket, source_key
from qkdproxy.core.throttle import LogThrottle

Readiness = Callable[[], tuple[bool, list[str]]]
StatusDocument = Callable[[], dict[str, Any]]

# A scraper, the kubelet's probes and an operator need a few connections at a time.
MAX_CONNECTIONS = 64
MAX_CONNECTIONS_PER_SOURCE = 8
# A request takes milliseconds: a connection older than this is a slow or idle client
# (a keep-alive scraper simply reconnects).
CONNECTION_LIFETIME_S = 30.0
# aiohttp closes a connection with no complete request for this long (idle, or headers
# trickled in).
IDLE_S = 5.0
# A stopping daemon does not wait longer than this for status requests in flight.
SHUTDOWN_S = 1.0
ERROR_LOG_INTERVAL_S = 10.0
# A scraper and a kubelet's probes ask about once a second from one address, a test polling
# for a counter 20 times a second; more than this from one address (IPv6 /64) gets 429.
REQUESTS_PER_SOURCE_S = 20.0
REQUEST_BURST_PER_SOURCE = 40.0
# /metrics and /status cost a daemon 1.5-2 ms of CPU each (its event loop, which also runs
# the tunnels): from everyone together at most this many, under 10 % of a core. The
# probes' /healthz and /readyz are cheap and limited per address only, so a flood of
# costly requests from many addresses cannot fail a liveness probe (a restart would cut
# every connection).
COSTLY_PER_S = 40.0
COSTLY_BURST = 80.0
COSTLY_PATHS = frozenset({"/metrics", "/status"})
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

log = logging.getLogger("qkdproxy.status")


class RequestBudget:
    """Which status requests are answered (pure: time is passed in): each address (IPv6
    /64) has its own token bucket, and the costly paths share one more among everyone.
    ``per_source`` and ``costly``: (rate per second, burst) of each."""

    def __init__(
        self,
        per_source: tuple[float, float] = (REQUESTS_PER_SOURCE_S, REQUEST_BURST_PER_SOURCE),
        costly: tuple[float, float] = (COSTLY_PER_S, COSTLY_BURST),
    ) -> None:
        self._sources = SourceBuckets(*per_source)
        self._costly = TokenBucket(*costly)

    def admit(self, source: str, path: str, now: float) -> bool:
        """Whether a request for ``path`` from ``source`` (a peer address) is answered."""
        if not self._sources.take(source_key(source), now):
            return False
        return path not in COSTLY_PATHS or self._costly.take(now)


def create_app(
    registry: CollectorRegistry,
    readiness: Readiness,
    status: StatusDocument,
    budget: RequestBudget | None = None,
) -> web.Application:
    """The status application; the callables read the daemon at request time. Requests
    beyond ``budget`` (a fresh :class:`RequestBudget` by default) get 429."""
    budget = budget or RequestBudget()

    @web.middleware
    async def budgeted(request: web.Request, handler: Handler) -> web.StreamResponse:
        if budget.admit(request.remote or "", request.path, time.monotonic()):
            return await handler(request)
        return web.Response(status=429, headers={"Retry-After": "1"})

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready, reasons = readiness()
        body = json.dumps({"ready": ready, "reasons": reasons})
        return web.Response(
            text=body + "\n", status=200 if ready else 503, content_type="application/json"
        )

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response(status())

    app = web.Application(middlewares=[budgeted])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_json)
    return app


class ThrottledHttpLog(logging.LoggerAdapter):  # type: ignore[type-arg] # typeshed: generic
    """What aiohttp logs with an exception, at most once per interval per kind, with how
    many were not logged since. A client's malformed request (``HttpProcessingError``) is
    one WARNING line without the traceback; anything else (a fault of ours) keeps it."""

    def __init__(self, logger: logging.Logger, interval_s: float = ERROR_LOG_INTERVAL_S) -> None:
        super().__init__(logger, {})
        self._throttle = LogThrottle(interval_s)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        """Log, or count, one aiohttp record."""
        exc_info = kwargs.get("exc_info")
        if not exc_info:
            self.logger.log(level, msg, *args, **kwargs)
            return
        exc = exc_info if isinstance(exc_info, BaseException) else None
        bad_request = isinstance(exc, HttpProcessingError)
        if bad_request:
            # Not our fault: a WARNING at most (aiohttp logs non-HTTP bytes at DEBUG).
            level = min(level, logging.WARNING)
        if not self.logger.isEnabledFor(level):
            # A line nobody sees must not take the interval's one line, nor its count.
            return
        kind = "bad_request" if bad_request else "error"
        suppressed = self._throttle.admit(kind, time.monotonic())
        if suppressed is None:
            return
        text = f"status listener: {msg}" % args if args else f"status listener: {msg}"
        if bad_request:
            self.logger.log(
                level, "%s: %s (%d more since the last such line)",
                text, escape(exc, limit=200), suppressed,
            )  # fmt: skip
            return
        self.logger.log(level, "%s (%d more since the last such line)", text, suppressed, **kwargs)


class StatusServer:
    """Serves the status application on one TCP address, with bounded connections."""

    def __init__(
        self,
        app: web.Application,
        *,
        lifetime_s: float = CONNECTION_LIFETIME_S,
        idle_s: float = IDLE_S,
    ) -> None:
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=idle_s, shutdown_timeout=SHUTDOWN_S,
            logger=ThrottledHttpLog(log),
        )  # fmt: skip
        self._lifetime_s = lifetime_s
        self._listener: asyncio.Server | None = None
        self._sources: dict[str, int] = {}
        self.address = ""

    async def start(self, host: str, port: int) -> None:
        """Listen (port 0 picks a free port; ``address`` says which)."""
        await self._runner.setup()
        sock = socket.create_server((host, port))
        self.address = format_sockname(sock.getsockname())
        self._listener = await asyncio.get_running_loop().create_server(self._protocol, sock=sock)

    @property
    def connections(self) -> int:
        """Status connections held now."""
        return sum(self._sources.values())

    async def stop(self) -> None:
        """Stop serving."""
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()

    def _protocol(self) -> asyncio.Protocol:
        return _Bounded(self)

    def _admit(self, source: str) -> bool:
        held = self._sources.get(source, 0)
        if held >= MAX_CONNECTIONS_PER_SOURCE or self.connections >= MAX_CONNECTIONS:
            return False
        self._sources[source] = held + 1
        return True

    def _release(self, source: str) -> None:
        left = self._sources[source] - 1
        if left:
            self._sources[source] = left
        else:
            del self._sources[source]


class _Bounded(asyncio.Protocol):
    """One status connection: aiohttp's handler if there is room for it (else a 503 and a
    close), cut when it has lived ``lifetime_s`` whatever it is doing (a client that sends
    a request and never reads the answer included)."""

    def __init__(self, server: StatusServer) -> None:
        self._server = server
        self._inner: asyncio.Protocol | None = None
        self._source = ""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not registered as asyncio.Transport).
        transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._source = source_key(str(peer[0]) if isinstance(peer, tuple) else str(peer))
        if not self._server._admit(self._source):
            transport.write(_BUSY)
            transport.close()
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._server._lifetime_s, transport.abort)
        handler = self._server._runner.server
        assert handler is not None
        self._inner = handler()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        assert self._timer is not None
        self._timer.cancel()
        self._server._release(self._source)
        self._inner.connection_lost(exc)
