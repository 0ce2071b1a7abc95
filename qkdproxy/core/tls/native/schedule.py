"""The TLS 1.3 key schedule and transcript hash of one handshake (RFC 8446 4.4.1, 7.1).

No PSK: the early secret is the fixed extract of zeros. Everything runs on
:func:`hmac.digest` and :mod:`hashlib` (C), a few microseconds per derivation.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from qkdproxy.core.tls.native.messages import MESSAGE_HASH
from qkdproxy.core.tls.records import hkdf_expand_label


class Transcript:
    """The running hash of the handshake messages; bytes are kept until the suite (and so
    the hash) is known, then hashed as they come."""

    __slots__ = ("_hash", "_pending", "hash_name")

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._hash: hashlib._Hash | None = None
        self.hash_name = ""

    def choose(self, hash_name: str) -> None:
        """Fix the hash (at ServerHello) and hash what came before."""
        self.hash_name = hash_name
        self._hash = hashlib.new(hash_name)
        for data in self._pending:
            self._hash.update(data)
        self._pending.clear()

    def add(self, data: bytes) -> None:
        """Append one whole handshake message."""
        if self._hash is None:
            self._pending.append(data)
        else:
            self._hash.update(data)

    def digest(self) -> bytes:
        """The hash of everything so far."""
        assert self._hash is not None
        return self._hash.copy().digest()

    def restart_for_retry(self, hash_name: str) -> None:
        """After a HelloRetryRequest: the first ClientHello becomes a message_hash
        message (RFC 8446 4.4.1)."""
        first = hashlib.new(hash_name, b"".join(self._pending)).digest()
        self._pending.clear()
        self.choose(hash_name)
        self.add(bytes([MESSAGE_HASH, 0, 0, len(first)]) + first)


def _extract(salt: bytes, ikm: bytes, hash_name: str) -> bytes:
    return hmac.digest(salt, ikm, hash_name)


def derive_secret(secret: bytes, label: bytes, transcript_hash: bytes, hash_name: str) -> bytes:
    """Derive-Secret with a transcript hash already taken."""
    return hkdf_expand_label(secret, label, len(transcript_hash), hash_name, transcript_hash)


@functools.cache
def _without_psk(hash_name: str) -> tuple[int, bytes, bytes]:
    """(digest size, hash of nothing, the salt the handshake secret is extracted with):
    without a PSK every handshake's early secret is the same public constant, so the two
    HMACs that lead from it to that salt are done once per hash, not per handshake."""
    size = hashlib.new(hash_name).digest_size
    empty = hashlib.new(hash_name).digest()
    zeros = bytes(size)
    early = _extract(zeros, zeros, hash_name)
    return size, empty, derive_secret(early, b"derived", empty, hash_name)


class KeySchedule:
    """Handshake and main secrets of one handshake, derived as the transcript reaches them."""

    __slots__ = ("_empty", "_handshake", "hash_name", "main", "size")

    def __init__(self, hash_name: str, shared_secret: bytes) -> None:
        self.hash_name = hash_name
        self.size, self._empty, derived = _without_psk(hash_name)
        zeros = bytes(self.size)
        self._handshake = _extract(derived, shared_secret, hash_name)
        derived = derive_secret(self._handshake, b"derived", self._empty, hash_name)
        self.main = _extract(derived, zeros, hash_name)

    def handshake_secrets(self, hello_hash: bytes) -> tuple[bytes, bytes]:
        """(client, server) handshake traffic secrets from the hash of ClientHello..ServerHello."""
        return (
            derive_secret(self._handshake, b"c hs traffic", hello_hash, self.hash_name),
            derive_secret(self._handshake, b"s hs traffic", hello_hash, self.hash_name),
        )

    def application_secrets(self, finished_hash: bytes) -> tuple[bytes, bytes]:
        """(client, server) application traffic secrets from the hash of
        ClientHello..server Finished."""
        return (
            derive_secret(self.main, b"c ap traffic", finished_hash, self.hash_name),
            derive_secret(self.main, b"s ap traffic", finished_hash, self.hash_name),
        )

    def finished(self, traffic_secret: bytes, transcript_hash: bytes) -> bytes:
        """The verify_data a Finished sent under ``traffic_secret`` carries."""
        key = hkdf_expand_label(traffic_secret, b"finished", self.size, self.hash_name)
        return hmac.digest(key, transcript_hash, self.hash_name)

    def forget(self) -> None:
        """Drop the handshake secret once both traffic secrets are derived."""
        self._handshake = b""
