"""Which Python interpreter the measured daemons ran on, and whether its build is a slow one.

The daemons are mostly interpreter time, so the interpreter's build moves every figure:
on the benchmark machine Debian's ``python3.11`` (profile-guided and link-time optimised,
libpython linked into the executable) spends about 9 % less CPU per connection than a
pyenv build of the same version as this machine has it (a shared libpython, no
``--enable-optimizations``): docs/PERFORMANCE.md, "What bounds the 8-concurrent rate; the
interpreter". A run says which one it measured.
"""

from __future__ import annotations

import platform
import sys
import sysconfig

SLOW_BUILD = (
    "its libpython is a shared library built without --enable-optimizations: expect about "
    "10 % more CPU per connection than on an optimised build such as Debian's python3 or "
    "the official python image (docs/PERFORMANCE.md, on the interpreter)"
)


def describe(executable: str, version: str, *, libpython_shared: bool, configure_args: str) -> str:
    """The note for an interpreter: which one, and a warning when its build is known slow.

    Only a build that loads libpython as a shared library and whose configure line lacks
    ``--enable-optimizations`` is called slow: distributions build with profile guidance
    without saying so on that line (Debian links libpython into the executable), so a
    missing flag alone proves nothing.
    """
    note = f"qkdproxy daemons ran on CPython {version} ({executable})"
    if libpython_shared and "--enable-optimizations" not in configure_args:
        note += f"; {SLOW_BUILD}"
    return note


def _libpython_mapped() -> bool:
    """Whether this process loaded libpython as a shared library (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libpython" in line for line in maps)
    except OSError:
        return False


def interpreter_note() -> str:
    """:func:`describe` for this process's interpreter (the daemons are started with it)."""
    return describe(
        sys.executable,
        platform.python_version(),
        libpython_shared=_libpython_mapped(),
        configure_args=str(sysconfig.get_config_var("CONFIG_ARGS") or ""),
    )
