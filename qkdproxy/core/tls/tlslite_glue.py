"""Everything that touches tlslite-ng 0.8.2, in one place.

tlslite supplies the TLS 1.3 state machine; this module
- registers the qkdproxy groups in tlslite's group tables,
- routes key exchange through per-connection hooks (prepared by :mod:`keyexchange`),
- replaces tlslite's pure-Python AEADs and RSA/ECDSA arithmetic with `cryptography`,
- validates peer certificate chains (tlslite does not).
The hook points are private tlslite names, so :func:`self_test` checks them at start-up.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import hmac
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import tlslite
import tlslite.handshakesettings as tl_settings
import tlslite.recordlayer as tl_recordlayer
import tlslite.tlsconnection as tl_connection
import tlslite.tlsrecordlayer as tl_tlsrecordlayer
import tlslite.utils.cryptomath as tl_cryptomath
import tlslite.x509 as tl_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from tlslite.api import HandshakeSettings, TLSConnection, X509CertChain
from tlslite.constants import (
    CipherSuite,
    ExtensionType,
    GroupName,
    KeyUpdateMessageType,
    TLSEnum,
)
from tlslite.errors import (
    TLSAbruptCloseError,
    TLSBadRecordMAC,
    TLSError,
    TLSIllegalParameterException,
    TLSInternalError,
    TLSLocalAlert,
    TLSProtocolException,
    TLSRemoteAlert,
)
from tlslite.extensions import CustomNameExtension, SupportedGroupsExtension, TLSExtension
from tlslite.handshakehashes import HandshakeHashes
from tlslite.handshakehelpers import HandshakeHelpers
from tlslite.messages import (
    CertificateRequest,
    ClientHello,
    EncryptedExtensions,
    HelloMessage,
    KeyShareEntry,
)
from tlslite.utils.codec import DecodeError, Parser
from tlslite.utils.ecdsakey import ECDSAKey
from tlslite.utils.rsakey import RSAKey

from qkdproxy.core.groups import GroupKind, GroupSpec
from qkdproxy.core.tls.credentials import Credentials, PrivateKey
from qkdproxy.core.tls.eku import TLS_FLAGS_EXTENSION, KeySchedule, has_flag, tls_flags_data
from qkdproxy.core.tls.engine import (
    AbruptCloseError,
    HandOverError,
    KeyExchangeHooks,
    LocalAlertError,
    PeerChainCheck,
    RemoteAlertError,
)
from qkdproxy.core.tls.events import DataReceived, KeysUpdated
from qkdproxy.core.tls.hello import ParsedClientHello, ParsedServerHello
from qkdproxy.core.tls.record_layer import CIPHER_SUITES, Direction, KeyUpdatePolicy, RecordLayer
from qkdproxy.core.tls.records import hkdf_expand_label
from qkdproxy.core.tls.wire import HeldHello

__all__ = [
    "NO_ALPN_PLACEHOLDER",
    "PRIVATE_NAMES",
    "HookedTLSConnection",
    "MemorySocket",
    "SelfTestError",
    # tlslite's exceptions, re-exported so that no other module imports tlslite
    "TLSAbruptCloseError",
    "TLSError",
    "TLSLocalAlert",
    "TLSRemoteAlert",
    "TlsliteEngine",
    "TlsliteEngineSpec",
    "install",
    "make_settings",
    "self_test",
    "tlslite_chain",
    "tlslite_group_name",
    "tlslite_private_key",
]

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


# ------------------------------------------------------------------ hot handshake steps
# Profiles of a tunnelled connection (docs/PERFORMANCE.md) put these tlslite steps among the
# costliest pure-Python parts of a handshake. The replacements compute the same values.


def _secure_hmac(key: ByteLike, data: ByteLike, algorithm: str) -> bytearray:
    return bytearray(hmac.digest(bytes_(key), bytes_(data), algorithm))


def _hkdf_expand_label(
    secret: ByteLike, label: ByteLike, hash_value: ByteLike, length: int, algorithm: str
) -> bytearray:
    # tlslite's own loop computes one HMAC block more than it returns.
    return bytearray(
        hkdf_expand_label(bytes_(secret), bytes_(label), length, algorithm, bytes_(hash_value))
    )


_EMPTY_DIGESTS = {name: hashlib.new(name).digest() for name in ("sha256", "sha384", "sha512")}


def _derive_secret(
    secret: ByteLike, label: ByteLike, handshake_hashes: Any, algorithm: str
) -> bytearray:
    if handshake_hashes is None:
        digest = _EMPTY_DIGESTS.get(algorithm) or hashlib.new(algorithm).digest()
    else:
        digest = handshake_hashes.digest(algorithm)
    size = hashlib.new(algorithm).digest_size
    return _hkdf_expand_label(secret, label, digest, size, algorithm)


_FAST_KDF: dict[str, Callable[..., bytearray]] = {
    "secureHMAC": _secure_hmac,
    "HKDF_expand_label": _hkdf_expand_label,
    "derive_secret": _derive_secret,
}


def _check_fast_kdf() -> None:
    """Our key derivations must give tlslite's values (checked before they replace them)."""
    secret, label, context = bytearray(range(48)), bytearray(b"c hs traffic"), bytearray(48)
    tlslite_kdf = _TLSLITE_KDF
    for name in ("sha256", "sha384"):
        size = hashlib.new(name).digest_size
        pairs = [
            (tlslite_kdf["secureHMAC"](secret, context, name), _secure_hmac(secret, context, name)),
            (
                tlslite_kdf["HKDF_expand_label"](secret, label, context, size + 5, name),
                _hkdf_expand_label(secret, label, context, size + 5, name),
            ),
            (
                tlslite_kdf["derive_secret"](secret, label, None, name),
                _derive_secret(secret, label, None, name),
            ),
        ]
        if any(theirs != ours for theirs, ours in pairs):
            raise SelfTestError("our HKDF differs from tlslite's")


# tlslite's own, kept for the comparison (install() rebinds the module's names too).
_TLSLITE_KDF = {name: getattr(tl_cryptomath, name) for name in _FAST_KDF}


def _rebind_kdf() -> None:
    """Point every tlslite module that imported a key-derivation function at ours."""
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("tlslite"):
            continue
        for name, original in _TLSLITE_KDF.items():
            if getattr(module, name, None) is original:
                setattr(module, name, _FAST_KDF[name])


class _TranscriptHashes(HandshakeHashes):  # type: ignore[misc]
    """tlslite's transcript, hashed as it grows only with the TLS 1.3 suites' hashes.

    tlslite feeds every handshake message to six hash functions (MD5 to SHA-512) for the
    sake of older versions; TLS 1.3 reads only SHA-256 or SHA-384. The others are computed
    from the kept transcript when asked for, so every digest has the same value.
    """

    _RUNNING = ("sha256", "sha384")

    def __init__(self) -> None:  # tlslite's __init__ would start all six
        self._running = {name: hashlib.new(name) for name in self._RUNNING}
        self._handshake_buffer = bytearray()

    def update(self, data: ByteLike) -> None:
        text = bytes_(data)
        for running in self._running.values():
            running.update(text)
        self._handshake_buffer += text

    def digest(self, digest: str | None = None) -> bytes | bytearray:
        running = self._running.get(digest) if digest else None
        if running is not None:
            return running.digest()
        if digest is None:  # TLS 1.0/1.1
            return self._lazy_digest("md5") + self._lazy_digest("sha1")
        if digest == "intrinsic":
            return self._handshake_buffer
        if digest not in ("md5", "sha1", "sha224", "sha512"):
            raise ValueError("Unknown digest name")
        return self._lazy_digest(digest)

    def _lazy_digest(self, name: str) -> bytes:
        return hashlib.new(name, bytes(self._handshake_buffer)).digest()

    def _lazy(self, name: str) -> Any:
        return hashlib.new(name, bytes(self._handshake_buffer))

    @property
    def _handshakeMD5(self) -> Any:  # noqa: N802 - read by tlslite's SSLv3 code
        return self._lazy("md5")

    @property
    def _handshakeSHA(self) -> Any:  # noqa: N802
        return self._lazy("sha1")

    def copy(self) -> _TranscriptHashes:
        other = _TranscriptHashes.__new__(_TranscriptHashes)
        other._running = {name: h.copy() for name, h in self._running.items()}
        other._handshake_buffer = bytearray(self._handshake_buffer)
        return other


def _check_transcript() -> None:
    """Our transcript must give tlslite's digests (checked before it replaces tlslite's)."""
    theirs, ours = HandshakeHashes(), _TranscriptHashes()
    for part in (b"client hello", bytearray(b"server hello" * 200), b""):
        theirs.update(part)
        ours.update(part)
    names = (None, "md5", "sha1", "sha224", "sha256", "sha384", "sha512", "intrinsic")
    for copied in (False, True):
        left, right = (theirs.copy(), ours.copy()) if copied else (theirs, ours)
        if any(bytes(left.digest(name)) != bytes(right.digest(name)) for name in names):
            raise SelfTestError("our transcript hashes differ from tlslite's")
        if left.digestSSL(bytearray(48), b"CLNT") != right.digestSSL(bytearray(48), b"CLNT"):
            raise SelfTestError("our transcript hashes differ from tlslite's (SSLv3)")


# tlslite turns code points into names (SignatureScheme.toRepr...) by scanning every class
# attribute on each call, several times per handshake. The answers are memoised; group
# registration (the only change to these classes) clears the memo.
_REPR_MEMO: dict[tuple[type, object, tuple[str, ...]], str | None] = {}
_tlslite_to_repr = TLSEnum.toRepr.__func__


def _memo_to_repr(cls: type, value: object, blacklist: list[str] | None = None) -> str | None:
    try:
        key = (cls, value, tuple(blacklist or ()))
        hash(key)
    except TypeError:
        return _tlslite_to_repr(cls, value, blacklist)  # type: ignore[no-any-return]
    if key not in _REPR_MEMO:
        _REPR_MEMO[key] = _tlslite_to_repr(cls, value, blacklist)
    return _REPR_MEMO[key]


# Cipher-suite filtering by settings runs six times per handshake, on constant tables.
_SUITES_MEMO: dict[tuple[object, ...], list[int]] = {}
_tlslite_filter_suites = CipherSuite._filterSuites


def _memo_filter_suites(suites: list[int], settings: Any, version: Any = None) -> list[int]:
    key = (
        tuple(suites),
        tuple(settings.macNames),
        tuple(settings.cipherNames),
        tuple(settings.keyExchangeNames),
        settings.maxVersion if version is None else version,
    )
    found = _SUITES_MEMO.get(key)
    if found is None:
        found = _SUITES_MEMO[key] = _tlslite_filter_suites(suites, settings, version)
    return list(found)


# tlslite's extensions keep their payload under a per-class name through __getattr__ and
# __setattr__; its versions probe with hasattr, so every attribute set while an extension
# is built raises and formats an AttributeError (some 200 per handshake). Same behaviour,
# looked up in the instance dictionary instead.
def _extension_getattr(self: Any, name: str) -> Any:
    fields = self.__dict__
    if name != "_field_name" and "_field_name" in fields and name == fields["_field_name"]:
        return fields["_internal_value"]
    raise AttributeError(f"type object '{type(self).__name__}' has no attribute '{name}'")


def _extension_setattr(self: Any, name: str, value: Any) -> None:
    fields = self.__dict__
    if "_field_name" in fields and name == fields["_field_name"]:
        fields["_internal_value"] = value
    else:
        object.__setattr__(self, name, value)


# tlslite reads every length, code point and list element of a handshake message through
# Parser.get, three Python calls each (some 120 per handshake and side). The versions below
# inline them: same values, same errors, the same index left behind after an error
# (_check_parser compares them with tlslite's at start-up).
_tlslite_parser = {
    name: getattr(Parser, name) for name in ("get", "getVarBytes", "getVarList", "getVarTupleList")
}
_PAST_END = "Read past end of buffer"


def _parser_get(self: Any, length: int) -> int:
    index = self.index
    end = index + length
    data = self.bytes
    if end > len(data):
        raise DecodeError(_PAST_END)
    self.index = end
    return int.from_bytes(data[index:end], "big")


def _parser_get_var_bytes(self: Any, length_length: int) -> Any:
    index = self.index
    data = self.bytes
    start = index + length_length
    if start > len(data):
        raise DecodeError(_PAST_END)
    self.index = start
    end = start + int.from_bytes(data[index:start], "big")
    if end > len(data):
        raise DecodeError(_PAST_END)
    self.index = end
    return data[start:end]


def _parser_get_var_list(self: Any, length: int, length_length: int) -> list[int]:
    size = _parser_get(self, length_length)
    if size % length != 0:
        raise DecodeError("Encoded length not a multiple of element length")
    index = self.index
    data = self.bytes
    end = index + size
    if end > len(data):
        # tlslite reads element by element: the whole ones that fit are consumed.
        self.index = index + (len(data) - index) // length * length
        raise DecodeError(_PAST_END)
    self.index = end
    return [int.from_bytes(data[i : i + length], "big") for i in range(index, end, length)]


def _parser_get_var_tuple_list(
    self: Any, elem_length: int, elem_num: int, length_length: int
) -> list[tuple[int, ...]]:
    size = _parser_get(self, length_length)
    tuple_size = elem_length * elem_num
    if size % tuple_size != 0:
        raise DecodeError("Encoded length not a multiple of element length")
    index = self.index
    data = self.bytes
    end = index + size
    if end > len(data):
        # tlslite reads element by element: the whole elements that fit are consumed.
        self.index = index + (len(data) - index) // elem_length * elem_length
        raise DecodeError(_PAST_END)
    self.index = end
    return [
        tuple(
            int.from_bytes(data[i : i + elem_length], "big")
            for i in range(start, start + tuple_size, elem_length)
        )
        for start in range(index, end, tuple_size)
    ]


_FAST_PARSER: dict[str, Callable[..., Any]] = {
    "get": _parser_get,
    "getVarBytes": _parser_get_var_bytes,
    "getVarList": _parser_get_var_list,
    "getVarTupleList": _parser_get_var_tuple_list,
}


def _parser_outcome(method: Callable[..., Any], data: bytes, args: tuple[int, ...]) -> object:
    return _parser_outcome_from(method, Parser(bytearray(data)), args)


def _parser_outcome_from(method: Callable[..., Any], parser: Any, args: tuple[int, ...]) -> object:
    """What ``method`` returns or raises on ``parser``, and where it leaves the index."""
    try:
        value = method(parser, *args)
    except DecodeError as exc:
        value = ("DecodeError", str(exc))
    except ZeroDivisionError:
        value = "ZeroDivisionError"
    return value, parser.index


def _check_parser() -> None:
    """Our Parser methods must give tlslite's values, errors and positions on every
    boundary: each prefix of a few encodings, each argument combination they take."""
    samples = [
        bytes([0, 4, 0, 1, 0, 2, 9]),
        bytes([3, 0x13, 0x01, 0x13]),
        bytes([0, 6, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE]),
        bytes(range(1, 12)),
    ]
    calls: dict[str, list[tuple[int, ...]]] = {
        "get": [(n,) for n in range(5)],
        "getVarBytes": [(n,) for n in range(1, 4)],
        "getVarList": [(e, n) for e in range(0, 4) for n in range(1, 3)],
        "getVarTupleList": [(e, k, n) for e in range(1, 3) for k in range(1, 3) for n in (1, 2)],
    }
    for name, argument_sets in calls.items():
        for sample in samples:
            for cut in range(len(sample) + 1):
                for args in argument_sets:
                    theirs = _parser_outcome(_tlslite_parser[name], sample[:cut], args)
                    ours = _parser_outcome(_FAST_PARSER[name], sample[:cut], args)
                    if theirs != ours:
                        raise SelfTestError(f"our Parser.{name} differs from tlslite's")


# tlslite looks up a hello's extensions some 70 times per handshake pair, each through a
# list comprehension (a function call of its own on Python 3.11). Same result, same error.
_tlslite_get_extension = HelloMessage.getExtension


def _get_extension(self: Any, ext_type: int) -> Any:
    found = None
    for ext in self.extensions or ():
        if ext.extType == ext_type:
            if found is not None:
                raise TLSInternalError("Multiple extensions of the same type present")
            found = ext
    return found


# tlslite serialises the whole ClientHello once more only to learn whether it is 256 to 511
# bytes long (then it adds a padding extension). One whose key shares alone are longer than
# that gets no padding: with an ML-KEM share (1184 bytes) every ClientHello of ours.
_tlslite_align_padding = HandshakeHelpers.alignClientHelloPadding
PADDED_HELLO_MAX = 511


def _align_client_hello_padding(client_hello: Any) -> None:
    shares = client_hello.getExtension(ExtensionType.key_share)
    share_bytes = sum(len(s.key_exchange) for s in shares.client_shares or ()) if shares else 0
    if share_bytes <= PADDED_HELLO_MAX:
        _tlslite_align_padding(client_hello)


# A peer presents the same certificates on every connection: tlslite's pure-Python DER
# parse (about 90 us each) is done once per distinct certificate. Only parsing is shared;
# chain validation (verify.py) runs on every handshake.
_PARSED_MAX = 256
_parsed: dict[bytes, dict[str, Any]] = {}
_tlslite_parse_binary = tl_x509.X509.parseBinary


def _parse_binary_once(self: Any, cert_bytes: ByteLike) -> Any:
    der = bytes_(cert_bytes)
    fields = _parsed.get(der)
    if fields is None:
        _tlslite_parse_binary(self, cert_bytes)
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()  # bounded: a peer cycling certificates only costs itself parses
        _parsed[der] = dict(vars(self))
    else:
        vars(self).update(fields)
        self.bytes = bytearray(der)
    return self


# ------------------------------------------------------------------------ connection


class HookedTLSConnection(TLSConnection):  # type: ignore[misc]
    """A TLSConnection whose key exchange and peer-chain check are delegated per connection."""

    def __init__(self, sock: object, hooks: KeyExchangeHooks, chain_check: PeerChainCheck) -> None:
        super().__init__(sock)
        self._qkd_hooks = hooks
        self._qkd_chain_check = chain_check
        # qkdproxy does not resume sessions; tlslite would keep every NewSessionTicket a peer
        # sends (and accepts them even from clients), so they are dropped on arrival.
        self.tickets = _Discard()
        # Extended Key Update: offered by us (set before the handshake), offered by the peer.
        self.eku_offer = False
        self.eku_peer = False

    @property
    def eku_negotiated(self) -> bool:
        """Both sides offered Extended Key Update (the server acknowledged it in EE)."""
        return self.eku_offer and self.eku_peer

    def _sendMsg(self, msg: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        if isinstance(msg, ClientHello) and self.eku_offer:
            _add_eku_flag(msg)
        return super()._sendMsg(msg, *args, **kwargs)

    def _getMsg(self, *args: Any, **kwargs: Any) -> Iterator[Any]:  # noqa: N802
        for result in super()._getMsg(*args, **kwargs):
            if isinstance(result, ClientHello | EncryptedExtensions):
                ext = result.getExtension(TLS_FLAGS_EXTENSION)
                self.eku_peer = ext is not None and has_flag(bytes(ext.extData))
            yield result

    def key_schedule(self) -> KeySchedule:
        """The main secret and handshake transcript hash the first Extended Key Update
        chains from (valid once the handshake completed)."""
        suite = CIPHER_SUITES[self.session.cipherSuite]
        return KeySchedule(
            suite.hash_name,
            bytes(self.session.masterSecret),
            bytes(self._first_handshake_hashes.digest(suite.hash_name)),
        )

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
        if isinstance(msg, EncryptedExtensions) and self.eku_negotiated:
            _add_eku_flag(msg)
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

    def hand_over(self, policy: KeyUpdatePolicy | None = None) -> tuple[RecordLayer, bytes]:
        """The established connection's record layer, and inbound bytes tlslite read ahead.

        From here on tlslite touches no record: the traffic secrets and sequence numbers
        move to a :class:`RecordLayer`. Raises :class:`TLSProtocolException` if tlslite
        holds anything the record layer could not take over (a partial handshake message
        or decrypted data), which only a peer breaking the protocol causes.
        """
        session = self.session
        suite = CIPHER_SUITES.get(session.cipherSuite) if session else None
        if self.closed or self.version != (3, 4) or suite is None:
            raise TLSProtocolException("no TLS 1.3 session to hand over")
        if self._readBuffer or any(self._defragmenter.buffers.values()):
            raise TLSProtocolException("handshake data left over after Finished")
        layer = self._recordLayer
        client_secret = Direction(suite, bytes(session.cl_app_secret))
        server_secret = Direction(suite, bytes(session.sr_app_secret))
        read, write = (
            (server_secret, client_secret) if self._client else (client_secret, server_secret)
        )
        read.seqnum = layer._readState.seqnum
        write.seqnum = layer._writeState.seqnum
        records = RecordLayer(
            read,
            write,
            is_client=self._client,
            send_limit=self._send_record_limit,
            policy=policy,
        )
        # tlslite reads its socket in 4 KiB chunks: bytes past its last record go first.
        buffered: bytearray = self.sock._read_buffer
        leftover = bytes(buffered)
        buffered.clear()
        return records, leftover


class MemorySocket:
    """The socket tlslite sees: reads from ``inbound``, writes to ``outbound``, never blocks."""

    def __init__(self) -> None:
        self.inbound = bytearray()
        self.outbound = bytearray()
        self.eof = False

    def recv(self, size: int) -> bytes:
        if not self.inbound:
            if self.eof:
                return b""
            # tlslite reads args[0] to tell "would block" from real errors.
            raise BlockingIOError(errno.EAGAIN, "no data buffered")
        chunk = bytes(self.inbound[:size])
        del self.inbound[:size]
        return chunk

    def send(self, data: bytes) -> int:
        self.outbound += data
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.outbound += data

    def close(self) -> None:
        """Nothing to release: the transport belongs to the driver."""

    def shutdown(self, how: int) -> None:
        """Nothing to release: the transport belongs to the driver."""


class TlsliteEngine:
    """tlslite's handshake behind the engine interface of :mod:`qkdproxy.core.tls.engine`:
    its generators stepped on an in-memory socket, its exceptions translated."""

    def __init__(
        self,
        spec: TlsliteEngineSpec,
        hooks: KeyExchangeHooks,
        *,
        is_client: bool,
        chain_check: PeerChainCheck | None,
        alpn: Sequence[bytes] | None,
        server_name: str | None,
    ) -> None:
        self._spec = spec
        self._sock = MemorySocket()
        self._tls = HookedTLSConnection(self._sock, hooks, chain_check or (lambda chain: None))
        self._alpn = [bytearray(p) for p in alpn] if alpn else None
        self._server_name = server_name
        self._steps: Iterator[Any] | None = None

    @property
    def eku_offer(self) -> bool:
        return self._tls.eku_offer

    @eku_offer.setter
    def eku_offer(self, value: bool) -> None:
        self._tls.eku_offer = value

    def start_client(self, groups: Sequence[GroupSpec], share_group: GroupSpec) -> None:
        """Create the client generator (the ClientHello leaves on the first step)."""
        self._steps = self._tls.handshakeClientCert(
            self._spec.chain, self._spec.private_key, settings=make_settings(groups, share_group),
            serverName=self._server_name, async_=True, alpn=self._alpn,
        )  # fmt: skip

    def start_server(self, groups: Sequence[GroupSpec]) -> None:
        """Create the server generator, limited to ``groups``."""
        self._steps = self._tls.handshakeServerAsync(
            certChain=self._spec.chain,
            privateKey=self._spec.private_key,
            settings=make_settings(groups, groups[0]),
            reqCert=True,
            alpn=self._alpn or [NO_ALPN_PLACEHOLDER],
        )

    def feed(self, data: bytes) -> None:
        self._sock.inbound += data

    def feed_client_hello(self, hello: HeldHello, parsed: ParsedClientHello) -> None:
        """tlslite parses every message itself: the bytes only."""
        self.feed(hello.records)

    def feed_server_hello(self, hello: HeldHello, parsed: ParsedServerHello) -> None:
        """tlslite parses every message itself: the bytes only."""
        self.feed(hello.records)

    def feed_eof(self) -> None:
        self._sock.eof = True

    def step(self) -> bool:
        """Step tlslite until it waits for bytes it does not have; True once it is done."""
        assert self._steps is not None
        with _translated():
            while True:
                try:
                    result = next(self._steps)
                except StopIteration:
                    return True
                if result == 0 and not self._sock.inbound and not self._sock.eof:
                    return False

    def take_output(self) -> bytes:
        out = bytes(self._sock.outbound)
        self._sock.outbound.clear()
        return out

    def send_alert(self, alert: int, reason: str) -> None:
        with _translated():
            for _ in self._tls.send_alert(alert, reason):
                pass

    def hand_over(self, policy: KeyUpdatePolicy | None = None) -> tuple[RecordLayer, bytes]:
        try:
            records, leftover = self._tls.hand_over(policy)
        except TLSError as exc:
            raise HandOverError(str(exc)) from None
        leftover += bytes(self._sock.inbound)
        self._sock.inbound.clear()
        return records, leftover

    def key_schedule(self) -> KeySchedule:
        return self._tls.key_schedule()

    @property
    def peer_chain(self) -> list[bytes]:
        chain = self._tls.session.clientCertChain if self._tls.session else None
        return [bytes(c.bytes) for c in chain.x509List] if chain else []

    @property
    def cipher_name(self) -> str:
        return str(self._tls.getCipherName() or "")

    @property
    def alpn(self) -> bytes | None:
        app_protocol = self._tls.session.appProto if self._tls.session else None
        return bytes(app_protocol) if app_protocol else None

    @property
    def eku_negotiated(self) -> bool:
        return bool(self._tls.eku_negotiated)


@contextmanager
def _translated() -> Iterator[None]:
    """tlslite's handshake exceptions as the engine interface's."""
    try:
        yield
    except TLSLocalAlert as exc:
        raise LocalAlertError(exc.description, exc.message or str(exc)) from None
    except TLSRemoteAlert as exc:
        raise RemoteAlertError(exc.description, f"peer sent alert {exc}") from None
    except TLSAbruptCloseError:
        raise AbruptCloseError("peer closed the connection during the handshake") from None


@dataclass(frozen=True, slots=True)
class TlsliteEngineSpec:
    """tlslite, prepared for one endpoint: its chain and key in tlslite's forms."""

    chain: Any
    private_key: Any
    name: str = "tlslite"

    @classmethod
    def of(cls, credentials: Credentials) -> TlsliteEngineSpec:
        """Convert the credentials once per endpoint."""
        return cls(tlslite_chain(credentials), tlslite_private_key(credentials.private_key))

    def new(
        self,
        hooks: KeyExchangeHooks,
        *,
        is_client: bool,
        chain_check: PeerChainCheck | None,
        alpn: Sequence[bytes] | None,
        server_name: str | None,
    ) -> TlsliteEngine:
        """A fresh tlslite handshake."""
        return TlsliteEngine(
            self, hooks, is_client=is_client, chain_check=chain_check, alpn=alpn,
            server_name=server_name,
        )  # fmt: skip


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


def _add_eku_flag(msg: Any) -> None:
    """Put the Extended Key Update flag (tls_flags) in a ClientHello or EncryptedExtensions."""
    if msg.extensions is None:
        msg.extensions = []
    if msg.getExtension(TLS_FLAGS_EXTENSION) is None:
        msg.extensions.append(
            TLSExtension(extType=TLS_FLAGS_EXTENSION).create(bytearray(tls_flags_data()))
        )


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


class _ValidatedOnce(HandshakeSettings):  # type: ignore[misc]
    """Settings that tlslite validates once: it validates (copies and checks) the settings
    it is given several times per handshake; later calls get a copy of the first result,
    its lists copied too, so a handshake that changes its copy changes nothing shared."""

    _validated: HandshakeSettings | None = None

    def validate(self) -> HandshakeSettings:
        if self._validated is None:
            self._validated = super().validate()
        other = copy.copy(self._validated)
        for name, value in vars(other).items():
            if isinstance(value, list):
                setattr(other, name, list(value))
        return other


_SETTINGS_MAX = 64
_settings: dict[tuple[tuple[str, ...], str | None], HandshakeSettings] = {}


def make_settings(groups: Iterable[GroupSpec], share_group: GroupSpec | None) -> HandshakeSettings:
    """TLS 1.3-only settings offering ``groups`` in order, with one key share.

    Built once per (groups, share) and shared by every handshake that uses them.
    """
    names = tuple(tlslite_group_name(g) for g in groups)
    share = tlslite_group_name(share_group) if share_group else None
    found = _settings.get((names, share))
    if found is None:
        if len(_settings) >= _SETTINGS_MAX:
            _settings.clear()
        found = _settings[(names, share)] = _new_settings(list(names), share)
    return found


def _new_settings(groups: list[str], share: str | None) -> HandshakeSettings:
    settings = _ValidatedOnce()
    settings.minVersion = (3, 4)
    settings.maxVersion = (3, 4)
    settings.versions = [(3, 4)]
    settings.cipherNames = list(CIPHER_NAMES)
    settings.eccCurves = groups
    settings.keyShares = [share] if share else []
    settings.dhGroups = []
    settings.ticketKeys = []
    settings.ticket_count = 0
    settings.use_heartbeat_extension = False
    # tlslite 0.8.2 compresses the client certificate whenever its own ClientHello offered
    # compression, even if the server never asked: stacks without RFC 8879 then abort.
    settings.certificate_compression_send = []
    settings.certificate_compression_receive = []
    return settings


# tlslite names groups through class attributes of GroupName and module-level lists: state
# shared by the whole process. Each (name, code point) pair gets a name of its own, set
# once and never rebound, so endpoints with different code-point overrides cannot see
# each other's (an override used to rebind the shared name for every endpoint).
_tlslite_names: dict[tuple[str, int], str] = {}


def tlslite_group_name(group: GroupSpec) -> str:
    """The name tlslite knows ``group`` by at its code point (registered on first use)."""
    key = (group.tlslite_name, group.code_point)
    name = _tlslite_names.get(key)
    if name is None:
        name = _register(group)
        _tlslite_names[key] = name
    return name


def _register(group: GroupSpec) -> str:
    stock = getattr(GroupName, group.tlslite_name, None)
    name = group.tlslite_name
    if stock is not None and stock != group.code_point:
        name = f"{group.tlslite_name}_{group.code_point:04x}"
    setattr(GroupName, name, group.code_point)
    _REPR_MEMO.clear()
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
        if name not in names:
            names.append(name)
    return name


_installed = False


def install(groups: Iterable[GroupSpec]) -> None:
    """Patch tlslite once per process (crypto back-ends); register ``groups`` (once each)."""
    global _installed  # noqa: PLW0603 - tlslite's tables are process-wide by nature
    if not _installed:
        tl_recordlayer.createAESGCM = _create_aes_gcm
        tl_recordlayer.createCHACHA20 = _create_chacha20
        tl_x509._createPublicRSAKey = _public_rsa_key
        tl_x509.X509._ecdsa_pubkey_parsing = _ecdsa_pubkey_parsing
        tl_x509.X509.parseBinary = _parse_binary_once
        TLSEnum.toRepr = classmethod(_memo_to_repr)
        CipherSuite._filterSuites = staticmethod(_memo_filter_suites)
        CustomNameExtension.__getattr__ = _extension_getattr
        CustomNameExtension.__setattr__ = _extension_setattr
        _check_fast_kdf()
        _rebind_kdf()
        _check_transcript()
        _check_parser()
        for name, method in _FAST_PARSER.items():
            setattr(Parser, name, method)
        HandshakeHelpers.alignClientHelloPadding = staticmethod(_align_client_hello_padding)
        HelloMessage.getExtension = _get_extension
        tl_connection.HandshakeHashes = _TranscriptHashes
        tl_tlsrecordlayer.HandshakeHashes = _TranscriptHashes
        self_test()  # with the back-ends above in place: what the daemon will run
        _installed = True
    for group in groups:
        tlslite_group_name(group)


# Every private tlslite name qkdproxy relies on: (owner, name, what for). The self-test
# checks each exists, then runs a handshake, a KeyUpdate and records to pin behaviour.
_SAMPLE = TLSConnection(None)
PRIVATE_NAMES: list[tuple[object, str, str]] = [
    (TLSConnection, "_getKEX", "per-connection key exchange (overridden)"),
    (TLSConnection, "_genKeyShareEntry", "per-connection key share (overridden)"),
    (TLSConnection, "_KEMEncaps", "server-side KEM encapsulation (overridden)"),
    (TLSConnection, "_check_certchain_with_settings", "peer chain validation (overridden)"),
    (TLSConnection, "_sendError", "fatal alerts during the handshake"),
    (TLSConnection, "_queue_message", "drops an empty compress_certificate (overridden)"),
    (TLSConnection, "_send_record_limit", "the peer's record_size_limit, for our records"),
    (TLSConnection, "_sendMsg", "adds the Extended Key Update flag to ClientHello (overridden)"),
    (TLSConnection, "_getMsg", "sees the peer's Extended Key Update flag (overridden)"),
    (tl_recordlayer, "createAESGCM", "AES-GCM from cryptography (rebound)"),
    (tl_recordlayer, "createCHACHA20", "ChaCha20-Poly1305 from cryptography (rebound)"),
    (tl_x509, "_createPublicRSAKey", "RSA peer keys from cryptography (rebound)"),
    (tl_x509.X509, "_ecdsa_pubkey_parsing", "ECDSA peer keys from cryptography (rebound)"),
    (tl_x509.X509, "parseBinary", "certificate parsing, once per certificate (wrapped)"),
    (TLSEnum, "toRepr", "code point names, memoised (wrapped)"),
    (CipherSuite, "_filterSuites", "cipher suites allowed by settings, memoised (wrapped)"),
    (HandshakeHelpers, "alignClientHelloPadding", "ClientHello padding (shortcut)"),
    (HelloMessage, "getExtension", "a hello's extension by type (replaced)"),
    (Parser, "get", "integers of handshake messages, inlined (replaced)"),
    (Parser, "getVarBytes", "byte vectors of handshake messages, inlined (replaced)"),
    (Parser, "getVarList", "integer lists of handshake messages, inlined (replaced)"),
    (Parser, "getVarTupleList", "tuple lists of handshake messages, inlined (replaced)"),
    (SupportedGroupsExtension(), "_field_name", "an extension's payload name (read directly)"),
    (SupportedGroupsExtension(), "_internal_value", "an extension's payload (read directly)"),
    (tl_cryptomath, "secureHMAC", "HMAC on hmac.digest (rebound)"),
    (tl_cryptomath, "HKDF_expand_label", "HKDF-Expand-Label on hmac.digest (rebound)"),
    (tl_cryptomath, "derive_secret", "Derive-Secret on hmac.digest (rebound)"),
    (tl_connection, "HandshakeHashes", "the transcript, SHA-256/384 only as it grows (rebound)"),
    (tl_tlsrecordlayer, "HandshakeHashes", "the transcript (rebound)"),
    (GroupName, "allKEM", "groups on the server's encapsulation path"),
    (tl_settings, "TLS13_PERMITTED_GROUPS", "group names tlslite accepts"),
    # Read once, at the hand-over to our record layer.
    (_SAMPLE, "_client", "which traffic secret is ours"),
    (_SAMPLE, "_readBuffer", "no decrypted data left behind at the hand-over"),
    (_SAMPLE, "_defragmenter", "no handshake message left behind at the hand-over"),
    (_SAMPLE.sock, "_read_buffer", "bytes read ahead past the last handshake record"),
    (_SAMPLE._recordLayer, "_readState", "the read sequence number at the hand-over"),
    (_SAMPLE._recordLayer, "_writeState", "the write sequence number at the hand-over"),
]


def self_test() -> None:
    """Fail fast unless this tlslite has the private names qkdproxy relies on and still
    behaves as they expect: an in-memory handshake through the hooks, the hand-over to
    our record layer, a KeyUpdate both ways and records through the fast path."""
    if tlslite.__version__ != TLSLITE_VERSION:
        raise SelfTestError(f"tlslite-ng {TLSLITE_VERSION} required, found {tlslite.__version__}")
    missing = [name for owner, name, _ in PRIVATE_NAMES if not hasattr(owner, name)]
    if missing:
        raise SelfTestError(f"tlslite-ng lacks hook points: {', '.join(missing)}")
    digest = hashlib.sha256(b"self-test").digest()
    probe = CryptographyECDSAKey(ec.generate_private_key(ec.SECP256R1()))
    if not probe.verify(probe.sign(digest, hashAlg="sha256"), digest):
        raise SelfTestError("ECDSA sign/verify round trip failed")
    try:
        _self_test_connection()
    except SelfTestError:
        raise
    except Exception as exc:
        raise SelfTestError(f"tlslite-ng misbehaves: {type(exc).__name__}: {exc}") from exc


class _Pipe:
    """One end of an in-memory connection, as tlslite's socket."""

    def __init__(self) -> None:
        self.inbound = bytearray()
        self.peer: _Pipe | None = None

    def recv(self, size: int) -> bytes:
        if not self.inbound:
            raise BlockingIOError(errno.EAGAIN, "no data buffered")
        chunk = bytes(self.inbound[:size])
        del self.inbound[:size]
        return chunk

    def send(self, data: bytes) -> int:
        assert self.peer is not None
        self.peer.inbound += data
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.send(data)

    def close(self) -> None:
        """Nothing to release."""

    def shutdown(self, how: int) -> None:
        """Nothing to release."""


class _X25519Hooks:
    """A plain X25519 key exchange through the per-connection hooks."""

    def __init__(self) -> None:
        self._private = x25519.X25519PrivateKey.generate()

    def key_share(self, group: int) -> tuple[bytes, object]:
        return self._private.public_key().public_bytes_raw(), None

    def shared_secret(self, group: int, peer_share: bytes) -> bytes:
        return self._private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_share))


def _self_test_connection() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "qkdproxy self-test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(minutes=5))
        .sign(key, hashes.SHA256())
    )
    credentials = Credentials((cert,), key)
    chain, private = tlslite_chain(credentials), tlslite_private_key(key)
    group = GroupSpec("x25519", 0x001D, ("X25519",), GroupKind.CLASSICAL, "x25519")
    client_pipe, server_pipe = _Pipe(), _Pipe()
    client_pipe.peer, server_pipe.peer = server_pipe, client_pipe
    client = HookedTLSConnection(client_pipe, _X25519Hooks(), lambda chain: None)
    server = HookedTLSConnection(server_pipe, _X25519Hooks(), lambda chain: None)
    steps = [
        client.handshakeClientCert(
            chain, private, settings=make_settings([group], group), async_=True
        ),
        server.handshakeServerAsync(
            certChain=chain, privateKey=private, settings=make_settings([group], group),
            reqCert=True, alpn=[NO_ALPN_PLACEHOLDER],
        ),
    ]  # fmt: skip
    running = [True, True]
    for _ in range(64):
        for i, generator in enumerate(steps):
            while running[i]:
                try:
                    if next(generator) == 0:
                        break  # waits for the other side
                except StopIteration:
                    running[i] = False
        if not any(running):
            break
    else:
        raise SelfTestError("in-memory handshake did not complete")
    ours, ours_left = client.hand_over()
    theirs, theirs_left = server.hand_over()
    if ours_left or theirs_left or client_pipe.inbound or server_pipe.inbound:
        raise SelfTestError("bytes left over after the handshake")
    for conn, layer in ((client, ours), (server, theirs)):
        records = conn._recordLayer
        for state, direction in (
            (records._writeState, layer.write),
            (records._readState, layer.read),
        ):
            # The keys we derive must be the ones tlslite installed for the handshake's end.
            theirs_probe = bytes(state.encContext.seal(bytes(12), b"probe", b""))
            ours_probe = direction.keys.aead.encrypt(bytes(12), b"probe", b"")
            iv = direction.keys.iv.to_bytes(12, "big")
            if theirs_probe != ours_probe or bytes(state.fixedNonce) != iv:
                raise SelfTestError("our traffic keys differ from tlslite's")
    ours.send_data(b"ping")
    ours.update_keys(request_peer=True)
    ours.send_data(b"after the update")
    heard = theirs.receive(ours.data_to_send(), 0.0)
    theirs.send_data(b"pong")
    answered = ours.receive(theirs.data_to_send(), 0.0)
    expected = (
        [DataReceived(b"ping"), KeysUpdated("read", True), DataReceived(b"after the update"),
         KeysUpdated("write")],
        [KeysUpdated("read", False), DataReceived(b"pong")],
    )  # fmt: skip
    if (heard, answered) != expected:
        raise SelfTestError(f"records after the handshake: {heard} / {answered}")
