"""The benches name the interpreter the daemons ran on and warn about a known slow build."""

from __future__ import annotations

import subprocess
import sys
import sysconfig

from qkdproxy.tools.bench.interpreter import describe, interpreter_note

PYENV_ARGS = "'--prefix=/root/.pyenv/versions/3.11.7' '--enable-shared' '--libdir=/x'"
DOCKER_ARGS = "'--enable-optimizations' '--enable-shared' '--with-lto'"
DEBIAN_ARGS = "'--enable-shared' '--prefix=/usr' '--with-computed-gotos'"


def test_a_shared_libpython_without_optimisations_is_called_slow() -> None:
    note = describe("/p/python", "3.11.7", libpython_shared=True, configure_args=PYENV_ARGS)
    assert note.startswith("qkdproxy daemons ran on CPython 3.11.7 (/p/python); ")
    assert "without --enable-optimizations" in note


def test_optimised_or_linked_in_builds_are_only_named() -> None:
    docker = describe("/usr/local/bin/python", "3.11.9", libpython_shared=True,
                      configure_args=DOCKER_ARGS)  # fmt: skip
    # Debian's configure line says --enable-shared, but its executable links libpython in
    # (and is built with profile guidance): no warning.
    debian = describe("/usr/bin/python3", "3.11.2", libpython_shared=False,
                      configure_args=DEBIAN_ARGS)  # fmt: skip
    assert docker == "qkdproxy daemons ran on CPython 3.11.9 (/usr/local/bin/python)"
    assert debian == "qkdproxy daemons ran on CPython 3.11.2 (/usr/bin/python3)"


def test_this_interpreter_is_described_by_what_it_loaded() -> None:
    note = interpreter_note()
    assert note.startswith(f"qkdproxy daemons ran on CPython {sys.version.split()[0]} ")
    # The running process is the judge: ldd of the executable says whether it needs
    # libpython as a shared library.
    linked = subprocess.run(
        ["ldd", sys.executable], check=True, capture_output=True, text=True
    ).stdout
    slow = "libpython" in linked and "--enable-optimizations" not in str(
        sysconfig.get_config_var("CONFIG_ARGS")
    )
    assert ("without --enable-optimizations" in note) == slow
