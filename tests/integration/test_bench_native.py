"""The C load generator and backend, built with the system compiler and run for real; the
Python fallback against its own backend; CPU accounting of real processes."""

from __future__ import annotations

import socket
import subprocess
import sys
from contextlib import AsyncExitStack

import pytest

from qkdproxy.tools.bench import native
from qkdproxy.tools.bench.loadgen import (
    LoadChoice,
    Purpose,
    start_load,
)
from qkdproxy.tools.bench.names import Generator
from qkdproxy.tools.bench.proctime import ProcessGroup

requires_cc = pytest.mark.skipif(
    native.find_compiler() is None, reason="no C compiler (cc, gcc or clang): C load generator"
)


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> native.NativeTools:
    if native.find_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang): C load generator")
    return native.build(tmp_path_factory.mktemp("bench-cache"))


@requires_cc
def test_a_build_is_cached_by_source_and_compiler(tools: native.NativeTools) -> None:
    again = native.build(tools.loadgen.parent.parent)
    assert again == tools
    assert tools.loadgen.parent.name == again.loadgen.parent.name
    stamp = tools.loadgen.stat().st_mtime_ns
    native.build(tools.loadgen.parent.parent)
    assert tools.loadgen.stat().st_mtime_ns == stamp  # not rebuilt


@requires_cc
async def test_c_generator_against_c_echo(tools: native.NativeTools) -> None:
    async with AsyncExitStack() as stack:
        load = await start_load(stack, LoadChoice(Generator.C, tools=tools), Purpose.ECHO)
        for concurrency in (1, 4):
            batch = await load.connections(load.backend_port, 20, concurrency)
            assert batch.connections == 20
            assert 0 < batch.p50_ms <= batch.p99_ms
            assert batch.seconds > 0 and batch.load_cpu_s >= 0
        async with load.hold(load.backend_port, 8):
            pass
        with pytest.raises(RuntimeError, match="loadgen failed"):
            await load.connections(_closed_port(), 2, 1)


@requires_cc
async def test_c_bulk_against_c_sink(tools: native.NativeTools) -> None:
    async with AsyncExitStack() as stack:
        load = await start_load(stack, LoadChoice(Generator.C, tools=tools), Purpose.SINK)
        run = await load.bulk(load.backend_port, 4 * 1024 * 1024, 2)
        assert run.bytes == run.sent == 4 * 1024 * 1024


async def test_python_fallback_against_its_own_backends() -> None:
    async with AsyncExitStack() as stack:
        echo = await start_load(stack, LoadChoice(Generator.PYTHON), Purpose.ECHO)
        batch = await echo.connections(echo.backend_port, 20, 2)
        assert batch.connections == 20 and batch.p50_ms <= batch.p99_ms
        async with echo.hold(echo.backend_port, 4):
            pass
        sink = await start_load(stack, LoadChoice(Generator.PYTHON), Purpose.SINK)
        assert (await sink.bulk(sink.backend_port, 1024 * 1024, 2)).bytes == 1024 * 1024


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The child burns CPU until its own CPU clock shows 0.5 s, says so, and waits: what it used
# is known without timing anything.
BURN = (
    "import sys, time\n"
    "while time.process_time() < 0.5: pass\n"
    "print('burnt', flush=True)\n"
    "sys.stdin.read()\n"
)
PARENT = (
    "import subprocess, sys\n"
    f"child = subprocess.Popen([sys.executable, '-c', {BURN!r}])\n"
    "child.wait()\n"
)


def test_cpu_time_of_a_process_tree_includes_its_children() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as parent:
        assert parent.stdout is not None
        assert parent.stdin is not None
        assert parent.stdout.readline() == b"burnt\n"
        group = ProcessGroup((parent.pid,))
        # The parent itself used little (an interpreter's start, under 0.2 s); the child's
        # 0.5 s must be counted too. /proc counts user and system time in whole clock ticks
        # (10 ms), each rounded down, so a little of the child's 0.5 s may not show.
        assert group.cpu_seconds() >= 0.45
        assert group.rss_kib() > 1000  # two Python interpreters
        parent.stdin.close()
