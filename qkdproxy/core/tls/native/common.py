"""What the native client and server handshakes share: inputs, outputs, failure, and the
hand-over to the record layer."""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, NoReturn, TypeVar

from cryptography.hazmat.primitives.serialization import Encoding

from qkdproxy.core.groups import GroupSpec
from qkdproxy.core.tls.codec import MessageError
from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.eku import TLS_FLAGS_EXTENSION, tls_flags_data
from qkdproxy.core.tls.eku import KeySchedule as EkuSchedule
from qkdproxy.core.tls.engine import (
    AbruptCloseError,
    HandOverError,
    KeyExchangeHooks,
    LocalAlertError,
    PeerChainCheck,
)
from qkdproxy.core.tls.hello import ParsedClientHello, ParsedServerHello
from qkdproxy.core.tls.native import messages as m
from qkdproxy.core.tls.native.flight import HandshakeRecords
from qkdproxy.core.tls.native.schedule import KeySchedule, Transcript
from qkdproxy.core.tls.native.signatures import OFFERED_SCHEMES, leaf_key, signable_schemes, verify
from qkdproxy.core.tls.record_layer import (
    CIPHER_SUITES,
    CipherSuite,
    Direction,
    KeyUpdatePolicy,
    RecordLayer,
)
from qkdproxy.core.tls.wire import Alert, HeldHello

T = TypeVar("T")

# Our preference, the order tlslite was configured with: AES-256-GCM first.
SUITES: tuple[int, ...] = (0x1302, 0x1301, 0x1303)
SUITE_NAMES = {0x1301: "aes128gcm", 0x1302: "aes256gcm", 0x1303: "chacha20-poly1305"}
# Extensions that never change, built once: the schemes we verify (a client's hello, a
# server's CertificateRequest) and the Extended Key Update offer (hello, or its answer).
OFFERED_SCHEMES_EXTENSION = m.extension(m.SIGNATURE_ALGORITHMS, m.u16_vector(OFFERED_SCHEMES))
EKU_OFFER_EXTENSION = m.extension(TLS_FLAGS_EXTENSION, tls_flags_data())


@dataclass(frozen=True, slots=True)
class Identity:
    """Our certificate chain (DER, leaf first), its key and the schemes that key signs, and
    the Certificate message every handshake sends (it never changes)."""

    chain: tuple[bytes, ...]
    credentials: Credentials
    schemes: tuple[int, ...]
    certificate: bytes

    @classmethod
    def of(cls, credentials: Credentials) -> Identity:
        """Prepared once per endpoint."""
        chain = tuple(c.public_bytes(Encoding.DER) for c in credentials.chain)
        schemes = signable_schemes(credentials.private_key)
        return cls(chain, credentials, schemes, m.certificate(chain))


class NativeHandshake(ABC):
    """One handshake of one role; :mod:`client` and :mod:`server` add the messages."""

    state: Enum
    # The message types each state takes (a state not listed takes none).
    ACCEPTS: ClassVar[Mapping[Enum, frozenset[int]]] = {}

    def __init__(
        self,
        hooks: KeyExchangeHooks,
        identity: Identity,
        *,
        alpn: Sequence[bytes] | None,
        chain_check: PeerChainCheck | None = None,
        server_name: str | None = None,
        random: Callable[[int], bytes],
    ) -> None:
        self._hooks = hooks
        self._identity = identity
        self._alpn = tuple(alpn) if alpn else ()
        self._chain_check = chain_check
        self._server_name = server_name
        self._random = random
        self._records = HandshakeRecords()
        self._transcript = Transcript()
        self._schedule: KeySchedule | None = None
        self._suite: CipherSuite | None = None
        self._suite_code = 0
        self._done = False
        self._peer_chain: list[bytes] = []
        self._selected_alpn: bytes | None = None
        self._eku_schedule: EkuSchedule | None = None
        # Extended Key Update: offered by us (set before the handshake), offered by the peer.
        self.eku_offer = False
        self.eku_peer = False
        self._handlers = self._message_handlers()

    # ----------------------------------------------------------------- inputs

    def start_client(self, groups: Sequence[GroupSpec], share_group: GroupSpec) -> None:
        """Only a client starts by sending."""
        raise LocalAlertError(int(Alert.INTERNAL_ERROR), "a server engine cannot start a client")

    def start_server(self, groups: Sequence[GroupSpec]) -> None:
        """Only a server waits for a ClientHello."""
        raise LocalAlertError(int(Alert.INTERNAL_ERROR), "a client engine cannot wait for hellos")

    def feed(self, data: bytes) -> None:
        """Bytes from the peer."""
        self._records.inbound += data

    def feed_client_hello(self, hello: HeldHello, parsed: ParsedClientHello) -> None:
        """A ClientHello's records (the server keeps the parse; a client refuses the
        message by its type, unparsed)."""
        self.feed(hello.records)

    def feed_server_hello(self, hello: HeldHello, parsed: ParsedServerHello) -> None:
        """A ServerHello's records (the client keeps the parse; a server refuses the
        message by its type, unparsed)."""
        self.feed(hello.records)

    def feed_eof(self) -> None:
        """The peer closed its sending side."""
        self._records.eof = True

    def step(self) -> bool:
        """Process every whole message; True once the handshake is complete."""
        records = self._records
        try:
            while not self._done:
                message = records.next_message()
                if message is None:
                    if records.eof:
                        raise AbruptCloseError("peer closed the connection during the handshake")
                    return False
                self._on_message(message)
        except MessageError as exc:
            self.send_alert(int(exc.alert), str(exc))
        return True

    def _on_message(self, message: bytes) -> None:
        # The records refused any other type on its header; checked again here because
        # the handlers are found by type alone.
        if message[0] not in self._records.accepts:
            raise unexpected(message, self.state.value)
        self._handlers[message[0]](message)

    @abstractmethod
    def _message_handlers(self) -> dict[int, Callable[[bytes], None]]:
        """Each message type this role takes, and its handler."""

    def _move(self, state: Enum) -> None:
        """Go to ``state``: from now on only its message types are taken."""
        self.state = state
        self._records.accepts = self.ACCEPTS.get(state, frozenset())

    # ---------------------------------------------------------------- outputs

    def take_output(self) -> bytes:
        """Bytes for the peer."""
        return self._records.take_output()

    def send_alert(self, alert: int, reason: str) -> NoReturn:
        """Queue a fatal alert and end the handshake."""
        self._records.send_alert(alert)
        raise LocalAlertError(alert, reason)

    def hand_over(self, policy: KeyUpdatePolicy | None = None) -> tuple[RecordLayer, bytes]:
        """The record layer of the established connection and the bytes read past Finished."""
        records = self._records
        if not self._done or records.read is None or records.write is None:
            raise HandOverError("no TLS 1.3 session to hand over")
        if not records.at_record_boundary:
            raise HandOverError("handshake data left over after Finished")
        layer = RecordLayer(records.read, records.write, is_client=self.is_client, policy=policy)
        leftover = bytes(records.inbound)
        records.inbound.clear()
        return layer, leftover

    def key_schedule(self) -> EkuSchedule:
        """The main secret and transcript hash (through client Finished) EKU chains from."""
        if self._eku_schedule is None:
            raise HandOverError("handshake not complete")
        return self._eku_schedule

    @property
    @abstractmethod
    def is_client(self) -> bool:
        """Which role this handshake plays."""

    @property
    def peer_chain(self) -> list[bytes]:
        """The peer's certificates, DER, leaf first."""
        return self._peer_chain

    @property
    def cipher_name(self) -> str:
        """The negotiated suite's name."""
        return SUITE_NAMES.get(self._suite_code, "")

    @property
    def alpn(self) -> bytes | None:
        """The negotiated application protocol."""
        return self._selected_alpn

    @property
    def eku_negotiated(self) -> bool:
        """Both sides offered Extended Key Update."""
        return self.eku_offer and self.eku_peer

    # ---------------------------------------------------------------- helpers

    def _choose_suite(self, code: int) -> CipherSuite:
        suite = CIPHER_SUITES[code]
        self._suite, self._suite_code = suite, code
        return suite

    @staticmethod
    def _hook(call: Callable[[], T]) -> T:
        """A key-exchange hook; a refusal there is the peer's share not matching."""
        try:
            return call()
        except (LookupError, ValueError) as exc:
            raise MessageError(str(exc), Alert.ILLEGAL_PARAMETER) from None

    def _check_certificate_verify(self, message: bytes, context: bytes) -> None:
        """The peer's CertificateVerify, over ``context`` and the transcript so far, by its
        leaf's key; then it joins the transcript."""
        scheme, signature = m.parse_certificate_verify(message[4:])
        verify(
            leaf_key(self._peer_chain[0]), scheme, signature, context + self._transcript.digest()
        )
        self._transcript.add(message)

    def _check_finished(self, message: bytes, peer_secret: bytes, who: str) -> KeySchedule:
        """The peer's Finished, made with its handshake traffic secret ``peer_secret``; it must
        end its record (keys change after it). Then it joins the transcript."""
        schedule = self._schedule
        assert schedule is not None
        expected = schedule.finished(peer_secret, self._transcript.digest())
        if not hmac.compare_digest(message[4:], expected):
            raise MessageError(f"{who} Finished does not verify", Alert.DECRYPT_ERROR)
        if not self._records.at_record_boundary:
            raise MessageError("Finished does not end its record", Alert.UNEXPECTED_MESSAGE)
        self._transcript.add(message)
        return schedule

    def _direction(self, secret: bytes) -> Direction:
        assert self._suite is not None
        return Direction(self._suite, secret)

    def _finish(self, main_secret: bytes) -> None:
        """Complete: keep what Extended Key Update chains from."""
        assert self._suite is not None
        self._eku_schedule = EkuSchedule(
            self._suite.hash_name, main_secret, self._transcript.digest()
        )
        self._done = True


def unexpected(message: bytes, expecting: str) -> MessageError:
    """The error for a message the state machine does not expect here."""
    return MessageError(
        f"unexpected handshake message type {message[0]} (expecting {expecting})",
        Alert.UNEXPECTED_MESSAGE,
    )
