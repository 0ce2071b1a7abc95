"""Logs that explain themselves: UTC timestamps with the zone, a JSON format in which every
line is JSON, one line per KME/breaker transition, the drain's start and end and the exit,
failed connections at WARNING (rate-limited), IPv6 written as ``[::1]:443``."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from qkdproxy.core.addresses import format_sockname
from qkdproxy.core.breaker import CircuitBreaker
from qkdproxy.core.tls.keyexchange import KeyApi
from qkdproxy.daemon.config import KmeConfig
from qkdproxy.daemon.kme_binding import KmeConnection
from qkdproxy.daemon.logformat import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    event,
    record_event,
)
from qkdproxy.keys.sources import KeySources
from tests.system.test_daemon_system import (
    DEADLINE,
    Harness,
    harness_fixture,  # noqa: F401 - fixture
    pki_fixture,  # noqa: F401 - fixture
)
from tests.system_helpers import (
    FaultHarness,
    eventually,
    fault_pki_fixture,  # noqa: F401 - fixture
    faults_fixture,  # noqa: F401 - fixture
    free_port,
    refused,
    works,
)

UTC_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def make_record(message: str, extra: dict[str, Any] | None = None) -> logging.LogRecord:
    record = logging.LogRecord("qkdproxy.test", logging.WARNING, __file__, 1, message, (), None)
    for key, value in (extra or {}).items():
        setattr(record, key, value)
    return record


def test_text_lines_carry_a_utc_timestamp_with_the_zone() -> None:
    line = TextFormatter().format(make_record("hello"))
    stamp, level, rest = line.split(" ", 2)
    assert UTC_STAMP.match(stamp), line
    assert (level, rest) == ("WARNING", "qkdproxy.test: hello")


def test_json_lines_have_timestamp_level_logger_and_event_fields() -> None:
    line = JsonFormatter().format(make_record("KME a down", event("kme_down", kme="a")))
    out = json.loads(line)
    assert UTC_STAMP.match(out["ts"])
    assert out | {"ts": ""} == {
        "ts": "", "level": "WARNING", "logger": "qkdproxy.test", "message": "KME a down",
        "event": "kme_down", "kme": "a",
    }  # fmt: skip
    # A connection record is written once, as fields; a field never overwrites ts/level.
    fields = {"conn_id": 1, "level": "x"}
    out = json.loads(JsonFormatter().format(make_record("{...}", record_event("c", fields))))
    assert "message" not in out
    assert (out["level"], out["field_level"], out["conn_id"]) == ("WARNING", "x", 1)


def test_json_format_keeps_handler_filters_and_makes_a_traceback_one_line() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("info", "text", stream)
    hygiene = logging.Filter()  # stands for a filter installed on the handler
    root.handlers[-1].addFilter(hygiene)
    configure_logging("info", "json", stream)  # reconfigured: the filter stays
    assert root.handlers[-1].filters == [hygiene]
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("qkdproxy.test").exception("failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "RuntimeError: boom" in json.loads(lines[0])["exception"]


def test_ipv6_socket_addresses_are_bracketed() -> None:
    assert format_sockname(("::1", 443, 0, 0)) == "[::1]:443"
    assert format_sockname(("127.0.0.1", 443)) == "127.0.0.1:443"
    assert format_sockname("/run/x.sock") == "unix:/run/x.sock"


def test_kme_and_breaker_transitions_are_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = KmeConfig("a", KeyApi.ETSI_014, "https://kme", "s", "p", Path(), Path(), Path())
    kme = KmeConnection(config, KeySources(), cast(Any, None))
    breaker = CircuitBreaker(threshold=2, base_backoff_s=1.0)
    kme.client014 = cast(Any, SimpleNamespace(breaker=breaker))
    caplog.set_level(logging.INFO, "qkdproxy.kme")

    def lines() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records]

    for now in (0.0, 0.1, 0.2):  # the second failure opens; the third is refused at once
        kme.last_ok = False
        breaker.record_failure(now) if breaker.allow(now) else None
        kme.log_transitions("connect")
    assert lines() == [
        (logging.WARNING, "KME a down (connect)"),  # the first failed call
        (logging.WARNING, "KME a circuit breaker closed -> open"),
    ]
    caplog.clear()
    assert breaker.allow(5.0)  # time alone: half-open
    kme.log_transitions()
    kme.log_transitions()
    assert lines() == [(logging.WARNING, "KME a circuit breaker open -> half-open")]
    caplog.clear()
    breaker.record_success()
    kme.last_ok = True
    kme.log_transitions()
    kme.log_transitions()
    assert lines()[0][1] == "KME a circuit breaker half-open -> closed"
    assert lines()[1][1].startswith("KME a up again after ")
    assert len(lines()) == 2


async def test_json_log_format_every_line_with_drain_and_exit_events(harness: Harness) -> None:
    _, backend_port = await harness.backend()
    config = await harness.server_config(
        "server.toml", backend_port,
        {"kme": None, "policy": "pq-required", "groups": ["X25519MLKEM768"]},
        daemon={"log_format": "json"},
    )  # fmt: skip
    server = await harness.daemon(config)
    # Two failed handshakes: the first is a WARNING, the second (same reason, within the
    # interval) stays INFO so a flood is not a flood of warnings.
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await asyncio.wait_for(reader.read(), DEADLINE)
        writer.close()
    await server.proc.wait_line(lambda line: line.count('"event":"connection"') > 0)
    await server.proc.wait_line(
        lambda _: sum('"event":"connection"' in line for line in server.proc.lines) == 2
    )
    server.proc.signal(signal.SIGTERM)
    assert await server.proc.wait_exit() == 0
    lines = [json.loads(line) for line in server.proc.lines]  # every line is JSON
    assert all(UTC_STAMP.match(line["ts"]) for line in lines)
    assert all({"ts", "level", "logger"} <= set(line) for line in lines)
    connections = [line for line in lines if line.get("event") == "connection"]
    assert [c["level"] for c in connections] == ["WARNING", "INFO"]
    assert connections[0]["reason"].startswith("handshake failed")
    events = [line["event"] for line in lines if "event" in line]
    assert events[-3:] == ["drain_start", "drain_end", "exit"]
    assert lines[-1]["code"] == 0


async def test_a_kme_outage_is_logged_once_down_and_once_up(faults: FaultHarness) -> None:
    """The KME is killed and started again on its ports. The client daemon logs one
    "down" line and one "up again" line, however many connections fail in between, and
    with max_retry_interval_s = 1 it uses the KME again about a second after it is back."""
    ports = (free_port(), free_port())
    kme = await faults.start_kme(ports=ports)
    _, backend_port = await faults.backend()
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port, kme="t")],
        {"t": faults.kme_table(kme.urls["kme-b"], "b")},
    ))  # fmt: skip
    table = faults.kme_table(kme.urls["kme-a"], "a", prefetch=False, max_retry_interval_s=1.0)
    client = await faults.node(faults.config(
        "client.toml", [faults.client_tunnel("t", server.ports["t"], kme="t")], {"t": table},
    ))  # fmt: skip
    assert await works(client.ports["t"])
    kme.proc.process.kill()
    await kme.proc.wait_exit()
    for _ in range(4):  # each fails closed; the breaker opens
        assert await refused(client.ports["t"]) == b""
    await faults.start_kme(ports=ports, name="kme-again")

    async def recovered() -> bool:
        return await works(client.ports["t"])

    await eventually(recovered, "the tunnel works again once the KME is back")
    lines = client.proc.lines
    assert sum("KME t down" in line for line in lines) == 1, client.proc.stderr
    assert sum("KME t up again after" in line for line in lines) == 1, client.proc.stderr
    assert any("KME t circuit breaker closed -> open" in line for line in lines)
    # Half-open lasts one trial call: it shows only if a check falls inside it.
    assert re.search(r"KME t circuit breaker (half-open|open) -> closed", client.proc.stderr)


async def test_a_reload_applies_the_files_log_format(harness: Harness) -> None:
    """[daemon] log settings read by a reload take effect with it (they were reported as
    reloaded and left as they were until a restart): text, then JSON after one SIGHUP, then
    text again after another, each reload's own line in the new format."""
    _, backend_port = await harness.backend()
    tunnel = {"kme": None, "policy": "pq-required", "groups": ["X25519MLKEM768"]}
    config = await harness.server_config("server.toml", backend_port, tunnel)
    server = await harness.daemon(config)
    text_file = config.read_text()
    json_file = (
        await harness.server_config(
            "json.toml", backend_port, tunnel, daemon={"log_format": "json"}
        )
    ).read_text()

    config.write_text(json_file)
    server.proc.signal(signal.SIGHUP)
    line = await server.proc.wait_line(lambda text: '"event":"reload"' in text)
    assert json.loads(line)["result"] == "success"

    config.write_text(text_file)
    server.proc.signal(signal.SIGHUP)
    line = await server.proc.wait_line(lambda text: "INFO qkdproxy.daemon.app: reloaded " in text)
    assert not line.startswith("{")
