"""Log hygiene: hostile KME and peer strings never produce more than one log line per
event, through the helper, the filter every daemon handler carries, and real daemons."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from qkdproxy.core.logsafe import JsonLine, SingleLineFilter, escape
from tests.system.test_admission import legit_endpoint, legit_exchange
from tests.system_helpers import (
    FaultHarness,
    fault_pki_fixture,  # noqa: F401 - fixture
    faults_fixture,  # noqa: F401 - fixture
    refused,
)

FORGED = '2026-01-01 00:00:00,000 INFO qkdproxy.connection: {"forged":true}'
HOSTILE = [
    f"KME failure\n{FORGED}",
    f"carriage\r{FORGED}",
    f"unicode line separator\u2028{FORGED}",
    f"next line\x85{FORGED}",
    f"terminal \x1b[2K\x1b[1Aescape {FORGED}",
    f"bidi \u202e{FORGED}",
    f"nul \x00 and vertical tab \x0b and form feed \x0c {FORGED}",
]
# Every line a daemon writes starts a record: timestamp, level, logger.
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ \S+: \{?")


@pytest.mark.parametrize("text", HOSTILE)
def test_escape_keeps_a_hostile_string_on_one_visible_line(text: str) -> None:
    safe = escape(text)
    assert len(safe.splitlines()) == 1
    assert all(ch.isprintable() for ch in safe)
    assert FORGED in safe  # still readable, just inert


def test_escape_bounds_the_length_and_keeps_json_valid() -> None:
    assert len(escape("x" * 10_000)) < 1100
    line = json.dumps({"reason": "a\nb"})
    assert json.loads(escape(line)) == {"reason": "a\nb"}


def emit(configure: object) -> list[str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SingleLineFilter())
    logger = logging.getLogger(f"test.logsafe.{id(stream)}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    assert callable(configure)
    configure(logger)
    logger.removeHandler(handler)
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("text", HOSTILE)
def test_the_filter_makes_every_record_one_line(text: str) -> None:
    def log_all(logger: logging.Logger) -> None:
        logger.warning("tunnel t: QKD unavailable (%s)", text)
        logger.error(text)
        try:
            raise ValueError(text)
        except ValueError:
            logger.exception("crash while serving %s", text)
        logger.info("stack", stack_info=True)

    lines = emit(log_all)
    assert len(lines) == 4, lines
    assert all(line.startswith(("WARNING ", "ERROR ", "INFO ")) for line in lines)


def test_a_json_line_is_left_unrendered_and_renders_to_one_safe_line() -> None:
    fields = {"reason": HOSTILE[0], "peer": "\u202e\x85", "n": 1}
    record = logging.LogRecord("t", logging.INFO, __file__, 1, JsonLine(fields), None, None)
    assert SingleLineFilter().filter(record)
    assert isinstance(record.msg, JsonLine)  # not rendered: a JSON-format line never needs it
    text = record.getMessage()
    assert text == json.dumps(fields, separators=(",", ":"))
    assert escape(text, limit=None) == text and len(text.splitlines()) == 1
    assert json.loads(text) == fields
    lines = emit(lambda logger: logger.info(JsonLine(fields)))
    assert lines == [f"INFO {lines[0].split()[1]} {text}"]


def records(lines: list[str]) -> list[dict[str, object]]:
    """Connection records, parsed strictly: the JSON must be the whole message. (A parser
    that looks for the marker anywhere in a line would take the KME's inert text for one.)"""
    out = []
    for line in lines:
        match = RECORD_START.match(line)
        if match and " qkdproxy.connection: {" in match.group():
            out.append(json.loads(line[match.end() - 1 :]))
    return out


def assert_one_line_per_record(stderr: list[str]) -> None:
    strays = [line for line in stderr if not RECORD_START.match(line)]
    assert strays == [], strays


async def test_a_kme_error_message_with_newlines_cannot_forge_a_line(
    faults: FaultHarness,
) -> None:
    """A KME answering 503 with a message built to look like log lines: the client's
    fallback warning and connection lines stay one line per event."""
    kme = await faults.start_kme()
    front = await faults.front("kme-a", "sae-a", kme.urls["kme-a"])
    _, backend_port = await faults.backend()
    preferred = {"policy": "qkd-preferred", "groups": ["qkd_mlkem768", "X25519MLKEM768"]}
    server = await faults.node(faults.config(
        "server.toml", [faults.server_tunnel("t", backend_port, **preferred)],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    ))  # fmt: skip
    client = await faults.node(faults.config(
        "client.toml",
        [faults.client_tunnel("required", server.ports["t"], kme="direct"),
         faults.client_tunnel("preferred", server.ports["t"], kme="direct", **preferred)],
        {"direct": faults.kme_table(front.url, "a", prefetch=False)},
    ))  # fmt: skip
    for text in HOSTILE[:3]:
        front.answer = (503, text)
        await refused(client.ports["preferred"])  # falls back: the warning names the KME error
        assert await refused(client.ports["required"]) == b""
    await client.proc.wait_line(lambda line: len(records(client.proc.lines)) >= 6)
    await client.proc.wait_line(lambda line: line.count("QKD unavailable") >= 1)
    lines = client.proc.lines
    assert_one_line_per_record(lines)
    assert not [line for line in lines if line.startswith(FORGED[:20])]
    warnings = [line for line in lines if "QKD unavailable" in line]
    # The KME's text reached the log (escaped) before its circuit breaker opened.
    assert any("forged" in w and "\\x0a" in w for w in warnings), warnings


def hostile_credentials(faults: FaultHarness, tmp: Path) -> Path:
    """A client certificate of the test CA whose names are hostile strings."""
    tmp.mkdir()
    issued = faults.dev.ca.issue(
        'evil\n2026 INFO x: {"f":1}\r', [f"spiffe://qkdproxy.test/evil\n{FORGED}/x"]
    )
    (tmp / "tunnel-client.pem").write_bytes(
        issued.chain[0].public_bytes(serialization.Encoding.PEM)
    )
    key = tmp / "tunnel-client-key.pem"
    key.write_bytes(issued.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    (tmp / "ca.pem").write_bytes(faults.dev.ca.certificate.public_bytes(serialization.Encoding.PEM))
    return tmp


async def test_hostile_peer_certificate_names_stay_on_one_line(
    faults: FaultHarness, tmp_path: Path
) -> None:
    """A client whose certificate names carry newlines and separators: the server refuses
    it (allow-list) and logs one line that names it, escaped."""
    _, backend_port = await faults.backend()
    tunnel = faults.server_tunnel("t", backend_port, policy="pq-required",
                                  groups=["X25519MLKEM768"], kme=None)  # fmt: skip
    server = await faults.node(faults.config("server.toml", [tunnel], {}))
    endpoint = legit_endpoint(hostile_credentials(faults, tmp_path / "pki"))
    assert not await legit_exchange(endpoint, server.ports["t"])
    record = await server.proc.wait_record(lambda r: r["failure"] is not None)
    assert "evil" in record["reason"] and "not allowed" in record["reason"]
    assert_one_line_per_record(server.proc.lines)
    assert not [line for line in server.proc.lines if line.startswith(FORGED[:20])]
