"""Shared fixtures: a development CA, group resolution, liboqs and matplotlib availability;
the package's bytecode compiled once for the daemons the tests start."""

from __future__ import annotations

import compileall
import importlib.util
from pathlib import Path

import pytest

import qkdproxy
from qkdproxy.core.groups import DEFAULT_GROUPS
from qkdproxy.core.hybrid import GroupUnavailableError, HybridKem, resolve
from qkdproxy.core.kem import default_registry
from qkdproxy.core.kem.liboqs import probe_liboqs
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.tools.loopback import resolve_groups

LIBOQS = probe_liboqs()
requires_liboqs = pytest.mark.skipif(
    LIBOQS.module is None, reason=f"liboqs backend unavailable: {LIBOQS.reason}"
)
# matplotlib is the `plot` extra (README: which tests skip without which tools).
requires_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib not installed (pip install -e '.[plot]')",
)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the package once, before any daemon starts.

    The suite starts about 250 ``python -m qkdproxy`` processes. The package is installed
    editable, so pip compiled none of it, and where PYTHONDONTWRITEBYTECODE is set (this
    machine, CI, most container images) no process writes what it compiled: each one
    compiled some 110 modules again, about 0.2 s of CPU per start. Compiled files are
    still read where writing them is off. Unchanged files are skipped, so a second run
    costs nothing."""
    compileall.compile_dir(Path(qkdproxy.__file__).parent, quiet=1)


def available_group_names() -> list[str]:
    """Every group whose KEMs run on this machine."""
    names = []
    for group in DEFAULT_GROUPS.all():
        try:
            resolve(group, default_registry())
        except GroupUnavailableError:
            continue
        names.append(group.name)
    return names


def groups(*names: str) -> list[HybridKem]:
    """Resolve group names to runnable hybrids."""
    return resolve_groups(names)


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    """One development CA for the whole run (issuing leaves is cheap, the CA is shared)."""
    return CertificateAuthority.create()
