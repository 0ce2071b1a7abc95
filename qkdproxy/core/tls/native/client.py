"""The client side of a TLS 1.3 handshake with certificates (RFC 8446 2, 4).

ClientHello (one key share; again after a HelloRetryRequest), ServerHello, then the
server's protected flight: EncryptedExtensions, CertificateRequest (optional),
Certificate, CertificateVerify, Finished; our Certificate, CertificateVerify and Finished
answer it. No PSK, no early data, no session tickets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import ClassVar

from qkdproxy.core.groups import GroupSpec
from qkdproxy.core.tls.codec import MessageError, Reader
from qkdproxy.core.tls.eku import TLS_FLAGS_EXTENSION, has_flag
from qkdproxy.core.tls.hello import ParsedServerHello, ServerHelloFields
from qkdproxy.core.tls.native import messages as m
from qkdproxy.core.tls.native.common import (
    EKU_OFFER_EXTENSION,
    OFFERED_SCHEMES_EXTENSION,
    SUITES,
    NativeHandshake,
)
from qkdproxy.core.tls.native.schedule import KeySchedule
from qkdproxy.core.tls.native.signatures import (
    CLIENT_CONTEXT,
    SERVER_CONTEXT,
    choose_scheme,
    sign,
)
from qkdproxy.core.tls.wire import Alert, HeldHello

# tlslite pads ClientHellos of 256 to 511 bytes to 512 (RFC 7685; some middleboxes hang on
# those lengths); we keep its rule so a hello has the same shape whichever engine sent it.
PAD_FROM, PAD_TO = 256, 512
_SUPPORTED_VERSIONS = m.extension(m.SUPPORTED_VERSIONS, m.u16_vector((m.TLS13,), 1))


class State(Enum):
    """What the client waits for."""

    START = "start"
    SERVER_HELLO = "server_hello"
    ENCRYPTED_EXTENSIONS = "encrypted_extensions"
    CERTIFICATE_OR_REQUEST = "certificate_or_request"
    CERTIFICATE = "certificate"
    CERTIFICATE_VERIFY = "certificate_verify"
    FINISHED = "finished"
    DONE = "done"


class NativeClient(NativeHandshake):
    """A client handshake (see the module docstring)."""

    state = State.START
    ACCEPTS: ClassVar[Mapping[Enum, frozenset[int]]] = {
        State.SERVER_HELLO: frozenset({m.SERVER_HELLO}),
        State.ENCRYPTED_EXTENSIONS: frozenset({m.ENCRYPTED_EXTENSIONS}),
        State.CERTIFICATE_OR_REQUEST: frozenset({m.CERTIFICATE_REQUEST, m.CERTIFICATE}),
        State.CERTIFICATE: frozenset({m.CERTIFICATE}),
        State.CERTIFICATE_VERIFY: frozenset({m.CERTIFICATE_VERIFY}),
        State.FINISHED: frozenset({m.FINISHED}),
    }
    _groups: tuple[int, ...] = ()
    _share_group = 0
    _client_random = b""
    _session_id = b""
    _retry_suite: int | None = None
    _server_schemes: tuple[int, ...] | None = None
    _handshake_secrets = (b"", b"")
    # The connection's parse of the ServerHello it released last, with that message.
    _given: tuple[bytes, ParsedServerHello] | None = None

    @property
    def is_client(self) -> bool:
        return True

    def start_client(self, groups: Sequence[GroupSpec], share_group: GroupSpec) -> None:
        """Send the ClientHello."""
        self._groups = tuple(g.code_point for g in groups)
        self._share_group = share_group.code_point
        self._client_random = self._random(32)
        # A session id makes middleboxes take this for a TLS 1.2 resumption (RFC 8446 D.4).
        self._session_id = self._random(32)
        hello = self._client_hello(cookie=None)
        self._transcript.add(hello)
        self._records.send_plain(hello, version=0x0301)
        self._records.ccs_allowed = True
        self._move(State.SERVER_HELLO)

    def _client_hello(self, cookie: bytes | None) -> bytes:
        share = self._hook(lambda: self._hooks.key_share(self._share_group))[0]
        exts = []
        if self._server_name:
            name = self._server_name.encode("ascii")
            exts.append(m.extension(m.SERVER_NAME, m.vector(b"\x00" + m.vector(name, 2), 2)))
        exts += [
            _SUPPORTED_VERSIONS,
            m.extension(m.SUPPORTED_GROUPS, m.u16_vector(self._groups)),
            OFFERED_SCHEMES_EXTENSION,
            m.extension(
                m.KEY_SHARE, m.vector(self._share_group.to_bytes(2, "big") + m.vector(share, 2), 2)
            ),
        ]
        if cookie is not None:
            exts.append(m.extension(m.COOKIE, m.vector(cookie, 2)))
        if self._alpn:
            exts.append(
                m.extension(m.ALPN, m.vector(b"".join(m.vector(p, 1) for p in self._alpn), 2))
            )
        if self.eku_offer:
            exts.append(EKU_OFFER_EXTENSION)
        hello = m.client_hello(self._client_random, self._session_id, SUITES, exts)
        body_length = len(hello) - 4
        if PAD_FROM <= body_length < PAD_TO:
            exts.append(m.extension(m.PADDING, bytes(max(PAD_TO - body_length - 4, 0))))
            hello = m.client_hello(self._client_random, self._session_id, SUITES, exts)
        return hello

    # ---------------------------------------------------------------- messages

    def _message_handlers(self) -> dict[int, Callable[[bytes], None]]:
        return {
            m.SERVER_HELLO: self._on_server_hello,
            m.ENCRYPTED_EXTENSIONS: self._on_encrypted_extensions,
            m.CERTIFICATE_REQUEST: self._on_certificate_request,
            m.CERTIFICATE: self._on_certificate,
            m.CERTIFICATE_VERIFY: self._on_certificate_verify,
            m.FINISHED: self._on_finished,
        }

    def feed_server_hello(self, hello: HeldHello, parsed: ParsedServerHello) -> None:
        """Keep the connection's parse for :meth:`_on_server_hello` (our own parser accepts
        every ServerHello it does, with the same fields)."""
        self._given = (hello.message, parsed)
        self.feed(hello.records)

    def _on_server_hello(self, message: bytes) -> None:
        given, self._given = self._given, None
        hello = (
            given[1].fields
            if given is not None and given[0] == message
            else m.parse_server_hello(message[4:])
        )
        if not self._records.at_record_boundary:
            raise MessageError("ServerHello does not end its record", Alert.UNEXPECTED_MESSAGE)
        versions = hello.extensions.get(m.SUPPORTED_VERSIONS)
        if versions is None:
            raise MessageError("server does not speak TLS 1.3", Alert.PROTOCOL_VERSION)
        if versions != m.TLS13.to_bytes(2, "big") or hello.legacy_version != m.LEGACY_VERSION:
            raise MessageError("server chose a version we did not offer", Alert.ILLEGAL_PARAMETER)
        if hello.session_id != self._session_id:
            raise MessageError("server did not echo our session id", Alert.ILLEGAL_PARAMETER)
        if hello.cipher_suite not in SUITES or hello.compression != 0:
            raise MessageError("server chose a suite we did not offer", Alert.ILLEGAL_PARAMETER)
        hello_retry = hello.random == m.HELLO_RETRY_RANDOM
        allowed = {m.SUPPORTED_VERSIONS, m.KEY_SHARE}
        if hello_retry:
            allowed.add(m.COOKIE)
        if not allowed.issuperset(hello.extensions):
            raise MessageError(
                "ServerHello extension we did not offer", Alert.UNSUPPORTED_EXTENSION
            )
        if hello_retry:
            self._on_hello_retry(hello, message)
            return
        if self._retry_suite is not None and hello.cipher_suite != self._retry_suite:
            raise MessageError("suite differs from the HelloRetryRequest", Alert.ILLEGAL_PARAMETER)
        data = hello.extensions.get(m.KEY_SHARE)
        if data is None:
            raise MessageError("ServerHello without key_share", Alert.MISSING_EXTENSION)
        reader = Reader(data)
        group = reader.u16()
        share = reader.vector(2, 1)
        reader.expect_done("key_share")
        if group != self._share_group:
            raise MessageError(
                "server answered a group we sent no share for", Alert.ILLEGAL_PARAMETER
            )
        suite = self._choose_suite(hello.cipher_suite)
        if self._retry_suite is None:
            self._transcript.choose(suite.hash_name)
        self._transcript.add(message)
        secret = self._hook(lambda: self._hooks.shared_secret(group, share))
        self._schedule = KeySchedule(suite.hash_name, secret)
        client_secret, server_secret = self._schedule.handshake_secrets(self._transcript.digest())
        self._handshake_secrets = (client_secret, server_secret)
        self._records.read = self._direction(server_secret)
        self._records.write = self._direction(client_secret)
        self._move(State.ENCRYPTED_EXTENSIONS)

    def _on_hello_retry(self, hello: ServerHelloFields, message: bytes) -> None:
        if self._retry_suite is not None:
            raise MessageError("second HelloRetryRequest", Alert.UNEXPECTED_MESSAGE)
        data = hello.extensions.get(m.KEY_SHARE)
        if data is None:
            # Without a group to change to, a retry could only carry a cookie: we never
            # need one, and a retry that changes nothing would loop.
            raise MessageError("HelloRetryRequest without key_share", Alert.ILLEGAL_PARAMETER)
        reader = Reader(data)
        group = reader.u16()
        reader.expect_done("key_share")
        if group not in self._groups or group == self._share_group:
            raise MessageError("HelloRetryRequest for an unusable group", Alert.ILLEGAL_PARAMETER)
        cookie = None
        if m.COOKIE in hello.extensions:
            reader = Reader(hello.extensions[m.COOKIE])
            cookie = reader.vector(2, 1)
            reader.expect_done("cookie")
        self._retry_suite = hello.cipher_suite
        suite = self._choose_suite(hello.cipher_suite)
        self._transcript.restart_for_retry(suite.hash_name)
        self._transcript.add(message)
        self._share_group = group
        second = self._client_hello(cookie)
        self._transcript.add(second)
        self._records.send_plain(second)

    def _on_encrypted_extensions(self, message: bytes) -> None:
        found = m.parse_extensions_only(message[4:], "EncryptedExtensions")
        allowed = {m.SERVER_NAME, m.SUPPORTED_GROUPS}
        if self._alpn:
            allowed.add(m.ALPN)
        if self.eku_offer:
            allowed.add(TLS_FLAGS_EXTENSION)
        if not allowed.issuperset(found):
            raise MessageError(
                "EncryptedExtensions has an extension we did not offer", Alert.UNSUPPORTED_EXTENSION
            )
        if m.ALPN in found:
            names = m.alpn_names(found[m.ALPN])
            if len(names) != 1 or names[0] not in self._alpn:
                raise MessageError(
                    "server chose a protocol we did not offer", Alert.ILLEGAL_PARAMETER
                )
            self._selected_alpn = names[0]
        self.eku_peer = has_flag(found.get(TLS_FLAGS_EXTENSION))
        self._transcript.add(message)
        self._move(State.CERTIFICATE_OR_REQUEST)

    def _on_certificate_request(self, message: bytes) -> None:
        found = m.parse_certificate_request(message[4:])
        self._server_schemes = m.u16_list(found[m.SIGNATURE_ALGORITHMS], 2, "signature_algorithms")
        self._transcript.add(message)
        self._move(State.CERTIFICATE)

    def _on_certificate(self, message: bytes) -> None:
        chain = m.parse_certificate(message[4:])
        if not chain:
            raise MessageError("server sent no certificate", Alert.DECODE_ERROR)
        self._transcript.add(message)
        self._peer_chain = chain
        if self._chain_check is not None:
            refusal = self._chain_check(chain)
            if refusal is not None:
                self.send_alert(*refusal)
        self._move(State.CERTIFICATE_VERIFY)

    def _on_certificate_verify(self, message: bytes) -> None:
        self._check_certificate_verify(message, SERVER_CONTEXT)
        self._move(State.FINISHED)

    def _on_finished(self, message: bytes) -> None:
        client_secret, server_secret = self._handshake_secrets
        schedule = self._check_finished(message, server_secret, "server")
        client_app, server_app = schedule.application_secrets(self._transcript.digest())
        flight = b""
        if self._server_schemes is not None:
            flight += self._our_certificate(self._server_schemes)
        finished = m.message(
            m.FINISHED, schedule.finished(client_secret, self._transcript.digest())
        )
        self._transcript.add(finished)
        records = self._records
        records.send_change_cipher_spec()
        records.send_protected(flight + finished)
        records.read = self._direction(server_app)
        records.write = self._direction(client_app)
        self._handshake_secrets = (b"", b"")
        schedule.forget()
        self._move(State.DONE)
        self._finish(schedule.main)

    def _our_certificate(self, server_schemes: tuple[int, ...]) -> bytes:
        """Certificate and CertificateVerify for the server's request (added to the transcript)."""
        identity = self._identity
        scheme = choose_scheme(identity.schemes, server_schemes)
        if scheme is None:
            raise MessageError("no signature scheme in common", Alert.HANDSHAKE_FAILURE)
        cert = identity.certificate
        self._transcript.add(cert)
        content = CLIENT_CONTEXT + self._transcript.digest()
        signature = sign(identity.credentials.private_key, scheme, content)
        cert_verify = m.certificate_verify(scheme, signature)
        self._transcript.add(cert_verify)
        return cert + cert_verify
