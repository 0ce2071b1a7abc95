"""How fast each side's crypto library seals AES-256-GCM, for ``bench throughput``.

A one-stream throughput ratio to stunnel compares two crypto libraries as much as two
tunnels: Debian's stunnel links the system OpenSSL (3.0 on Debian 12), whose AES-GCM on a
CPU with AVX-512 and VAES runs at about half the speed of the OpenSSL bundled in
``cryptography``'s wheels. The bench therefore measures both libraries in the same run and
says when they differ, and ``--equal-aes`` runs every process of the run (stunnel, the
daemons, this measurement) on the same instructions through OpenSSL's documented
``OPENSSL_ia32cap`` capability mask.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# OPENSSL_ia32cap's second word is CPUID leaf 7 (EBX in bits 0-31, ECX in 32-63); "~" clears
# what it names: AVX512F/DQ/IFMA/CD/BW/VL (EBX 16, 17, 21, 28, 30, 31), AVX512VBMI, VAES
# and VPCLMULQDQ (ECX 1, 9, 10). Both libraries fall back to AES-NI with AVX2 and PCLMULQDQ.
EQUAL_AES_CAP = ":~0x00000602D0230000"
CAP_VARIABLE = "OPENSSL_ia32cap"
RECORD = 16384  # one full TLS record
MEASURE_S = 0.5
# Outside this band the libraries, not the tunnels, decide a throughput ratio.
MAX_LIBRARY_RATIO = 1.25
_SPEED_LINE = re.compile(rb"^AES-256-GCM\s+(?:[\d.]+k\s+)*([\d.]+)k\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class AesSpeeds:
    """AES-256-GCM sealing rates of 16 KiB records, in GB/s (None: not measured)."""

    system_openssl: float | None  # `openssl speed`: the library Debian's stunnel links
    ours: float | None  # cryptography's bundled OpenSSL, as the daemons run it


@contextmanager
def equal_aes(enabled: bool) -> Iterator[None]:
    """With ``enabled``, every process started inside sees :data:`EQUAL_AES_CAP` (a mask
    set by the caller's environment is kept: it was chosen on purpose)."""
    if not enabled or CAP_VARIABLE in os.environ:
        yield
        return
    os.environ[CAP_VARIABLE] = EQUAL_AES_CAP
    try:
        yield
    finally:
        os.environ.pop(CAP_VARIABLE, None)


def parse_openssl_speed(output: bytes) -> float | None:
    """GB/s of the last (largest) block size in ``openssl speed -evp aes-256-gcm``'s table
    (its figures are thousands of bytes per second)."""
    found = _SPEED_LINE.search(output)
    return float(found.group(1)) * 1000 / 1e9 if found else None


def seal_rate(seconds: float = MEASURE_S) -> float:
    """GB/s at which ``cryptography`` seals 16 KiB records with AES-256-GCM, in this
    process (whose OpenSSL read ``OPENSSL_ia32cap`` when it was loaded)."""
    sealer, record, nonce = AESGCM(bytes(32)), bytes(RECORD), bytes(12)
    sealed = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        sealer.encrypt(nonce, record, None)
        sealed += RECORD
    return sealed / elapsed / 1e9


async def _output(*args: str) -> bytes | None:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await process.communicate()
    return out if process.returncode == 0 else None


async def measure() -> AesSpeeds:
    """Both rates, each in a new process so that it sees the environment's mask."""
    system = None
    if openssl := shutil.which("openssl"):
        seconds = str(max(1, round(MEASURE_S)))
        args = ("speed", "-seconds", seconds, "-bytes", str(RECORD), "-evp", "aes-256-gcm")
        out = await _output(openssl, *args)
        system = parse_openssl_speed(out) if out else None
    out = await _output(sys.executable, "-m", __name__)
    try:
        ours = float(out) if out else None
    except ValueError:
        ours = None
    return AesSpeeds(system, ours)


def describe(speeds: AesSpeeds, masked: bool) -> tuple[str, str | None]:
    """The run's note on the two libraries, and a warning when they differ enough to
    decide the throughput ratios."""

    def rate(value: float | None) -> str:
        return "not measured" if value is None else f"{value:.2f} GB/s"

    mask = f" ({CAP_VARIABLE}={os.environ[CAP_VARIABLE]})" if masked else ""
    note = (
        f"AES-256-GCM on 16 KiB records{mask}: the system OpenSSL (openssl speed; the "
        f"library Debian's stunnel links) {rate(speeds.system_openssl)}, ours "
        f"(cryptography) {rate(speeds.ours)}"
    )
    if speeds.system_openssl is None or speeds.ours is None:
        return note, None
    ratio = speeds.ours / speeds.system_openssl
    if 1 / MAX_LIBRARY_RATIO <= ratio <= MAX_LIBRARY_RATIO:
        return note, None
    hint = "" if masked else "; --equal-aes runs every process on the same AES instructions"
    warning = (
        f"our crypto library seals AES-GCM {ratio:.2f}x as fast as stunnel's on this CPU: "
        f"the throughput ratios to stunnel measure the libraries as much as the tunnels{hint}"
    )
    return note, warning


if __name__ == "__main__":
    print(f"{seal_rate():.4f}")
