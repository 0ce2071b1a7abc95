"""The native TLS 1.3 engine against hostile peers: a server or client that is authenticated
(its messages signed and its Finished valid where the test wants) but breaks the protocol,
and records an on-path attacker reshapes. Each refusal must be one fatal alert naming the
fault, raised by the victim (never an internal error), and never a completed handshake."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from qkdproxy.core.groups import GroupSpec
from qkdproxy.core.tls.connection import Phase
from qkdproxy.core.tls.eku import TLS_FLAGS_EXTENSION, tls_flags_data
from qkdproxy.core.tls.engine import AbruptCloseError, LocalAlertError
from qkdproxy.core.tls.events import Side
from qkdproxy.core.tls.native import NativeClient, NativeServer
from qkdproxy.core.tls.native import messages as m
from qkdproxy.core.tls.native.common import Identity
from qkdproxy.core.tls.native.signatures import CLIENT_CONTEXT, sign
from qkdproxy.core.tls.records import HEADER, MAX_CIPHERTEXT, MAX_PLAINTEXT
from qkdproxy.core.tls.wire import Alert
from tests.conftest import groups
from tests.native_forge import (
    ALERT,
    APPLICATION_DATA,
    CCS,
    HANDSHAKE,
    Forge,
    Item,
    Raw,
    Script,
    ScriptedClient,
    ScriptedServer,
    ScriptedSpec,
    ecdsa_signer,
    honest_client_flight,
    honest_server_flight,
    pkcs1_signer,
    plain,
    rebuild_hello,
)
from tests.native_harness import CLIENT, SERVER, Cut, Hook, Identities, Link, link

X25519 = groups("x25519")
SECP256R1 = 0x0017
X25519_CODE = 0x001D


@pytest.fixture(scope="module")
def ids() -> Identities:
    return Identities.create()


@pytest.fixture(scope="module")
def rsa_ids() -> Identities:
    return Identities.create("rsa-2048")


def scripted_server(ids: Identities, script: Script, **attrs: object) -> ScriptedSpec:
    role = type("Server", (ScriptedServer,), {"script": script, **attrs})
    return ScriptedSpec(Identity.of(ids.server), role)


def scripted_client(ids: Identities, **attrs: object) -> ScriptedSpec:
    role = type("Client", (ScriptedClient,), attrs)
    return ScriptedSpec(Identity.of(ids.client), role)


def refused(result: Link, victim: str, *alerts: Alert) -> Alert:
    """The victim ended the handshake itself with one of ``alerts``; nobody completed."""
    result.assert_no_internal_error()
    conn = result.conn(victim)
    assert not result.complete(victim), result.events
    assert conn.phase is Phase.FAILED
    failed = result.failed(victim)
    assert failed is not None, result.events
    assert failed.side is Side.LOCAL, failed
    assert failed.alert in alerts, failed
    return Alert(failed.alert)


def records_of(data: bytes) -> list[tuple[int, bytes]]:
    """(type, whole record) of every record in ``data``."""
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        out.append((data[pos], data[pos : pos + 5 + length]))
        pos += 5 + length
    return out


def refragment(data: bytes, size: int) -> bytes:
    """Every plaintext handshake record cut into records of ``size`` bytes."""
    out = bytearray()
    for kind, record in records_of(data):
        if kind != HANDSHAKE:
            out += record
            continue
        body = record[5:]
        for i in range(0, len(body), size):
            out += plain(HANDSHAKE, body[i : i + size], int.from_bytes(record[1:3], "big")).data
    return bytes(out)


def on(direction: str, index: int, edit: Callable[[bytes], bytes | Cut]) -> Hook:
    """A link hook that edits one transmission."""

    def hook(name: str, n: int, data: bytes) -> bytes | Cut:
        return edit(data) if (name, n) == (direction, index) else data

    return hook


# ------------------------------------------------------------- the scripts are honest


def test_the_honest_scripts_complete_so_each_refusal_is_the_fault_under_test(
    ids: Identities,
) -> None:
    result = link(
        ids,
        X25519,
        client_engine=scripted_client(ids, script=honest_client_flight),
        server_engine=scripted_server(ids, honest_server_flight),
    )
    assert result.complete(CLIENT) and result.complete(SERVER), result.events
    result.assert_same_keys()


# ------------------------------------------------------------- a hostile server


def against_server(ids: Identities, script: Script, **kwargs: object) -> Link:
    alpn = kwargs.pop("alpn", (None, None))
    server_hello_extra = kwargs.pop("server_hello_extra", ())
    spec = scripted_server(ids, script, server_hello_extra=server_hello_extra)
    return link(ids, X25519, server_engine=spec, alpn=alpn)  # type: ignore[arg-type]


def flight(*parts: Callable[[Forge], bytes | Item]) -> Script:
    """A script of message builders, sealed together (Raw items keep their place)."""

    def script(forge: Forge) -> list[Item]:
        items: list[Item] = []
        for part in parts:
            item = part(forge)
            if isinstance(item, bytes) and items and isinstance(items[-1], bytes):
                items[-1] += item
            else:
                items.append(item)
        return items

    return script


EE = Forge.encrypted_extensions
CR = Forge.certificate_request
CERT = Forge.certificate
CV = Forge.certificate_verify
FIN = Forge.finished


@pytest.mark.parametrize(
    "extension",
    [
        m.extension(0xFF01, b""),  # renegotiation_info, never offered in TLS 1.3
        m.extension(m.ALPN, m.vector(m.vector(b"h2", 1), 2)),  # no ALPN was offered
        m.extension(TLS_FLAGS_EXTENSION, tls_flags_data()),  # EKU not offered
        m.extension(m.KEY_SHARE, b""),
        m.extension(m.PRE_SHARED_KEY, b"\x00\x00"),
        m.extension(m.EARLY_DATA, b""),
    ],
    ids=["renegotiation_info", "alpn", "tls_flags", "key_share", "pre_shared_key", "early_data"],
)
def test_encrypted_extensions_with_an_extension_never_offered(
    ids: Identities, extension: bytes
) -> None:
    script = flight(lambda f: f.encrypted_extensions(extension), CR, CERT, CV, FIN)
    refused(against_server(ids, script), CLIENT, Alert.UNSUPPORTED_EXTENSION)


@pytest.mark.parametrize(
    ("names", "alert"),
    [
        ([b"evil"], Alert.ILLEGAL_PARAMETER),
        ([b"h2", b"h2"], Alert.ILLEGAL_PARAMETER),
        ([b""], Alert.DECODE_ERROR),
    ],
)
def test_an_alpn_the_client_did_not_offer_is_refused(
    ids: Identities, names: list[bytes], alert: Alert
) -> None:
    ext = m.extension(m.ALPN, m.vector(b"".join(m.vector(n, 1) for n in names), 2))
    script = flight(lambda f: f.encrypted_extensions(ext), CR, CERT, CV, FIN)
    result = against_server(ids, script, alpn=([b"h2"], [b"h2"]))
    refused(result, CLIENT, alert)


def test_a_duplicate_extension_in_encrypted_extensions(ids: Identities) -> None:
    ext = m.extension(m.ALPN, m.vector(m.vector(b"h2", 1), 2))
    script = flight(lambda f: f.encrypted_extensions(ext, ext), CR, CERT, CV, FIN)
    refused(against_server(ids, script, alpn=([b"h2"], [b"h2"])), CLIENT, Alert.ILLEGAL_PARAMETER)


@pytest.mark.parametrize(
    "script",
    [
        flight(EE, CR, CERT, FIN),  # no CertificateVerify
        flight(EE, CR, CV, FIN),  # no Certificate
        flight(CR, CERT, CV, FIN),  # no EncryptedExtensions
        flight(EE, CR, CR, CERT, CV, FIN),  # CertificateRequest twice
        flight(EE, CR, CERT, CV, CV, FIN),  # CertificateVerify twice
        flight(EE, CERT, CR, CV, FIN),  # CertificateRequest after Certificate
        flight(EE, CR, CERT, CV, lambda f: f.add(m.message(m.NEW_SESSION_TICKET, b"")), FIN),
        flight(EE, CR, CERT, CV, lambda f: f.add(m.message(m.SERVER_HELLO, b""))),
    ],
    ids=["no-cv", "no-cert", "no-ee", "cr-twice", "cv-twice", "cr-late", "ticket", "hello"],
)
def test_a_server_flight_out_of_order_is_unexpected(ids: Identities, script: Script) -> None:
    refused(against_server(ids, script), CLIENT, Alert.UNEXPECTED_MESSAGE)


def test_a_server_that_never_sends_finished_does_not_complete(ids: Identities) -> None:
    spec = scripted_server(ids, flight(EE, CR, CERT, CV))
    hook = on(SERVER, 0, Cut)  # the flight, then EOF
    result = link(ids, X25519, server_engine=spec, hook=hook)
    assert not result.complete(CLIENT)
    error = result.client.error
    assert error is not None and error.outcome.value == "peer_closed"


def test_application_data_before_the_server_finished(ids: Identities) -> None:
    data = lambda f: f.sealed(b"early", APPLICATION_DATA)  # noqa: E731
    refused(
        against_server(ids, flight(EE, CR, CERT, CV, data, FIN)), CLIENT, Alert.UNEXPECTED_MESSAGE
    )


def test_a_protected_change_cipher_spec_is_unexpected(ids: Identities) -> None:
    ccs = lambda f: f.sealed(b"\x01", CCS)  # noqa: E731
    refused(
        against_server(ids, flight(EE, ccs, CR, CERT, CV, FIN)), CLIENT, Alert.UNEXPECTED_MESSAGE
    )


def test_a_plaintext_handshake_record_after_the_keys_is_unexpected(ids: Identities) -> None:
    script = flight(lambda f: plain(HANDSHAKE, f.encrypted_extensions()), CR, CERT, CV, FIN)
    refused(against_server(ids, script), CLIENT, Alert.UNEXPECTED_MESSAGE)


@pytest.mark.parametrize(
    ("record", "alerts"),
    [
        (lambda f: plain(HANDSHAKE, b""), (Alert.UNEXPECTED_MESSAGE,)),
        (lambda f: f.sealed(b""), (Alert.UNEXPECTED_MESSAGE,)),
        (lambda f: plain(APPLICATION_DATA, b""), (Alert.BAD_RECORD_MAC, Alert.DECODE_ERROR)),
        (lambda f: plain(ALERT, b""), (Alert.DECODE_ERROR,)),
        (lambda f: plain(CCS, b""), (Alert.UNEXPECTED_MESSAGE,)),
        # An inner plaintext of padding only: no content type (RFC 8446 5.4).
        (lambda f: f.sealed(b"", 0), (Alert.UNEXPECTED_MESSAGE,)),
    ],
    ids=["plain-handshake", "sealed-handshake", "application", "alert", "ccs", "all-padding"],
)
def test_an_empty_record_is_refused(
    ids: Identities, record: Callable[[Forge], Raw], alerts: tuple[Alert, ...]
) -> None:
    refused(against_server(ids, flight(EE, record, CR, CERT, CV, FIN)), CLIENT, *alerts)


@pytest.mark.parametrize(
    ("content_type", "length"),
    [(HANDSHAKE, MAX_PLAINTEXT + 1), (APPLICATION_DATA, MAX_CIPHERTEXT + 1), (ALERT, 0xFFFF)],
)
def test_an_oversized_record_is_refused_on_its_header(
    ids: Identities, content_type: int, length: int
) -> None:
    """Only the 5-byte header arrives: the refusal cannot wait for the body. (A plaintext
    handshake record here is also one after the keys: either fault may be named.)"""
    header = lambda f: Raw(HEADER.pack(content_type, 0x0303, length))  # noqa: E731
    result = against_server(ids, flight(EE, header))
    refused(result, CLIENT, Alert.RECORD_OVERFLOW, Alert.UNEXPECTED_MESSAGE)
    failed = result.failed(CLIENT)
    assert failed is not None
    assert content_type == HANDSHAKE or failed.alert == Alert.RECORD_OVERFLOW


@pytest.mark.parametrize("claimed", [0xFFFFFF, 0x010001])
def test_a_huge_certificate_is_refused_as_soon_as_its_header_arrives(
    ids: Identities, claimed: int
) -> None:
    """A 16 MiB (or just over 64 KiB) Certificate: only its 4-byte header is sent."""
    header = lambda f: f.sealed(bytes([m.CERTIFICATE]) + claimed.to_bytes(3, "big"))  # noqa: E731
    alert = refused(against_server(ids, flight(EE, CR, header)), CLIENT, Alert.ILLEGAL_PARAMETER)
    assert alert is Alert.ILLEGAL_PARAMETER


def test_a_server_certificate_without_certificates(ids: Identities) -> None:
    script = flight(EE, CR, lambda f: f.certificate(()), CV, FIN)
    refused(against_server(ids, script), CLIENT, Alert.DECODE_ERROR)


@pytest.mark.parametrize(
    ("scheme", "signer", "alert"),
    [
        # ECDSA with the hash of another curve's scheme: a valid signature, the wrong scheme.
        (0x0503, lambda k: ecdsa_signer(k, hashes.SHA384()), Alert.ILLEGAL_PARAMETER),
        (0x0804, lambda k: ecdsa_signer(k, hashes.SHA256()), Alert.ILLEGAL_PARAMETER),
        (0x0807, lambda k: ecdsa_signer(k, hashes.SHA256()), Alert.ILLEGAL_PARAMETER),  # ed25519
        (0x0401, lambda k: ecdsa_signer(k, hashes.SHA256()), Alert.ILLEGAL_PARAMETER),
        (0x0203, lambda k: ecdsa_signer(k, hashes.SHA1()), Alert.ILLEGAL_PARAMETER),
        (0x0403, lambda k: lambda content: b"\x30\x00", Alert.DECRYPT_ERROR),
        (0x0403, lambda k: lambda content: os.urandom(72), Alert.DECRYPT_ERROR),
    ],
    ids=["p384-scheme", "pss-scheme", "ed25519", "pkcs1-scheme", "sha1", "empty-der", "garbage"],
)
def test_a_server_certificate_verify_that_does_not_match(
    ids: Identities, scheme: int, signer: Callable[[object], Callable[[bytes], bytes]], alert: Alert
) -> None:
    key = ids.server.private_key
    cv = lambda f: f.certificate_verify(scheme, signer(key))  # noqa: E731
    refused(against_server(ids, flight(EE, CR, CERT, cv, FIN)), CLIENT, alert)


def test_a_server_certificate_verify_with_pkcs1_v15_is_refused(rsa_ids: Identities) -> None:
    """A valid RSASSA-PKCS1-v1_5 signature: allowed in certificates, never in TLS 1.3
    handshake messages (RFC 8446 4.2.3)."""
    cv = lambda f: f.certificate_verify(0x0401, pkcs1_signer(rsa_ids.server.private_key))  # noqa: E731
    refused(against_server(rsa_ids, flight(EE, CR, CERT, cv, FIN)), CLIENT, Alert.ILLEGAL_PARAMETER)


def test_a_server_signing_the_client_context_is_refused(ids: Identities) -> None:
    """The signature of a client CertificateVerify (other context string) on this transcript."""

    def cv(forge: Forge) -> bytes:
        key = ids.server.private_key
        content = CLIENT_CONTEXT + forge.engine._transcript.digest()
        return forge.add(m.certificate_verify(0x0403, sign(key, 0x0403, content)))

    refused(against_server(ids, flight(EE, CR, CERT, cv, FIN)), CLIENT, Alert.DECRYPT_ERROR)


@pytest.mark.parametrize(
    "verify_data",
    [bytes(32), bytes(31), b"", os.urandom(48)],
    ids=["zeros", "short", "empty", "long"],
)
def test_a_server_finished_that_does_not_verify(ids: Identities, verify_data: bytes) -> None:
    fin = lambda f: f.finished(verify_data)  # noqa: E731
    refused(against_server(ids, flight(EE, CR, CERT, CV, fin)), CLIENT, Alert.DECRYPT_ERROR)


def test_a_server_finished_sharing_its_record_with_more_handshake_bytes(ids: Identities) -> None:
    tail = lambda f: f.add(m.message(m.NEW_SESSION_TICKET, b"\x00" * 9))  # noqa: E731
    refused(
        against_server(ids, flight(EE, CR, CERT, CV, FIN, tail)), CLIENT, Alert.UNEXPECTED_MESSAGE
    )


def test_a_server_flight_in_one_byte_records_completes(ids: Identities) -> None:
    def script(forge: Forge) -> list[Item]:
        [messages] = honest_server_flight(forge)
        assert isinstance(messages, bytes)
        return list(forge.sealed_each(messages, 1))

    result = against_server(ids, script)
    assert result.complete(CLIENT) and result.complete(SERVER), result.events
    result.assert_same_keys()


def test_hellos_in_one_byte_records_complete(ids: Identities) -> None:
    def hook(name: str, n: int, data: bytes) -> bytes:
        return refragment(data, 1) if n == 0 else data

    result = link(ids, X25519, hook=hook)
    assert result.complete(CLIENT) and result.complete(SERVER), result.events
    result.assert_same_keys()


def test_a_client_flight_in_one_byte_records_completes(ids: Identities) -> None:
    def script(forge: Forge) -> list[Item]:
        [messages] = honest_client_flight(forge)
        assert isinstance(messages, bytes)
        return list(forge.sealed_each(messages, 1))

    result = link(ids, X25519, client_engine=scripted_client(ids, script=script))
    assert result.complete(CLIENT) and result.complete(SERVER), result.events


def spill_into_hello_record(data: bytes) -> bytes:
    """The first record's handshake message followed, in the same record, by one more byte
    (the start of the next message, which belongs under the next keys)."""
    [(kind, first), *rest] = records_of(data)
    assert kind == HANDSHAKE
    body = first[5:] + bytes([m.ENCRYPTED_EXTENSIONS])
    return plain(HANDSHAKE, body).data + b"".join(r for _, r in rest)


@pytest.mark.parametrize(
    ("direction", "victim"),
    [(SERVER, CLIENT), (CLIENT, SERVER)],
    ids=["server-hello", "client-hello"],
)
def test_a_hello_spanning_the_key_change_is_refused(
    ids: Identities, direction: str, victim: str
) -> None:
    result = link(ids, X25519, hook=on(direction, 0, spill_into_hello_record))
    refused(result, victim, Alert.UNEXPECTED_MESSAGE)


def test_encrypted_extensions_in_the_server_hello_record_is_refused(ids: Identities) -> None:
    """Signed and finished over correctly, but sent in plaintext: the ServerHello must end
    its record (RFC 8446 5.1), so nothing after it is read without protection."""
    spec = scripted_server(ids, flight(CR, CERT, CV, FIN), hello_record_tail=EE)
    refused(link(ids, X25519, server_engine=spec), CLIENT, Alert.UNEXPECTED_MESSAGE)


@pytest.mark.parametrize(
    "extension",
    [
        m.extension(m.ALPN, m.vector(m.vector(b"h2", 1), 2)),
        m.extension(m.SERVER_NAME, b""),
        m.extension(TLS_FLAGS_EXTENSION, tls_flags_data()),
        m.extension(0xFF01, b"\x00"),
        m.extension(m.COOKIE, m.vector(b"c", 2)),
    ],
    ids=["alpn", "server_name", "tls_flags", "renegotiation_info", "cookie"],
)
def test_a_server_hello_with_an_extension_never_offered(ids: Identities, extension: bytes) -> None:
    result = against_server(ids, honest_server_flight, server_hello_extra=(extension,))
    refused(result, CLIENT, Alert.UNSUPPORTED_EXTENSION, Alert.ILLEGAL_PARAMETER)


def test_a_server_hello_with_a_duplicate_extension(ids: Identities) -> None:
    versions = m.extension(m.SUPPORTED_VERSIONS, m.TLS13.to_bytes(2, "big"))
    result = against_server(ids, honest_server_flight, server_hello_extra=(versions,))
    refused(result, CLIENT, Alert.ILLEGAL_PARAMETER, Alert.DECODE_ERROR)


# ------------------------------------------------------ change_cipher_spec on the wire


def insert_after_first_record(extra: bytes) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        [(_, first), *rest] = records_of(data)
        return first + extra + b"".join(r for _, r in rest)

    return edit


@pytest.mark.parametrize(
    "ccs",
    [
        plain(CCS, b"\x01").data,  # a second one (the server sent its own already)
        plain(CCS, b"\x02").data,
        plain(CCS, b"\x01\x01").data,
    ],
    ids=["twice", "wrong-byte", "two-bytes"],
)
def test_a_change_cipher_spec_other_than_the_one_dummy(ids: Identities, ccs: bytes) -> None:
    result = link(ids, X25519, hook=on(SERVER, 0, insert_after_first_record(ccs)))
    refused(result, CLIENT, Alert.UNEXPECTED_MESSAGE)


def test_a_change_cipher_spec_before_the_client_hello(ids: Identities) -> None:
    result = link(ids, X25519, hook=on(CLIENT, 0, lambda data: plain(CCS, b"\x01").data + data))
    refused(result, SERVER, Alert.UNEXPECTED_MESSAGE)


def test_a_change_cipher_spec_between_fragments_of_a_hello(ids: Identities) -> None:
    def edit(data: bytes) -> bytes:
        cut = refragment(data, 50)
        records = records_of(cut)
        return records[0][1] + plain(CCS, b"\x01").data + b"".join(r for _, r in records[1:])

    refused(link(ids, X25519, hook=on(CLIENT, 0, edit)), SERVER, Alert.UNEXPECTED_MESSAGE)


def test_a_server_without_the_dummy_change_cipher_spec_completes(ids: Identities) -> None:
    spec = scripted_server(ids, honest_server_flight, compat_ccs=False)
    result = link(ids, X25519, server_engine=spec)
    assert result.complete(CLIENT) and result.complete(SERVER), result.events


# ------------------------------------------------------------- HelloRetryRequest


class RetryingServer(NativeServer):
    """Answers the first ``retries`` ClientHellos with a HelloRetryRequest for ``group``."""

    group = SECP256R1
    retries = 1
    cookie: bytes | None = None
    sent = 0

    def _on_client_hello(self, message: bytes) -> None:
        if self.sent >= self.retries:
            super()._on_client_hello(message)
            return
        hello = m.parse_client_hello(message[4:])
        exts = [
            m.extension(m.SUPPORTED_VERSIONS, m.TLS13.to_bytes(2, "big")),
            m.extension(m.KEY_SHARE, self.group.to_bytes(2, "big")),
        ]
        if self.cookie is not None:
            exts.append(m.extension(m.COOKIE, self.cookie))
        retry = m.server_hello(m.HELLO_RETRY_RANDOM, hello.session_id, 0x1302, exts)
        # Kept as the real server keeps them, so a retry that is followed completes.
        self._retry_group = self.group
        self._choose_suite(0x1302)
        self._transcript.add(message)
        self._transcript.restart_for_retry("sha384")
        self._transcript.add(retry)
        self._records.ccs_allowed = True
        self._records.send_plain(retry)
        if self.sent == 0:
            self._records.send_change_cipher_spec()
        self.sent += 1


def retrying(ids: Identities, **attrs: object) -> ScriptedSpec:
    return ScriptedSpec(Identity.of(ids.server), type("Retrying", (RetryingServer,), attrs))


@pytest.mark.parametrize(
    ("attrs", "alerts"),
    [
        ({"retries": 2}, (Alert.UNEXPECTED_MESSAGE,)),
        ({"group": X25519_CODE}, (Alert.ILLEGAL_PARAMETER,)),  # the share already sent
        ({"group": 0x0018}, (Alert.ILLEGAL_PARAMETER, Alert.HANDSHAKE_FAILURE)),  # not offered
        ({"group": 0x9999}, (Alert.ILLEGAL_PARAMETER, Alert.HANDSHAKE_FAILURE)),  # unknown
        ({"cookie": b"\x00\x00"}, (Alert.DECODE_ERROR,)),  # empty cookie
        ({"cookie": b"\x00\x05ab"}, (Alert.DECODE_ERROR,)),  # cookie overruns
    ],
    ids=["second", "shared-group", "not-offered", "unknown", "empty-cookie", "bad-cookie"],
)
def test_a_hello_retry_request_the_client_must_refuse(
    ids: Identities, attrs: dict[str, object], alerts: tuple[Alert, ...]
) -> None:
    result = link(ids, groups("x25519", "secp256r1"), server_engine=retrying(ids, **attrs))
    refused(result, CLIENT, *alerts)


def test_a_hello_retry_request_with_a_cookie_is_answered_with_it(ids: Identities) -> None:
    """The retry's cookie comes back in the second ClientHello, and the handshake (which then
    needs the retried group's share) completes."""
    cookie = m.vector(b"opaque-state", 2)
    result = link(
        ids,
        groups("x25519", "secp256r1"),
        groups("secp256r1"),
        server_engine=retrying(ids, cookie=cookie),
    )
    second = records_of(result.sent[CLIENT][1])[-1][1]
    assert m.extension(m.COOKIE, cookie) in second
    assert result.complete(CLIENT) and result.complete(SERVER), result.events


# ------------------------------------------------------------- a hostile client


def against_client(ids: Identities, script: Script) -> Link:
    return link(ids, X25519, client_engine=scripted_client(ids, script=script))


def test_an_empty_client_certificate_never_completes(ids: Identities) -> None:
    """The engine lets an empty Certificate go on to Finished; the connection then refuses
    the unauthenticated client before any application data."""
    script = flight(lambda f: f.certificate(()), FIN)
    result = against_client(ids, script=script)
    alert = refused(
        result, SERVER, Alert.CERTIFICATE_REQUIRED, Alert.BAD_CERTIFICATE, Alert.ACCESS_DENIED
    )
    assert result.server.records is None and result.server.verified is None
    del alert


@pytest.mark.parametrize(
    ("script", "alert"),
    [
        (flight(CERT, FIN), Alert.UNEXPECTED_MESSAGE),  # no CertificateVerify
        (flight(FIN), Alert.UNEXPECTED_MESSAGE),  # no Certificate
        (flight(CV, FIN), Alert.UNEXPECTED_MESSAGE),
        (flight(CERT, CV, CV, FIN), Alert.UNEXPECTED_MESSAGE),
        (flight(lambda f: f.certificate(()), CV, FIN), Alert.UNEXPECTED_MESSAGE),
        (flight(CERT, CV, lambda f: f.finished(bytes(32))), Alert.DECRYPT_ERROR),
        (flight(CERT, CV, lambda f: f.finished(b"")), Alert.DECRYPT_ERROR),
        (
            flight(
                CERT,
                lambda f: f.certificate_verify(
                    0x0503,
                    ecdsa_signer(f.engine._identity.credentials.private_key, hashes.SHA384()),
                ),
                FIN,
            ),
            Alert.ILLEGAL_PARAMETER,
        ),
        (
            flight(CERT, lambda f: f.sealed(b"x", APPLICATION_DATA), CV, FIN),
            Alert.UNEXPECTED_MESSAGE,
        ),
        (flight(lambda f: plain(HANDSHAKE, f.certificate()), CV, FIN), Alert.UNEXPECTED_MESSAGE),
        (flight(CERT, CV, lambda f: f.add(m.message(m.KEY_SHARE, b""))), Alert.UNEXPECTED_MESSAGE),
        (
            flight(lambda f: f.sealed(bytes([m.CERTIFICATE]) + (0xFFFFFF).to_bytes(3, "big"))),
            Alert.ILLEGAL_PARAMETER,
        ),
        (flight(CERT, lambda f: plain(CCS, b"\x01"), CV, FIN), Alert.UNEXPECTED_MESSAGE),
    ],
    ids=[
        "no-cv",
        "no-cert",
        "cv-without-cert",
        "cv-twice",
        "empty-cert-then-cv",
        "bad-finished",
        "empty-finished",
        "p384-scheme-on-p256",
        "data-before-finished",
        "plaintext-cert",
        "unknown-message",
        "16MiB-certificate",
        "second-ccs",
    ],
)
def test_a_client_flight_the_server_must_refuse(
    ids: Identities, script: Script, alert: Alert
) -> None:
    refused(against_client(ids, script=script), SERVER, alert)


def test_a_client_certificate_verify_with_pkcs1_v15_is_refused(rsa_ids: Identities) -> None:
    key = rsa_ids.client.private_key
    script = flight(CERT, lambda f: f.certificate_verify(0x0401, pkcs1_signer(key)), FIN)
    refused(against_client(rsa_ids, script=script), SERVER, Alert.ILLEGAL_PARAMETER)


def test_rsa_pss_identities_complete_both_ways(rsa_ids: Identities) -> None:
    """The refusals above are not a refusal of RSA: RSA-PSS signs and verifies."""
    result = link(rsa_ids, X25519)
    assert result.complete(CLIENT) and result.complete(SERVER), result.events
    result.assert_same_keys()


def hello_edit(
    edit: Callable[[list[tuple[int, bytes]]], list[tuple[int, bytes]]] | None = None,
    suites: tuple[int, ...] | None = None,
    second_only: bool = False,
) -> Callable[[bytes, bool], bytes]:
    def apply(hello: bytes, second: bool) -> bytes:
        if second_only and not second:
            return hello
        return rebuild_hello(hello, edit, suites)

    return apply


def replace(
    ext_type: int, data: bytes
) -> Callable[[list[tuple[int, bytes]]], list[tuple[int, bytes]]]:
    return lambda exts: [(t, data if t == ext_type else d) for t, d in exts]


def share_entry(group: int, size: int = 32) -> bytes:
    return group.to_bytes(2, "big") + m.vector(os.urandom(size), 2)


@pytest.mark.parametrize(
    ("edit", "alerts"),
    [
        (hello_edit(lambda e: [*e, e[-1]]), (Alert.ILLEGAL_PARAMETER,)),  # duplicate extension
        (
            hello_edit(replace(m.KEY_SHARE, m.vector(share_entry(X25519_CODE) * 2, 2))),
            (Alert.ILLEGAL_PARAMETER,),  # two shares for one group
        ),
        (
            hello_edit(replace(m.KEY_SHARE, m.vector(share_entry(X25519_CODE, 31), 2))),
            (Alert.ILLEGAL_PARAMETER,),
        ),
        (
            hello_edit(replace(m.SUPPORTED_VERSIONS, m.u16_vector((0x0303,), 1))),
            (Alert.PROTOCOL_VERSION,),
        ),
        (
            hello_edit(lambda e: [x for x in e if x[0] != m.SIGNATURE_ALGORITHMS]),
            (Alert.MISSING_EXTENSION,),
        ),
        (
            hello_edit(replace(m.SIGNATURE_ALGORITHMS, m.u16_vector((0x0401, 0x0201)))),
            (Alert.HANDSHAKE_FAILURE,),
        ),
        (hello_edit(suites=(0x009C, 0xC02F)), (Alert.HANDSHAKE_FAILURE,)),  # TLS 1.2 suites only
        (hello_edit(replace(m.ALPN, m.vector(b"", 2))), (Alert.DECODE_ERROR,)),
    ],
    ids=[
        "duplicate-extension",
        "two-shares-one-group",
        "short-share",
        "tls12-only",
        "no-signature-algorithms",
        "pkcs1-only",
        "no-tls13-suite",
        "empty-alpn",
    ],
)
def test_a_client_hello_the_server_must_refuse(
    ids: Identities, edit: Callable[[bytes, bool], bytes], alerts: tuple[Alert, ...]
) -> None:
    result = link(
        ids,
        X25519,
        client_engine=scripted_client(ids, hello_edit=edit),
        alpn=([b"h2"], [b"h2"]),
    )
    refused(result, SERVER, *alerts)


@pytest.mark.parametrize(
    "edit",
    [
        hello_edit(suites=(0x1301,), second_only=True),  # the suite the retry named is gone
        hello_edit(replace(m.KEY_SHARE, m.vector(share_entry(X25519_CODE), 2)), second_only=True),
        hello_edit(
            lambda e: [
                (t, m.vector(d[2:] + share_entry(X25519_CODE), 2) if t == m.KEY_SHARE else d)
                for t, d in e
            ],
            second_only=True,
        ),  # the requested share plus another
    ],
    ids=["suite-dropped", "other-group", "extra-share"],
)
def test_a_second_client_hello_that_changes_what_it_must_not(
    ids: Identities, edit: Callable[[bytes, bool], bytes]
) -> None:
    result = link(
        ids,
        groups("x25519", "secp256r1"),
        groups("secp256r1"),
        client_engine=scripted_client(ids, hello_edit=edit),
    )
    refused(result, SERVER, Alert.ILLEGAL_PARAMETER)


def test_a_key_share_for_a_group_not_in_supported_groups(ids: Identities) -> None:
    """The share is for x25519, which both ends speak, but supported_groups lists only
    secp256r1: the server must not take the share."""
    edit = hello_edit(replace(m.SUPPORTED_GROUPS, m.u16_vector((SECP256R1,))))
    result = link(
        ids,
        X25519,
        groups("x25519", "secp256r1"),
        client_engine=scripted_client(ids, hello_edit=edit),
    )
    refused(result, SERVER, Alert.ILLEGAL_PARAMETER)


# ------------------------------------------------------------- bad key shares


P256_OFF_CURVE = b"\x04" + bytes(31) + b"\x01" + bytes(31) + b"\x01"


@pytest.mark.parametrize(
    ("group_names", "share"),
    [
        (["x25519"], share_entry(X25519_CODE, 0)[:2] + m.vector(bytes(32), 2)),  # all-zero output
        (["x25519"], share_entry(X25519_CODE, 0)[:2] + m.vector(b"\x01" + bytes(31), 2)),
        (["secp256r1"], SECP256R1.to_bytes(2, "big") + m.vector(P256_OFF_CURVE, 2)),
        (["secp256r1"], SECP256R1.to_bytes(2, "big") + m.vector(b"\x04" + bytes(64), 2)),
        (["X25519MLKEM768"], (0x11EC).to_bytes(2, "big") + m.vector(bytes(1216 + 32), 2)),
        (["X25519MLKEM768"], (0x11EC).to_bytes(2, "big") + m.vector(bytes(100), 2)),
    ],
    ids=[
        "x25519-zero",
        "x25519-low-order",
        "p256-off-curve",
        "p256-zero",
        "mlkem-zero",
        "mlkem-short",
    ],
)
def test_a_client_key_share_that_is_not_a_key(
    ids: Identities, group_names: list[str], share: bytes
) -> None:
    edit = hello_edit(replace(m.KEY_SHARE, m.vector(share, 2)))
    hybrids = groups(*group_names)
    result = link(ids, hybrids, client_engine=scripted_client(ids, hello_edit=edit))
    refused(result, SERVER, Alert.ILLEGAL_PARAMETER, Alert.DECODE_ERROR)


def server_share_zeroed(data: bytes) -> bytes:
    """The x25519 share of the ServerHello (its last 32 bytes) set to zero."""
    [(_, hello), *rest] = records_of(data)
    return hello[:-32] + bytes(32) + b"".join(r for _, r in rest)


def test_a_server_key_share_that_is_not_a_key(ids: Identities) -> None:
    result = link(ids, X25519, hook=on(SERVER, 0, server_share_zeroed))
    refused(result, CLIENT, Alert.ILLEGAL_PARAMETER, Alert.DECODE_ERROR)


# ------------------------------------------------------------- certificates


def test_a_certificate_request_the_client_cannot_sign_for(ids: Identities) -> None:
    """Only PKCS#1 v1.5 schemes requested: the client has nothing it may sign with."""
    script = flight(EE, lambda f: f.certificate_request((0x0401, 0x0501)), CERT, CV, FIN)
    refused(against_server(ids, script), CLIENT, Alert.HANDSHAKE_FAILURE)


@pytest.mark.parametrize(
    ("leaf", "alerts"),
    [
        (b"\x30\x03\x02\x01\x00", (Alert.BAD_CERTIFICATE,)),
        (b"\x00", (Alert.BAD_CERTIFICATE,)),
        (b"not a certificate" * 100, (Alert.BAD_CERTIFICATE,)),
    ],
    ids=["tiny-der", "one-byte", "text"],
)
def test_a_client_leaf_that_is_not_a_certificate(
    ids: Identities, leaf: bytes, alerts: tuple[Alert, ...]
) -> None:
    """The server reads the client's key from the leaf to check CertificateVerify before
    the chain is validated: an unparsable leaf is the client's fault, not an internal error."""
    script = flight(lambda f: f.certificate((leaf,)), CV, FIN)
    refused(against_client(ids, script), SERVER, *alerts)


def test_a_client_leaf_with_an_ed25519_key(ids: Identities) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, None)
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    script = flight(
        lambda f: f.certificate((der,)),
        lambda f: f.certificate_verify(0x0807, key.sign),
        FIN,
    )
    refused(
        against_client(ids, script), SERVER, Alert.UNSUPPORTED_CERTIFICATE, Alert.ILLEGAL_PARAMETER
    )


# ------------------------------------------------------------- known tlslite faults


@pytest.mark.xfail(strict=True, reason="tlslite-ng indexes hostNames[0] with no host_name")
def test_tlslite_server_refuses_an_empty_server_name_list_without_internal_error(
    ids: Identities,
) -> None:
    """Found by the tamper sweep (native client -> tlslite server, ClientHello byte 94):
    the tlslite engine turns a ServerNameList whose only entry is of an unknown name type
    (RFC 6066 3 lets a server ignore those) into an internal error. The native server
    ignores server_name. When tlslite is fixed this starts passing."""
    entry = b"\xff" + m.vector(b"server.qkdproxy.test", 2)
    edit = hello_edit(replace(m.SERVER_NAME, m.vector(entry, 2)))
    result = link(
        ids, X25519, client_engine=scripted_client(ids, hello_edit=edit), server_engine="tlslite"
    )
    result.assert_no_internal_error()


class PlainClient(ScriptedClient):
    """A client without middlebox compatibility: no session id, no change_cipher_spec."""

    compat_ccs = False
    script = staticmethod(honest_client_flight)

    def start_client(self, groups: Sequence[GroupSpec], share_group: GroupSpec) -> None:
        real = self._random

        def no_session_id(n: int) -> bytes:
            # The second 32-byte draw is the session id.
            return b"" if self._client_random else real(n)

        self._random = no_session_id
        super().start_client(groups, share_group)


def test_a_client_without_middlebox_compatibility_completes(ids: Identities) -> None:
    """No session id: the server echoes none and sends no change_cipher_spec either."""
    spec = ScriptedSpec(Identity.of(ids.client), PlainClient)
    result = link(ids, X25519, client_engine=spec)
    assert result.complete(CLIENT) and result.complete(SERVER), result.events
    assert [kind for kind, _ in records_of(result.sent[SERVER][0])][:2] == [
        HANDSHAKE,
        APPLICATION_DATA,
    ]
    assert CCS not in [kind for kind, _ in records_of(result.sent[CLIENT][1])]
    result.assert_same_keys()


# ------------------------------------------------------------- the server as victim, on the wire


@pytest.mark.parametrize(
    ("transmission", "data", "alert"),
    [
        (0, HEADER.pack(HANDSHAKE, 0x0301, 4) + b"\x01\xff\xff\xff", Alert.ILLEGAL_PARAMETER),
        (0, plain(HANDSHAKE, b"").data, Alert.UNEXPECTED_MESSAGE),
        (0, HEADER.pack(HANDSHAKE, 0x0301, MAX_PLAINTEXT + 1), Alert.RECORD_OVERFLOW),
        (0, plain(APPLICATION_DATA, bytes(40)).data, Alert.UNEXPECTED_MESSAGE),
        (0, plain(HANDSHAKE, m.message(m.SERVER_HELLO, bytes(40))).data, Alert.UNEXPECTED_MESSAGE),
        (1, HEADER.pack(APPLICATION_DATA, 0x0303, MAX_CIPHERTEXT + 1), Alert.RECORD_OVERFLOW),
        # Also plaintext after the keys: refused as that (either alert is right).
        (1, HEADER.pack(HANDSHAKE, 0x0303, MAX_PLAINTEXT + 1), Alert.UNEXPECTED_MESSAGE),
        (1, plain(APPLICATION_DATA, b"").data, Alert.BAD_RECORD_MAC),
    ],
    ids=[
        "16MiB-client-hello",
        "empty-record",
        "oversized-hello-record",
        "protected-before-hello",
        "server-hello-to-server",
        "oversized-protected",
        "oversized-plaintext",
        "empty-protected",
    ],
)
def test_the_server_refuses_a_hostile_record_on_sight(
    ids: Identities, transmission: int, data: bytes, alert: Alert
) -> None:
    """Only these bytes arrive in place of the client's hello or last flight: nothing the
    refusal could wait for."""
    result = link(ids, X25519, hook=on(CLIENT, transmission, lambda _: data))
    refused(result, SERVER, alert)


def test_a_16_mib_server_hello_is_refused_on_its_header(ids: Identities) -> None:
    header = HEADER.pack(HANDSHAKE, 0x0303, 4) + b"\x02\xff\xff\xff"
    result = link(ids, X25519, hook=on(SERVER, 0, lambda _: header))
    refused(result, CLIENT, Alert.ILLEGAL_PARAMETER, Alert.DECODE_ERROR)


# ------------------------------------------------------------- the engine on its own
# TlsConnection refuses some of these before the engine sees them; the engine's own checks
# must hold for any driver of the HandshakeEngine interface.


class FixedShares:
    """Key-exchange hooks that hand out a fixed share and secret."""

    def key_share(self, group: int) -> tuple[bytes, object]:
        return bytes(range(32)), None

    def shared_secret(self, group: int, peer_share: bytes) -> bytes:
        return bytes(32)


def bare_client(ids: Identities) -> NativeClient:
    client = NativeClient(
        FixedShares(),
        Identity.of(ids.client),
        alpn=None,
        chain_check=None,
        server_name=None,
        random=os.urandom,
    )
    hybrids = groups("x25519", "secp256r1")
    client.start_client([h.group for h in hybrids], hybrids[0].group)
    return client


def retry_for(client: NativeClient, group: int) -> bytes:
    [(_, record)] = records_of(client.take_output())
    session_id = m.parse_client_hello(record[9:]).session_id
    exts = [
        m.extension(m.SUPPORTED_VERSIONS, m.TLS13.to_bytes(2, "big")),
        m.extension(m.KEY_SHARE, group.to_bytes(2, "big")),
    ]
    return plain(HANDSHAKE, m.server_hello(m.HELLO_RETRY_RANDOM, session_id, 0x1302, exts)).data


@pytest.mark.parametrize(
    ("retries", "alert"),
    [((X25519_CODE,), Alert.ILLEGAL_PARAMETER), ((SECP256R1, SECP256R1), Alert.UNEXPECTED_MESSAGE)],
    ids=["for-the-shared-group", "twice"],
)
def test_the_client_engine_refuses_a_retry_by_itself(
    ids: Identities, retries: tuple[int, ...], alert: Alert
) -> None:
    client = bare_client(ids)
    retry = retry_for(client, retries[0])
    for _ in retries[1:]:  # retries the client follows
        client.feed(retry)
        assert not client.step()
        client.take_output()
    client.feed(retry)
    with pytest.raises(LocalAlertError) as refusal:
        client.step()
    assert refusal.value.description == alert
    assert client.take_output().endswith(bytes([2, alert]))  # the alert went out


def test_the_engine_refuses_input_after_eof_mid_message(ids: Identities) -> None:
    client = bare_client(ids)
    client.take_output()
    client.feed(HEADER.pack(HANDSHAKE, 0x0303, 10) + b"\x02\x00\x00")
    client.feed_eof()
    with pytest.raises(AbruptCloseError):
        client.step()


@pytest.mark.parametrize("direction", [CLIENT, SERVER])
def test_a_change_cipher_spec_after_the_peer_finished(ids: Identities, direction: str) -> None:
    """Allowed only before the peer's Finished (RFC 8446 5): one sent right behind the last
    flight, in the same segment, reaches the record layer and is refused there."""
    index = 1 if direction == CLIENT else 0
    ccs = plain(CCS, b"\x01").data
    result = link(ids, X25519, hook=on(direction, index, lambda data: data + ccs))
    victim = SERVER if direction == CLIENT else CLIENT
    failed = result.failed(victim)
    assert failed is not None and failed.alert == Alert.UNEXPECTED_MESSAGE, result.events


def test_a_protected_record_over_2_14_bytes_of_plaintext(ids: Identities) -> None:
    """Its ciphertext fits the 2^14 + 256 limit; its plaintext does not (RFC 8446 5.2)."""
    body = bytes(MAX_PLAINTEXT - 3)
    message = bytes([m.CERTIFICATE]) + len(body).to_bytes(3, "big") + body

    def big(forge: Forge) -> Item:
        return forge.sealed(message)

    refused(against_server(ids, flight(EE, CR, big)), CLIENT, Alert.RECORD_OVERFLOW)


# ------------------------------------------------------------- condemned by the header alone


@pytest.mark.parametrize(
    ("transmission", "data", "alert"),
    [
        # A plaintext HTTP request on the TLS port: type 0x47, "length" 0x202f.
        (0, b"GET / HTTP/1.0\r\n\r\n", Alert.UNEXPECTED_MESSAGE),
        (0, HEADER.pack(24, 0x0303, 100), Alert.UNEXPECTED_MESSAGE),  # heartbeat
        (0, HEADER.pack(0, 0x0303, 100), Alert.UNEXPECTED_MESSAGE),
        # In place of the client's last flight (before its hello the gate holds a CCS).
        (1, HEADER.pack(CCS, 0x0303, 100), Alert.UNEXPECTED_MESSAGE),  # CCS is 1 byte
        (1, HEADER.pack(ALERT, 0x0303, 1000), Alert.DECODE_ERROR),  # an alert is 2 bytes
        (1, HEADER.pack(0x47, 0x0303, 0x202F), Alert.UNEXPECTED_MESSAGE),
        (1, HEADER.pack(HANDSHAKE, 0x0303, 100), Alert.UNEXPECTED_MESSAGE),  # after the keys
    ],
    ids=["http", "heartbeat", "type-zero", "long-ccs", "long-alert", "http-later", "plaintext"],
)
def test_a_record_its_header_condemns_is_refused_without_waiting_for_its_body(
    ids: Identities, transmission: int, data: bytes, alert: Alert
) -> None:
    """Only the bytes shown arrive, then nothing: the refusal must not wait (until the
    handshake deadline) for a body that could not change it."""
    result = link(ids, X25519, hook=on(CLIENT, transmission, lambda _: data))
    refused(result, SERVER, alert)
    error = result.server.error
    assert error is not None
    assert error.outcome.value == "alert", error.reason


def test_a_protected_record_header_after_the_keys_at_the_client(ids: Identities) -> None:
    """The same on the client, in the middle of the server's flight."""
    header = lambda f: Raw(HEADER.pack(0x47, 0x0303, 0x202F))  # noqa: E731
    refused(against_server(ids, flight(EE, header)), CLIENT, Alert.UNEXPECTED_MESSAGE)
