"""asyncio driver for tlslite-ng: handshakes with awaited QKD keys, then a byte stream.

tlslite runs against an in-memory socket; this module moves bytes between that socket and
an asyncio stream. Inbound bytes pass through a :class:`HelloGate` so the hello that needs
a QKD key is held back until the key exchange (which may wait on a KME) has prepared its
answer; tlslite then continues without ever blocking the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from tlslite.errors import TLSAbruptCloseError, TLSError, TLSLocalAlert, TLSRemoteAlert

from qkdproxy.errors import LocalProtocolError, QkdproxyError, SettingError
from qkdproxy.hybrid import HybridKem
from qkdproxy.tls.credentials import Credentials
from qkdproxy.tls.events import (
    DataReceived,
    Failed,
    PeerClosed,
    RecordEvent,
    Side,
    Truncated,
)
from qkdproxy.tls.frames import ALPN_PROTOCOL
from qkdproxy.tls.hello import HelloParseError, parse_client_hello, parse_server_hello
from qkdproxy.tls.identity import PeerIdentity
from qkdproxy.tls.key_supply import run
from qkdproxy.tls.keyexchange import (
    ClientKeyExchange,
    HandshakeRecord,
    HandshakeRejectedError,
    KeyContext,
    ServerKeyExchange,
)
from qkdproxy.tls.record_layer import RecordLayer
from qkdproxy.tls.tlslite_glue import (
    NO_ALPN_PLACEHOLDER,
    HookedTLSConnection,
    install,
    make_settings,
    tlslite_chain,
    tlslite_private_key,
)
from qkdproxy.tls.verify import PeerPolicy, PeerRejectedError
from qkdproxy.tls.wire import (
    TLS13_CIPHER_SUITES,
    Alert,
    GateEvent,
    HandshakeType,
    HeldHello,
    HelloGate,
    plaintext_alert,
)

log = logging.getLogger(__name__)

READ_CHUNK = 65536
CLOSE_TIMEOUT = 5.0


class Outcome(Enum):
    """Why a handshake failed, for decisions and bounded metric labels (never the text)."""

    ALERT = "alert"  # a fatal alert, ours or the peer's (see ``remote``)
    TIMEOUT = "timeout"
    PEER_CLOSED = "peer_closed"
    UNVERIFIED = "unverified"  # the peer's identity was never checked
    INTERNAL = "internal"  # a bug of ours: logged with its traceback


class HandshakeError(QkdproxyError):
    """A handshake that did not complete; the only exception the handshake APIs raise."""

    def __init__(
        self,
        reason: str,
        alert: int | None = None,
        remote: bool = False,
        key_source: bool = False,
        outcome: Outcome = Outcome.ALERT,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert = alert
        self.remote = remote
        self.key_source = key_source
        self.outcome = outcome
        # What the failed handshake had got to: its flow and the key id it used, if any.
        self.record = HandshakeRecord()

    @property
    def may_be_kme(self) -> bool:
        """Our own KME failed. A peer's alert never counts: before the handshake completes
        it is unauthenticated, and an on-path attacker could inject one to force a
        downgrade."""
        return self.key_source


class TlsStreamError(ConnectionError, QkdproxyError):
    """An established stream ended abnormally (fatal alert, bad record, transport error).

    ``side`` says who sent ``alert``: we did (the peer broke the protocol) or the peer.
    ``truncated``: the stream ended without a protected close_notify (or, on
    ``qkdproxy/1``, without FIN), so the data may have been cut short and the plaintext
    side must never see a clean end.
    """

    def __init__(
        self,
        reason: str,
        alert: int | None = None,
        side: Side | None = None,
        *,
        truncated: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert = alert
        self.side = side
        self.truncated = truncated


def _sni_name(server_name: str | None) -> str | None:
    """SNI carries DNS names only (RFC 6066 3); IP addresses are checked, not sent."""
    if not server_name:
        return None
    try:
        ipaddress.ip_address(server_name)
    except ValueError:
        return server_name
    return None


def utc_now() -> datetime:
    """The default clock for certificate validation."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class EndpointSettings:
    """One TLS endpoint: identity, whom it accepts, groups in preference order, key context."""

    credentials: Credentials
    peer: PeerPolicy
    groups: Sequence[HybridKem]
    keys: KeyContext
    handshake_timeout: float = 10.0
    clock: Callable[[], datetime] = utc_now
    # Offer ALPN qkdproxy/1, the framed protocol only qkdproxy peers speak.
    peer_protocol: bool = True


class MemorySocket:
    """The socket tlslite sees: reads from ``inbound``, writes to ``outbound``, never blocks."""

    def __init__(self) -> None:
        self.inbound = bytearray()
        self.outbound = bytearray()
        self.eof = False

    def recv(self, size: int) -> bytes:
        if not self.inbound:
            if self.eof:
                return b""
            # tlslite reads args[0] to tell "would block" from real errors.
            raise BlockingIOError(errno.EAGAIN, "no data buffered")
        chunk = bytes(self.inbound[:size])
        del self.inbound[:size]
        return chunk

    def send(self, data: bytes) -> int:
        self.outbound += data
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.outbound += data

    def close(self) -> None:
        """Nothing to release: the asyncio transport is closed by the driver."""

    def shutdown(self, how: int) -> None:
        """Nothing to release: the asyncio transport is closed by the driver."""


HelloHandler = Callable[[HeldHello], Awaitable[None]]


class _Driver:
    """Steps tlslite generators, moving bytes between the memory socket and asyncio."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: HelloGate
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.gate = gate
        self.sock = MemorySocket()
        self.on_hello: HelloHandler | None = None
        self.backlog: deque[GateEvent] = deque()

    async def run(self, steps: Iterator[Any]) -> Any:
        """Drive a tlslite generator until it ends or yields its result (returned)."""
        while True:
            try:
                result = next(steps)
            except StopIteration:
                await self.flush()
                return None
            except BaseException:
                # tlslite queues its fatal alert before raising: let the peer learn why.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.flush(), CLOSE_TIMEOUT)
                raise
            if isinstance(result, int):
                await self.flush()
                if result == 0:
                    await self.fill()
                continue
            await self.flush()
            return result

    async def flush(self) -> None:
        if self.sock.outbound:
            if self.writer.is_closing():
                # uvloop raises RuntimeError on a write to a closed transport.
                self.sock.outbound.clear()
                raise ConnectionResetError("transport already closed")
            self.writer.write(bytes(self.sock.outbound))
            self.sock.outbound.clear()
            await self.writer.drain()

    async def fill(self) -> None:
        """Read until tlslite has bytes to consume (or the peer closed)."""
        while not self.sock.inbound and not self.sock.eof:
            await self.receive()

    async def receive(self) -> None:
        """Read one chunk from the transport into the inbound buffer (or note EOF)."""
        data = await self.reader.read(READ_CHUNK)
        if not data:
            self.sock.eof = True
            return
        await self.admit(data)

    async def admit(self, data: bytes) -> None:
        self.backlog.extend(self.gate.feed(data))
        await self.process_backlog()

    async def process_backlog(self) -> None:
        """Hand gate events to tlslite in order; a hello waits for ``on_hello`` to be set."""
        while self.backlog:
            event = self.backlog[0]
            if isinstance(event, HeldHello):
                if self.on_hello is None:
                    return
                await self.on_hello(event)
                data = event.records
            else:
                data = event.data
            self.backlog.popleft()
            self.sock.inbound += data

    async def first_hello(self) -> HeldHello | None:
        """Server: read until the first ClientHello is complete (None if it never comes)."""
        while True:
            head = self.backlog[0] if self.backlog else None
            if isinstance(head, HeldHello):
                self.backlog.popleft()
                return head
            if self.gate.passthrough or self.sock.eof:
                return None
            await self.receive()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


@dataclass(slots=True)
class TlsStream:
    """An established TLS 1.3 connection: ``read``/``write`` plaintext, then ``close``.

    Every record goes through our :class:`RecordLayer`; each call that makes it produce
    bytes hands them to the transport before yielding to the event loop, so records
    written by concurrent reads (a KeyUpdate answer) and writes keep their order.
    """

    _driver: _Driver = field(repr=False)
    _layer: RecordLayer = field(repr=False)
    record: HandshakeRecord
    peer: PeerIdentity
    handshake_seconds: float
    cipher: str
    alpn: str | None
    # Plaintext opened but not yet returned (a read asked for less than a record held).
    _plaintext: bytearray = field(default_factory=bytearray, repr=False)
    _peer_closed: bool = field(default=False, repr=False)
    # Events from bytes that arrived with the end of the handshake, handled on first read.
    _backlog: list[RecordEvent] = field(default_factory=list, repr=False)

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        """Up to ``max_bytes`` of plaintext; b"" once the peer closed cleanly.

        A fatal alert, a protocol violation or a transport closed without close_notify
        closes the transport and raises :class:`TlsStreamError` (``truncated`` for the
        last).
        """
        if self._backlog:
            events, self._backlog = self._backlog, []
            await self._handle(events)
        while not self._plaintext and not self._peer_closed:
            try:
                data = await self._driver.reader.read(READ_CHUNK)
            except ConnectionError as exc:
                raise await self._fail(TlsStreamError(f"{type(exc).__name__}: {exc}")) from None
            try:
                if data:
                    events = self._layer.receive(data, time.monotonic())
                else:
                    events = self._layer.receive_eof()
            except Exception as exc:
                # A bug of ours, never the peer's fault: keep the traceback, say internal_error.
                log.error("internal error in the record layer", exc_info=exc)
                reason = f"internal error ({type(exc).__name__})"
                events = [self._layer.fail(Alert.INTERNAL_ERROR, reason)]
            await self._handle(events)
        data = bytes(self._plaintext[:max_bytes])
        del self._plaintext[:max_bytes]
        return data

    async def _handle(self, events: list[RecordEvent]) -> None:
        """Apply what the record layer reported; raise if the stream ended badly."""
        self._transmit()
        for event in events:
            if isinstance(event, DataReceived):
                self._plaintext += event.data
            elif isinstance(event, PeerClosed):
                self._peer_closed = True
            elif isinstance(event, Truncated):
                raise await self._fail(TlsStreamError(event.reason, truncated=True))
            elif isinstance(event, Failed):
                raise await self._fail(TlsStreamError(event.reason, event.alert, event.side))

    def _transmit(self) -> None:
        """Hand what the record layer queued to the transport (without yielding)."""
        if out := self._layer.data_to_send():
            writer = self._driver.writer
            if writer.is_closing():
                # uvloop raises RuntimeError on a write to a closed transport.
                raise TlsStreamError("transport already closed")
            writer.write(out)

    async def write(self, data: bytes) -> None:
        """Send plaintext, one record per 16 KiB; :class:`TlsStreamError` if the stream broke."""
        try:
            self._layer.send_data(data)
            self._transmit()
            await self._driver.writer.drain()
        except LocalProtocolError as exc:
            raise await self._fail(TlsStreamError(exc.reason, exc.alert)) from None
        except ConnectionError as exc:
            raise await self._fail(TlsStreamError(f"{type(exc).__name__}: {exc}")) from None

    async def update_keys(self, request_peer: bool = False) -> None:
        """TLS 1.3 KeyUpdate of our sending keys (long-lived flows).

        Each side renews its own sending keys on its own budget: qkdproxy never asks the
        peer to answer unless ``request_peer`` says so.
        """
        try:
            self._layer.update_keys(request_peer)
            self._transmit()
            await self._driver.writer.drain()
        except LocalProtocolError as exc:
            raise await self._fail(TlsStreamError(exc.reason, exc.alert)) from None
        except ConnectionError as exc:
            raise await self._fail(TlsStreamError(f"{type(exc).__name__}: {exc}")) from None

    async def _fail(self, error: TlsStreamError) -> TlsStreamError:
        with contextlib.suppress(TlsStreamError):
            self._transmit()  # our alert, if the record layer queued one
        await close_transport(self._driver.writer)
        return error

    async def close(self) -> None:
        """Send close_notify (best effort) and close the transport."""
        try:
            self._layer.close()
            with contextlib.suppress(TlsStreamError, ConnectionError, TimeoutError):
                self._transmit()
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._driver.writer.drain()
        finally:
            await close_transport(self._driver.writer)


class TlsEndpoint:
    """Runs client or server handshakes with one set of endpoint settings."""

    def __init__(self, settings: EndpointSettings) -> None:
        if not settings.groups:
            raise SettingError("an endpoint needs at least one key-exchange group")
        install(g.group for g in settings.groups)
        self.settings = settings
        self._chain = tlslite_chain(settings.credentials)
        self._key = tlslite_private_key(settings.credentials.private_key)
        self._sni = _sni_name(settings.peer.server_name)
        self._alpn = [bytearray(ALPN_PROTOCOL.encode())] if settings.peer_protocol else None

    async def connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> TlsStream:
        """Client handshake over an open stream; raises :class:`HandshakeError`."""
        kex = ClientKeyExchange(self.settings.groups, self.settings.keys)
        driver = _Driver(reader, writer, HelloGate(HandshakeType.SERVER_HELLO))
        verified: list[PeerIdentity] = []

        async def on_server_hello(hello: HeldHello) -> None:
            try:
                parsed = parse_server_hello(hello.body)
            except HelloParseError as exc:
                # tlslite crashes on some hellos this parser refuses (an empty key_share),
                # so the client answers them itself.
                error = f"malformed ServerHello: {exc}"
                raise HandshakeRejectedError(Alert.DECODE_ERROR, error) from None
            await run(kex.on_server_hello(parsed))
            if parsed.hello_retry:
                driver.gate.allow_another()

        def check_chain(chain: list[bytes]) -> tuple[int, str] | None:
            try:
                verified.append(self.settings.peer.verify_server(chain, self.settings.clock()))
            except PeerRejectedError as exc:
                return int(exc.alert), exc.reason
            return None

        async def handshake(conn: HookedTLSConnection) -> None:
            first = self.settings.groups[0]
            settings = make_settings([g.group for g in self.settings.groups], first.group)
            steps = conn.handshakeClientCert(
                self._chain, self._key, settings=settings, serverName=self._sni,
                async_=True, alpn=self._alpn,
            )  # fmt: skip
            await run(kex.offer(first.group.code_point))
            driver.on_hello = on_server_hello
            await driver.run(steps)

        conn = HookedTLSConnection(driver.sock, kex, check_chain)
        return await self._complete(driver, conn, kex, handshake(conn), verified)

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> TlsStream:
        """Server handshake over an accepted stream; raises :class:`HandshakeError`."""
        kex = ServerKeyExchange(self.settings.groups, self.settings.keys)
        driver = _Driver(reader, writer, HelloGate(HandshakeType.CLIENT_HELLO))
        verified: list[PeerIdentity] = []

        async def on_client_hello(hello: HeldHello) -> None:
            try:
                parsed = parse_client_hello(hello.body)
            except HelloParseError:
                return  # tlslite answers it with the right alert
            # No KME call for a hello tlslite will refuse anyway.
            if not parsed.offers_tls13 or TLS13_CIPHER_SUITES.isdisjoint(parsed.cipher_suites):
                return
            if await run(kex.on_client_hello(parsed)):
                driver.gate.allow_another()

        async def handshake(conn: HookedTLSConnection) -> None:
            first = await driver.first_hello()
            if first is not None:
                await on_client_hello(first)
                driver.sock.inbound += first.records
            # tlslite is started only now, with the chosen group as its only choice, so it
            # cannot pick a group other than the one the key exchange prepared.
            groups = [kex.chosen.group] if kex.chosen else [g.group for g in self.settings.groups]
            driver.on_hello = on_client_hello
            await driver.process_backlog()
            await driver.run(
                conn.handshakeServerAsync(
                    certChain=self._chain,
                    privateKey=self._key,
                    settings=make_settings(groups, groups[0]),
                    reqCert=True,
                    alpn=self._alpn or [NO_ALPN_PLACEHOLDER],
                )
            )
            await self._check_client(driver, conn, verified)

        conn = HookedTLSConnection(driver.sock, kex, lambda chain: None)
        return await self._complete(driver, conn, kex, handshake(conn), verified)

    async def _check_client(
        self, driver: _Driver, conn: HookedTLSConnection, verified: list[PeerIdentity]
    ) -> None:
        chain = conn.session.clientCertChain if conn.session else None
        der = [bytes(c.bytes) for c in chain.x509List] if chain else []
        try:
            verified.append(self.settings.peer.verify_client(der, self.settings.clock()))
        except PeerRejectedError as exc:
            # Before any application data: the client learns why through an encrypted alert.
            await driver.run(conn.send_alert(int(exc.alert), exc.reason))

    async def _complete(
        self,
        driver: _Driver,
        conn: HookedTLSConnection,
        kex: ClientKeyExchange | ServerKeyExchange,
        handshake: Awaitable[None],
        verified: list[PeerIdentity],
    ) -> TlsStream:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.handshake_timeout):
                await handshake
        except BaseException as exc:
            await run(kex.finish(False))
            error = await _handshake_error(driver, exc)
            await close_transport(driver.writer)
            if error is None:
                raise
            error.record = kex.record
            raise error from None
        if not verified:
            await run(kex.finish(False))
            await close_transport(driver.writer)
            raise HandshakeError("peer identity was not verified", outcome=Outcome.UNVERIFIED)
        try:
            layer, leftover = conn.hand_over()
        except TLSError as exc:
            await run(kex.finish(False))
            await close_transport(driver.writer)
            raise HandshakeError(f"handshake did not end cleanly: {exc}", remote=True) from None
        await run(kex.finish(True))
        app_protocol = conn.session.appProto if conn.session else None
        stream = TlsStream(
            driver,
            layer,
            kex.record,
            verified[0],
            time.perf_counter() - started,
            str(conn.getCipherName() or ""),
            bytes(app_protocol).decode("ascii", "replace") if app_protocol else None,
        )
        leftover += driver.sock.inbound
        driver.sock.inbound.clear()
        if leftover:
            stream._backlog = layer.receive(leftover, time.monotonic())
        return stream


async def close_transport(writer: asyncio.StreamWriter) -> None:
    """Close an asyncio stream and wait (bounded) until its socket is released."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except TimeoutError:
        # A peer that stops reading must not keep the socket (and its descriptor) alive.
        writer.transport.abort()
    except Exception:  # noqa: S110 - the transport is being closed anyway
        pass


async def _handshake_error(driver: _Driver, exc: BaseException) -> HandshakeError | None:
    """Map whatever ended a handshake to a HandshakeError (None: let it propagate)."""
    if isinstance(exc, HandshakeRejectedError):
        with contextlib.suppress(ConnectionError):
            await driver.send_raw(plaintext_alert(exc.alert))
        return HandshakeError(exc.reason, int(exc.alert), key_source=exc.key_source)
    if isinstance(exc, TLSLocalAlert):
        return HandshakeError(exc.message or str(exc), exc.description)
    if isinstance(exc, TLSRemoteAlert):
        return HandshakeError(f"peer sent alert {exc}", exc.description, remote=True)
    if isinstance(exc, TimeoutError):
        return HandshakeError("handshake timed out", outcome=Outcome.TIMEOUT)
    if isinstance(exc, TLSAbruptCloseError | ConnectionError):
        return HandshakeError(
            "peer closed the connection during the handshake",
            remote=True,
            outcome=Outcome.PEER_CLOSED,
        )
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
        return None
    if isinstance(exc, Exception):
        # Our bug, or tlslite's on input it does not expect (a KeyError on an unknown
        # certificate OID): either way not the peer's fault. It ends this connection only.
        log.error("internal error in a handshake", exc_info=exc)
        with contextlib.suppress(ConnectionError):
            await driver.send_raw(plaintext_alert(Alert.INTERNAL_ERROR))
        return HandshakeError(
            f"handshake failed: internal error ({type(exc).__name__})",
            Alert.INTERNAL_ERROR,
            outcome=Outcome.INTERNAL,
        )
    return None
