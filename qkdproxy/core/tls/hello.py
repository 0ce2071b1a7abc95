"""Sans-I/O parsers for ClientHello and ServerHello: the fields key exchange needs (the
views), and the rest of each message as sent (the fields the native engine checks).

Strict: every length is checked against what remains, duplicate extensions are refused, and
anything malformed raises :class:`HelloParseError` (the engine then sends the alert).
The byte reader is the one the native engine's messages use (:mod:`qkdproxy.core.tls.codec`).
Each hello the gate holds is parsed here once (:func:`read_client_hello`,
:func:`read_server_hello`): the native engine takes the same parse for its own checks rather
than parsing the message again.
"""

from __future__ import annotations

from dataclasses import dataclass

from qkdproxy.core.tls.codec import MessageError, Reader

EXT_SUPPORTED_GROUPS = 10
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51
TLS13 = 0x0304

HELLO_RETRY_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)


class HelloParseError(ValueError):
    """The hello message is malformed."""


class DuplicateExtensionError(HelloParseError):
    """An extension block names one extension twice (RFC 8446 4.2: illegal_parameter)."""


@dataclass(frozen=True, slots=True)
class KeyShareEntry:
    """One key share: group code point and its opaque key_exchange bytes."""

    group: int
    key_exchange: bytes


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the server needs from a ClientHello to plan the key exchange."""

    supported_groups: tuple[int, ...]
    key_shares: tuple[KeyShareEntry, ...]
    versions: tuple[int, ...]
    cipher_suites: tuple[int, ...]

    @property
    def offers_tls13(self) -> bool:
        """True if the client lists TLS 1.3 in supported_versions."""
        return TLS13 in self.versions

    def share_for(self, group: int) -> KeyShareEntry | None:
        """The client's key share for ``group``, if it sent one."""
        return next((s for s in self.key_shares if s.group == group), None)


@dataclass(frozen=True, slots=True)
class ServerHello:
    """The server's choice: a key share, or (HelloRetryRequest) just the group it wants."""

    hello_retry: bool
    group: int | None
    key_exchange: bytes | None


@dataclass(frozen=True, slots=True)
class ClientHelloFields:
    """A ClientHello's fields as sent, its extensions unparsed (the native engine's view)."""

    legacy_version: int
    session_id: bytes
    cipher_suites: tuple[int, ...]
    compression: bytes
    extensions: dict[int, bytes]


@dataclass(frozen=True, slots=True)
class ServerHelloFields:
    """A ServerHello's or HelloRetryRequest's fields as sent, its extensions unparsed (the
    native engine's view)."""

    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression: int
    extensions: dict[int, bytes]


@dataclass(frozen=True, slots=True)
class ParsedClientHello:
    """One parse of a ClientHello for both its readers: the key exchange and the engine."""

    view: ClientHello
    fields: ClientHelloFields


@dataclass(frozen=True, slots=True)
class ParsedServerHello:
    """One parse of a ServerHello for both its readers: the key exchange and the engine."""

    view: ServerHello
    fields: ServerHelloFields


def _extensions(reader: Reader) -> dict[int, bytes]:
    block = Reader(reader.vector(2))
    found: dict[int, bytes] = {}
    while not block.done():
        ext_type = block.u16()
        data = block.vector(2)
        if ext_type in found:
            raise DuplicateExtensionError(f"duplicate extension {ext_type}")
        found[ext_type] = data
    return found


def _u16_list(data: bytes, what: str) -> tuple[int, ...]:
    reader = Reader(data)
    body = reader.vector(2)
    reader.expect_done(what)
    if not body or len(body) % 2:
        raise HelloParseError(f"{what}: bad length")
    return tuple(int.from_bytes(body[i : i + 2], "big") for i in range(0, len(body), 2))


def _key_share_entry(reader: Reader) -> KeyShareEntry:
    group = reader.u16()
    key_exchange = reader.vector(2)
    if not key_exchange:
        raise HelloParseError("empty key_exchange")
    return KeyShareEntry(group, key_exchange)


def _client_shares(data: bytes) -> tuple[KeyShareEntry, ...]:
    outer = Reader(data)
    reader = Reader(outer.vector(2))
    outer.expect_done("key_share")
    shares: list[KeyShareEntry] = []
    while not reader.done():
        entry = _key_share_entry(reader)
        if any(s.group == entry.group for s in shares):
            raise HelloParseError("two key shares for one group")
        shares.append(entry)
    return tuple(shares)


def _versions(data: bytes) -> tuple[int, ...]:
    reader = Reader(data)
    body = reader.vector(1)
    reader.expect_done("supported_versions")
    if not body or len(body) % 2:
        raise HelloParseError("supported_versions: bad length")
    return tuple(int.from_bytes(body[i : i + 2], "big") for i in range(0, len(body), 2))


def parse_client_hello(body: bytes) -> ClientHello:
    """Parse a ClientHello body (without the 4-byte handshake header)."""
    return read_client_hello(body).view


def read_client_hello(body: bytes) -> ParsedClientHello:
    """Parse a ClientHello body as :func:`parse_client_hello` does, keeping the rest of it."""
    try:
        return _client_hello(body)
    except MessageError as exc:
        raise HelloParseError(str(exc)) from None


def _client_hello(body: bytes) -> ParsedClientHello:
    reader = Reader(body)
    version = reader.u16()
    reader.take(32)
    session_id = reader.vector(1)
    if len(session_id) > 32:
        raise HelloParseError("session id longer than 32 bytes")
    suites = reader.vector(2)
    if not suites or len(suites) % 2:
        raise HelloParseError("cipher_suites: bad length")
    compression = reader.vector(1)
    extensions = _extensions(reader) if not reader.done() else {}
    reader.expect_done("ClientHello")
    groups = (
        _u16_list(extensions[EXT_SUPPORTED_GROUPS], "supported_groups")
        if EXT_SUPPORTED_GROUPS in extensions
        else ()
    )
    shares = _client_shares(extensions[EXT_KEY_SHARE]) if EXT_KEY_SHARE in extensions else ()
    versions = (
        _versions(extensions[EXT_SUPPORTED_VERSIONS])
        if EXT_SUPPORTED_VERSIONS in extensions
        else ()
    )
    cipher_suites = tuple(
        int.from_bytes(suites[i : i + 2], "big") for i in range(0, len(suites), 2)
    )
    fields = ClientHelloFields(version, session_id, cipher_suites, compression, extensions)
    return ParsedClientHello(ClientHello(groups, shares, versions, cipher_suites), fields)


def parse_server_hello(body: bytes) -> ServerHello:
    """Parse a ServerHello or HelloRetryRequest body."""
    return read_server_hello(body).view


def read_server_hello(body: bytes) -> ParsedServerHello:
    """Parse a ServerHello as :func:`parse_server_hello` does, keeping the rest of it."""
    try:
        return _server_hello(body)
    except MessageError as exc:
        raise HelloParseError(str(exc)) from None


def _server_hello(body: bytes) -> ParsedServerHello:
    reader = Reader(body)
    version = reader.u16()
    random = reader.take(32)
    session_id = reader.vector(1)
    if len(session_id) > 32:
        raise HelloParseError("session id longer than 32 bytes")
    suite = reader.u16()
    compression = reader.u8()
    extensions = _extensions(reader)
    reader.expect_done("ServerHello")
    # Like tlslite: the special random means HelloRetryRequest only in a TLS 1.3 answer.
    hello_retry = random == HELLO_RETRY_RANDOM and EXT_SUPPORTED_VERSIONS in extensions
    fields = ServerHelloFields(version, random, session_id, suite, compression, extensions)
    return ParsedServerHello(_server_view(hello_retry, extensions.get(EXT_KEY_SHARE)), fields)


def _server_view(hello_retry: bool, data: bytes | None) -> ServerHello:
    if data is None:
        return ServerHello(hello_retry, None, None)
    ext = Reader(data)
    if hello_retry:
        group = ext.u16()
        ext.expect_done("key_share")
        return ServerHello(True, group, None)
    entry = _key_share_entry(ext)
    ext.expect_done("key_share")
    return ServerHello(False, entry.group, entry.key_exchange)
