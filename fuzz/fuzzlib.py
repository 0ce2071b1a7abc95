"""What every atheris harness here shares: the import path, seeds and the run loop.

Import this module first, then the code under test inside ``atheris.instrument_imports``,
then the seed helpers (they import the test helpers, which need not be instrumented).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402 - after the path set-up above

__all__ = ["INSTRUMENTED", "ROOT", "atheris", "handshake", "real_hellos", "records", "run"]

INSTRUMENTED = ["qkdproxy"]


def run(test_one_input: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    """Fuzz ``test_one_input``; libFuzzer flags (``-atheris_runs=N``, ``-max_total_time=S``)
    and corpus directories pass through. The built-in ``seeds`` go to the first corpus
    directory when it is empty, or to a fresh temporary one when none is given (libFuzzer
    adds the inputs it finds to that directory). A file argument reruns that one input."""
    argv = list(sys.argv)
    paths = [Path(arg) for arg in argv[1:] if not arg.startswith("-")]
    if not paths:
        paths = [Path(tempfile.mkdtemp(prefix=f"qkdproxy-{Path(argv[0]).stem}-"))]
        argv.append(str(paths[0]))
    if paths[0].is_dir() and not any(paths[0].iterdir()):
        for number, seed in enumerate(seeds):
            (paths[0] / f"seed-{number:03d}").write_bytes(seed)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def real_hellos() -> list[tuple[bytes, bytes]]:
    """(ClientHello body, ServerHello body) pairs captured from a real client and server."""
    # Imported late: after the harness imported (and instrumented) the code under test.
    from tests.integration.test_wire_hello import _capture  # noqa: PLC0415

    groups = [("qkd_mlkem768", "X25519MLKEM768"), ("qkd_x25519mlkem768",), ("x25519",)]
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        captured = [runner.run(_capture(names)) for names in groups]
    return [(c.client_body, c.server_body) for c in captured]


def records(message: bytes, size: int = 2**14, content_type: int = 22) -> bytes:
    """``message`` in plaintext TLS records of at most ``size`` bytes."""
    out = bytearray()
    for start in range(0, len(message), size):
        fragment = message[start : start + size]
        out += bytes([content_type, 3, 3]) + len(fragment).to_bytes(2, "big") + fragment
    return bytes(out)


def handshake(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body
