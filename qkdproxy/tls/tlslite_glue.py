"""Everything that touches tlslite-ng 0.8.2, in one place.

tlslite supplies the TLS 1.3 state machine; this module
- registers the qkdproxy groups in tlslite's group tables,
- routes key exchange through per-connection hooks (prepared by :mod:`keyexchange`),
- replaces tlslite's pure-Python AEADs and RSA/ECDSA arithmetic with `cryptography`,
- validates peer certificate chains (tlslite does not).
The hook points are private tlslite names, so :func:`self_test` checks them at start-up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import tlslite
import tlslite.handshakesettings as tl_settings
import tlslite.recordlayer as tl_recordlayer
import tlslite.x509 as tl_x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from tlslite.api import HandshakeSettings, TLSConnection, X509CertChain
from tlslite.constants import ExtensionType, GroupName, KeyUpdateMessageType
from tlslite.errors import TLSBadRecordMAC, TLSIllegalParameterException
from tlslite.messages import CertificateRequest, KeyShareEntry
from tlslite.utils.ecdsakey import ECDSAKey
from tlslite.utils.rsakey import RSAKey

from qkdproxy.groups import GroupSpec
from qkdproxy.tls.credentials import Credentials, PrivateKey
from qkdproxy.tls.records import MAX_PLAINTEXT, TrafficKeys

TLSLITE_VERSION = "0.8.2"
ByteLike = bytes | bytearray | memoryview
CIPHER_NAMES = ["aes256gcm", "aes128gcm", "chacha20-poly1305"]
# tlslite 0.8.2 servers without an ALPN list crash (TypeError) on a client that offers ALPN;
# a name no client offers makes them answer without ALPN instead.
NO_ALPN_PLACEHOLDER = bytearray(b"\x00qkdproxy-none")

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
}
_DIGEST_BY_SIZE: dict[int, hashes.HashAlgorithm] = {
    32: hashes.SHA256(),
    48: hashes.SHA384(),
    64: hashes.SHA512(),
}
_CURVE_NAMES = {"secp256r1": "NIST256p", "secp384r1": "NIST384p", "secp521r1": "NIST521p"}


class SelfTestError(RuntimeError):
    """tlslite does not offer the hook points qkdproxy relies on."""


class KeyExchangeHooks(Protocol):
    """What a connection asks its key exchange for (see :mod:`qkdproxy.tls.keyexchange`)."""

    def key_share(self, group: int) -> tuple[bytes, object]: ...

    def shared_secret(self, group: int, peer_share: bytes) -> bytes: ...


# ---------------------------------------------------------------------------- records


class _Aead:
    """An AEAD with the interface tlslite's record layer calls."""

    isBlockCipher = False  # noqa: N815 - tlslite's attribute names
    isAEAD = True  # noqa: N815
    nonceLength = 12  # noqa: N815
    tagLength = 16  # noqa: N815
    implementation = "cryptography"

    def __init__(self, name: str, cipher: AESGCM | ChaCha20Poly1305) -> None:
        self.name = name
        self.cipher = cipher

    def seal(self, nonce: ByteLike, plaintext: ByteLike, data: ByteLike) -> bytearray:
        return bytearray(self.cipher.encrypt(bytes(nonce), bytes(plaintext), bytes(data)))

    def open(self, nonce: ByteLike, ciphertext: ByteLike, data: ByteLike) -> bytearray | None:
        try:
            return bytearray(self.cipher.decrypt(bytes(nonce), bytes(ciphertext), bytes(data)))
        except InvalidTag:
            return None

    def decrypt(self, ciphertext: ByteLike) -> bytearray:
        """tlslite's SSLv2 record path: any bytes with the top bit set reach it, so an
        on-path attacker can; SSLv2 has no place in TLS 1.3, and the answer is an alert."""
        raise TLSBadRecordMAC("SSLv2-style record refused")


def _create_aes_gcm(key: bytes, impl_list: object = None) -> _Aead:
    return _Aead(f"aes{len(key) * 8}gcm", AESGCM(bytes(key)))


def _create_chacha20(key: bytes, impl_list: object = None) -> _Aead:
    return _Aead("chacha20-poly1305", ChaCha20Poly1305(bytes(key)))


# ------------------------------------------------------------------------------ keys


def _hash(name: str | None) -> hashes.HashAlgorithm:
    if name is None or name.lower() not in _HASHES:
        raise ValueError(f"unsupported hash {name!r}")
    return _HASHES[name.lower()]()


class CryptographyRSAKey(RSAKey):  # type: ignore[misc]
    """tlslite RSA key backed by `cryptography` (signatures over pre-hashed digests)."""

    def __init__(self, key: rsa.RSAPrivateKey | rsa.RSAPublicKey, key_type: str = "rsa") -> None:
        # RSAKey.__init__ raises NotImplementedError by design; set its fields directly.
        self._private = key if isinstance(key, rsa.RSAPrivateKey) else None
        self._public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
        numbers = self._public.public_numbers()
        self.n, self.e, self.key_type, self._key_hash = numbers.n, numbers.e, key_type, None

    def hasPrivateKey(self) -> bool:  # noqa: N802
        return self._private is not None

    # tlslite passes ``padding``, ``hashAlg`` and ``saltLen`` by keyword, so the names stay.
    def sign(
        self,
        data: bytes,
        padding: str = "pkcs1",
        hashAlg: str | None = None,  # noqa: N803
        saltLen: int | None = None,  # noqa: N803
    ) -> bytearray:
        """Sign a pre-hashed digest (RSASSA-PSS or PKCS#1 v1.5)."""
        if self._private is None:
            raise ValueError("public key cannot sign")
        hash_alg = _hash(hashAlg)
        scheme = _rsa_padding(padding, hash_alg, saltLen)
        return bytearray(self._private.sign(bytes_(data), scheme, Prehashed(hash_alg)))

    def verify(
        self,
        signature: bytes,
        data: bytes,
        padding: str = "pkcs1",
        hashAlg: str | None = None,  # noqa: N803
        saltLen: int | None = None,  # noqa: N803
    ) -> bool:
        """Check a signature over a pre-hashed digest."""
        if padding == "pkcs1" and self.key_type == "rsa-pss":
            return False
        try:
            hash_alg = _hash(hashAlg)
            scheme = _rsa_padding(padding, hash_alg, saltLen)
            self._public.verify(bytes_(signature), bytes_(data), scheme, Prehashed(hash_alg))
        except (InvalidSignature, ValueError):
            return False
        return True


def _rsa_padding(name: str, hash_alg: hashes.HashAlgorithm, salt: int | None) -> Any:
    if name.lower() == "pss":
        length = hash_alg.digest_size if salt is None else salt
        return asym_padding.PSS(mgf=asym_padding.MGF1(hash_alg), salt_length=length)
    return asym_padding.PKCS1v15()


class CryptographyECDSAKey(ECDSAKey):  # type: ignore[misc]
    """tlslite ECDSA key backed by `cryptography`."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> None:
        self._private = key if isinstance(key, ec.EllipticCurvePrivateKey) else None
        self._public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
        self.curve_name = _CURVE_NAMES[self._public.curve.name]
        self.key_type = "ecdsa"

    def __len__(self) -> int:
        return int(self._public.curve.key_size)

    def hasPrivateKey(self) -> bool:  # noqa: N802
        return self._private is not None

    def _sign(self, data: bytes, hash_alg: str) -> bytearray:
        if self._private is None:
            raise ValueError("public key cannot sign")
        algorithm = ec.ECDSA(Prehashed(_hash(hash_alg)))
        return bytearray(self._private.sign(bytes_(data), algorithm))

    def _verify(self, signature: bytes, hash_bytes: bytes) -> bool:
        digest = _DIGEST_BY_SIZE.get(len(hash_bytes))
        if digest is None:
            return False
        try:
            self._public.verify(bytes_(signature), bytes_(hash_bytes), ec.ECDSA(Prehashed(digest)))
        except (InvalidSignature, ValueError):
            return False
        return True


def bytes_(value: ByteLike) -> bytes:
    """tlslite hands around bytearrays; `cryptography` wants immutable bytes in places."""
    return value if isinstance(value, bytes) else bytes(value)


def tlslite_private_key(key: PrivateKey) -> RSAKey | ECDSAKey:
    """Wrap a `cryptography` private key for tlslite."""
    if isinstance(key, rsa.RSAPrivateKey):
        return CryptographyRSAKey(key)
    return CryptographyECDSAKey(key)


def tlslite_chain(credentials: Credentials) -> X509CertChain:
    """The certificate chain in tlslite's form (parsed once per credential load)."""
    chain = X509CertChain()
    chain.parsePemList(
        "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in credentials.chain)
    )
    return chain


def _public_rsa_key(n: int, e: int, key_type: str, *_: object) -> CryptographyRSAKey:
    return CryptographyRSAKey(rsa.RSAPublicNumbers(e, n).public_key(), key_type)


def _ecdsa_pubkey_parsing(self: Any, subject_public_key_info: bytes) -> None:
    try:
        key = serialization.load_der_public_key(bytes_(subject_public_key_info))
    except (ValueError, TypeError):
        raise SyntaxError("Malformed or unsupported public key in certificate") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVE_NAMES:
        raise SyntaxError("Unsupported elliptic curve in certificate")
    self.publicKey = CryptographyECDSAKey(key)


# ------------------------------------------------------------------------ connection


class PeerChainCheck(Protocol):
    """Validates the peer's DER chain; returns None, or (alert, reason) to refuse it."""

    def __call__(self, chain: list[bytes]) -> tuple[int, str] | None: ...


class HookedTLSConnection(TLSConnection):  # type: ignore[misc]
    """A TLSConnection whose key exchange and peer-chain check are delegated per connection."""

    def __init__(self, sock: object, hooks: KeyExchangeHooks, chain_check: PeerChainCheck) -> None:
        super().__init__(sock)
        self._qkd_hooks = hooks
        self._qkd_chain_check = chain_check
        # qkdproxy does not resume sessions; tlslite would keep every NewSessionTicket a peer
        # sends (and accepts them even from clients), so they are dropped on arrival.
        self.tickets = _Discard()

    def _genKeyShareEntry(self, group: int, version: object) -> KeyShareEntry:  # noqa: N802
        share, private = self._prepared(lambda: self._qkd_hooks.key_share(group))
        return KeyShareEntry().create(group, bytearray(share), private)

    def _getKEX(self, group: int, version: object) -> _PreparedKex:  # noqa: N802
        return _PreparedKex(self, group)

    def _KEMEncaps(self, group: int, public: bytes) -> tuple[bytearray, KeyShareEntry]:  # noqa: N802
        secret = self._prepared(lambda: self._qkd_hooks.shared_secret(group, bytes_(public)))
        share, _ = self._prepared(lambda: self._qkd_hooks.key_share(group))
        return bytearray(secret), KeyShareEntry().create(group, bytearray(share), None)

    @staticmethod
    def _prepared(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (LookupError, ValueError) as exc:
            raise TLSIllegalParameterException(str(exc)) from None

    def _check_certchain_with_settings(self, cert_chain: Any, settings: Any) -> Iterator[Any]:
        # tlslite's generator yields 0/1 for I/O and then the peer's public key as its result.
        result = None
        for result in super()._check_certchain_with_settings(cert_chain, settings):
            if isinstance(result, int):
                yield result
            else:
                break
        refusal = self._qkd_chain_check([bytes(c.bytes) for c in cert_chain.x509List])
        if refusal is not None:
            yield from self._sendError(refusal[0], refusal[1])
        yield result

    def _queue_message(self, msg: Any) -> Any:
        return super()._queue_message(without_empty_compress_certificate(msg))

    def request_key_update(self) -> Iterator[Any]:
        """Send KeyUpdate(update_not_requested): fresh keys for what we send.

        Each side renews its own sending keys on its own budget. Asking the peer to answer
        (update_requested) would make its reading side write, possibly after we closed.
        """
        return self.send_keyupdate_request(  # type: ignore[no-any-return]
            KeyUpdateMessageType.update_not_requested
        )

    def send_alert(self, alert: int, reason: str) -> Iterator[Any]:
        """Send a fatal alert (encrypted if keys are set) and close; raises TLSLocalAlert."""
        return self._sendError(alert, reason)  # type: ignore[no-any-return]

    def traffic_keys(self, direction: str) -> TrafficKeys | None:
        """The current application traffic keys for ``"read"`` or ``"write"``.

        None whenever the records must go through tlslite: before or after the TLS 1.3
        application phase, or with a cipher this module did not install. The returned keys
        share tlslite's sequence counter, and a KeyUpdate replaces them (ask again).
        """
        if self.closed or self.version != (3, 4) or self._readBuffer:
            return None
        if direction == "write" and self._send_record_limit < MAX_PLAINTEXT:
            return None  # the peer asked for smaller records (RFC 8449): tlslite obeys it
        layer = self._recordLayer
        state = layer._readState if direction == "read" else layer._writeState
        aead = state.encContext
        if not isinstance(aead, _Aead) or state.fixedNonce is None:
            return None
        return TrafficKeys(aead.cipher, int.from_bytes(state.fixedNonce, "big"), state)

    def take_read_ahead(self) -> bytes:
        """Inbound bytes tlslite's socket wrapper read ahead but has not parsed yet.

        tlslite reads its socket in 4 KiB chunks; bytes it took past its last record must
        go back in front of the stream before anyone else parses records.
        """
        buffered: bytearray = self.sock._read_buffer
        data = bytes(buffered)
        buffered.clear()
        return data


def without_empty_compress_certificate(msg: Any) -> Any:
    """``msg``, minus a compress_certificate extension with no algorithm in it.

    tlslite 0.8.2 servers put compress_certificate in every TLS 1.3 CertificateRequest, with
    the algorithms they accept; qkdproxy accepts none, and an empty list is malformed
    (RFC 8879 requires 1..127 entries). OpenSSL 3.2+ built with a compression algorithm
    aborts with ``tls_parse_compress_certificate:bad extension``. Leaving the extension out
    says the same thing (no compression) correctly.
    """
    if isinstance(msg, CertificateRequest) and msg.extensions:
        msg.extensions = [
            ext
            for ext in msg.extensions
            if ext.extType != ExtensionType.compress_certificate or ext.algorithms
        ]
    return msg


class _Discard(list[Any]):
    """A list that stays empty."""

    def append(self, item: Any) -> None:
        """Drop the item."""


class _PreparedKex:
    """The duck-typed key-exchange object tlslite expects, answering from the hooks."""

    def __init__(self, conn: HookedTLSConnection, group: int) -> None:
        self._conn = conn
        self._group = group

    def calc_shared_key(self, private: object, peer_share: bytes) -> bytearray:
        hooks = self._conn._qkd_hooks
        secret = self._conn._prepared(lambda: hooks.shared_secret(self._group, bytes_(peer_share)))
        return bytearray(secret)


# --------------------------------------------------------------------------- set-up


def make_settings(groups: Iterable[GroupSpec], share_group: GroupSpec | None) -> HandshakeSettings:
    """TLS 1.3-only settings offering ``groups`` in order, with one key share."""
    settings = HandshakeSettings()
    settings.minVersion = (3, 4)
    settings.maxVersion = (3, 4)
    settings.versions = [(3, 4)]
    settings.cipherNames = list(CIPHER_NAMES)
    settings.eccCurves = [g.tlslite_name for g in groups]
    settings.keyShares = [share_group.tlslite_name] if share_group else []
    settings.dhGroups = []
    settings.ticketKeys = []
    settings.ticket_count = 0
    settings.use_heartbeat_extension = False
    # tlslite 0.8.2 compresses the client certificate whenever its own ClientHello offered
    # compression, even if the server never asked: stacks without RFC 8879 then abort.
    settings.certificate_compression_send = []
    settings.certificate_compression_receive = []
    return settings


def register_groups(groups: Iterable[GroupSpec]) -> None:
    """Make tlslite know every group (and the code point this process uses for it)."""
    for group in groups:
        previous = getattr(GroupName, group.tlslite_name, None)
        for table in (GroupName.allKEM, GroupName.all):
            if previous is not None and previous in table and previous != group.code_point:
                table.remove(previous)
        setattr(GroupName, group.tlslite_name, group.code_point)
        if group.code_point not in GroupName.all:
            GroupName.all.append(group.code_point)
        # KEM-style groups take tlslite's encapsulation path on the server.
        if group.post_quantum and group.code_point not in GroupName.allKEM:
            GroupName.allKEM.append(group.code_point)
        for names in (
            tl_settings.CURVE_NAMES,
            tl_settings.ALL_CURVE_NAMES,
            tl_settings.TLS13_PERMITTED_GROUPS,
        ):
            if group.tlslite_name not in names:
                names.append(group.tlslite_name)


_installed = False


def install(groups: Iterable[GroupSpec]) -> None:
    """Patch tlslite once per process (crypto back-ends), then (re)register ``groups``."""
    global _installed  # noqa: PLW0603 - tlslite's tables are process-wide by nature
    if not _installed:
        self_test()
        tl_recordlayer.createAESGCM = _create_aes_gcm
        tl_recordlayer.createCHACHA20 = _create_chacha20
        tl_x509._createPublicRSAKey = _public_rsa_key
        tl_x509.X509._ecdsa_pubkey_parsing = _ecdsa_pubkey_parsing
        _installed = True
    register_groups(groups)


def self_test() -> None:
    """Fail fast if this tlslite lacks the private hook points qkdproxy overrides."""
    if tlslite.__version__ != TLSLITE_VERSION:
        raise SelfTestError(f"tlslite-ng {TLSLITE_VERSION} required, found {tlslite.__version__}")
    required: list[tuple[object, str]] = [
        (TLSConnection, "_getKEX"),
        (TLSConnection, "_genKeyShareEntry"),
        (TLSConnection, "_KEMEncaps"),
        (TLSConnection, "_check_certchain_with_settings"),
        (TLSConnection, "_sendError"),
        (TLSConnection, "_queue_message"),
        (tl_recordlayer, "createAESGCM"),
        (tl_recordlayer, "createCHACHA20"),
        (tl_x509, "_createPublicRSAKey"),
        (tl_x509.X509, "_ecdsa_pubkey_parsing"),
        (GroupName, "allKEM"),
        (tl_settings, "TLS13_PERMITTED_GROUPS"),
    ]
    # The record fast path reads per-connection attributes, which exist only on instances.
    sample = TLSConnection(None)
    required += [
        (sample, "_readBuffer"),
        (sample.sock, "_read_buffer"),
        (sample._recordLayer, "_readState"),
        (sample._recordLayer, "_writeState"),
    ]
    missing = [name for owner, name in required if not hasattr(owner, name)]
    if missing:
        raise SelfTestError(f"tlslite-ng lacks hook points: {', '.join(missing)}")
    digest = hashlib.sha256(b"self-test").digest()
    probe = CryptographyECDSAKey(ec.generate_private_key(ec.SECP256R1()))
    if not probe.verify(probe.sign(digest, hashAlg="sha256"), digest):
        raise SelfTestError("ECDSA sign/verify round trip failed")
