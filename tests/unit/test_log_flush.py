"""Connection lines share writes (LineHandler's flush interval) without losing or reordering
a line: the first line after a quiet spell and every ordinary log call are written at once,
a burst waits at most the interval, and shutting logging down writes what waits."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from qkdproxy.daemon.logformat import LineHandler, configure_logging, log_record_event
from qkdproxy.daemon.tunnel import ConnectionRecord

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

INTERVAL_S = 0.05
STEP_S = 10.0
log = logging.getLogger("qkdproxy.connection")


class Sink(io.StringIO):
    """A stream that shows what a reader of the log would have seen so far: only flushed
    text, and each flush as one write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._written = 0
        self.flushed = asyncio.Event()

    def flush(self) -> None:
        text = self.getvalue()[self._written :]
        self._written += len(text)
        if text:
            self.writes.append(text)
            self.flushed.set()


@pytest.fixture
def sink() -> Iterator[Sink]:
    """Our handler alone on the root logger, as in the daemon. Installed by the test itself
    (pytest adds its capturing handler around the call, after fixtures; a second handler
    sends every line through logging, which flushes each one)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield Sink()
    root.handlers[:] = handlers
    root.setLevel(level)


def _install(stream: Sink) -> None:
    configure_logging("info", "json", stream, flush_interval_s=INTERVAL_S)


def _line(number: int) -> None:
    log_record_event(log, logging.INFO, "connection", {"conn_id": number})


async def test_a_burst_shares_one_write_and_the_first_line_goes_at_once(sink: Sink) -> None:
    _install(sink)
    _line(1)
    assert len(sink.writes) == 1 and '"conn_id":1' in sink.writes[0]  # after a quiet spell
    sink.flushed.clear()
    for number in range(2, 12):
        _line(number)
    assert len(sink.writes) == 1  # the burst waits...
    await asyncio.wait_for(sink.flushed.wait(), STEP_S)
    assert len(sink.writes) == 2  # ...for one write, every line in order
    numbers = [int(part.split("}")[0]) for part in sink.writes[1].split('"conn_id":')[1:]]
    assert numbers == list(range(2, 12))


async def test_an_ordinary_log_call_writes_what_waits_before_it(sink: Sink) -> None:
    _install(sink)
    _line(1)
    _line(2)
    logging.getLogger("qkdproxy.kme").warning("KME unreachable")
    text = "".join(sink.writes)
    assert text.index('"conn_id":2') < text.index("KME unreachable")


async def test_a_line_recording_a_spent_key_is_never_held_back(sink: Sink) -> None:
    """A process killed outright must not lose where a QKD key went: that line is written
    at once, with the lines waiting before it, in order."""
    _install(sink)
    _line(1)
    _line(2)
    assert '"conn_id":2' not in "".join(sink.writes)
    log_record_event(log, logging.INFO, "connection", {"conn_id": 3, "qkd_key_id": "k"},
                     at_once=True)  # fmt: skip
    text = "".join(sink.writes)
    assert text.index('"conn_id":2') < text.index('"conn_id":3')
    writes = len(sink.writes)
    sink.flushed.clear()
    _line(4)  # the interval starts again from that write
    assert len(sink.writes) == writes
    await asyncio.wait_for(sink.flushed.wait(), STEP_S)
    assert '"conn_id":4' in sink.writes[-1]


def test_the_line_that_records_a_spent_key_is_the_one_never_held_back() -> None:
    def record(**fields: object) -> ConnectionRecord:
        return ConnectionRecord(conn_id=1, tunnel="t", role="client", **fields)  # type: ignore[arg-type]

    assert record(qkd_key_id="k").spends_key  # a per-connection tunnel
    assert record(spent_key_id="k").spends_key  # a failed handshake that took a key
    assert record(qkd_key_id="k", mux="tunnel").spends_key  # a carrying tunnel
    assert record(fresh_key_ids=["k2"]).spends_key  # Extended Key Updates
    assert not record(qkd_key_id="k", mux="stream").spends_key  # the tunnel's key, logged there
    assert not record().spends_key  # refused before any key


async def test_shutting_logging_down_writes_what_waits(sink: Sink) -> None:
    _install(sink)
    _line(1)
    _line(2)
    assert '"conn_id":2' not in "".join(sink.writes)
    for handler in logging.getLogger().handlers:  # what logging.shutdown() does at exit
        handler.flush()
        handler.close()
    assert '"conn_id":2' in "".join(sink.writes)


async def test_reconfiguring_writes_the_old_handlers_waiting_lines(sink: Sink) -> None:
    _install(sink)
    _line(1)
    _line(2)
    configure_logging("info", "json", io.StringIO())
    assert '"conn_id":2' in "".join(sink.writes)


def test_without_an_event_loop_every_line_is_written_at_once(sink: Sink) -> None:
    _install(sink)
    for number in range(3):
        _line(number)
    assert len(sink.writes) == 3


def test_interval_zero_writes_every_line_at_once() -> None:
    stream = Sink()
    handler = LineHandler(stream, 0.0)

    async def burst() -> None:
        for number in range(3):
            handler.write_line(f"line {number}")

    asyncio.run(burst())
    assert stream.writes == [f"line {n}\n" for n in range(3)]


class RawWrites(io.RawIOBase):
    """The file descriptor under stderr: each call here would be one write(2)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.written = asyncio.Event()

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        self.writes.append(bytes(data))
        self.written.set()
        return len(self.writes[-1])


async def test_a_burst_is_one_write_on_a_line_buffered_stream_like_stderr(sink: Sink) -> None:
    raw = RawWrites()
    stderr_like = io.TextIOWrapper(io.BufferedWriter(raw), line_buffering=True)
    configure_logging("info", "json", stderr_like, flush_interval_s=INTERVAL_S)
    for number in range(10):
        _line(number)
    assert len(raw.writes) == 1  # the first line at once; the other nine wait
    raw.written.clear()
    await asyncio.wait_for(raw.written.wait(), STEP_S)
    assert len(raw.writes) == 2 and raw.writes[1].count(b"\n") == 9


async def test_a_broken_stream_under_waiting_lines_never_breaks_the_caller(
    sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting lines written ahead of an ordinary line hit a write error: logging reports
    it (handleError), the code that logged carries on."""
    _install(sink)
    _line(1)
    _line(2)  # waits

    def broken(text: str) -> int:
        raise OSError("disk full")

    errors: list[logging.LogRecord] = []
    monkeypatch.setattr(sink, "write", broken)
    monkeypatch.setattr(logging.Handler, "handleError", lambda self, record: errors.append(record))
    logging.getLogger("qkdproxy.kme").warning("KME unreachable")  # must not raise
    assert errors
