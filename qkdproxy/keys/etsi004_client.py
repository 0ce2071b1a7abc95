"""An ETSI GS QKD 004 client: a :class:`StreamKeySource` over one persistent mutual-TLS link.

Requests are serialised on one connection. A connection found broken is replaced for
OPEN_CONNECT and CLOSE (once per call), never for GET_KEY: the KME may have delivered the
key before the connection broke, and a key is delivered once per end. A connection the KME
closed while idle is replaced before any request, which is safe for all three.

Also here: building the ``ssl.SSLContext`` of either side from :class:`Credentials`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import NoReturn, TypeVar

from qkdproxy.core.etsi004.codec import (
    MAX_PAYLOAD,
    ZERO_KSID,
    CloseRequest,
    CloseResponse,
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
from qkdproxy.core.etsi004.qos import QosPolicy, changed_fields, describe_status
from qkdproxy.core.keys import (
    KeyExhaustedError,
    KeySourceUnavailableError,
    KsidInUseError,
    PeerNotConnectedError,
    QkdKeyError,
)
from qkdproxy.keys.kme_identity import ExpectedKme
from qkdproxy.keys.sources import KmeCallObserver, no_observer

M = TypeVar("M", OpenConnectResponse, GetKeyResponse, CloseResponse)
T = TypeVar("T")
READ_SIZE = 64 * 1024
CLOSE_TIMEOUT_S = 2.0
DEFAULT_METADATA_SIZE = 1024


class QosNotMetError(QkdKeyError):
    """ETSI 004 status 7: the KME refused the QoS; ``counter_proposal`` is what it offers."""

    def __init__(self, message: str, counter_proposal: QoS) -> None:
        super().__init__(message)
        self.counter_proposal = counter_proposal


class RequestRefusedError(QkdKeyError):
    """The KME answered with an error frame: a malformed request, or a ``source`` that is
    not the application named in this client's certificate.
    """


class _BrokenConnectionError(KeySourceUnavailableError):
    """The connection failed under a request (the request may or may not have been served)."""


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: FrameDecoder

    @property
    def usable(self) -> bool:
        """False once the KME has closed it (EOF received) or it is being closed."""
        return not (self.writer.is_closing() or self.reader.at_eof())


def _unavailable(status: Status) -> KeySourceUnavailableError:
    return KeySourceUnavailableError(describe_status(status))


class Etsi004Client:
    """ETSI 004 ``OPEN_CONNECT`` / ``GET_KEY`` / ``CLOSE`` for application ``source``.

    ``chunk_size`` is the key size asked for (32 for TLS), ``timeout_ms`` how long the KME may
    wait in GET_KEY for the peer application, ``call_timeout`` (seconds) bounds every call
    including connecting; keep ``timeout_ms`` below it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        source: str,
        destination: str,
        *,
        chunk_size: int = 32,
        timeout_ms: int = 1000,
        ttl_s: int = 600,
        metadata_size: int = DEFAULT_METADATA_SIZE,
        call_timeout: float = 5.0,
        server_hostname: str | None = None,
        observer: KmeCallObserver = no_observer,
        expected_kme: ExpectedKme | None = None,
        qos: QosPolicy | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._expected_kme = expected_kme
        self._ssl = expected_kme.prepare(ssl_context) if expected_kme else ssl_context
        self._server_hostname = server_hostname
        self._source, self._destination = source, destination
        # ``qos`` (from [kme] qos) replaces timeout_ms and ttl_s.
        self._policy = qos or QosPolicy(timeout_ms=timeout_ms, ttl_s=ttl_s)
        self._qos = self._policy.qos(chunk_size)
        self._metadata_size = metadata_size
        self._call_timeout = call_timeout
        self._lock = asyncio.Lock()
        self._observer = observer
        self._connection: _Connection | None = None
        self._closed = False

    async def open(self, ksid: bytes | None) -> bytes:
        """OPEN_CONNECT; ``None`` (or 16 zero bytes) lets the KME assign the KSID."""
        return await self._observed("open_connect", self._open(ksid))

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        """GET_KEY: the chunk at ``index``; never retried on a broken connection."""
        return await self._observed("get_key", self._get_key(ksid, index))

    async def close(self, ksid: bytes) -> None:
        """CLOSE the stream."""
        await self._observed("close", self._close(ksid))

    async def _observed(self, call: str, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            result = await work
        except QkdKeyError as exc:
            self._observer(call, time.perf_counter() - started, _error_class(exc))
            raise
        self._observer(call, time.perf_counter() - started, None)
        return result

    async def _open(self, ksid: bytes | None) -> bytes:
        """OPEN_CONNECT; ``None`` (or 16 zero bytes) lets the KME assign the KSID.

        Success includes status 1 (the peer application has not opened yet). A QoS
        counter-proposal (status 7) within the configured bounds is accepted, kept for later
        calls, and OPEN_CONNECT is retried once with it.
        """
        wanted = ZERO_KSID if ksid is None else bytes(ksid)
        async with self._lock:
            response, retried = await self._open_once(wanted)
            if response.status is Status.QOS_NOT_MET:
                asked, counter = self._qos, response.qos
                if problems := self._policy.problems(asked, counter):
                    raise QosNotMetError(
                        f"{describe_status(Status.QOS_NOT_MET)}; the counter-proposal is "
                        f"outside the configured bounds: {'; '.join(problems)}",
                        counter,
                    )
                self._qos = self._policy.adopt(asked, counter)
                response, retried = await self._open_once(wanted)
                if response.status is Status.QOS_NOT_MET:
                    raise QosNotMetError(
                        f"{describe_status(Status.QOS_NOT_MET)}, again after accepting the "
                        f"KME's counter-proposal ({changed_fields(asked, counter)})",
                        response.qos,
                    )
            if response.status is Status.KSID_IN_USE and retried and wanted != ZERO_KSID:
                # The attempt that broke may have joined the stream already: it is ours.
                return wanted
            if response.status in (Status.SUCCESS, Status.PEER_NOT_CONNECTED):
                if wanted not in (ZERO_KSID, response.ksid) or response.ksid == ZERO_KSID:
                    await self._protocol_error("KME answered with another KSID")
                # get_key checks every chunk against the size asked for here.
                if response.qos.key_chunk_size != self._qos.key_chunk_size:
                    await self._protocol_error("KME changed the chunk size")
                return response.ksid
        if response.status is Status.KSID_IN_USE:
            raise KsidInUseError(describe_status(response.status))
        raise _unavailable(response.status)

    async def _open_once(self, wanted: bytes) -> tuple[OpenConnectResponse, bool]:
        request = OpenConnectRequest(self._source, self._destination, self._qos, wanted)
        message, retried = await self._call_retrying(request)
        return await self._expect(message, OpenConnectResponse), retried

    async def _get_key(self, ksid: bytes, index: int) -> bytes:
        """GET_KEY: the chunk at ``index``; never retried on a broken connection."""
        request = GetKeyRequest(bytes(ksid), index, self._metadata_size)
        async with self._lock:
            response = await self._expect(await self._call(request), GetKeyResponse)
            if response.status is Status.METADATA_TOO_SMALL:
                # Nothing was drawn; ask once more with the buffer size the KME needs.
                if response.metadata_needed > MAX_PAYLOAD:
                    await self._protocol_error("KME wants a metadata buffer too large")
                request = replace(request, metadata_size=response.metadata_needed)
                message = await self._call(request)
                response = await self._expect(message, GetKeyResponse)
            if response.index != index:
                await self._protocol_error("KME answered for another index")
            if response.status is Status.SUCCESS:
                if len(response.key) != self._qos.key_chunk_size:
                    await self._protocol_error(f"key of {len(response.key)} bytes")
                return response.key
        if response.status is Status.INSUFFICIENT_KEY:
            raise KeyExhaustedError(
                f"{describe_status(response.status)}: pool exhausted, index {index} already "
                "delivered, or stream closed"
            )
        if response.status is Status.PEER_APP_NOT_CONNECTED:
            raise PeerNotConnectedError(describe_status(response.status))
        raise _unavailable(response.status)

    async def _close(self, ksid: bytes) -> None:
        """CLOSE: no new key is allocated on the stream afterwards."""
        async with self._lock:
            message, retried = await self._call_retrying(CloseRequest(bytes(ksid)))
            response = await self._expect(message, CloseResponse)
        # After a broken attempt, 4 most likely means that attempt closed the stream.
        if response.status is Status.SUCCESS or (
            retried and response.status is Status.NO_QKD_CONNECTION
        ):
            return
        raise _unavailable(response.status)

    async def aclose(self) -> None:
        """Close the connection; later calls fail with KeySourceUnavailableError."""
        self._closed = True
        await self._disconnect()

    # ------------------------------------------------------------------ transport

    async def _call_retrying(self, request: Request) -> tuple[Message, bool]:
        """A call replayed once on a fresh connection if the first one broke under it."""
        try:
            return await self._call(request), False
        except _BrokenConnectionError:
            return await self._call(request), True

    async def _call(self, request: Request) -> Message:
        """Send one request and read its answer; the caller holds the lock."""
        if self._closed:
            raise KeySourceUnavailableError("client closed")
        try:
            async with asyncio.timeout(self._call_timeout):
                connection = await self._connect()
                connection.writer.write(encode(request))
                await connection.writer.drain()
                while (message := connection.decoder.next_message()) is None:
                    data = await connection.reader.read(READ_SIZE)
                    if not data:
                        raise ConnectionError("KME closed the connection")
                    connection.decoder.feed(data)
        except TimeoutError:
            await self._disconnect()  # a late answer would be read as the next one's
            raise KeySourceUnavailableError(f"no answer in {self._call_timeout} s") from None
        except CodecError as exc:
            await self._disconnect()
            raise KeySourceUnavailableError(f"malformed answer: {exc}") from None
        except OSError as exc:  # includes ssl.SSLError and ConnectionError
            await self._disconnect()
            raise _BrokenConnectionError(f"connection failed: {exc}") from None
        except asyncio.CancelledError:
            # The answer may still come and would be taken for the next request's (a key
            # for another stream, even): this connection can no longer be trusted.
            self._abort()
            raise
        if isinstance(message, ErrorFrame):
            await self._disconnect()  # the KME closes after an error frame
            raise RequestRefusedError(
                f"KME refused the request (malformed, or source {self._source!r} "
                "is not the application in this client's certificate)"
            )
        return message

    async def _connect(self) -> _Connection:
        if self._connection is not None and self._connection.usable:
            return self._connection
        await self._disconnect()
        reader, writer = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._server_hostname,
            ssl_handshake_timeout=self._call_timeout,
        )
        if self._expected_kme is not None:
            problem = self._expected_kme.mismatch(writer.get_extra_info("ssl_object"))
            if problem is not None:
                writer.transport.abort()
                raise ssl.SSLCertVerificationError(problem)
        self._connection = _Connection(reader, writer, FrameDecoder())
        return self._connection

    def _abort(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.writer.transport.abort()

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.writer.close()
        try:
            await asyncio.wait_for(connection.writer.wait_closed(), CLOSE_TIMEOUT_S)
        except (TimeoutError, OSError):
            connection.writer.transport.abort()

    async def _expect(self, message: Message, kind: type[M]) -> M:
        if not isinstance(message, kind):
            await self._protocol_error(f"KME answered with {type(message).__name__}")
        return message

    async def _protocol_error(self, reason: str) -> NoReturn:
        """Drop the connection (its state is in doubt) and fail the call."""
        await self._disconnect()
        raise KeySourceUnavailableError(reason)


def _error_class(exc: QkdKeyError) -> str:
    if isinstance(exc, KeyExhaustedError):
        return "exhausted"
    if isinstance(exc, RequestRefusedError | KsidInUseError | QosNotMetError):
        return "refused"
    if isinstance(exc, PeerNotConnectedError):
        return "not_found"
    return "unavailable"


class Etsi004ClientPool:
    """Several connections of one application, for concurrent calls.

    The binary framing has no request ids, so one connection carries one request at a time;
    a GET_KEY waiting for the peer would hold up everything else. Streams belong to the
    application (its certificate), not to a connection, so any connection may serve any call.
    """

    def __init__(self, factory: Callable[[], Etsi004Client], size: int = 8) -> None:
        self._clients = [factory() for _ in range(size)]
        self._idle: asyncio.Queue[Etsi004Client] = asyncio.Queue()
        for client in self._clients:
            self._idle.put_nowait(client)

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[Etsi004Client]:
        client = await self._idle.get()
        try:
            yield client
        finally:
            self._idle.put_nowait(client)

    async def open(self, ksid: bytes | None) -> bytes:
        """OPEN_CONNECT on an idle connection."""
        async with self._lease() as client:
            return await client.open(ksid)

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        """GET_KEY on an idle connection."""
        async with self._lease() as client:
            return await client.get_key(ksid, index)

    async def close(self, ksid: bytes) -> None:
        """CLOSE on an idle connection."""
        async with self._lease() as client:
            await client.close(ksid)

    async def aclose(self) -> None:
        """Close every connection."""
        for client in self._clients:
            await client.aclose()
