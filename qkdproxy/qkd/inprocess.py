"""An in-process QKD link: two ends drawing on one key pool, for tests, demos and benchmarks.

It keeps the guarantees a real KME pair gives: every key is delivered once at each end, a
slave only gets keys its peer's master took, ETSI 004 streams need both ends connected, and
nothing new is allocated on a stream after CLOSE.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

from qkdproxy.qkd.keys import (
    KEY_ID_SIZE,
    KEY_SIZE,
    KeyExhaustedError,
    KeyNotFoundError,
    PeerNotConnectedError,
    QkdKey,
    QkdKeyError,
)
from qkdproxy.qkd.sources import KeySources


class KsidInUseError(QkdKeyError):
    """ETSI 004 status 5: this application already opened the stream."""


@dataclass(slots=True)
class _Stream:
    members: set[str] = field(default_factory=set)
    closed: set[str] = field(default_factory=set)
    chunks: dict[int, bytes] = field(default_factory=dict, repr=False)
    delivered: set[tuple[str, int]] = field(default_factory=set)


class InProcessQkdLink:
    """Two ends, ``"a"`` and ``"b"``, sharing one pool of at most ``capacity`` keys."""

    ENDS = ("a", "b")

    def __init__(self, capacity: int | None = None) -> None:
        self._remaining = capacity
        self._waiting: dict[tuple[str, bytes], bytes] = {}
        self._streams: dict[bytes, _Stream] = {}

    def sources(self, end: str) -> KeySources:
        """The master, slave and stream sources of one end."""
        if end not in self.ENDS:
            raise ValueError(f"end must be one of {self.ENDS}")
        return KeySources(
            master=_Master(self, end), slave=_Slave(self, end), stream=_StreamSource(self, end)
        )

    @property
    def keys_in_flight(self) -> int:
        """Keys a master took that the other end has not fetched yet."""
        return len(self._waiting)

    def _draw(self) -> bytes:
        if self._remaining is not None:
            if self._remaining <= 0:
                raise KeyExhaustedError("the QKD link has no key left")
            self._remaining -= 1
        return os.urandom(KEY_SIZE)

    @staticmethod
    def _peer(end: str) -> str:
        return "b" if end == "a" else "a"


@dataclass(frozen=True, slots=True)
class _Master:
    link: InProcessQkdLink
    end: str

    async def take_key(self) -> QkdKey:
        key = QkdKey(uuid.uuid4().bytes, self.link._draw())
        self.link._waiting[(InProcessQkdLink._peer(self.end), key.key_id)] = key.material
        return key


@dataclass(frozen=True, slots=True)
class _Slave:
    link: InProcessQkdLink
    end: str

    async def get_key(self, key_id: bytes) -> QkdKey:
        material = self.link._waiting.pop((self.end, bytes(key_id)), None)
        if material is None:
            raise KeyNotFoundError("key id unknown, already used, or not for this end")
        return QkdKey(bytes(key_id), material)


@dataclass(frozen=True, slots=True)
class _StreamSource:
    link: InProcessQkdLink
    end: str

    async def open(self, ksid: bytes | None) -> bytes:
        if ksid is None or ksid == bytes(KEY_ID_SIZE):
            ksid = uuid.uuid4().bytes
        if len(ksid) != KEY_ID_SIZE:
            raise ValueError("KSID must be 16 bytes")
        stream = self.link._streams.setdefault(bytes(ksid), _Stream())
        if self.end in stream.members:
            raise KsidInUseError("KSID already opened by this application")
        stream.members.add(self.end)
        return bytes(ksid)

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        stream = self._open_stream(ksid)
        if InProcessQkdLink._peer(self.end) not in stream.members:
            raise PeerNotConnectedError("peer application has not opened this key stream")
        if (self.end, index) in stream.delivered:
            raise KeyNotFoundError(f"key {index} of this stream was already delivered")
        chunk = stream.chunks.get(index)
        if chunk is None:
            if stream.closed:
                raise KeyNotFoundError("stream closed: no new key is allocated")
            chunk = stream.chunks[index] = self.link._draw()
        stream.delivered.add((self.end, index))
        if (InProcessQkdLink._peer(self.end), index) in stream.delivered:
            del stream.chunks[index]
        return chunk

    async def close(self, ksid: bytes) -> None:
        stream = self._open_stream(ksid)
        stream.closed.add(self.end)
        if stream.closed >= stream.members:
            del self.link._streams[bytes(ksid)]

    def _open_stream(self, ksid: bytes) -> _Stream:
        stream = self.link._streams.get(bytes(ksid))
        if stream is None or self.end not in stream.members or self.end in stream.closed:
            raise KeyNotFoundError("key stream not open at this end")
        return stream
