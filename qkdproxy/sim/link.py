"""A simulated QKD link between two KMEs, without I/O: time comes in, key bytes go out.

Secret key material accumulates at ``rate_bps`` into a bounded pool shared by both ends (both
KMEs see the same stream). Material that waits longer than ``key_ttl_s`` expires. ETSI 014
keys handed to a master wait for its slave; ETSI 004 streams allocate chunks by index. Every
key leaves the simulator once per end, never more.
"""

from __future__ import annotations

import math
import os
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK_BYTES = 32


class LinkError(Exception):
    """Base of the link model's refusals."""


class PoolExhaustedError(LinkError):
    """Not enough key material in the pool."""


class KeyUnknownError(LinkError):
    """Unknown, already delivered or expired key id."""


class KsidInUseError(LinkError):
    """ETSI 004 status 5: the application already opened this key stream."""


class KeyNotForCallerError(LinkError):
    """The caller was not named as a slave SAE when the key was made (ETSI 014: 401)."""


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Link behaviour; the defaults give a comfortable development link."""

    rate_bps: float = 1_000_000.0
    pool_bits: int = 256 * 100_000
    key_ttl_s: float = 600.0
    start_full: bool = True

    def __post_init__(self) -> None:
        if self.rate_bps < 0 or self.pool_bits < 0 or self.key_ttl_s <= 0:
            raise ValueError("rate_bps and pool_bits must be >= 0 and key_ttl_s > 0")


@dataclass(slots=True)
class LinkCounters:
    """What happened to the material (bytes) and to keys (counts)."""

    generated_bytes: int = 0
    delivered_bytes: int = 0
    expired_pool_bytes: int = 0
    expired_keys: int = 0
    exhausted: int = 0


@dataclass(slots=True)
class PendingKey:
    """An ETSI 014 key the master received, waiting for one of its slaves."""

    material: bytes = field(repr=False)
    master_sae: str
    slave_saes: frozenset[str]
    created: float


@dataclass(slots=True)
class StreamState:
    """An ETSI 004 key stream between two applications."""

    chunk_size: int
    ttl_s: float
    members: set[str] = field(default_factory=set)
    closed: set[str] = field(default_factory=set)
    chunks: dict[int, bytes] = field(default_factory=dict, repr=False)
    delivered: set[tuple[str, int]] = field(default_factory=set)
    last_used: float = 0.0


class QkdLinkModel:
    """The shared state of a simulated KME pair. Call with the current time (seconds)."""

    def __init__(
        self,
        settings: LinkSettings,
        now: float,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.settings = settings
        self.counters = LinkCounters()
        self.link_up = True
        self._random = random_bytes
        self._pool: deque[tuple[float, bytes]] = deque()
        self._last_generation = now
        self._pending: dict[bytes, PendingKey] = {}
        self._streams: dict[bytes, StreamState] = {}
        if settings.start_full:
            self._add_chunks(self.capacity_chunks, now)

    @property
    def capacity_chunks(self) -> int:
        """How many 32-byte chunks the pool holds at most."""
        return self.settings.pool_bits // (CHUNK_BYTES * 8)

    # ------------------------------------------------------------------ pool

    def stored_bits(self, now: float) -> int:
        """Key material available right now, in bits."""
        self._advance(now)
        return len(self._pool) * CHUNK_BYTES * 8

    def draw(self, nbytes: int, now: float) -> bytes:
        """Take ``nbytes`` of fresh material (whole chunks; the rest of a chunk is dropped)."""
        self._advance(now)
        needed = math.ceil(nbytes / CHUNK_BYTES)
        if needed > len(self._pool):
            self.counters.exhausted += 1
            raise PoolExhaustedError(f"pool holds {len(self._pool) * CHUNK_BYTES} bytes")
        material = b"".join(self._pool.popleft()[1] for _ in range(needed))[:nbytes]
        self.counters.delivered_bytes += nbytes
        return material

    def exhaust(self, now: float) -> None:
        """Drop everything in the pool, including what accrued until ``now`` (fault injection)."""
        self._advance(now)
        self._pool.clear()
        self._last_generation = now

    def _advance(self, now: float) -> None:
        # Expire first: stale material must not make the pool look full to the generator.
        horizon = now - self.settings.key_ttl_s
        while self._pool and self._pool[0][0] < horizon:
            self._pool.popleft()
            self.counters.expired_pool_bytes += CHUNK_BYTES
        # Keys are inserted in time order, so the expired ones are at the front.
        while self._pending:
            key_id, oldest = next(iter(self._pending.items()))
            if oldest.created >= horizon:
                break
            del self._pending[key_id]
            self.counters.expired_keys += 1
        if self.link_up and self.settings.rate_bps > 0:
            per_chunk = CHUNK_BYTES * 8 / self.settings.rate_bps
            due = int((now - self._last_generation) / per_chunk)
            if due > 0:
                self._last_generation += due * per_chunk
                self._add_chunks(min(due, self.capacity_chunks - len(self._pool)), now)
        else:
            self._last_generation = now
        if len(self._pool) >= self.capacity_chunks:
            # A full pool wastes what the link produces meanwhile; no credit accumulates.
            self._last_generation = now

    def _add_chunks(self, count: int, now: float) -> None:
        if count <= 0:
            return
        material = self._random(count * CHUNK_BYTES)
        for i in range(count):
            self._pool.append((now, material[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]))
        self.counters.generated_bytes += count * CHUNK_BYTES

    # -------------------------------------------------------------- ETSI 014

    def make_keys(
        self, master_sae: str, slave_saes: frozenset[str], number: int, size_bits: int, now: float
    ) -> list[tuple[bytes, bytes]]:
        """enc_keys: ``number`` keys of ``size_bits`` as (key id, key); all or nothing."""
        nbytes = size_bits // 8
        if number * math.ceil(nbytes / CHUNK_BYTES) > len(self._pool_after(now)):
            self.counters.exhausted += 1
            raise PoolExhaustedError("not enough key material for the request")
        keys = []
        for _ in range(number):
            key_id, material = uuid.uuid4().bytes, self.draw(nbytes, now)
            self._pending[key_id] = PendingKey(material, master_sae, slave_saes, now)
            keys.append((key_id, material))
        return keys

    def take_keys(
        self, caller_sae: str, master_sae: str, key_ids: list[bytes], now: float
    ) -> list[bytes]:
        """dec_keys: every key or none; each id at most once, only by a named slave."""
        materials = self.read_keys(caller_sae, master_sae, key_ids, now)
        for key_id in key_ids:
            del self._pending[key_id]
        return materials

    def read_keys(
        self, caller_sae: str, master_sae: str, key_ids: list[bytes], now: float
    ) -> list[bytes]:
        """:meth:`take_keys` without using the keys up (the ``reusable-keys`` quirk)."""
        self._advance(now)
        if len(set(key_ids)) != len(key_ids):
            raise KeyUnknownError("a key id is listed twice")
        pending = [self._pending.get(key_id) for key_id in key_ids]
        if any(p is None or p.master_sae != master_sae for p in pending):
            raise KeyUnknownError("one or more keys specified are not found on KME")
        if any(caller_sae not in p.slave_saes for p in pending if p is not None):
            raise KeyNotForCallerError("caller is not a slave SAE of these keys")
        return [p.material for p in pending if p is not None]

    def _pool_after(self, now: float) -> deque[tuple[float, bytes]]:
        self._advance(now)
        return self._pool

    @property
    def pending_keys(self) -> int:
        """ETSI 014 keys waiting for their slave."""
        return len(self._pending)

    # -------------------------------------------------------------- ETSI 004

    def stream(self, ksid: bytes, now: float | None = None) -> StreamState | None:
        """The stream with this KSID, if open (and, given ``now``, not expired)."""
        if now is not None:
            self._expire_streams(now)
        return self._streams.get(bytes(ksid))

    def open_stream(
        self, ksid: bytes, app: str, chunk_size: int, ttl_s: float, now: float
    ) -> StreamState:
        """Join (or create) the stream; raises LinkError if ``app`` already opened it."""
        self._expire_streams(now)
        stream = self._streams.get(ksid)
        if stream is None:
            stream = self._streams[ksid] = StreamState(chunk_size, ttl_s, last_used=now)
        if app in stream.members:
            raise KsidInUseError("KSID already in use by this application")
        stream.members.add(app)
        stream.last_used = now
        return stream

    def stream_key(self, ksid: bytes, app: str, index: int, now: float) -> bytes:
        """The chunk at ``index`` for ``app``: allocated once, delivered once per end."""
        self._expire_streams(now)
        stream = self._streams.get(bytes(ksid))
        if stream is None:
            raise KeyUnknownError("no such key stream (never opened, closed or expired)")
        stream.last_used = now
        if (app, index) in stream.delivered:
            raise KeyUnknownError(f"key {index} of this stream was already delivered")
        chunk = stream.chunks.get(index)
        if chunk is None:
            if stream.closed:
                raise KeyUnknownError("stream closed: no new key is allocated")
            chunk = stream.chunks[index] = self.draw(stream.chunk_size, now)
        stream.delivered.add((app, index))
        if len(stream.members) > 1 and all((m, index) in stream.delivered for m in stream.members):
            del stream.chunks[index]
        return chunk

    def close_stream(self, ksid: bytes, app: str) -> None:
        """``app`` leaves; the stream and its unused key go once every member has left."""
        stream = self._streams.get(ksid)
        if stream is None:
            return
        stream.closed.add(app)
        if stream.closed >= stream.members:
            del self._streams[ksid]

    def _expire_streams(self, now: float) -> None:
        for ksid in [k for k, s in self._streams.items() if now - s.last_used > s.ttl_s]:
            del self._streams[ksid]
