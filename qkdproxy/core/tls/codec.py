"""Reading TLS's big-endian integers and length-prefixed vectors, refusing any overrun.

Shared by the hello gate's parsers (:mod:`qkdproxy.core.tls.hello`) and the native
engine's messages (:mod:`qkdproxy.core.tls.native.messages`).
"""

from __future__ import annotations

from qkdproxy.core.tls.wire import Alert


class MessageError(Exception):
    """A message that must end the handshake with ``alert``."""

    def __init__(self, reason: str, alert: Alert = Alert.DECODE_ERROR) -> None:
        super().__init__(reason)
        self.alert = alert


class Reader:
    """Reads big-endian integers and length-prefixed vectors, refusing any overrun."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def u8(self) -> int:
        return self._int(1)

    def u16(self) -> int:
        return self._int(2)

    def _int(self, size: int) -> int:
        pos = self._pos
        end = pos + size
        if end > len(self._data):
            raise MessageError("message truncated")
        self._pos = end
        return int.from_bytes(self._data[pos:end], "big")

    def take(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._data):
            raise MessageError("message truncated")
        self._pos = end
        return self._data[pos:end]

    def vector(self, length_size: int, minimum: int = 0) -> bytes:
        data = self.take(self._int(length_size))
        if len(data) < minimum:
            raise MessageError("vector shorter than its minimum")
        return data

    def done(self) -> bool:
        return self._pos == len(self._data)

    def expect_done(self, what: str) -> None:
        if not self.done():
            raise MessageError(f"trailing bytes after {what}")
