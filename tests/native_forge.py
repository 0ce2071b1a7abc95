"""Hostile peers built on the native engine: a server whose protected flight, and a client
whose hello and last flight, are written by a test script on the real transcript and keys.
So a forged message can carry a valid signature and Finished (an authenticated but hostile
peer), or be broken exactly where a test wants it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from qkdproxy.core.tls.codec import Reader
from qkdproxy.core.tls.engine import HandshakeEngine, KeyExchangeHooks, PeerChainCheck
from qkdproxy.core.tls.native import NativeClient, NativeServer
from qkdproxy.core.tls.native import messages as m
from qkdproxy.core.tls.native.client import State as ClientState
from qkdproxy.core.tls.native.common import Identity, NativeHandshake
from qkdproxy.core.tls.native.schedule import KeySchedule
from qkdproxy.core.tls.native.server import State as ServerState
from qkdproxy.core.tls.native.signatures import CLIENT_CONTEXT, SERVER_CONTEXT, sign
from qkdproxy.core.tls.records import HEADER, seal_inner

HANDSHAKE, CCS, ALERT, APPLICATION_DATA = 22, 20, 21, 23


@dataclass(frozen=True)
class Raw:
    """Bytes appended to the output as they are (already framed records)."""

    data: bytes


@dataclass(frozen=True)
class Sealed:
    """One protected record of any inner type, sealed when its turn comes."""

    content: bytes
    content_type: int = 22


Item = bytes | Raw | Sealed  # bytes: handshake messages, sealed in one go
Script = Callable[["Forge"], Sequence[Item]]


def plain(content_type: int, body: bytes, version: int = 0x0303) -> Raw:
    """One plaintext record."""
    return Raw(HEADER.pack(content_type, version, len(body)) + body)


class Forge:
    """Writes messages on an engine's transcript, under its handshake keys."""

    def __init__(self, engine: NativeHandshake, finished_secret: bytes, context: bytes) -> None:
        self.engine = engine
        self._secret = finished_secret
        self._context = context

    @property
    def _schedule(self) -> KeySchedule:
        assert self.engine._schedule is not None
        return self.engine._schedule

    def add(self, message: bytes) -> bytes:
        """Any message, added to the transcript."""
        self.engine._transcript.add(message)
        return message

    def encrypted_extensions(self, *exts: bytes) -> bytes:
        return self.add(m.message(m.ENCRYPTED_EXTENSIONS, m.vector(b"".join(exts), 2)))

    def certificate_request(self, schemes: tuple[int, ...] = (0x0403, 0x0804)) -> bytes:
        ext = m.extension(m.SIGNATURE_ALGORITHMS, m.u16_vector(schemes))
        return self.add(m.message(m.CERTIFICATE_REQUEST, b"\x00" + m.vector(ext, 2)))

    def certificate(self, chain: tuple[bytes, ...] | None = None) -> bytes:
        return self.add(m.certificate(self.engine._identity.chain if chain is None else chain))

    def certificate_verify(
        self, scheme: int | None = None, signer: Callable[[bytes], bytes] | None = None
    ) -> bytes:
        """Signed over the transcript so far (``signer`` replaces the engine's own)."""
        identity = self.engine._identity
        scheme = identity.schemes[0] if scheme is None else scheme
        content = self._context + self.engine._transcript.digest()
        key = identity.credentials.private_key
        signature = signer(content) if signer else sign(key, scheme, content)
        return self.add(m.certificate_verify(scheme, signature))

    def finished(self, verify_data: bytes | None = None) -> bytes:
        if verify_data is None:
            verify_data = self._schedule.finished(self._secret, self.engine._transcript.digest())
        return self.add(m.message(m.FINISHED, verify_data))

    @staticmethod
    def sealed(content: bytes, content_type: int = HANDSHAKE) -> Sealed:
        """One protected record of any inner type (not added to the transcript)."""
        return Sealed(content, content_type)

    @staticmethod
    def sealed_each(messages: bytes, size: int) -> list[Sealed]:
        """``messages`` cut into protected records of ``size`` bytes."""
        return [Sealed(messages[i : i + size]) for i in range(0, len(messages), size)]


def pkcs1_signer(key: object) -> Callable[[bytes], bytes]:
    """A valid RSASSA-PKCS1-v1_5 signature (SHA-256), which TLS 1.3 forbids here."""
    assert isinstance(key, rsa.RSAPrivateKey)
    return lambda content: key.sign(content, padding.PKCS1v15(), hashes.SHA256())


def ecdsa_signer(key: object, algorithm: hashes.HashAlgorithm) -> Callable[[bytes], bytes]:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return lambda content: key.sign(content, ec.ECDSA(algorithm))


def emit(engine: NativeHandshake, items: Sequence[Item]) -> None:
    records = engine._records
    for item in items:
        if isinstance(item, Raw):
            records.out += item.data
        elif isinstance(item, Sealed):
            assert records.write is not None
            records.out += seal_inner(records.write.keys, item.content, item.content_type)
        elif item:
            records.send_protected(item)


class ScriptedServer(NativeServer):
    """A native server whose flight after ServerHello is the script's."""

    script: Script
    server_hello_extra: tuple[bytes, ...] = ()
    hello_record_tail: Callable[[Forge], bytes] | None = None
    compat_ccs = True

    def _send_flight(
        self, session_id: bytes, group: int, share: bytes, secret: bytes, scheme: int
    ) -> None:
        suite = self._suite
        assert suite is not None
        records, transcript = self._records, self._transcript
        exts = [
            m.extension(m.SUPPORTED_VERSIONS, m.TLS13.to_bytes(2, "big")),
            m.extension(m.KEY_SHARE, group.to_bytes(2, "big") + m.vector(share, 2)),
            *self.server_hello_extra,
        ]
        server_hello = m.server_hello(os.urandom(32), session_id, self._suite_code, exts)
        transcript.add(server_hello)
        schedule = self._schedule = KeySchedule(suite.hash_name, secret)
        client_secret, server_secret = schedule.handshake_secrets(transcript.digest())
        forge = Forge(self, server_secret, SERVER_CONTEXT)
        tail = type(self).hello_record_tail
        # Messages that should be protected, sent in the ServerHello's own plaintext record.
        records.send_plain(server_hello + (tail(forge) if tail else b""))
        if self.compat_ccs:
            records.send_change_cipher_spec()
        self._client_secret = client_secret
        records.write = self._direction(server_secret)
        records.read = self._direction(client_secret)
        emit(self, type(self).script(forge))
        self._client_app, server_app = schedule.application_secrets(transcript.digest())
        records.write = self._direction(server_app)
        self._move(ServerState.CERTIFICATE)


def honest_server_flight(forge: Forge) -> list[Item]:
    """What the real server sends, as a script to start from."""
    return [
        forge.encrypted_extensions()
        + forge.certificate_request()
        + forge.certificate()
        + forge.certificate_verify()
        + forge.finished()
    ]


class ScriptedClient(NativeClient):
    """A native client whose hello (``hello_edit``) and last flight (``script``) are the
    test's. The script runs after the server's Finished was checked."""

    script: Script | None = None
    hello_edit: Callable[[bytes, bool], bytes] | None = None
    compat_ccs = True

    def _client_hello(self, cookie: bytes | None) -> bytes:
        hello = super()._client_hello(cookie)
        edit = type(self).hello_edit
        return edit(hello, self._retry_suite is not None) if edit else hello

    def _on_finished(self, message: bytes) -> None:
        script = type(self).script
        if script is None:
            super()._on_finished(message)
            return
        schedule = self._schedule
        assert schedule is not None
        client_secret = self._handshake_secrets[0]
        self._transcript.add(message)
        client_app, server_app = schedule.application_secrets(self._transcript.digest())
        records = self._records
        if self.compat_ccs:
            records.send_change_cipher_spec()
        emit(self, script(Forge(self, client_secret, CLIENT_CONTEXT)))
        records.read = self._direction(server_app)
        records.write = self._direction(client_app)
        self._move(ClientState.DONE)
        self._finish(schedule.main)


def honest_client_flight(forge: Forge) -> list[Item]:
    """What the real client sends after the server's Finished."""
    return [forge.certificate() + forge.certificate_verify() + forge.finished()]


def rebuild_hello(
    hello: bytes,
    edit: Callable[[list[tuple[int, bytes]]], list[tuple[int, bytes]]] | None = None,
    suites: tuple[int, ...] | None = None,
) -> bytes:
    """A ClientHello with its extensions (in order) or suites replaced."""
    reader = Reader(hello[4:])
    reader.u16()
    random = reader.take(32)
    session_id = reader.vector(1)
    old_suites = reader.vector(2)
    reader.vector(1)
    block = Reader(reader.vector(2))
    exts: list[tuple[int, bytes]] = []
    while not block.done():
        ext_type = block.u16()
        exts.append((ext_type, block.vector(2)))
    if edit is not None:
        exts = edit(exts)
    codes = suites or tuple(
        int.from_bytes(old_suites[i : i + 2], "big") for i in range(0, len(old_suites), 2)
    )
    return m.client_hello(random, session_id, codes, [m.extension(t, d) for t, d in exts])


@dataclass(frozen=True)
class ScriptedSpec:
    """An engine spec that builds one of the scripted roles (or any native subclass)."""

    identity: Identity
    role: type[NativeHandshake]
    name: str = "native"

    def new(
        self,
        hooks: KeyExchangeHooks,
        *,
        is_client: bool,
        chain_check: PeerChainCheck | None,
        alpn: Sequence[bytes] | None,
        server_name: str | None,
    ) -> HandshakeEngine:
        return self.role(
            hooks,
            self.identity,
            alpn=alpn,
            chain_check=chain_check,
            server_name=server_name,
            random=os.urandom,
        )
