"""The per-connection log line, pinned byte for byte in both log formats.

The line is an interface (operators parse it): however it is rendered, a connection writes
exactly these bytes. The values include hostile text (a line break, a forged key, a
Unicode line separator) that must stay inside its JSON string.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from qkdproxy.core import logsafe
from qkdproxy.core.logsafe import JsonLine, compact_json
from qkdproxy.daemon.config import TunnelConfig
from qkdproxy.daemon.logformat import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    record_event,
    utc_timestamp,
)
from qkdproxy.daemon.tunnel import ConnectionRecord, Tunnel

NOW = 1796185633.7134567  # 2026-12-02T04:27:13.713Z
MONOTONIC = 5000.0
HOSTILE = 'x\n{"level":"ERROR"}\u2028\x1b[2J'


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fixed wall and monotonic clocks; the root logger restored afterwards."""
    monkeypatch.setattr(time, "time", lambda: NOW)
    monkeypatch.setattr(time, "time_ns", lambda: int(NOW * 1e9))
    monkeypatch.setattr(time, "monotonic", lambda: MONOTONIC)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def make_tunnel() -> Tunnel:
    """A tunnel with only what writing its connection lines needs."""
    config = SimpleNamespace(
        name="web", role="client", max_connections=100, max_connections_per_source=0,
        max_handshakes=128, max_handshakes_per_source=64, handshake_rate_per_source=100.0,
        handshake_burst_per_source=200.0, refusal_log_interval_s=10.0,
    )  # fmt: skip
    return Tunnel(cast(TunnelConfig, config), cast(Any, None), cast(Any, None))


def stream_record() -> ConnectionRecord:
    """A multiplexed stream that moved data and rode a tunnel with fresh keys."""
    return ConnectionRecord(
        conn_id=42, tunnel="web", role="client", client="127.0.0.1:51234",
        peer="CN=" + HOSTILE, group="qkd_mlkem768", flow="client", api="etsi014",
        qkd_key_id="2f1c0b9e-7d1a-4c3e-9b8f-0a1b2c3d4e5f", bytes_to_peer=1,
        bytes_from_peer=70000, key_updates=2, fresh_key_updates=1,
        fresh_key_ids=["k-\u00e9"], reason="closed", mux="stream", mux_tunnel=7,
    )  # fmt: skip


def failed_record() -> ConnectionRecord:
    """A handshake that failed (a warning) after the peer's hostile alert text."""
    return ConnectionRecord(
        conn_id=43, tunnel="web", role="client", client="[::1]:4433", failure="alert",
        spent_key_id="k2", fallback=True, hello_retry=True, handshake_ms=3.25,
        reason="handshake failed (peer): " + HOSTILE,
    )  # fmt: skip


def lines(log_format: str, *, extra_handler: logging.Handler | None = None) -> str:
    """The lines three connections write: a stream, a failed one, a quiet refusal."""
    out = io.StringIO()
    configure_logging("info", log_format, out)
    logsafe.install()
    if extra_handler is not None:
        logging.getLogger().addHandler(extra_handler)
    tunnel = make_tunnel()
    tunnel._finish(stream_record(), MONOTONIC - 0.0123456)
    tunnel._finish(failed_record(), MONOTONIC - 1.5)
    refused = ConnectionRecord(conn_id=44, tunnel="web", role="client", reason="rejected")
    tunnel._finish(refused, MONOTONIC, opened=False, quiet_as="rejected")
    return out.getvalue()


JSON_LINES = (
    '{"ts":"2026-12-02T04:27:13.713Z","level":"INFO","logger":"qkdproxy.connection",'
    '"event":"connection","conn_id":42,"tunnel":"web","role":"client",'
    '"client":"127.0.0.1:51234","peer":"CN=x\\n{\\"level\\":\\"ERROR\\"}\\u2028\\u001b[2J",'
    '"group":"qkd_mlkem768","flow":"client","api":"etsi014",'
    '"qkd_key_id":"2f1c0b9e-7d1a-4c3e-9b8f-0a1b2c3d4e5f","spent_key_id":null,'
    '"hello_retry":false,"fallback":false,"failure":null,"handshake_ms":null,'
    '"bytes_to_peer":1,"bytes_from_peer":70000,"key_updates":2,"fresh_key_updates":1,'
    '"fresh_key_update_failures":0,"fresh_key_updates_abandoned":0,'
    '"fresh_key_ids":["k-\\u00e9"],"duration_s":0.012346,"reason":"closed","mux":"stream",'
    '"mux_tunnel":7,"mux_streams":null,"mux_retries":null}\n'
    '{"ts":"2026-12-02T04:27:13.713Z","level":"WARNING","logger":"qkdproxy.connection",'
    '"event":"connection","conn_id":43,"tunnel":"web","role":"client",'
    '"client":"[::1]:4433","peer":null,"group":null,"flow":null,"api":null,'
    '"qkd_key_id":null,"spent_key_id":"k2","hello_retry":true,"fallback":true,'
    '"failure":"alert","handshake_ms":3.25,"bytes_to_peer":0,"bytes_from_peer":0,'
    '"key_updates":0,"fresh_key_updates":0,"fresh_key_update_failures":0,'
    '"fresh_key_updates_abandoned":0,"fresh_key_ids":[],"duration_s":1.5,'
    '"reason":"handshake failed (peer): x\\n{\\"level\\":\\"ERROR\\"}\\u2028\\u001b[2J",'
    '"mux":null,"mux_tunnel":null,"mux_streams":null,"mux_retries":null}\n'
    '{"ts":"2026-12-02T04:27:13.713Z","level":"WARNING","logger":"qkdproxy.connection",'
    '"event":"connection","conn_id":44,"tunnel":"web","role":"client","client":"",'
    '"peer":null,"group":null,"flow":null,"api":null,"qkd_key_id":null,"spent_key_id":null,'
    '"hello_retry":false,"fallback":false,"failure":null,"handshake_ms":null,'
    '"bytes_to_peer":0,"bytes_from_peer":0,"key_updates":0,"fresh_key_updates":0,'
    '"fresh_key_update_failures":0,"fresh_key_updates_abandoned":0,"fresh_key_ids":[],'
    '"duration_s":0.0,"reason":"rejected","mux":null,"mux_tunnel":null,"mux_streams":null,"mux_retries":null,'
    '"suppressed":0}\n'
)
TEXT_LINES = (
    '2026-12-02T04:27:13.713Z INFO qkdproxy.connection: {"conn_id":42,"tunnel":"web",'
    '"role":"client","client":"127.0.0.1:51234",'
    '"peer":"CN=x\\n{\\"level\\":\\"ERROR\\"}\\u2028\\u001b[2J","group":"qkd_mlkem768",'
    '"flow":"client","api":"etsi014","qkd_key_id":"2f1c0b9e-7d1a-4c3e-9b8f-0a1b2c3d4e5f",'
    '"spent_key_id":null,"hello_retry":false,"fallback":false,"failure":null,'
    '"handshake_ms":null,"bytes_to_peer":1,"bytes_from_peer":70000,"key_updates":2,'
    '"fresh_key_updates":1,"fresh_key_update_failures":0,"fresh_key_updates_abandoned":0,'
    '"fresh_key_ids":["k-\\u00e9"],"duration_s":0.012346,"reason":"closed","mux":"stream",'
    '"mux_tunnel":7,"mux_streams":null,"mux_retries":null}\n'
    '2026-12-02T04:27:13.713Z WARNING qkdproxy.connection: {"conn_id":43,"tunnel":"web",'
    '"role":"client","client":"[::1]:4433","peer":null,"group":null,"flow":null,"api":null,'
    '"qkd_key_id":null,"spent_key_id":"k2","hello_retry":true,"fallback":true,'
    '"failure":"alert","handshake_ms":3.25,"bytes_to_peer":0,"bytes_from_peer":0,'
    '"key_updates":0,"fresh_key_updates":0,"fresh_key_update_failures":0,'
    '"fresh_key_updates_abandoned":0,"fresh_key_ids":[],"duration_s":1.5,'
    '"reason":"handshake failed (peer): x\\n{\\"level\\":\\"ERROR\\"}\\u2028\\u001b[2J",'
    '"mux":null,"mux_tunnel":null,"mux_streams":null,"mux_retries":null}\n'
    '2026-12-02T04:27:13.713Z WARNING qkdproxy.connection: {"conn_id":44,"tunnel":"web",'
    '"role":"client","client":"","peer":null,"group":null,"flow":null,"api":null,'
    '"qkd_key_id":null,"spent_key_id":null,"hello_retry":false,"fallback":false,'
    '"failure":null,"handshake_ms":null,"bytes_to_peer":0,"bytes_from_peer":0,'
    '"key_updates":0,"fresh_key_updates":0,"fresh_key_update_failures":0,'
    '"fresh_key_updates_abandoned":0,"fresh_key_ids":[],"duration_s":0.0,'
    '"reason":"rejected","mux":null,"mux_tunnel":null,"mux_streams":null,"mux_retries":null,"suppressed":0}\n'
)


def test_json_format_line_is_pinned(frozen: None) -> None:
    assert lines("json") == JSON_LINES


def test_text_format_line_is_pinned(frozen: None) -> None:
    assert lines("text") == TEXT_LINES


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_another_handler_gets_the_same_line(frozen: None, log_format: str) -> None:
    """A handler added beside ours (a test's capture, a library's) still sees every line,
    and ours writes what it writes alone."""
    other = io.StringIO()
    handler = logging.StreamHandler(other)
    handler.setFormatter(logging.Formatter("%(message)s"))
    assert lines(log_format, extra_handler=handler) == lines(log_format)
    assert other.getvalue().count("\n") == 3


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_our_own_handler_alone_gets_the_line_without_a_log_record(
    frozen: None, log_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct path: no LogRecord for a connection line when only our handler writes."""
    made: list[logging.LogRecord] = []
    make = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(make(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    assert lines(log_format).count("\n") == 3
    assert made == []


def test_a_failing_stream_does_not_break_the_connection(
    frozen: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write error is logging's to report (handleError), never the connection's."""

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    errors: list[str] = []
    monkeypatch.setattr(
        logging.Handler, "handleError", lambda self, record: errors.append(record.getMessage())
    )
    configure_logging("info", "json", Broken())
    make_tunnel()._finish(stream_record(), MONOTONIC)
    assert len(errors) == 1 and '"conn_id":42' in errors[0]


@pytest.mark.parametrize(
    "fields", [{}, {"a": 1}, {"x": HOSTILE, "n": None, "l": ["\u00e9"], "f": 0.1}]
)
@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_record_line_is_what_the_formatter_writes(
    fields: dict[str, object], formatter: JsonFormatter | TextFormatter
) -> None:
    """The direct rendering equals the formatter's for any record event, empty included."""
    record = logging.makeLogRecord(
        {"name": "qkdproxy.x", "levelno": logging.INFO, "levelname": "INFO", "created": NOW,
         "msg": JsonLine(fields), **record_event("ev", fields)}
    )  # fmt: skip
    direct = formatter.record_line(
        utc_timestamp(NOW), "INFO", "qkdproxy.x", "ev", compact_json(fields)
    )
    assert direct == formatter.format(record)
