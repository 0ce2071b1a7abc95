"""Extended Key Update (draft-ietf-tls-extended-key-update): wire format, key schedule and
the per-connection state machine, without I/O.

A fresh key exchange inside an established TLS 1.3 connection, in the connection's own
group. On a QKD-KEM group each update therefore spends one fresh QKD key and one fresh PQ
secret, carried and checked exactly as in the handshake (:mod:`qkdproxy.core.tls.keyexchange`
does both: the initiator plays the KEM client, the responder the KEM server).

Implemented text: the working group's editor's copy of draft-ietf-tls-extended-key-update
(tlswg/tls-key-update, commit 00252c1f, the draft-11 structure): negotiation by a TLS flag
in ClientHello/EncryptedExtensions, one ExtendedKeyUpdate handshake message with subtypes
key_update_request / key_update_response / new_key_update, the main-secret chain with a
running transcript hash, crossing requests resolved by the key shares' order. The draft's
code points are still TBD; qkdproxy uses provisional private values (below), so only two
qkdproxy peers that both enable it negotiate it.

Deviation: the draft forbids the standard KeyUpdate once EKU is negotiated; qkdproxy keeps
accepting and sending it (the ``rekey_bytes`` budget), because both renew traffic keys and
nothing in a standard KeyUpdate can undo a fresh key exchange.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from qkdproxy.core.errors import RemoteProtocolError
from qkdproxy.core.tls.records import hkdf_expand_label
from qkdproxy.core.tls.wire import Alert

# Provisional code points (the draft's TBD1/TBD2), private to qkdproxy peers.
TLS_FLAGS_EXTENSION = 62  # draft-ietf-tls-tlsflags
EKU_FLAG = 10  # flag number inside tls_flags
EXTENDED_KEY_UPDATE = 40  # HandshakeType

KEY_UPDATE_REQUEST = 0
KEY_UPDATE_RESPONSE = 1
NEW_KEY_UPDATE = 2


def tls_flags_data(flag: int = EKU_FLAG) -> bytes:
    """The tls_flags extension body with one flag set (bit ``flag % 8`` of byte ``flag // 8``,
    least significant bit first, minimal length)."""
    flags = bytearray(flag // 8 + 1)
    flags[flag // 8] = 1 << (flag % 8)
    return bytes([len(flags)]) + bytes(flags)


def has_flag(data: bytes | None, flag: int = EKU_FLAG) -> bool:
    """True if a tls_flags extension body sets ``flag`` (a malformed body sets nothing)."""
    if not data or data[0] != len(data) - 1 or data[0] == 0:
        return False
    flags = data[1:]
    return flag // 8 < len(flags) and bool(flags[flag // 8] & (1 << (flag % 8)))


@dataclass(frozen=True, slots=True)
class EkuMessage:
    """One parsed ExtendedKeyUpdate: its subtype and, for request/response, the key share."""

    subtype: int
    group: int | None = None
    key_exchange: bytes = b""


def encode(subtype: int, group: int | None = None, key_exchange: bytes = b"") -> bytes:
    """The whole handshake message (type, uint24 length, body)."""
    body = bytes([subtype])
    if subtype != NEW_KEY_UPDATE:
        assert group is not None
        body += group.to_bytes(2, "big") + len(key_exchange).to_bytes(2, "big") + key_exchange
    return bytes([EXTENDED_KEY_UPDATE]) + len(body).to_bytes(3, "big") + body


def parse(body: bytes) -> EkuMessage:
    """Parse a message body; :class:`RemoteProtocolError` with the draft's alert if bad."""
    if not body:
        raise RemoteProtocolError("empty ExtendedKeyUpdate", Alert.DECODE_ERROR)
    subtype = body[0]
    if subtype == NEW_KEY_UPDATE:
        if len(body) != 1:
            raise RemoteProtocolError("malformed new_key_update", Alert.DECODE_ERROR)
        return EkuMessage(subtype)
    if subtype not in (KEY_UPDATE_REQUEST, KEY_UPDATE_RESPONSE):
        raise RemoteProtocolError(f"ExtendedKeyUpdate subtype {subtype}", Alert.UNEXPECTED_MESSAGE)
    if len(body) < 5:
        raise RemoteProtocolError("truncated ExtendedKeyUpdate", Alert.DECODE_ERROR)
    group = int.from_bytes(body[1:3], "big")
    length = int.from_bytes(body[3:5], "big")
    if length == 0 or len(body) != 5 + length:
        raise RemoteProtocolError("malformed ExtendedKeyUpdate key share", Alert.DECODE_ERROR)
    return EkuMessage(subtype, group, bytes(body[5:]))


@dataclass(slots=True)
class KeySchedule:
    """The chain the draft keeps across updates: the main secret and the transcript hash of
    generation N (generation 0: the handshake's main secret and the hash of ClientHello ..
    client Finished)."""

    hash_name: str
    main_secret: bytes
    transcript_hash: bytes

    def next(self, shared_secret: bytes, request: bytes, response: bytes) -> tuple[bytes, bytes]:
        """Advance one generation; returns the new (client, server) application traffic
        secrets. ``request``/``response`` are the two whole EKU messages exchanged."""
        size = hashlib.new(self.hash_name).digest_size
        empty = hashlib.new(self.hash_name).digest()
        salt = hkdf_expand_label(self.main_secret, b"derived", size, self.hash_name, empty)
        main = hmac.digest(salt, shared_secret, self.hash_name)
        transcript = hashlib.new(self.hash_name, self.transcript_hash + request + response).digest()
        client = hkdf_expand_label(main, b"c ap traffic", size, self.hash_name, transcript)
        server = hkdf_expand_label(main, b"s ap traffic", size, self.hash_name, transcript)
        self.main_secret, self.transcript_hash = main, transcript
        return client, server
