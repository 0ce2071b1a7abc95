"""TLS 1.3 handshake messages (RFC 8446 4): strict parsers and builders.

Every length is checked against what remains and against the vector bounds the RFC gives;
anything malformed raises :class:`MessageError` with the alert to send. Builders return
whole messages (4-byte header included), ready for the transcript and the record layer.
"""

from __future__ import annotations

from qkdproxy.core.tls.codec import MessageError, Reader
from qkdproxy.core.tls.hello import ClientHelloFields, ServerHelloFields
from qkdproxy.core.tls.wire import Alert

# Handshake message types (RFC 8446 4).
CLIENT_HELLO = 1
SERVER_HELLO = 2
NEW_SESSION_TICKET = 4
ENCRYPTED_EXTENSIONS = 8
CERTIFICATE = 11
CERTIFICATE_REQUEST = 13
CERTIFICATE_VERIFY = 15
FINISHED = 20
MESSAGE_HASH = 254

# Extension types.
SERVER_NAME = 0
SUPPORTED_GROUPS = 10
SIGNATURE_ALGORITHMS = 13
ALPN = 16
PADDING = 21
PRE_SHARED_KEY = 41
EARLY_DATA = 42
SUPPORTED_VERSIONS = 43
COOKIE = 44
KEY_SHARE = 51

TLS13 = 0x0304
LEGACY_VERSION = 0x0303
HELLO_RETRY_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)


def u16_list(data: bytes, length_size: int, what: str) -> tuple[int, ...]:
    """A non-empty vector of 16-bit values (groups, versions, signature schemes)."""
    reader = Reader(data)
    body = reader.vector(length_size)
    reader.expect_done(what)
    if not body or len(body) % 2:
        raise MessageError(f"{what}: bad length")
    return tuple(int.from_bytes(body[i : i + 2], "big") for i in range(0, len(body), 2))


def extensions(reader: Reader, minimum: int = 0) -> dict[int, bytes]:
    """An extension block, in order; one extension of a type twice is illegal_parameter."""
    block = Reader(reader.vector(2, minimum))
    found: dict[int, bytes] = {}
    while not block.done():
        ext_type = block.u16()
        data = block.vector(2)
        if ext_type in found:
            raise MessageError(f"duplicate extension {ext_type}", Alert.ILLEGAL_PARAMETER)
        found[ext_type] = data
    return found


def alpn_names(data: bytes) -> tuple[bytes, ...]:
    """The protocol names of an ALPN extension (RFC 7301 3.1: none empty, at least one)."""
    reader = Reader(data)
    body = Reader(reader.vector(2, 2))
    reader.expect_done("application_layer_protocol_negotiation")
    names = []
    while not body.done():
        names.append(body.vector(1, 1))
    return tuple(names)


def key_share_entries(data: bytes) -> dict[int, bytes]:
    """A ClientHello key_share: group -> key_exchange (one share per group, none empty)."""
    outer = Reader(data)
    reader = Reader(outer.vector(2))
    outer.expect_done("key_share")
    shares: dict[int, bytes] = {}
    while not reader.done():
        group = reader.u16()
        share = reader.vector(2, 1)
        if group in shares:
            raise MessageError("two key shares for one group", Alert.ILLEGAL_PARAMETER)
        shares[group] = share
    return shares


def parse_client_hello(body: bytes) -> ClientHelloFields:
    """Parse a ClientHello body (after the 4-byte header)."""
    reader = Reader(body)
    version = reader.u16()
    reader.take(32)
    session_id = reader.vector(1)
    if len(session_id) > 32:
        raise MessageError("session id longer than 32 bytes", Alert.ILLEGAL_PARAMETER)
    suites = reader.vector(2, 2)
    if len(suites) % 2:
        raise MessageError("cipher_suites: bad length")
    compression = reader.vector(1, 1)
    found = extensions(reader) if not reader.done() else {}
    reader.expect_done("ClientHello")
    cipher_suites = tuple(
        int.from_bytes(suites[i : i + 2], "big") for i in range(0, len(suites), 2)
    )
    return ClientHelloFields(version, session_id, cipher_suites, compression, found)


def parse_server_hello(body: bytes) -> ServerHelloFields:
    """Parse a ServerHello or HelloRetryRequest body."""
    reader = Reader(body)
    version = reader.u16()
    random = reader.take(32)
    session_id = reader.vector(1)
    if len(session_id) > 32:
        raise MessageError("session id longer than 32 bytes", Alert.ILLEGAL_PARAMETER)
    suite = reader.u16()
    compression = reader.u8()
    found = extensions(reader)
    reader.expect_done("ServerHello")
    return ServerHelloFields(version, random, session_id, suite, compression, found)


def parse_extensions_only(body: bytes, what: str) -> dict[int, bytes]:
    """EncryptedExtensions: nothing but an extension block."""
    reader = Reader(body)
    found = extensions(reader)
    reader.expect_done(what)
    return found


def parse_certificate_request(body: bytes) -> dict[int, bytes]:
    """A CertificateRequest's extensions (its context must be empty in a handshake)."""
    reader = Reader(body)
    if reader.vector(1):
        raise MessageError("CertificateRequest context in a handshake", Alert.ILLEGAL_PARAMETER)
    found = extensions(reader, 2)
    reader.expect_done("CertificateRequest")
    if SIGNATURE_ALGORITHMS not in found:
        raise MessageError(
            "CertificateRequest without signature_algorithms", Alert.MISSING_EXTENSION
        )
    return found


def parse_certificate(body: bytes) -> list[bytes]:
    """The DER certificates of a Certificate message, leaf first (context must be empty)."""
    reader = Reader(body)
    if reader.vector(1):
        raise MessageError("Certificate context in a handshake", Alert.ILLEGAL_PARAMETER)
    entries = Reader(reader.vector(3))
    reader.expect_done("Certificate")
    chain = []
    while not entries.done():
        chain.append(entries.vector(3, 1))
        extensions(entries)  # OCSP and SCT entries: parsed for framing, not used
    return chain


def parse_certificate_verify(body: bytes) -> tuple[int, bytes]:
    """(signature scheme, signature) of a CertificateVerify."""
    reader = Reader(body)
    scheme = reader.u16()
    signature = reader.vector(2, 1)
    reader.expect_done("CertificateVerify")
    return scheme, signature


# ----------------------------------------------------------------------- builders


def vector(data: bytes, length_size: int) -> bytes:
    """``data`` behind its length."""
    return len(data).to_bytes(length_size, "big") + data


def extension(ext_type: int, data: bytes) -> bytes:
    """One extension: type, length, data."""
    return ext_type.to_bytes(2, "big") + vector(data, 2)


def u16_vector(values: tuple[int, ...] | list[int], length_size: int = 2) -> bytes:
    """A vector of 16-bit values."""
    return vector(b"".join(v.to_bytes(2, "big") for v in values), length_size)


def message(msg_type: int, body: bytes) -> bytes:
    """A handshake message: type, 24-bit length, body."""
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def client_hello(
    random: bytes, session_id: bytes, cipher_suites: tuple[int, ...], exts: list[bytes]
) -> bytes:
    """A ClientHello (legacy_version 1.2, null compression only)."""
    body = (
        LEGACY_VERSION.to_bytes(2, "big")
        + random
        + vector(session_id, 1)
        + u16_vector(cipher_suites)
        + b"\x01\x00"
        + vector(b"".join(exts), 2)
    )
    return message(CLIENT_HELLO, body)


def server_hello(random: bytes, session_id: bytes, suite: int, exts: list[bytes]) -> bytes:
    """A ServerHello or (with the special random) HelloRetryRequest."""
    body = (
        LEGACY_VERSION.to_bytes(2, "big")
        + random
        + vector(session_id, 1)
        + suite.to_bytes(2, "big")
        + b"\x00"
        + vector(b"".join(exts), 2)
    )
    return message(SERVER_HELLO, body)


def certificate(chain: tuple[bytes, ...]) -> bytes:
    """A Certificate message with an empty context and no entry extensions."""
    entries = b"".join(vector(der, 3) + b"\x00\x00" for der in chain)
    return message(CERTIFICATE, b"\x00" + vector(entries, 3))


def certificate_verify(scheme: int, signature: bytes) -> bytes:
    """A CertificateVerify message."""
    return message(CERTIFICATE_VERIFY, scheme.to_bytes(2, "big") + vector(signature, 2))
