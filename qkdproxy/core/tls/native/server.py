"""The server side of a TLS 1.3 handshake that requires a client certificate (RFC 8446 2, 4).

ClientHello (a HelloRetryRequest if it lacks a share for our group, then the second
ClientHello), then our flight in one go: ServerHello, EncryptedExtensions,
CertificateRequest, Certificate, CertificateVerify, Finished; the client's Certificate,
CertificateVerify and Finished complete it. The client's chain is validated by the
connection once the handshake is complete (:mod:`qkdproxy.core.tls.verify`); here only its
CertificateVerify is checked. No PSK (so no early data), no session tickets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import ClassVar

from qkdproxy.core.groups import GroupSpec
from qkdproxy.core.tls.codec import MessageError
from qkdproxy.core.tls.eku import TLS_FLAGS_EXTENSION, has_flag
from qkdproxy.core.tls.hello import ClientHello, ClientHelloFields, ParsedClientHello
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

_SUPPORTED_VERSIONS = m.extension(m.SUPPORTED_VERSIONS, m.TLS13.to_bytes(2, "big"))
_CERTIFICATE_REQUEST = m.message(
    m.CERTIFICATE_REQUEST,
    b"\x00" + m.vector(OFFERED_SCHEMES_EXTENSION, 2),
)


class State(Enum):
    """What the server waits for."""

    START = "start"
    CLIENT_HELLO = "client_hello"
    CERTIFICATE = "certificate"
    CERTIFICATE_VERIFY = "certificate_verify"
    FINISHED = "finished"
    DONE = "done"


class NativeServer(NativeHandshake):
    """A server handshake (see the module docstring)."""

    state = State.START
    ACCEPTS: ClassVar[Mapping[Enum, frozenset[int]]] = {
        State.CLIENT_HELLO: frozenset({m.CLIENT_HELLO}),
        State.CERTIFICATE: frozenset({m.CERTIFICATE}),
        State.CERTIFICATE_VERIFY: frozenset({m.CERTIFICATE_VERIFY}),
        State.FINISHED: frozenset({m.FINISHED}),
    }
    _groups: tuple[int, ...] = ()
    _retry_group: int | None = None
    _client_secret = b""
    _client_app = b""
    # The connection's parse of the ClientHello it released last, with that message.
    _given: tuple[bytes, ParsedClientHello] | None = None

    @property
    def is_client(self) -> bool:
        return False

    def start_server(self, groups: Sequence[GroupSpec]) -> None:
        """Wait for the ClientHello; ``groups`` in our order of preference."""
        self._groups = tuple(g.code_point for g in groups)
        self._move(State.CLIENT_HELLO)

    def _message_handlers(self) -> dict[int, Callable[[bytes], None]]:
        return {
            m.CLIENT_HELLO: self._on_client_hello,
            m.CERTIFICATE: self._on_certificate,
            m.CERTIFICATE_VERIFY: self._on_certificate_verify,
            m.FINISHED: self._on_finished,
        }

    def feed_client_hello(self, hello: HeldHello, parsed: ParsedClientHello) -> None:
        """Keep the connection's parse for :meth:`_on_client_hello`, if our own parser would
        accept the message too: that one also wants a compression method, so a hello with an
        empty list is parsed again there and gets its decode_error."""
        self._given = (hello.message, parsed) if parsed.fields.compression else None
        self.feed(hello.records)

    def _parsed_hello(self, message: bytes) -> tuple[ClientHelloFields, ClientHello | None]:
        """The ClientHello's fields and, if the connection parsed this very message, its
        key-exchange view. With the view every field it holds is well-formed, as the checks'
        own parses would find; without it each field is parsed where it is checked, so a
        malformed hello gets the alert of its first fault in the checks' order."""
        given, self._given = self._given, None
        if given is not None and given[0] == message:
            return given[1].fields, given[1].view
        return m.parse_client_hello(message[4:]), None

    def _on_client_hello(self, message: bytes) -> None:
        hello, view = self._parsed_hello(message)
        if not self._records.at_record_boundary:
            raise MessageError("ClientHello does not end its record", Alert.UNEXPECTED_MESSAGE)
        self._records.ccs_allowed = True
        exts = hello.extensions
        versions = exts.get(m.SUPPORTED_VERSIONS)
        if versions is None or m.TLS13 not in (
            view.versions if view is not None else m.u16_list(versions, 1, "supported_versions")
        ):
            raise MessageError("client does not offer TLS 1.3", Alert.PROTOCOL_VERSION)
        if hello.compression != b"\x00":
            raise MessageError("TLS 1.3 allows null compression only", Alert.ILLEGAL_PARAMETER)
        code = next((s for s in SUITES if s in hello.cipher_suites), None)
        if code is None:
            raise MessageError("no cipher suite in common", Alert.HANDSHAKE_FAILURE)
        if self._retry_group is not None and code != self._suite_code:
            raise MessageError("second ClientHello changed suites", Alert.ILLEGAL_PARAMETER)
        if m.SIGNATURE_ALGORITHMS not in exts:
            raise MessageError("ClientHello without signature_algorithms", Alert.MISSING_EXTENSION)
        client_schemes = m.u16_list(exts[m.SIGNATURE_ALGORITHMS], 2, "signature_algorithms")
        scheme = choose_scheme(self._identity.schemes, client_schemes)
        if scheme is None:
            raise MessageError("no signature scheme in common", Alert.HANDSHAKE_FAILURE)
        if m.KEY_SHARE not in exts or m.SUPPORTED_GROUPS not in exts:
            raise MessageError(
                "ClientHello without key_share or supported_groups", Alert.MISSING_EXTENSION
            )
        supported, shares = _offered_groups(exts, view)
        if not set(shares).issubset(supported):
            raise MessageError(
                "key share for a group not in supported_groups", Alert.ILLEGAL_PARAMETER
            )
        selected_alpn = self._select_alpn(exts.get(m.ALPN))
        self.eku_peer = has_flag(exts.get(TLS_FLAGS_EXTENSION))
        suite = self._choose_suite(code)
        group = next((g for g in self._groups if g in shares), None)
        if self._retry_group is not None:
            if set(shares) != {self._retry_group}:
                raise MessageError("no key share for the requested group", Alert.ILLEGAL_PARAMETER)
        elif group is None:
            wanted = next((g for g in self._groups if g in supported), None)
            if wanted is None:
                raise MessageError("no key-exchange group in common", Alert.HANDSHAKE_FAILURE)
            self._hello_retry(message, wanted, hello.session_id)
            return
        assert group is not None
        if self._retry_group is None:
            self._transcript.choose(suite.hash_name)
        self._transcript.add(message)
        self._selected_alpn = selected_alpn
        secret = self._hook(lambda: self._hooks.shared_secret(group, shares[group]))
        share = self._hook(lambda: self._hooks.key_share(group))[0]
        self._send_flight(hello.session_id, group, share, secret, scheme)

    def _select_alpn(self, data: bytes | None) -> bytes | None:
        """The client's first protocol that we speak. None if either side has no list, or
        they share no protocol: a standard client offering h2 is served plainly, as tlslite
        served it, rather than refused (RFC 7301 would alert; applications behind a
        sidecar cannot change what their TLS library offers)."""
        if data is None or not self._alpn:
            return None
        return next((n for n in m.alpn_names(data) if n in self._alpn), None)

    def _hello_retry(self, message: bytes, group: int, session_id: bytes) -> None:
        assert self._suite is not None
        self._retry_group = group
        self._transcript.add(message)
        self._transcript.restart_for_retry(self._suite.hash_name)
        retry = m.server_hello(
            m.HELLO_RETRY_RANDOM,
            session_id,
            self._suite_code,
            [_SUPPORTED_VERSIONS, m.extension(m.KEY_SHARE, group.to_bytes(2, "big"))],
        )
        self._transcript.add(retry)
        self._records.send_plain(retry)
        if session_id:
            self._records.send_change_cipher_spec()

    def _send_flight(
        self, session_id: bytes, group: int, share: bytes, secret: bytes, scheme: int
    ) -> None:
        suite = self._suite
        assert suite is not None
        records, transcript = self._records, self._transcript
        server_hello = m.server_hello(
            self._random(32),
            session_id,
            self._suite_code,
            [
                _SUPPORTED_VERSIONS,
                m.extension(m.KEY_SHARE, group.to_bytes(2, "big") + m.vector(share, 2)),
            ],
        )
        transcript.add(server_hello)
        records.send_plain(server_hello)
        if session_id and self._retry_group is None:
            records.send_change_cipher_spec()
        schedule = self._schedule = KeySchedule(suite.hash_name, secret)
        client_secret, server_secret = schedule.handshake_secrets(transcript.digest())
        self._client_secret = client_secret
        records.write = self._direction(server_secret)
        records.read = self._direction(client_secret)
        ext_list = []
        if self._selected_alpn is not None:
            ext_list.append(m.extension(m.ALPN, m.vector(m.vector(self._selected_alpn, 1), 2)))
        if self.eku_negotiated:
            ext_list.append(EKU_OFFER_EXTENSION)
        encrypted_extensions = m.message(m.ENCRYPTED_EXTENSIONS, m.vector(b"".join(ext_list), 2))
        certificate = self._identity.certificate
        for part in (encrypted_extensions, _CERTIFICATE_REQUEST, certificate):
            transcript.add(part)
        signature = sign(
            self._identity.credentials.private_key, scheme, SERVER_CONTEXT + transcript.digest()
        )
        cert_verify = m.certificate_verify(scheme, signature)
        transcript.add(cert_verify)
        finished = m.message(m.FINISHED, schedule.finished(server_secret, transcript.digest()))
        transcript.add(finished)
        records.send_protected(
            encrypted_extensions + _CERTIFICATE_REQUEST + certificate + cert_verify + finished
        )
        self._client_app, server_app = schedule.application_secrets(transcript.digest())
        records.write = self._direction(server_app)
        self._move(State.CERTIFICATE)

    def _on_certificate(self, message: bytes) -> None:
        self._peer_chain = m.parse_certificate(message[4:])
        self._transcript.add(message)
        # An empty chain goes on to Finished; the connection's policy then refuses it.
        self._move(State.CERTIFICATE_VERIFY if self._peer_chain else State.FINISHED)

    def _on_certificate_verify(self, message: bytes) -> None:
        self._check_certificate_verify(message, CLIENT_CONTEXT)
        self._move(State.FINISHED)

    def _on_finished(self, message: bytes) -> None:
        schedule = self._check_finished(message, self._client_secret, "client")
        self._records.read = self._direction(self._client_app)
        self._client_secret = self._client_app = b""
        schedule.forget()
        self._move(State.DONE)
        self._finish(schedule.main)


def _offered_groups(
    exts: dict[int, bytes], view: ClientHello | None
) -> tuple[tuple[int, ...], dict[int, bytes]]:
    """A ClientHello's supported_groups and its key shares by group (from the view if there
    is one)."""
    if view is not None:
        return view.supported_groups, {s.group: s.key_exchange for s in view.key_shares}
    return (
        m.u16_list(exts[m.SUPPORTED_GROUPS], 2, "supported_groups"),
        m.key_share_entries(exts[m.KEY_SHARE]),
    )
