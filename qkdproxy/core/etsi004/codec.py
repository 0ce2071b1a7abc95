"""The ETSI GS QKD 004 binary wire format, without I/O: bytes in, frozen messages out.

The standard defines no wire protocol. This is the binding of the ETSI forge reference (also
spoken by the QUBIP client the QKD-KEM reference uses), carried over mutual TLS 1.3:

    header  = version (3 bytes: 1, 0, 1) || service type (1 byte) || payload length (uint32)
    QoS     = 7 x uint32 (chunk size, max bps, min bps, jitter, priority, timeout ms, TTL s)
              || metadata mimetype (256 bytes, ASCII, NUL-padded)

All integers are big-endian. Decoding is strict: every field is bounds-checked and anything
unexpected (unknown version, service type or status, truncation, oversized payload, a string
without its NUL, trailing bytes) raises :class:`CodecError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

VERSION = bytes((1, 0, 1))
HEADER_SIZE = 8
KSID_SIZE = 16
ZERO_KSID = bytes(KSID_SIZE)
MIMETYPE_SIZE = 256
QOS_SIZE = 7 * 4 + MIMETYPE_SIZE
MAX_PAYLOAD = 64 * 1024
DEFAULT_PORT = 25575
JSON_MIMETYPE = "application/json"
UINT32_MAX = 2**32 - 1

_HEADER = struct.Struct(">3sBI")
_U32 = struct.Struct(">I")
_QOS_INTS = struct.Struct(">7I")


class CodecError(ValueError):
    """Bytes that are not a well-formed ETSI 004 frame; the message says what is wrong."""


class ServiceType(IntEnum):
    """The header's service type byte."""

    ERROR = 0x00
    OPEN_CONNECT_REQUEST = 0x02
    OPEN_CONNECT_RESPONSE = 0x03
    GET_KEY_REQUEST = 0x04
    GET_KEY_RESPONSE = 0x05
    CLOSE_REQUEST = 0x08
    CLOSE_RESPONSE = 0x09
    CLOSE_SERVER = 0xFF


class Status(IntEnum):
    """ETSI GS QKD 004 V2.1.1 status codes."""

    SUCCESS = 0
    PEER_NOT_CONNECTED = 1  # OPEN_CONNECT succeeded, the peer application has not opened yet
    INSUFFICIENT_KEY = 2
    PEER_APP_NOT_CONNECTED = 3  # GET_KEY: the peer application is not connected
    NO_QKD_CONNECTION = 4
    KSID_IN_USE = 5
    TIMEOUT = 6
    QOS_NOT_MET = 7  # the response QoS carries the KME's counter-proposal
    METADATA_TOO_SMALL = 8  # the response's metadata length carries the size needed


def _check_u32(value: int, what: str) -> None:
    if not 0 <= value <= UINT32_MAX:
        raise CodecError(f"{what} must fit in a uint32, got {value}")


def _check_ksid(ksid: bytes) -> None:
    if len(ksid) != KSID_SIZE:
        raise CodecError(f"KSID must be {KSID_SIZE} bytes, got {len(ksid)}")


def _check_name(name: str, what: str) -> None:
    if "\0" in name:
        raise CodecError(f"{what} must not contain NUL")


@dataclass(frozen=True, slots=True)
class QoS:
    """The QoS structure of OPEN_CONNECT (sizes in bytes, times in ms or s as named)."""

    key_chunk_size: int
    max_bps: int = 0
    min_bps: int = 0
    jitter: int = 0
    priority: int = 0
    timeout_ms: int = 0
    ttl_s: int = 0
    metadata_mimetype: str = JSON_MIMETYPE

    def __post_init__(self) -> None:
        for name in ("key_chunk_size", "max_bps", "min_bps", "jitter", "priority"):
            _check_u32(getattr(self, name), name)
        _check_u32(self.timeout_ms, "timeout_ms")
        _check_u32(self.ttl_s, "ttl_s")
        mimetype = self.metadata_mimetype
        # One byte of the fixed field is kept for the terminating NUL.
        if not mimetype.isascii() or "\0" in mimetype or len(mimetype) >= MIMETYPE_SIZE:
            raise CodecError(f"metadata mimetype must be ASCII, below {MIMETYPE_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class OpenConnectRequest:
    """OPEN_CONNECT: ``source`` and ``destination`` application ids, QoS, KSID (0 = new)."""

    SERVICE: ClassVar[ServiceType] = ServiceType.OPEN_CONNECT_REQUEST
    source: str
    destination: str
    qos: QoS
    ksid: bytes = ZERO_KSID

    def __post_init__(self) -> None:
        _check_name(self.source, "source")
        _check_name(self.destination, "destination")
        _check_ksid(self.ksid)


@dataclass(frozen=True, slots=True)
class OpenConnectResponse:
    """OPEN_CONNECT answer: status, the accepted (or counter-proposed) QoS, the KSID."""

    SERVICE: ClassVar[ServiceType] = ServiceType.OPEN_CONNECT_RESPONSE
    status: Status
    qos: QoS
    ksid: bytes

    def __post_init__(self) -> None:
        _check_ksid(self.ksid)


@dataclass(frozen=True, slots=True)
class GetKeyRequest:
    """GET_KEY: the chunk at ``index``; ``metadata_size`` is the caller's metadata buffer."""

    SERVICE: ClassVar[ServiceType] = ServiceType.GET_KEY_REQUEST
    ksid: bytes
    index: int
    metadata_size: int

    def __post_init__(self) -> None:
        _check_ksid(self.ksid)
        _check_u32(self.index, "index")
        _check_u32(self.metadata_size, "metadata_size")


@dataclass(frozen=True, slots=True)
class GetKeyResponse:
    """GET_KEY answer. With status 8 the metadata length field carries ``metadata_needed``
    and no metadata bytes follow; otherwise ``metadata_needed`` is 0.
    """

    SERVICE: ClassVar[ServiceType] = ServiceType.GET_KEY_RESPONSE
    status: Status
    index: int
    key: bytes = field(default=b"", repr=False)  # key bytes must never reach a log line
    metadata: bytes = b""
    metadata_needed: int = 0

    def __post_init__(self) -> None:
        _check_u32(self.index, "index")
        _check_u32(self.metadata_needed, "metadata_needed")
        too_small = self.status == Status.METADATA_TOO_SMALL
        if too_small != (self.metadata_needed > 0) or (too_small and self.metadata):
            raise CodecError("metadata_needed goes with status 8 only, and without metadata")


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """CLOSE: the caller leaves the key stream."""

    SERVICE: ClassVar[ServiceType] = ServiceType.CLOSE_REQUEST
    ksid: bytes

    def __post_init__(self) -> None:
        _check_ksid(self.ksid)


@dataclass(frozen=True, slots=True)
class CloseResponse:
    """CLOSE answer."""

    SERVICE: ClassVar[ServiceType] = ServiceType.CLOSE_RESPONSE
    status: Status


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """Service type 0x00 with an empty payload: the request could not be understood."""

    SERVICE: ClassVar[ServiceType] = ServiceType.ERROR


@dataclass(frozen=True, slots=True)
class CloseServer:
    """Service type 0xFF with an empty payload: the sender ends the session."""

    SERVICE: ClassVar[ServiceType] = ServiceType.CLOSE_SERVER


Message = (
    OpenConnectRequest
    | OpenConnectResponse
    | GetKeyRequest
    | GetKeyResponse
    | CloseRequest
    | CloseResponse
    | ErrorFrame
    | CloseServer
)
Request = OpenConnectRequest | GetKeyRequest | CloseRequest

# ------------------------------------------------------------------------------ encoding


def _u32(value: int) -> bytes:
    return _U32.pack(value)


def _qos(qos: QoS) -> bytes:
    ints = _QOS_INTS.pack(
        qos.key_chunk_size,
        qos.max_bps,
        qos.min_bps,
        qos.jitter,
        qos.priority,
        qos.timeout_ms,
        qos.ttl_s,
    )
    return ints + qos.metadata_mimetype.encode("ascii").ljust(MIMETYPE_SIZE, b"\0")


def _payload(message: Message) -> bytes:
    match message:
        case OpenConnectRequest():
            names = message.source.encode() + b"\0" + message.destination.encode() + b"\0"
            return names + _qos(message.qos) + message.ksid
        case OpenConnectResponse():
            return _u32(message.status) + _qos(message.qos) + message.ksid
        case GetKeyRequest():
            return message.ksid + _u32(message.index) + _u32(message.metadata_size)
        case GetKeyResponse():
            metadata_length = message.metadata_needed or len(message.metadata)
            return (
                _u32(message.status)
                + _u32(message.index)
                + _u32(len(message.key))
                + message.key
                + _u32(metadata_length)
                + message.metadata
            )
        case CloseRequest():
            return message.ksid
        case CloseResponse():
            return _u32(message.status)
        case ErrorFrame() | CloseServer():
            return b""


def encode(message: Message) -> bytes:
    """The complete frame (header and payload) for ``message``."""
    payload = _payload(message)
    _check_u32(len(payload), "payload length")
    return _HEADER.pack(VERSION, message.SERVICE, len(payload)) + payload


# ------------------------------------------------------------------------------ decoding


class _Reader:
    """Pulls fields off one payload; every pull is bounds-checked."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def take(self, size: int, what: str) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise CodecError(f"payload truncated in {what}")
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.take(4, what))[0]
        return value

    def status(self) -> Status:
        value = self.u32("status")
        try:
            return Status(value)
        except ValueError:
            raise CodecError(f"unknown status {value}") from None

    def cstring(self, what: str) -> str:
        end = self._data.find(b"\0", self._offset)
        if end < 0:
            raise CodecError(f"{what} is not NUL-terminated")
        raw = self.take(end - self._offset, what)
        self._offset += 1
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise CodecError(f"{what} is not UTF-8") from None

    def qos(self) -> QoS:
        chunk, max_bps, min_bps, jitter, priority, timeout_ms, ttl_s = _QOS_INTS.unpack(
            self.take(_QOS_INTS.size, "QoS")
        )
        raw = self.take(MIMETYPE_SIZE, "metadata mimetype")
        text, nul, padding = raw.partition(b"\0")
        # Strict: the fixed field must be terminated and NUL-padded, so decoding is canonical.
        if not nul or padding.strip(b"\0"):
            raise CodecError("metadata mimetype must be NUL-terminated and NUL-padded")
        try:
            mimetype = text.decode("ascii")
        except UnicodeDecodeError:
            raise CodecError("metadata mimetype is not ASCII") from None
        return QoS(chunk, max_bps, min_bps, jitter, priority, timeout_ms, ttl_s, mimetype)

    def ksid(self) -> bytes:
        return self.take(KSID_SIZE, "KSID")

    def end(self) -> None:
        if self._offset != len(self._data):
            raise CodecError(f"{len(self._data) - self._offset} trailing bytes in payload")


def _parse_payload(service: ServiceType, payload: bytes) -> Message:
    reader = _Reader(payload)
    message: Message
    match service:
        case ServiceType.OPEN_CONNECT_REQUEST:
            source, destination = reader.cstring("source"), reader.cstring("destination")
            message = OpenConnectRequest(source, destination, reader.qos(), reader.ksid())
        case ServiceType.OPEN_CONNECT_RESPONSE:
            message = OpenConnectResponse(reader.status(), reader.qos(), reader.ksid())
        case ServiceType.GET_KEY_REQUEST:
            message = GetKeyRequest(reader.ksid(), reader.u32("index"), reader.u32("metadata"))
        case ServiceType.GET_KEY_RESPONSE:
            status, index = reader.status(), reader.u32("index")
            key = reader.take(reader.u32("key length"), "key")
            metadata_length = reader.u32("metadata length")
            if status is Status.METADATA_TOO_SMALL:
                if metadata_length == 0:
                    raise CodecError("status 8 without the metadata size needed")
                message = GetKeyResponse(status, index, key, metadata_needed=metadata_length)
            else:
                metadata = reader.take(metadata_length, "metadata")
                message = GetKeyResponse(status, index, key, metadata)
        case ServiceType.CLOSE_REQUEST:
            message = CloseRequest(reader.ksid())
        case ServiceType.CLOSE_RESPONSE:
            message = CloseResponse(reader.status())
        case ServiceType.ERROR:
            message = ErrorFrame()
        case ServiceType.CLOSE_SERVER:
            message = CloseServer()
    reader.end()
    return message


_SERVICE_VALUES = frozenset(int(service) for service in ServiceType)


def _parse_header(header: bytes, max_payload: int) -> tuple[ServiceType, int]:
    version, service, length = _HEADER.unpack(header)
    if version != VERSION:
        raise CodecError(f"unsupported protocol version {tuple(version)}")
    try:
        service_type = ServiceType(service)
    except ValueError:
        raise CodecError(f"unknown service type 0x{service:02x}") from None
    if length > max_payload:
        raise CodecError(f"payload of {length} bytes exceeds the limit of {max_payload}")
    return service_type, length


class FrameDecoder:
    """Reassembles frames from arbitrary chunks: :meth:`feed` bytes, then pull messages
    with :meth:`next_message` until it returns ``None``.

    A bad frame raises :class:`CodecError`, and so does every later call: the stream cannot
    be resynchronised, so the connection has to end. A wrong version or service type is
    reported as soon as its byte arrives and an oversized length as soon as the header is
    complete, without waiting for (or buffering) the payload.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._buffer = bytearray()
        self._error: CodecError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not form a complete frame yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._error is not None:
            raise self._error
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except CodecError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    def _next(self) -> Message | None:
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            seen = min(len(buffer), len(VERSION))
            if buffer[:seen] != VERSION[:seen]:
                raise CodecError(f"unsupported protocol version {tuple(buffer[:seen])}")
            if len(buffer) > len(VERSION) and buffer[len(VERSION)] not in _SERVICE_VALUES:
                raise CodecError(f"unknown service type 0x{buffer[len(VERSION)]:02x}")
            return None
        service, length = _parse_header(bytes(buffer[:HEADER_SIZE]), self._max_payload)
        if len(buffer) < HEADER_SIZE + length:
            return None
        payload = bytes(buffer[HEADER_SIZE : HEADER_SIZE + length])
        del buffer[: HEADER_SIZE + length]
        return _parse_payload(service, payload)


def decode(data: bytes, max_payload: int = MAX_PAYLOAD) -> Message:
    """Exactly one complete frame to its message."""
    decoder = FrameDecoder(max_payload)
    decoder.feed(data)
    message = decoder.next_message()
    if message is None:
        raise CodecError(f"frame truncated: {len(data)} bytes")
    if decoder.buffered:
        raise CodecError(f"{decoder.buffered} trailing bytes after the frame")
    return message
