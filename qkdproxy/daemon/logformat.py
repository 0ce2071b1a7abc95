"""The daemon's log formats: readable text or one JSON object per line.

Both stamp every line in UTC, ISO 8601 with the zone (``2026-12-02T04:27:13.713Z``): local
time without a zone cannot be correlated across hosts. An event (a connection record, a KME
or breaker transition, a reload, the drain, the exit) carries its fields in the ``fields``
attribute of the log record (``extra={"fields": {...}}``); the JSON format writes them as
top-level keys next to ``ts``, ``level`` and ``logger``, the text format shows the message.

The connection record is written at the end of every connection, so it has a direct path
(:func:`log_record_event`): when the only handler a record would reach is the one
:func:`configure_logging` installed, the line is rendered and written without a LogRecord,
the same bytes the logging path writes; any other set-up goes through logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from qkdproxy.core.logsafe import JsonLine, SingleLineFilter, compact_json

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Keys the JSON format owns: an event field of the same name is written with a prefix.
RESERVED = ("ts", "level", "logger", "message", "exception")
RESERVED_SET = frozenset(RESERVED)


def utc_timestamp(created: float) -> str:
    """``created`` (seconds since the epoch) as ISO 8601 UTC with milliseconds and ``Z``."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(name: str, /, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call that is an event: ``log.info(msg, extra=event("x", k=v))``."""
    return {"fields": {"event": name, **fields}}


def record_event(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """``extra=`` for a message that is already ``fields`` as JSON (the connection record):
    the JSON format writes the fields once, without the message."""
    return {"fields": {"event": name, **fields}, "message_is_record": True}


class TextFormatter(logging.Formatter):
    """``TIMESTAMP LEVEL LOGGER: message``, with a UTC timestamp."""

    @staticmethod
    def record_line(ts: str, level: str, logger: str, name: str, fields: str) -> str:
        """A record event's line without a LogRecord: what :meth:`format` writes for
        ``record_event(name, ...)`` with a :class:`JsonLine` message (``fields``, its JSON)."""
        del name  # the text format shows the message only
        return f"{ts} {level} {logger}: {fields}"

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's API
        """UTC, ISO 8601, with the zone."""
        return utc_timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, then the event fields or the message."""

    @staticmethod
    def record_line(ts: str, level: str, logger: str, name: str, fields: str) -> str:
        """A record event's line without a LogRecord: what :meth:`format` writes for
        ``record_event(name, ...)``, given the compact JSON of ``fields`` (an object with
        no reserved or ``event`` key); the head is the same dict :meth:`format` builds."""
        head = '{"ts":' + compact_json(ts) + _json_head_tail(level, logger, name)
        return head + "," + fields[1:] if len(fields) > 2 else head + "}"

    def format(self, record: logging.LogRecord) -> str:
        """The whole line, exceptions included (a traceback becomes one string field)."""
        out: dict[str, Any] = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        if not getattr(record, "message_is_record", False):
            out["message"] = record.getMessage()
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out[f"field_{key}" if key in RESERVED else str(key)] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["exception"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, separators=(",", ":"))


@functools.lru_cache(maxsize=64)
def _json_head_tail(level: str, logger: str, name: str) -> str:
    """``,"level":..,"logger":..,"event":..`` of a record line, the same for every line
    of one logger, level and event (a few per daemon)."""
    return "," + compact_json({"level": level, "logger": logger, "event": name})[1:-1]


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg] # typeshed: generic
    """The handler :func:`configure_logging` installs: a stream handler whose record events
    may skip the logging machinery (:func:`log_record_event`).

    ``flush_interval_s``: record event lines (one per connection) written within this long
    of the last flush wait for one flush, at most that long later; the first line after a
    quiet spell, every line logged the ordinary way (warnings, errors) and every line
    written ``at_once`` (where a QKD key went: it must survive a crash) flush at once with
    whatever waits before them. The write of each line was 6-7 % of each daemon's
    samples in a multiplexed run (docs/PERFORMANCE.md, "Fourth pass: fewer writes per
    connection"). 0: every line is flushed as it is written. The waiting lines are
    flushed when logging shuts down (a normal exit, SIGTERM); a process killed outright
    loses at most that interval's lines, none of them the record of a spent key.
    """

    def __init__(self, stream: TextIO, flush_interval_s: float = 0.0) -> None:
        super().__init__(stream)
        self.flush_interval_s = flush_interval_s
        self._flushed_at = -flush_interval_s
        self._flush_timer: asyncio.TimerHandle | None = None
        # Held here, not in the stream: stderr is line-buffered (a write per line).
        self._waiting: list[str] = []

    def write_line(self, line: str, *, at_once: bool = False) -> None:
        """Write one line; flush it now (``at_once``: always, with what waits before it) or
        within ``flush_interval_s``."""
        with self.lock or _NO_LOCK:
            try:
                self._waiting.append(line + self.terminator)
                if at_once:
                    self._cancel_timer()
                    self._write_waiting()
                elif self._flush_timer is None and not self._flush_later():
                    self._write_waiting()
            except RecursionError:
                raise
            except Exception:  # logging never breaks the caller (emit's rule)
                self.handleError(logging.makeLogRecord({"msg": line}))

    def emit(self, record: logging.LogRecord) -> None:
        """An ordinary log line: the waiting lines go first, in one write with it."""
        if self._waiting:
            self._cancel_timer()
            text = "".join(self._waiting)
            self._waiting.clear()
            try:
                self.stream.write(text)
            except RecursionError:
                raise
            except Exception:  # logging never breaks the caller (emit's rule)
                self.handleError(record)
        super().emit(record)  # writes the line and flushes

    def flush(self) -> None:
        """Write out every waiting line."""
        with self.lock or _NO_LOCK:
            self._cancel_timer()
            if self.stream and hasattr(self.stream, "flush"):
                self._write_waiting()

    def _flush_later(self) -> bool:
        """Schedule the flush if the last one was recent and an event loop runs here."""
        wait = self._flushed_at + self.flush_interval_s - time.monotonic()
        if wait <= 0:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._flush_timer = loop.call_later(wait, self._flush_due)
        return True

    def _flush_due(self) -> None:
        try:
            self.flush()
        except RecursionError:
            raise
        except Exception:  # a write error is logging's to report, not the event loop's
            self.handleError(logging.makeLogRecord({"msg": "(waiting connection lines)"}))

    def _cancel_timer(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None

    def _write_waiting(self) -> None:
        if self._waiting:
            text = "".join(self._waiting)
            self._waiting.clear()
            self.stream.write(text)
        self.stream.flush()
        self._flushed_at = time.monotonic()


_NO_LOCK = contextlib.nullcontext()


def _direct_handler(logger: logging.Logger, level: int) -> LineHandler | None:
    """The handler a record of ``logger`` at ``level`` would reach if it is the only one,
    is ours, and filters and formats in a way :func:`log_record_event` reproduces."""
    if logger.filters or logger.disabled or not logger.isEnabledFor(level):
        return None
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None or type(handler) is not LineHandler:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if not isinstance(found, LineHandler) or level < found.level:
        return None
    # The log-hygiene filter passes a JsonLine message as it is; any other filter may not.
    if not all(type(f) is SingleLineFilter for f in found.filters):
        return None
    if type(found.formatter) not in (JsonFormatter, TextFormatter):
        return None
    return found


def log_record_event(
    logger: logging.Logger,
    level: int,
    name: str,
    fields: dict[str, object],
    *,
    at_once: bool = False,
) -> None:
    """Log ``fields`` as the record event ``name``: the same line as ``logger.log(level,
    JsonLine(fields), extra=record_event(name, fields))``, written directly when only our
    own handler would write it (no LogRecord, filter or formatter call: about half of what
    the line cost), and through logging otherwise. ``at_once``: never held back for a
    shared write (with the lines waiting before it)."""
    handler = _direct_handler(logger, level)
    if handler is not None and "event" not in fields and RESERVED_SET.isdisjoint(fields):
        try:
            body = compact_json(fields)
        except (TypeError, ValueError):
            pass  # not plain JSON: logging's path decides what is written
        else:
            formatter = handler.formatter
            assert isinstance(formatter, JsonFormatter | TextFormatter)
            level_name = logging.getLevelName(level)
            ts = utc_timestamp(time.time())
            line = formatter.record_line(ts, level_name, logger.name, name, body)
            handler.write_line(line, at_once=at_once)
            return
    logger.log(level, JsonLine(fields), extra=record_event(name, fields), stacklevel=2)


def configure_logging(
    level: str, log_format: str, stream: TextIO | None = None, flush_interval_s: float = 0.0
) -> None:
    """Route every logger (asyncio's and Python warnings included) through one handler; the
    filters of the handler it replaces carry over, so it may be called again (the command
    line, then the file, decide the format). ``flush_interval_s``: see :class:`LineHandler`."""
    handler = LineHandler(stream or sys.stderr, flush_interval_s)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        # A filter someone installed on the handler (log hygiene) stays in place.
        for kept in old.filters:
            handler.addFilter(kept)
        old.flush()  # its waiting lines come first
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
