"""Registry of the KEMs this machine can run, and why the others cannot."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from qkdproxy.core.kem.base import Kem
from qkdproxy.core.kem.cryptography_backend import cryptography_kems
from qkdproxy.core.kem.liboqs import liboqs_kems, probe_liboqs


@dataclass(frozen=True, slots=True)
class UnavailableKem:
    """A KEM name that was asked for but cannot run here, with the reason."""

    name: str
    reason: str


# liboqs 0.15+ names HQC by NIST level; the reference provider used the older names.
ALIASES = {"HQC-128": "HQC-1", "HQC-192": "HQC-3", "HQC-256": "HQC-5"}


class KemRegistry:
    """Maps KEM names to implementations; the first backend that provides a name wins."""

    def __init__(self, kems: Iterable[Kem], missing_reason: str) -> None:
        self._kems: dict[str, Kem] = {}
        for kem in kems:
            self._kems.setdefault(kem.name, kem)
        self._missing_reason = missing_reason

    def get(self, name: str) -> Kem | UnavailableKem:
        """The KEM called ``name``, or an :class:`UnavailableKem` saying why not."""
        kem = self._kems.get(name) or self._kems.get(ALIASES.get(name, ""))
        if kem is not None:
            return kem
        return UnavailableKem(name, f"{name} is not available: {self._missing_reason}")

    def names(self) -> list[str]:
        """Names of every available KEM."""
        return sorted(self._kems)


@functools.cache
def default_registry() -> KemRegistry:
    """The registry for this process: `cryptography` first, then liboqs when installed."""
    probe = probe_liboqs()
    kems: list[Kem] = list(cryptography_kems())
    if probe.module is not None:
        kems.extend(liboqs_kems(probe.module))
        reason = f"not enabled in {probe.reason}"
    else:
        reason = probe.reason
    return KemRegistry(kems, reason)
