"""The C load generator and backend (``native/*.c``), built at bench time.

They are our own sources, shipped as package data and compiled with the system C compiler
into a cache directory keyed by the sources and the compiler, never committed as binaries.
Without a compiler the benches fall back to the Python generator and say so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PROGRAMS = ("loadgen", "backend")
HEADERS = ("common.h",)
COMPILERS = ("cc", "gcc", "clang")
CFLAGS = ("-O2", "-pthread")
BUILD_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class NativeTools:
    """Paths of the built programs."""

    loadgen: Path
    backend: Path


class NativeUnavailableError(RuntimeError):
    """The C programs cannot be built here; the message says why."""


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/qkdproxy-bench`` (``~/.cache/qkdproxy-bench``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "qkdproxy-bench"


def find_compiler() -> str | None:
    """``$CC`` if set (it must exist), else the first of cc, gcc, clang on the PATH."""
    if chosen := os.environ.get("CC"):
        return shutil.which(chosen)
    return next((found for name in COMPILERS if (found := shutil.which(name))), None)


def _source(file: str) -> bytes:
    return resources.files("qkdproxy.tools.bench").joinpath(f"native/{file}").read_bytes()


def build(cache: Path | None = None) -> NativeTools:
    """Compile the programs unless this version is already in ``cache``.

    Raises :class:`NativeUnavailableError` (no compiler, or it failed) with the reason.
    """
    compiler = find_compiler()
    if compiler is None:
        raise NativeUnavailableError("no C compiler (cc, gcc or clang; or $CC) on this machine")
    digest = hashlib.sha256(compiler.encode() + b"\0" + " ".join(CFLAGS).encode())
    for file in (*HEADERS, *(f"{name}.c" for name in PROGRAMS)):
        digest.update(_source(file))
    folder = (cache or default_cache()) / digest.hexdigest()[:16]
    built = {name: folder / name for name in PROGRAMS}
    if not all(path.is_file() for path in built.values()):
        folder.mkdir(parents=True, exist_ok=True)
        for name, target in built.items():
            _compile(compiler, name, target)
    return NativeTools(built["loadgen"], built["backend"])


def _compile(compiler: str, name: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="qkdproxy-bench-build-") as tmp:
        for header in HEADERS:
            (Path(tmp) / header).write_bytes(_source(header))
        source = Path(tmp) / f"{name}.c"
        source.write_bytes(_source(f"{name}.c"))
        # Built next to its final place: the rename below must not cross file systems.
        output = target.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            subprocess.run(  # noqa: S603 - our own source, a compiler found on the PATH
                [compiler, *CFLAGS, "-o", str(output), str(source)],
                check=True, capture_output=True, timeout=BUILD_TIMEOUT_S,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            output.unlink(missing_ok=True)
            detail = getattr(exc, "stderr", b"") or b""
            raise NativeUnavailableError(
                f"{compiler} could not build {name}.c: {exc} {detail.decode(errors='replace')}"
            ) from None
        # Atomic: a concurrent bench sees the old state or a complete binary.
        os.replace(output, target)
