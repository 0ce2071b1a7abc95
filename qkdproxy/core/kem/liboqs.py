"""Optional KEMs from liboqs through liboqs-python.

liboqs-python downloads and compiles liboqs when it cannot find the shared library at
import time. A daemon must never do that, so the library is located here first, with the
same search order liboqs-python uses, and ``oqs`` is imported only when it is present.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from qkdproxy.core.kem.base import Kem, KemError, KemSizes, require_length

BACKEND = "liboqs"


@dataclass(frozen=True, slots=True)
class LiboqsProbe:
    """What was found: the loaded module, or why the backend is unavailable."""

    module: ModuleType | None
    reason: str
    library_path: str | None = None


def _candidate_paths() -> list[str]:
    install_dir = Path(os.environ.get("OQS_INSTALL_PATH", str(Path.home() / "_oqs")))
    paths = [str(install_dir / sub / "liboqs.so") for sub in ("lib", "lib64")]
    for name in ("oqs", "liboqs"):
        found = ctypes.util.find_library(name)
        if found:
            paths.insert(0, found)
    return paths


def find_liboqs_library() -> str | None:
    """Return the path of a loadable liboqs shared library, or None. Never builds anything."""
    for path in _candidate_paths():
        try:
            ctypes.CDLL(path)
        except OSError:
            continue
        return path
    return None


def probe_liboqs() -> LiboqsProbe:
    """Import liboqs-python only if both the package and the shared library are present."""
    if importlib.util.find_spec("oqs") is None:
        return LiboqsProbe(None, "liboqs-python is not installed (pip install 'qkdproxy[oqs]')")
    library = find_liboqs_library()
    if library is None:
        return LiboqsProbe(
            None,
            "the liboqs shared library was not found (install liboqs, or set OQS_INSTALL_PATH "
            "to its install prefix)",
        )
    # liboqs-python warns when library and wrapper versions differ, and attaches a handler
    # that logs to the stdout of import time: the probe reports what is there instead, and
    # stdout stays clean for JSON output.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import oqs  # noqa: PLC0415 - imported only once the library is known to exist
    oqs_logger = logging.getLogger("oqs.oqs")
    oqs_logger.handlers.clear()
    oqs_logger.setLevel(logging.WARNING)
    return LiboqsProbe(oqs, f"liboqs {oqs.oqs_version()} at {library}", library)


@dataclass(frozen=True, slots=True)
class OqsKem:
    """One liboqs KEM; ``name`` is liboqs's own algorithm name."""

    name: str
    sizes: KemSizes
    _oqs: Any = field(repr=False)
    backend: str = BACKEND

    def generate(self) -> tuple[object, bytes]:
        """Return the secret key (inside a liboqs handle) and the public key."""
        handle = self._oqs.KeyEncapsulation(self.name)
        return OqsPrivateKey(handle), bytes(handle.generate_keypair())

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Return ``(ciphertext, shared_secret)``."""
        require_length(f"{self.name} public key", public_key, self.sizes.public_key)
        with self._oqs.KeyEncapsulation(self.name) as handle:
            try:
                ciphertext, shared = handle.encap_secret(public_key)
            except RuntimeError as exc:
                raise KemError(f"{self.name} public key rejected: {exc}") from None
        return bytes(ciphertext), bytes(shared)

    def decapsulate(self, private_key: object, ciphertext: bytes) -> bytes:
        """Recover the shared secret; the secret key is freed and cannot be used again."""
        require_length(f"{self.name} ciphertext", ciphertext, self.sizes.ciphertext)
        if not isinstance(private_key, OqsPrivateKey):
            raise KemError(f"{self.name}: not a liboqs private key")
        handle = private_key.take()
        try:
            return bytes(handle.decap_secret(ciphertext))
        except RuntimeError as exc:
            raise KemError(f"{self.name} ciphertext rejected: {exc}") from None
        finally:
            handle.free()


class OqsPrivateKey:
    """A liboqs handle holding one ephemeral secret key, usable for one decapsulation.

    liboqs frees the secret key with the handle; a second use would touch freed memory and
    abort the whole process, so it is refused with :class:`KemError` instead.
    """

    __slots__ = ("_handle",)

    def __init__(self, handle: Any) -> None:
        self._handle: Any = handle

    def take(self) -> Any:
        """The handle, once; :class:`KemError` afterwards."""
        handle, self._handle = self._handle, None
        if handle is None:
            raise KemError("an ephemeral liboqs secret key was already used")
        return handle

    def __del__(self) -> None:
        # An abandoned handshake never decapsulates: wipe and free the secret key anyway.
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(Exception):  # at interpreter exit liboqs may be gone
                handle.free()


def liboqs_kems(module: ModuleType) -> list[Kem]:
    """Every KEM the loaded liboqs enables."""
    kems: list[Kem] = []
    for name in module.get_enabled_kem_mechanisms():
        with module.KeyEncapsulation(name) as handle:
            details = handle.details
        sizes = KemSizes(
            public_key=int(details["length_public_key"]),
            ciphertext=int(details["length_ciphertext"]),
            shared_secret=int(details["length_shared_secret"]),
        )
        kems.append(OqsKem(name, sizes, module))
    return kems
