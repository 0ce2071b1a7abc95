"""The ETSI GS QKD 004 server of a simulated KME: binary frames over mutual TLS 1.3.

Each connection is one application, named by its client certificate (CN or first URI SAN,
per ``KmeNode.identity``). Requests on a connection are answered in order; every request
first passes :meth:`KmeNode.admit`, so the node's latency, error bursts, resets, link-down
windows and exhaustion apply here as they do to the ETSI 014 server.

Key streams live in the shared :class:`QkdLinkModel`, so an application may reconnect (or
reach the peer's KME) and keep using them. What the link model does not keep, the declared
peer and QoS of each member, is kept per link in :class:`_Streams`, together with the
condition a GET_KEY waits on until the peer application opens.

Status choices where the standard leaves room:

- OPEN_CONNECT whose ``source`` is not the caller's certificate id: there is no status for
  it, so the answer is an error frame and the connection is closed.
- OPEN_CONNECT joining a stream whose members declared another peer (a third application):
  5, KSID in use. A chunk size or mimetype other than the stream's: 7 with the stream's
  values as the counter-proposal.
- GET_KEY on a KSID the caller has not opened (or has closed, or that expired): 4.
- GET_KEY for an index already delivered to the caller, or for a new index after a member
  closed the stream: 2, there is no (more) key for that index.
- An injected failure (``Decision.fail``): 4 for every request.
- ``KmeNode.qos_demands``: QoS values the KME insists on; a request asking for others gets 7
  with them as the counter-proposal.
- Quirk ``kme-address-destination``: a destination containing "://" (the reference
  provider's KME address) pairs with whichever application joins the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import uuid
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

from qkdproxy.core.etsi004.codec import (
    JSON_MIMETYPE,
    MAX_PAYLOAD,
    ZERO_KSID,
    CloseRequest,
    CloseResponse,
    CloseServer,
    CodecError,
    ErrorFrame,
    FrameDecoder,
    GetKeyRequest,
    GetKeyResponse,
    Message,
    OpenConnectRequest,
    OpenConnectResponse,
    QoS,
    Request,
    Status,
    encode,
)
from qkdproxy.keys.sslctx import peer_identity
from qkdproxy.sim.link import (
    KeyUnknownError,
    KsidInUseError,
    LinkError,
    PoolExhaustedError,
    QkdLinkModel,
    StreamState,
)
from qkdproxy.sim.node import KmeNode
from qkdproxy.sim.quirks import Quirk

logger = logging.getLogger(__name__)

MAX_CHUNK_SIZE = 1024
DEFAULT_CHUNK_SIZE = 32
DEFAULT_TTL_S = 600
IDLE_TIMEOUT_S = 300.0
HANDSHAKE_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 5.0
READ_SIZE = 64 * 1024


class _RefusedError(Exception):
    """The request gets an error frame and the connection ends (no status fits)."""


@dataclass(frozen=True, slots=True)
class _Member:
    """What one application declared when it opened a stream."""

    destination: str
    qos: QoS


@dataclass(slots=True)
class _StreamRecord:
    state: StreamState
    members: dict[str, _Member] = field(default_factory=dict)


class _Streams:
    """Per link: the members' declarations, and a condition signalled on OPEN and CLOSE.

    Shared by every server on the link (both KMEs), so an OPEN_CONNECT at one KME wakes a
    GET_KEY waiting at the other.
    """

    def __init__(self) -> None:
        self.records: dict[bytes, _StreamRecord] = {}
        self.changed = asyncio.Condition()

    def current(self, link: QkdLinkModel, ksid: bytes, now: float) -> _StreamRecord | None:
        """The record of a live stream; a record whose stream closed or expired is dropped."""
        record = self.records.get(ksid)
        if record is None:
            return None
        state = record.state
        if link.stream(ksid) is not state or now - state.last_used > state.ttl_s:
            del self.records[ksid]
            return None
        return record

    def prune(self, link: QkdLinkModel, now: float) -> None:
        """Forget every stream the link model no longer serves."""
        for ksid in list(self.records):
            self.current(link, ksid, now)

    async def notify(self) -> None:
        """Wake every GET_KEY waiting for a peer."""
        async with self.changed:
            self.changed.notify_all()


# One registry per link model, dropped with it; not per server, because the two KMEs of a
# link run separate servers.
_REGISTRIES: weakref.WeakKeyDictionary[QkdLinkModel, _Streams] = weakref.WeakKeyDictionary()


def _streams_of(link: QkdLinkModel) -> _Streams:
    streams = _REGISTRIES.get(link)
    if streams is None:
        streams = _REGISTRIES[link] = _Streams()
    return streams


def _failure(request: Request, status: Status) -> Message:
    """The answer to ``request`` that carries only ``status``."""
    match request:
        case OpenConnectRequest():
            return OpenConnectResponse(status, request.qos, request.ksid)
        case GetKeyRequest():
            return GetKeyResponse(status, request.index)
        case CloseRequest():
            return CloseResponse(status)


# A member whose destination was a KME address: it pairs with whichever application joins.
ANY_PEER = "\0any-peer"


def _names(destination: str, app: str) -> bool:
    """True if a member that declared ``destination`` accepts ``app`` as its peer."""
    return destination in (app, ANY_PEER)


def _negotiate(requested: QoS) -> QoS:
    """The QoS this KME accepts closest to ``requested`` (equal to it if acceptable)."""
    chunk = requested.key_chunk_size
    return replace(
        requested,
        key_chunk_size=chunk if 1 <= chunk <= MAX_CHUNK_SIZE else DEFAULT_CHUNK_SIZE,
        ttl_s=requested.ttl_s or DEFAULT_TTL_S,
        # MIME types compare case-insensitively; JSON is the one this KME writes.
        metadata_mimetype=(
            requested.metadata_mimetype
            if requested.metadata_mimetype.lower() == JSON_MIMETYPE
            else JSON_MIMETYPE
        ),
    )


class Etsi004Server:
    """Serves one :class:`KmeNode` over ETSI 004 (TLS 1.3, client certificate required)."""

    def __init__(
        self,
        node: KmeNode,
        ssl_context: ssl.SSLContext,
        *,
        idle_timeout: float = IDLE_TIMEOUT_S,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        # Fail closed on a context that would admit anonymous callers or older TLS.
        if ssl_context.verify_mode is not ssl.CERT_REQUIRED:
            raise ValueError("the ETSI 004 server requires client certificates")
        if ssl_context.minimum_version < ssl.TLSVersion.TLSv1_3:
            raise ValueError("the ETSI 004 server requires TLS 1.3")
        self._node = node
        self._ssl = ssl_context
        self._idle_timeout = idle_timeout
        self._max_payload = max_payload
        self._server: asyncio.Server | None = None
        self._stopping = False
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def connections(self) -> int:
        """Connections being served right now."""
        return len(self._connections)

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host``:``port`` (0 picks a free port); returns the bound port."""
        self._server = await asyncio.start_server(
            self._serve,
            host,
            port,
            ssl=self._ssl,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
        )
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        """Stop accepting, drop every connection, and wait (bounded) for their tasks."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        # Streams survive in the link model; a connection has nothing worth a graceful end.
        for task, writer in list(self._connections.items()):
            writer.transport.abort()
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=STOP_TIMEOUT_S)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), STOP_TIMEOUT_S)
            self._server = None

    # ---------------------------------------------------------------- connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stopping:  # a TLS handshake that was under way when stop() began
            writer.transport.abort()
            return
        self._connections[task] = writer
        try:
            if await self._converse(reader, writer):
                await self._close(writer)
        except asyncio.CancelledError:
            # Only stop() cancels a connection. Ending quietly, because asyncio's stream
            # callback reports a connection task that ends cancelled as an error.
            writer.transport.abort()
        except Exception as exc:  # a connection must never take the server down
            logger.debug("ETSI 004 connection dropped: %s", type(exc).__name__, exc_info=True)
            writer.transport.abort()
        finally:
            del self._connections[task]

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer requests until the caller leaves; False if the transport was aborted."""
        ssl_object = writer.get_extra_info("ssl_object")
        app = peer_identity(ssl_object, self._node.identity.value)
        if app is None:
            logger.debug("ETSI 004 client certificate names no application")
            await self._send(writer, ErrorFrame())
            return True
        decoder = FrameDecoder(self._max_payload)
        while True:
            try:
                message = await self._next_message(reader, decoder)
                if message is None or isinstance(message, CloseServer):
                    return True
                if not isinstance(message, OpenConnectRequest | GetKeyRequest | CloseRequest):
                    raise _RefusedError(f"{type(message).__name__} is not a request")
                decision = await self._node.admit()
                if decision.reset:
                    writer.transport.abort()
                    return False
                response = (
                    _failure(message, Status.NO_QKD_CONNECTION)
                    if decision.fail
                    else await self._answer(app, message)
                )
            except (CodecError, _RefusedError) as exc:
                logger.debug("ETSI 004 request refused: %s", exc)
                await self._send(writer, ErrorFrame())
                return True
            await self._send(writer, response)

    async def _next_message(
        self, reader: asyncio.StreamReader, decoder: FrameDecoder
    ) -> Message | None:
        """The next request, or None at end of stream or after the idle timeout."""
        try:
            async with asyncio.timeout(self._idle_timeout):
                while (message := decoder.next_message()) is None:
                    data = await reader.read(READ_SIZE)
                    if not data:
                        if decoder.buffered:
                            logger.debug("ETSI 004 caller left inside a frame")
                        return None
                    decoder.feed(data)
        except TimeoutError:
            logger.debug("ETSI 004 connection idle for %g s: closing", self._idle_timeout)
            return None
        return message

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, message: Message) -> None:
        writer.write(encode(message))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)
        except (TimeoutError, OSError):
            # The peer did not complete the TLS close: nothing more is owed to it.
            writer.transport.abort()

    # ---------------------------------------------------------------- requests

    async def _answer(self, app: str, request: Request) -> Message:
        try:
            match request:
                case OpenConnectRequest():
                    return await self._open(app, request)
                case GetKeyRequest():
                    return await self._get_key(app, request)
                case CloseRequest():
                    return await self._close_stream(app, request)
        except LinkError as exc:
            # Any refusal of the link model not mapped more precisely below.
            logger.debug("ETSI 004 %s: link refused: %s", type(request).__name__, exc)
            return _failure(request, Status.NO_QKD_CONNECTION)

    async def _open(self, app: str, request: OpenConnectRequest) -> OpenConnectResponse:
        """OPEN_CONNECT: create (KSID 0) or join a stream; 1 until the peer has joined."""
        if request.source != app:
            raise _RefusedError(f"source {request.source!r} is not the caller {app!r}")
        link, now = self._node.link, self._node.now()
        demands: dict[str, Any] = dict(self._node.qos_demands)
        accepted = replace(_negotiate(request.qos), **demands)
        if accepted != replace(request.qos, ttl_s=accepted.ttl_s):
            return OpenConnectResponse(Status.QOS_NOT_MET, accepted, request.ksid)
        if not link.link_up:
            return OpenConnectResponse(Status.NO_QKD_CONNECTION, request.qos, request.ksid)
        ksid = uuid.uuid4().bytes if request.ksid == ZERO_KSID else request.ksid
        streams = _streams_of(link)
        streams.prune(link, now)
        record = streams.current(link, ksid, now)
        destination = self._destination(request.destination)
        if record is not None:
            if app in record.members or any(
                not _names(member.destination, app) or not _names(destination, other)
                for other, member in record.members.items()
            ):
                return OpenConnectResponse(Status.KSID_IN_USE, request.qos, ksid)
            if record.state.chunk_size != accepted.key_chunk_size:
                counter = replace(accepted, key_chunk_size=record.state.chunk_size)
                return OpenConnectResponse(Status.QOS_NOT_MET, counter, ksid)
        try:
            state = link.open_stream(ksid, app, accepted.key_chunk_size, accepted.ttl_s, now)
        except KsidInUseError:
            return OpenConnectResponse(Status.KSID_IN_USE, request.qos, ksid)
        if record is None or record.state is not state:
            record = streams.records[ksid] = _StreamRecord(state)
        record.members[app] = _Member(destination, accepted)
        await streams.notify()
        joined = any(_names(destination, m) for m in state.members if m != app)
        return OpenConnectResponse(
            Status.SUCCESS if joined else Status.PEER_NOT_CONNECTED, accepted, ksid
        )

    def _destination(self, destination: str) -> str:
        """The peer an OPEN_CONNECT names; a KME address (``server://host:port``, from the
        reference provider) means any peer when the node has that quirk."""
        if Quirk.KME_ADDRESS_DESTINATION in self._node.quirks and "://" in destination:
            return ANY_PEER
        return destination

    def _readiness(self, app: str, ksid: bytes) -> Status | None:
        """None if ``app`` may draw key on ``ksid`` now, else the status that says why not."""
        link = self._node.link
        record = _streams_of(link).current(link, ksid, self._node.now())
        member = record.members.get(app) if record else None
        if record is None or member is None or app in record.state.closed:
            return Status.NO_QKD_CONNECTION
        if not link.link_up:
            return Status.NO_QKD_CONNECTION
        if not any(_names(member.destination, m) for m in record.state.members if m != app):
            return Status.PEER_APP_NOT_CONNECTED
        return None

    async def _get_key(self, app: str, request: GetKeyRequest) -> GetKeyResponse:
        """GET_KEY: the chunk at ``index``, waiting up to the QoS timeout for the peer."""
        ksid, link = request.ksid, self._node.link
        status = self._readiness(app, ksid)
        if status is Status.PEER_APP_NOT_CONNECTED:
            await self._wait_for_peer(app, ksid)
            status = self._readiness(app, ksid)
        record = _streams_of(link).current(link, ksid, self._node.now())
        if status is not None or record is None:
            return GetKeyResponse(status or Status.NO_QKD_CONNECTION, request.index)
        metadata = json.dumps(
            {
                "index": request.index,
                "ksid": str(uuid.UUID(bytes=ksid)),
                "chunk_size": record.state.chunk_size,
            },
            separators=(",", ":"),
        ).encode()
        # Checked before drawing, so the caller can retry with a larger buffer at no cost.
        if request.metadata_size < len(metadata):
            return GetKeyResponse(
                Status.METADATA_TOO_SMALL, request.index, metadata_needed=len(metadata)
            )
        try:
            key = link.stream_key(ksid, app, request.index, self._node.now())
        except (PoolExhaustedError, KeyUnknownError):
            return GetKeyResponse(Status.INSUFFICIENT_KEY, request.index)
        except KeyError:  # the stream vanished between the check and the draw
            return GetKeyResponse(Status.NO_QKD_CONNECTION, request.index)
        return GetKeyResponse(Status.SUCCESS, request.index, key, metadata)

    async def _wait_for_peer(self, app: str, ksid: bytes) -> None:
        """Wait (no polling) until the peer opens, up to the caller's QoS timeout."""
        link = self._node.link
        record = _streams_of(link).current(link, ksid, self._node.now())
        member = record.members.get(app) if record else None
        if member is None:
            return
        # The connection is also bounded by the idle timeout, so a wait is never longer.
        timeout = min(member.qos.timeout_ms / 1000, self._idle_timeout)
        if timeout <= 0:
            return
        changed = _streams_of(link).changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), changed:
                await changed.wait_for(
                    lambda: self._readiness(app, ksid) is not Status.PEER_APP_NOT_CONNECTED
                )

    async def _close_stream(self, app: str, request: CloseRequest) -> CloseResponse:
        """CLOSE: the caller leaves; 4 if it had not opened the stream (or already left)."""
        link = self._node.link
        streams = _streams_of(link)
        record = streams.current(link, request.ksid, self._node.now())
        if record is None or app not in record.members or app in record.state.closed:
            return CloseResponse(Status.NO_QKD_CONNECTION)
        link.close_stream(request.ksid, app)
        streams.prune(link, self._node.now())
        await streams.notify()
        return CloseResponse(Status.SUCCESS)
