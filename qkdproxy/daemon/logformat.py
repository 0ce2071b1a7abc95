"""The daemon's log formats: readable text or one JSON object per line.

Both stamp every line in UTC, ISO 8601 with the zone (``2026-12-02T04:27:13.713Z``): local
time without a zone cannot be correlated across hosts. An event (a connection record, a KME
or breaker transition, a reload, the drain, the exit) carries its fields in the ``fields``
attribute of the log record (``extra={"fields": {...}}``); the JSON format writes them as
top-level keys next to ``ts``, ``level`` and ``logger``, the text format shows the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Keys the JSON format owns: an event field of the same name is written with a prefix.
RESERVED = ("ts", "level", "logger", "message", "exception")


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

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's API
        """UTC, ISO 8601, with the zone."""
        return utc_timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, then the event fields or the message."""

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


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Route every logger (asyncio's and Python warnings included) through one handler; the
    filters of the handler it replaces carry over, so it may be called again (the command
    line, then the file, decide the format)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        # A filter someone installed on the handler (log hygiene) stays in place.
        for kept in old.filters:
            handler.addFilter(kept)
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
