"""Sans-I/O TLS 1.3 wire pieces: constants, plaintext alerts, and the hello gate.

The hello gate holds inbound bytes back until each expected hello message is complete, so
the driver can fetch QKD keys before tlslite (which never yields between reading a hello and
answering it) sees the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

RECORD_HEADER_SIZE = 5  # content type (1), legacy version (2), length (2)
MAX_PLAINTEXT_RECORD = 2**14
# The largest handshake message an engine takes (the native engine's limit; a hello with
# every ML-KEM-1024 hybrid share is under 10 KiB). The gate holds no longer hello, so none
# gets as far as the key exchange (and its KME calls) only to be refused by the engine.
MAX_HELLO_SIZE = 2**16
# TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256
TLS13_CIPHER_SUITES = frozenset({0x1301, 0x1302, 0x1303})
# Bytes the gate may hold for one hello: the message plus generous record overhead.
MAX_HELD_BYTES = 2 * MAX_HELLO_SIZE


class ContentType(IntEnum):
    """TLS record content types (RFC 8446 5.1)."""

    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class HandshakeType(IntEnum):
    """The handshake message types the gate looks for."""

    CLIENT_HELLO = 1
    SERVER_HELLO = 2


class Alert(IntEnum):
    """Every TLS 1.3 alert description (RFC 8446 6, RFC 7301): metrics label them by name."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    MISSING_EXTENSION = 109
    UNSUPPORTED_EXTENSION = 110
    UNRECOGNIZED_NAME = 112
    BAD_CERTIFICATE_STATUS_RESPONSE = 113
    UNKNOWN_PSK_IDENTITY = 115
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120


def alert_name(description: int) -> str:
    """The RFC name of an alert description (its number if unknown): "bad_record_mac"."""
    try:
        return Alert(description).name.lower()
    except ValueError:
        return str(description)


def plaintext_alert(description: Alert) -> bytes:
    """A fatal alert record for the unencrypted part of the handshake."""
    return bytes([ContentType.ALERT, 3, 3, 0, 2, 2, int(description)])


@dataclass(frozen=True, slots=True)
class Release:
    """Bytes the TLS engine may see now."""

    data: bytes


@dataclass(frozen=True, slots=True)
class HeldHello:
    """A complete hello message, and the records carrying it, held until it is processed."""

    message: bytes
    records: bytes

    @property
    def msg_type(self) -> int:
        """The handshake message type."""
        return self.message[0]

    @property
    def body(self) -> bytes:
        """The message without its 4-byte handshake header."""
        return self.message[4:]


GateEvent = Release | HeldHello


class HelloGate:
    """Splits an inbound byte stream into releasable bytes and held hello messages.

    It intercepts at most ``allowed`` hellos of type ``expect`` carried in plaintext handshake
    records; :meth:`allow_another` admits one more (after a HelloRetryRequest). Anything it
    does not understand, and everything after the hello stage, passes straight through so
    that tlslite answers it with the right alert.
    """

    def __init__(self, expect: HandshakeType) -> None:
        self._expect = expect
        self._allowed = 1
        self._passthrough = False
        self._pending = bytearray()
        self._held = bytearray()
        self._message = bytearray()

    @property
    def passthrough(self) -> bool:
        """True once the gate no longer intercepts anything."""
        return self._passthrough or (self._allowed == 0 and not self._held)

    def allow_another(self) -> None:
        """Intercept one more hello (the second ClientHello, or the ServerHello after HRR)."""
        if not self._passthrough:
            self._allowed += 1

    def feed(self, data: bytes) -> list[GateEvent]:
        """Take inbound bytes; return what may be released and the hellos to process, in order."""
        self._pending += data
        events: list[GateEvent] = []
        while not self.passthrough:
            record = self._next_record()
            if record is None:
                break
            events.extend(self._on_record(record))
        if self.passthrough and (self._pending or self._held):
            events.append(Release(bytes(self._held + self._pending)))
            self._held.clear()
            self._pending.clear()
        return events

    def _next_record(self) -> bytes | None:
        if len(self._pending) < RECORD_HEADER_SIZE:
            return None
        content_type = self._pending[0]
        length = int.from_bytes(self._pending[3:5], "big")
        # Empty handshake records are forbidden (RFC 8446 5.1); holding them would let a peer
        # make the gate buffer without bound.
        if (
            content_type not in (ContentType.HANDSHAKE, ContentType.CHANGE_CIPHER_SPEC)
            or length > MAX_PLAINTEXT_RECORD
            or length == 0
        ):
            self._stop()
            return None
        if len(self._pending) < RECORD_HEADER_SIZE + length:
            return None
        record = bytes(self._pending[: RECORD_HEADER_SIZE + length])
        del self._pending[: RECORD_HEADER_SIZE + length]
        return record

    def _on_record(self, record: bytes) -> list[GateEvent]:
        if record[0] == ContentType.CHANGE_CIPHER_SPEC:
            if not self._held:
                return [Release(record)]
            # A record between the fragments of a hello: not ours to judge, tlslite rejects it.
            self._held += record
            self._stop()
            return []
        self._held += record
        self._message += record[RECORD_HEADER_SIZE:]
        if len(self._held) > MAX_HELD_BYTES:
            self._stop()
            return []
        if len(self._message) < 4:
            return []
        msg_type = self._message[0]
        length = int.from_bytes(self._message[1:4], "big")
        if msg_type != self._expect or length > MAX_HELLO_SIZE:
            self._stop()
            return []
        if len(self._message) < 4 + length:
            return []
        hello = HeldHello(bytes(self._message[: 4 + length]), bytes(self._held))
        self._held.clear()
        self._message.clear()
        self._allowed -= 1
        return [hello]

    def _stop(self) -> None:
        self._passthrough = True
