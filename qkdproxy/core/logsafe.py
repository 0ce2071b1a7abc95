"""Log hygiene: text from a peer or a KME never forges or splits a log line.

Peers and KMEs choose some of the strings qkdproxy logs (error messages, certificate names,
alert descriptions). :func:`escape` makes one such string safe for a single log line;
:class:`SingleLineFilter` applies the same rule to every record a handler emits (message,
arguments and exception text), so a path that forgot to escape still yields one line per
event. Backslashes are left alone: JSON lines stay valid JSON.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidirectional
# overrides (which reorder what a terminal shows).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
DEFAULT_LIMIT = 1000
# One encoder for every compact line: json.dumps builds a new one per call with these options.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def compact_json(value: object) -> str:
    """``value`` as compact, ASCII-only JSON (``json.dumps(value, separators=(",", ":"))``):
    every control, non-ASCII and line-separating character escaped, so one safe line."""
    return _COMPACT.encode(value)


def _code(match: re.Match[str]) -> str:
    point = ord(match.group())
    return f"\\x{point:02x}" if point < 0x100 else f"\\u{point:04x}"


def escape(value: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """``value`` as text fit for one log line: control and line-breaking characters become
    ``\\xNN``/``\\uNNNN`` escapes, and more than ``limit`` characters are cut (marked)."""
    text = str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "...(cut)"
    return _UNSAFE.sub(_code, text)


class JsonLine:
    """A log message that is ``fields`` as compact JSON, rendered only when a handler shows
    it: the JSON log format writes the fields as keys of its own line and never needs it.
    ASCII-only JSON is one safe line by construction (every control, non-ASCII and
    separator character is escaped), so :class:`SingleLineFilter` passes it as it is."""

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, object]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return compact_json(self.fields)


class SingleLineFilter(logging.Filter):
    """Make every record one line: the rendered message and any exception text escaped.

    Attach it to a handler (``handler.addFilter(SingleLineFilter())``); it changes the
    record in place, so it goes before the formatter runs, whatever the format.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Escape the record; never drops it."""
        if isinstance(record.msg, JsonLine) and not (
            record.args or record.exc_info or record.stack_info
        ):
            return True  # already one safe line; left unrendered
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback is kept, as one escaped line after the message.
            text = logging.Formatter().formatException(record.exc_info)
            message = f"{message} | {text}"
            record.exc_info, record.exc_text = None, None
        if record.stack_info:
            message, record.stack_info = f"{message} | {record.stack_info}", None
        record.msg, record.args = escape(message, limit=None), None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add a :class:`SingleLineFilter` to every handler of ``logger`` (default: root)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, SingleLineFilter) for f in handler.filters):
            handler.addFilter(SingleLineFilter())
