"""Load generators and backends for ``bench connrate`` and ``bench throughput``.

Three kinds:
- ``c`` (the default): our C programs (:mod:`qkdproxy.tools.bench.native`), generator and
  backend each its own process;
- ``iperf3`` (throughput only, on request): ``iperf3 -s`` as the backend, ``iperf3 -c``
  through the path;
- ``python`` (the fallback without a C compiler): asyncio in the benchmark's process. It
  holds the direct and stunnel figures down (one event loop does the generator's and the
  backend's work), so a run on it says that its baseline is Python-limited.

Every kind reports the CPU time of the generator and the backend ("load" CPU), so the
tunnel processes' own CPU can be told apart from the cost of driving them.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from qkdproxy.tools.bench.names import Generator
from qkdproxy.tools.bench.native import NativeTools, NativeUnavailableError, build
from qkdproxy.tools.bench.processes import (
    BackendHandler,
    discard,
    follow,
    free_port,
    spawn,
    wait_line,
)
from qkdproxy.tools.bench.proctime import ProcessGroup

CHUNK = 256 * 1024
IPERF3_STARTUP_MARKER = b"Server listening"


class Purpose(Enum):
    """What the backend does with a connection."""

    ECHO = "echo"  # every byte back until the peer half-closes (connrate, idle)
    SINK = "sink"  # count to EOF, answer with the count (throughput)


DESCRIPTIONS = {
    Generator.IPERF3: "load: iperf3 client and server, each its own process",
    Generator.C: "load: our C generator and backend (tools/bench/native), each its own process",
    Generator.PYTHON: "load: asyncio generator and backend in the benchmark's process",
}


class LoadUnavailableError(RuntimeError):
    """The generator asked for explicitly cannot run here; the message says why."""


PYTHON_LIMITED = (
    "the load generator and backend run in the benchmark's Python process: the direct and "
    "stunnel baselines are Python-limited (lower than they are)"
)


@dataclass(frozen=True, slots=True)
class ConnBatch:
    """One measurement of new connections."""

    connections: int
    seconds: float
    p50_ms: float
    p99_ms: float
    load_cpu_s: float


@dataclass(frozen=True, slots=True)
class BulkRun:
    """One measurement of bulk transfer."""

    bytes: int  # counted by the receiver
    seconds: float
    load_cpu_s: float
    sent: int  # written by the generator (iperf3's receiver stops counting when it stops)


class Load(Protocol):
    """A generator and its backend, ready to drive a path listening on ``port``."""

    kind: Generator
    backend_port: int

    async def connections(self, port: int, count: int, concurrency: int) -> ConnBatch:
        """``concurrency`` clients open ``count // concurrency`` connections each."""
        ...

    def hold(self, port: int, count: int) -> AbstractAsyncContextManager[None]:
        """``count`` established connections, open while the context is."""
        ...

    async def bulk(self, port: int, size: int, streams: int) -> BulkRun:
        """``size`` bytes one way over ``streams`` parallel connections."""
        ...


def quantile(ordered: Sequence[float], q: float) -> float:
    """The C generator's rule: ``ordered[min(n - 1, int(q * n))]``."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------- python


async def echo_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte until the peer half-closes, then close."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def sink_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Count bytes to EOF, answer with the count (8 bytes, big-endian)."""
    total = 0
    try:
        while data := await reader.read(CHUNK):
            total += len(data)
        writer.write(total.to_bytes(8, "big"))
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def connect_once(port: int) -> float:
    """Open, one byte each way, close; the seconds it took."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    await writer.drain()
    await reader.readexactly(1)
    writer.close()
    return time.perf_counter() - started


async def _connect_many(port: int, count: int) -> list[float]:
    return [await connect_once(port) for _ in range(count)]


async def _stream(port: int, size: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    block = memoryview(os.urandom(CHUNK))
    sent = 0
    while sent < size:
        writer.write(block[: min(CHUNK, size - sent)])
        sent += min(CHUNK, size - sent)
        await writer.drain()
    writer.write_eof()
    count = int.from_bytes(await reader.readexactly(8), "big")
    writer.close()
    if count != size:
        raise RuntimeError(f"sent {size} bytes, the backend counted {count}")
    return size


@dataclass(slots=True)
class PythonLoad:
    """Generator and backend in this process (load CPU: this process's CPU time)."""

    backend_port: int
    kind: Generator = Generator.PYTHON

    async def connections(self, port: int, count: int, concurrency: int) -> ConnBatch:
        """See :class:`Load`."""
        cpu, started = time.process_time(), time.perf_counter()
        batches = await asyncio.gather(
            *(_connect_many(port, count // concurrency) for _ in range(concurrency))
        )
        seconds = time.perf_counter() - started
        ordered = sorted(t for batch in batches for t in batch)
        return ConnBatch(
            len(ordered), seconds, quantile(ordered, 0.5) * 1000, quantile(ordered, 0.99) * 1000,
            time.process_time() - cpu,
        )  # fmt: skip

    @asynccontextmanager
    async def hold(self, port: int, count: int) -> AsyncIterator[None]:
        """See :class:`Load`."""
        writers = []
        try:
            for _ in range(count):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writers.append(writer)
                writer.write(b"x")
                await reader.readexactly(1)
            yield
        finally:
            for writer in writers:
                writer.close()

    async def bulk(self, port: int, size: int, streams: int) -> BulkRun:
        """See :class:`Load`."""
        cpu, started = time.process_time(), time.perf_counter()
        share = size // streams
        moved = sum(await asyncio.gather(*(_stream(port, share) for _ in range(streams))))
        return BulkRun(moved, time.perf_counter() - started, time.process_time() - cpu, moved)


# --------------------------------------------------------------- external processes


def _children_cpu() -> float:
    """CPU time of this process's reaped children (a finished generator lands here)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _run_json(*args: str) -> tuple[dict[str, object], float]:
    """Run a generator to completion: its JSON output and the CPU time it used."""
    before = _children_cpu()
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    cpu = _children_cpu() - before
    if process.returncode != 0:
        detail = (err or out).decode(errors="replace").strip()[-400:]
        raise RuntimeError(f"{os.path.basename(args[0])} failed ({process.returncode}): {detail}")
    # iperf3 -J prints one document; our programs one line.
    document = json.loads(out)
    if not isinstance(document, dict):
        raise RuntimeError(f"{args[0]} printed no JSON object")
    return document, cpu


def _number(document: dict[str, object], key: str) -> float:
    value = document[key]
    if not isinstance(value, int | float):
        raise RuntimeError(f"the generator's {key!r} is not a number")
    return float(value)


@dataclass(slots=True)
class NativeLoad:
    """The C generator against the C backend (or iperf3 against ``iperf3 -s``)."""

    kind: Generator
    backend_port: int
    backend: ProcessGroup
    tools: NativeTools | None
    iperf3: str | None = None

    def _native(self) -> NativeTools:
        if self.tools is None:
            raise LoadUnavailableError("this generator has no C programs")
        return self.tools

    async def connections(self, port: int, count: int, concurrency: int) -> ConnBatch:
        """See :class:`Load`."""
        backend_cpu = self.backend.cpu_seconds()
        document, cpu = await _run_json(
            str(self._native().loadgen), "conn", str(port), str(count), str(concurrency)
        )
        cpu += self.backend.cpu_seconds() - backend_cpu
        return ConnBatch(
            int(_number(document, "connections")), _number(document, "elapsed_s"),
            _number(document, "p50_ms"), _number(document, "p99_ms"), cpu,
        )  # fmt: skip

    @asynccontextmanager
    async def hold(self, port: int, count: int) -> AsyncIterator[None]:
        """See :class:`Load`."""
        process = await asyncio.create_subprocess_exec(
            str(self._native().loadgen), "hold", str(port), str(count),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            line = await process.stdout.readline()
            if b"ready" not in line:
                _, err = await process.communicate()
                raise RuntimeError(f"loadgen hold failed: {err.decode(errors='replace')}")
            yield
        finally:
            if process.returncode is None:
                process.stdin.close()
                await process.wait()

    async def bulk(self, port: int, size: int, streams: int) -> BulkRun:
        """See :class:`Load`."""
        backend_cpu = self.backend.cpu_seconds()
        if self.iperf3 is not None:
            document, cpu = await _run_json(
                self.iperf3, "-c", "127.0.0.1", "-p", str(port), "-n", str(size),
                "-P", str(streams), "-J",
            )  # fmt: skip
            end = document["end"]
            received = end["sum_received"]  # type: ignore[index]
            moved, seconds = int(received["bytes"]), float(received["seconds"])
            sent = int(end["sum_sent"]["bytes"])  # type: ignore[index]
        else:
            document, cpu = await _run_json(
                str(self._native().loadgen), "bulk", str(port), str(size), str(streams)
            )
            moved, seconds = int(_number(document, "bytes")), _number(document, "elapsed_s")
            sent = moved  # the sink's count matched, or the generator failed
        cpu += self.backend.cpu_seconds() - backend_cpu
        return BulkRun(moved, seconds, cpu, sent)


# ------------------------------------------------------------------------- choice


@dataclass(frozen=True, slots=True)
class LoadChoice:
    """The generator a run will use, and what the reader must know about it."""

    kind: Generator
    tools: NativeTools | None = None
    iperf3: str | None = None
    notes: tuple[str, ...] = ()


def choose(wanted: Generator, purpose: Purpose) -> LoadChoice:
    """Resolve ``wanted`` (``auto``: our C programs, else Python).

    ``auto`` does not pick iperf3: with ``-n`` its receiver stops counting once the sender
    has written everything, so through a buffering tunnel the bytes still in flight are not
    counted (a 4 MiB run through a tunnel counted none, a 256 MiB run 91-99 %); the C
    sink counts every byte and the clock stops when the last one arrived.
    An explicit choice that cannot run raises :class:`LoadUnavailableError`; ``auto`` falls
    back and records why in ``notes``.
    """
    notes: list[str] = []
    if wanted is Generator.IPERF3:
        if purpose is not Purpose.SINK:
            raise LoadUnavailableError("iperf3 measures throughput only; use c or python here")
        if found := shutil.which("iperf3"):
            return LoadChoice(Generator.IPERF3, iperf3=found)
        raise LoadUnavailableError("iperf3 is not installed")
    if wanted in (Generator.AUTO, Generator.C):
        try:
            return LoadChoice(Generator.C, tools=build(), notes=tuple(notes))
        except NativeUnavailableError as exc:
            if wanted is Generator.C:
                raise LoadUnavailableError(str(exc)) from None
            notes.append(f"{exc}: no C load generator")
    return LoadChoice(Generator.PYTHON, notes=tuple(notes))


async def start_load(stack: AsyncExitStack, choice: LoadChoice, purpose: Purpose) -> Load:
    """Start the backend for ``choice``; the load, ready to drive a path."""
    if choice.kind is Generator.PYTHON:
        handler: BackendHandler = echo_backend if purpose is Purpose.ECHO else sink_backend
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        stack.callback(server.close)
        return PythonLoad(int(server.sockets[0].getsockname()[1]))
    if choice.iperf3 is not None:
        port = free_port()
        # --forceflush: its stdout is a pipe, and we wait for its first line.
        process = await spawn(
            stack, choice.iperf3, "-s", "--forceflush", "-B", "127.0.0.1", "-p", str(port)
        )
        assert process.stdout is not None
        await wait_line(process.stdout, IPERF3_STARTUP_MARKER)
    else:
        assert choice.tools is not None
        process = await spawn(stack, str(choice.tools.backend), purpose.value)
        assert process.stdout is not None
        port = int(json.loads(await wait_line(process.stdout, b"port"))["port"])
    # Whatever the backend prints later (iperf3 reports every test) must not fill a pipe.
    assert process.stdout is not None
    assert process.stderr is not None
    follow(stack, process.stdout, discard)
    follow(stack, process.stderr, discard)
    return NativeLoad(choice.kind, port, ProcessGroup((process.pid,)), choice.tools, choice.iperf3)
