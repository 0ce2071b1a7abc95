"""An in-process QKD link: two ends drawing on one key pool, for tests, demos and benchmarks.

It is the simulator's link model (:mod:`qkdproxy.sim.link`) called directly, without KMEs
or sockets, so it keeps the same guarantees: every key is delivered once at each end, a
slave only gets keys its peer's master took, ETSI 004 streams need both ends connected, and
nothing new is allocated on a stream after CLOSE.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from qkdproxy.core.keys import (
    KEY_ID_SIZE,
    KEY_SIZE,
    KeyExhaustedError,
    KeyNotFoundError,
    KsidInUseError,
    PeerNotConnectedError,
    QkdKey,
)
from qkdproxy.keys.sources import KeySources
from qkdproxy.sim import link as model

STREAM_TTL_S = 600.0
# A fast link with a small pool: refilled as it is drawn, never the bottleneck of a test.
UNLIMITED = model.LinkSettings(rate_bps=1e12, pool_bits=256 * 4096)


class InProcessQkdLink:
    """Two ends, ``"a"`` and ``"b"``; ``capacity`` keys in all, or an endless supply."""

    ENDS = ("a", "b")

    def __init__(
        self, capacity: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        settings = (
            UNLIMITED
            if capacity is None
            else model.LinkSettings(rate_bps=0, pool_bits=capacity * KEY_SIZE * 8)
        )
        self.clock = clock
        self.model = model.QkdLinkModel(settings, clock())

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
        return self.model.pending_keys

    @property
    def open_streams(self) -> int:
        """ETSI 004 streams not yet closed by every member."""
        return len(self.model._streams)

    @staticmethod
    def peer(end: str) -> str:
        """The other end's name."""
        return "b" if end == "a" else "a"


@dataclass(frozen=True, slots=True)
class _Master:
    link: InProcessQkdLink
    end: str

    async def take_key(self) -> QkdKey:
        peers = frozenset({InProcessQkdLink.peer(self.end)})
        try:
            [(key_id, material)] = self.link.model.make_keys(
                self.end, peers, 1, KEY_SIZE * 8, self.link.clock()
            )
        except model.PoolExhaustedError as exc:
            raise KeyExhaustedError(str(exc)) from None
        return QkdKey(key_id, material)


@dataclass(frozen=True, slots=True)
class _Slave:
    link: InProcessQkdLink
    end: str

    async def get_key(self, key_id: bytes) -> QkdKey:
        try:
            [material] = self.link.model.take_keys(
                self.end, InProcessQkdLink.peer(self.end), [bytes(key_id)], self.link.clock()
            )
        except model.LinkError:
            raise KeyNotFoundError("key id unknown, already used, or not for this end") from None
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
        try:
            self.link.model.open_stream(
                bytes(ksid), self.end, KEY_SIZE, STREAM_TTL_S, self.link.clock()
            )
        except model.KsidInUseError as exc:
            raise KsidInUseError(str(exc)) from None
        return bytes(ksid)

    async def get_key(self, ksid: bytes, index: int) -> bytes:
        self._member_of(ksid)
        stream = self.link.model.stream(ksid)
        if stream is None or InProcessQkdLink.peer(self.end) not in stream.members:
            raise PeerNotConnectedError("peer application has not opened this key stream")
        try:
            return self.link.model.stream_key(bytes(ksid), self.end, index, self.link.clock())
        except model.PoolExhaustedError as exc:
            raise KeyExhaustedError(str(exc)) from None
        except model.LinkError as exc:
            raise KeyNotFoundError(str(exc)) from None

    async def close(self, ksid: bytes) -> None:
        self._member_of(ksid)
        self.link.model.close_stream(bytes(ksid), self.end)

    def _member_of(self, ksid: bytes) -> None:
        stream = self.link.model.stream(bytes(ksid))
        if stream is None or self.end not in stream.members or self.end in stream.closed:
            raise KeyNotFoundError("key stream not open at this end")
