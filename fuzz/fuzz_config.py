#!/usr/bin/env python3
"""The daemon's TOML configuration (qkdproxy/daemon/config.py load_config).

The input is the file. load_config must return a Config or raise ConfigError whose every
problem names the file; any other exception (a traceback for the operator) is a crash.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from qkdproxy.daemon.config import ConfigError, load_config

# Seeds: the configurations the tests use (imported after the code under test).
from tests.unit.test_config import CLIENT, KME, SERVER
from tests.unit.test_fuzz_parsers import GOOD_CONFIG, toml_document

PATH = Path(tempfile.mkdtemp(prefix="qkdproxy-fuzz-config-")) / "qkdproxy.toml"


def test_one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    problems: list[str] = []
    try:
        load_config(PATH)
    except ConfigError as exc:
        problems = exc.problems or ["(a ConfigError without problems)"]
    assert all(p.startswith(str(PATH)) for p in problems), problems


def seeds() -> list[bytes]:
    return [
        (KME + CLIENT + SERVER).encode(),
        toml_document(GOOD_CONFIG).encode(),
        b'[daemon]\ndrain_timeout_s = 1e3\n[status]\nlisten = "127.0.0.1:9100"\n',
    ]


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
