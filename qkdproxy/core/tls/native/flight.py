"""Records during a TLS 1.3 handshake (RFC 8446 5): plaintext hellos, protected flights,
the middlebox-compatibility change_cipher_spec, alerts, and handshake messages cut out of
records however the peer fragmented them.

Reading stops after each whole message, so the bytes that follow the peer's Finished stay
in :attr:`HandshakeRecords.inbound` for the record layer, untouched.
"""

from __future__ import annotations

from qkdproxy.core.errors import RemoteProtocolError
from qkdproxy.core.tls.codec import MessageError
from qkdproxy.core.tls.engine import RemoteAlertError
from qkdproxy.core.tls.record_layer import Direction
from qkdproxy.core.tls.records import HEADER, MAX_CIPHERTEXT, MAX_PLAINTEXT, open_record, seal_inner
from qkdproxy.core.tls.wire import MAX_HELLO_SIZE, Alert, ContentType, alert_name

# Bigger than any certificate chain we expect (a few KiB), far below what a 24-bit length
# lets a peer claim (16 MiB); the hello gate holds hellos up to the same size.
MAX_MESSAGE = MAX_HELLO_SIZE
CHANGE_CIPHER_SPEC = bytes([ContentType.CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1])
_RECORD_TYPES = frozenset(ContentType)
# Handshake messages travel in plaintext records before the keys, protected ones after.
_MESSAGE_RECORDS = frozenset({ContentType.HANDSHAKE, ContentType.APPLICATION_DATA})


class HandshakeRecords:
    """The record stream of one handshake, in both directions."""

    __slots__ = (
        "_ccs_seen",
        "_messages",
        "accepts",
        "ccs_allowed",
        "eof",
        "inbound",
        "out",
        "read",
        "write",
    )

    def __init__(self) -> None:
        self.inbound = bytearray()
        self.out = bytearray()
        # Keys of each direction once protected (None: plaintext).
        self.read: Direction | None = None
        self.write: Direction | None = None
        self._messages = bytearray()  # handshake bytes not yet a whole message
        # One dummy change_cipher_spec may arrive between the first hello and Finished.
        self.ccs_allowed = False
        self._ccs_seen = False
        self.eof = False
        # The message types the handshake's state takes next: any other is refused on its
        # 4-byte header, before its body (up to 64 KiB) is waited for.
        self.accepts: frozenset[int] = frozenset()

    # ------------------------------------------------------------------- reading

    def next_message(self) -> bytes | None:
        """The next whole handshake message (header included), or None until more bytes."""
        while True:
            message = self._whole_message()
            if message is not None:
                return message
            if not self._next_record():
                return None

    @property
    def at_record_boundary(self) -> bool:
        """No handshake bytes wait: the last message ended its record (required before a
        key change, RFC 8446 5.1)."""
        return not self._messages

    def _whole_message(self) -> bytes | None:
        buffer = self._messages
        if len(buffer) < 4:
            return None
        if buffer[0] not in self.accepts:
            raise MessageError(
                f"unexpected handshake message type {buffer[0]}", Alert.UNEXPECTED_MESSAGE
            )
        length = int.from_bytes(buffer[1:4], "big")
        if length > MAX_MESSAGE:
            raise MessageError(f"handshake message of {length} bytes", Alert.ILLEGAL_PARAMETER)
        end = 4 + length
        if len(buffer) < end:
            return None
        message = bytes(buffer[:end])
        del buffer[:end]
        return message

    def _next_record(self) -> bool:
        """Take one whole record from :attr:`inbound`; False if none is whole yet. A header
        that must be refused is refused at once, before the length it claims arrives."""
        data = self.inbound
        if len(data) < HEADER.size:
            return False
        kind, _version, length = HEADER.unpack_from(data, 0)
        protected = kind == ContentType.APPLICATION_DATA
        if protected != (self.read is not None) and kind in _MESSAGE_RECORDS:
            raise MessageError(
                f"{'protected' if protected else 'plaintext'} handshake record here",
                Alert.UNEXPECTED_MESSAGE,
            )
        if kind not in _RECORD_TYPES:
            raise MessageError(f"unknown record type {kind}", Alert.UNEXPECTED_MESSAGE)
        if length > (MAX_CIPHERTEXT if protected else MAX_PLAINTEXT):
            raise MessageError(f"record of {length} bytes", Alert.RECORD_OVERFLOW)
        # A change_cipher_spec record is one byte and a plaintext alert two (RFC 8446 5,
        # 6): any other length is refused now, not after the body it claims.
        if kind == ContentType.CHANGE_CIPHER_SPEC and length != 1:
            raise MessageError("unexpected change_cipher_spec", Alert.UNEXPECTED_MESSAGE)
        if kind == ContentType.ALERT and length != 2:
            raise MessageError("malformed alert")
        end = HEADER.size + length
        if len(data) < end:
            return False
        if protected:
            assert self.read is not None
            try:
                inner = open_record(self.read.keys, data)
            except RemoteProtocolError as exc:
                raise MessageError(str(exc), Alert(exc.alert)) from None
            assert inner is not None  # the record is whole
            del data[:end]
            self._content(inner.content_type, inner.content)
            return True
        content = bytes(data[HEADER.size : end])
        del data[:end]
        if kind == ContentType.CHANGE_CIPHER_SPEC:
            self._change_cipher_spec(content)
        elif kind == ContentType.ALERT:
            self._alert(content)
        else:
            self._content(kind, content)
        return True

    def _content(self, kind: int, content: bytes) -> None:
        if kind == ContentType.HANDSHAKE:
            if not content:
                raise MessageError("empty handshake record", Alert.UNEXPECTED_MESSAGE)
            self._messages += content
        elif kind == ContentType.ALERT:
            self._alert(content)
        else:
            raise MessageError(f"record type {kind} during the handshake", Alert.UNEXPECTED_MESSAGE)

    def _change_cipher_spec(self, content: bytes) -> None:
        # RFC 8446 5: dropped if it is the single byte 1, between the first hello and the
        # peer's Finished, and not between the fragments of a message.
        if content != b"\x01" or not self.ccs_allowed or self._ccs_seen or self._messages:
            raise MessageError("unexpected change_cipher_spec", Alert.UNEXPECTED_MESSAGE)
        self._ccs_seen = True

    @staticmethod
    def _alert(content: bytes) -> None:
        if len(content) != 2:
            raise MessageError("malformed alert")
        description = content[1]
        raise RemoteAlertError(description, f"peer sent alert {alert_name(description)}")

    # ------------------------------------------------------------------- writing

    def send_plain(self, message: bytes, version: int = 0x0303) -> None:
        """A message in plaintext handshake records (hellos)."""
        for start in range(0, len(message), MAX_PLAINTEXT):
            chunk = message[start : start + MAX_PLAINTEXT]
            self.out += HEADER.pack(ContentType.HANDSHAKE, version, len(chunk)) + chunk

    def send_change_cipher_spec(self) -> None:
        """The dummy change_cipher_spec of middlebox-compatibility mode (RFC 8446 D.4)."""
        self.out += CHANGE_CIPHER_SPEC

    def send_protected(self, messages: bytes) -> None:
        """Messages under the current write keys, as few records as fit."""
        assert self.write is not None
        keys = self.write.keys
        for start in range(0, len(messages), MAX_PLAINTEXT):
            self.out += seal_inner(
                keys, messages[start : start + MAX_PLAINTEXT], ContentType.HANDSHAKE
            )

    def send_alert(self, description: int) -> None:
        """A fatal alert, protected once we have write keys."""
        body = bytes([2, description])
        if self.write is None:
            self.out += HEADER.pack(ContentType.ALERT, 0x0303, 2) + body
        else:
            self.out += seal_inner(self.write.keys, body, ContentType.ALERT)

    def take_output(self) -> bytes:
        """Everything queued for the peer."""
        out = bytes(self.out)
        self.out.clear()
        return out
