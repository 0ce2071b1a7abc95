"""``qkdproxy probe`` tells the truth: it waits for the server's verdict (a ``qkdproxy/1``
PROBE frame) and fails, with the reason, when the server refuses us after the handshake
(wrong identity, another CA) or cannot reach its backend. Real daemons on loopback, no KME
(the verdict does not depend on the key exchange), so each case costs one handshake.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkdproxy.core.peer.frames import (
    MAX_VERDICT,
    FrameDecoder,
    FrameError,
    FrameType,
    decode_verdict,
    encode,
    encode_verdict,
)
from qkdproxy.daemon.config import load_config
from qkdproxy.tools.bench.processes import free_port
from qkdproxy.tools.certs import write_dev_pki
from qkdproxy.tools.probe import probe
from tests.system.test_daemon_system import (
    Harness,
    TomlValue,
    harness_fixture,  # noqa: F401 - fixture
    pki_fixture,  # noqa: F401 - fixture
)

NO_KME: dict[str, TomlValue | None] = {
    "kme": None, "policy": "pq-required", "groups": ["X25519MLKEM768"],
}  # fmt: skip


async def test_probe_reports_success_only_once_the_backend_is_reached(
    harness: Harness, tmp_path: Path
) -> None:
    """One server daemon with four tunnels, one per outcome, and a client tunnel for each."""
    _, backend_port = await harness.backend()
    other = tmp_path / "other-pki"
    write_dev_pki(other)
    cases: dict[str, dict[str, TomlValue | None]] = {
        "ok": {},
        "down": {"connect": f"127.0.0.1:{free_port()}"},
        "picky": {"allow": ["uri:spiffe://qkdproxy.test/tunnel/someone-else"]},
        "otherca": {"ca": str(other / "ca.pem")},
    }
    ports = {name: free_port() for name in cases}
    server_text = client_text = ""
    for name, change in cases.items():
        server = await harness.server_config("s.toml", backend_port, NO_KME | change)
        client = await harness.client_config("c.toml", ports[name], NO_KME)
        # One [[tunnel]] each: take the generated table, give it its name and port.
        server_text += tunnel_table(server, name, f"127.0.0.1:{ports[name]}")
        client_text += tunnel_table(client, name, "127.0.0.1:0")
    servers = harness.write("servers.toml", "[daemon]\n" + server_text)
    clients = harness.write("clients.toml", "[daemon]\n" + client_text)
    daemon = await harness.daemon(servers)
    await daemon.proc.wait_line(lambda _: daemon.proc.stderr.count("listening on") == 4)

    config = load_config(clients)
    results = {t.name: await probe(config, t) for t in config.tunnels}
    assert results["ok"]["ok"] is True, results["ok"]
    assert (results["ok"]["backend"], results["ok"]["group"]) == ("reached", "X25519MLKEM768")
    expected = {"down": "backend_unreachable", "picky": "access_denied", "otherca": "unknown_ca"}
    for name, reason in expected.items():
        assert (results[name]["ok"], results[name]["reason"]) == (False, reason), results[name]
    assert "backend unreachable" in results["down"]["error"]

    # The command: exit codes, and human output without Python reprs.
    for name, code, head in (("ok", 0, "OK"), ("down", 1, "FAILED")):
        status, out, _ = await harness.cli("probe", "--config", clients, "--tunnel", name)
        assert status == code and out.startswith(head), out
        assert "True" not in out and "None" not in out and "False" not in out
    status, out, _ = await harness.cli("probe", "--config", clients, "--tunnel", "picky", "--json")
    assert status == 1 and json.loads(out)["reason"] == "access_denied"


def tunnel_table(path: Path, name: str, listen: str) -> str:
    """The ``[[tunnel]]`` table of a generated file, renamed and listening on ``listen``."""
    table = path.read_text().split("[[tunnel]]", 1)[1]
    table = table.replace('name = "backend"', f'name = "{name}"')
    return "[[tunnel]]" + table.replace('listen = "127.0.0.1:0"', f'listen = "{listen}"')


# Hostile frames: a VERDICT is bounded, printable, and PROBE carries nothing.


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (encode(FrameType.PROBE, b"x"), "PROBE carries no payload"),
        (encode(FrameType.VERDICT), "VERDICT carries"),
        (encode(FrameType.VERDICT, b"x" * (MAX_VERDICT + 1)), "VERDICT carries"),
    ],
)
def test_malformed_probe_and_verdict_frames_are_refused(wire: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        FrameDecoder().feed(wire)


def test_a_verdict_is_cut_and_made_printable() -> None:
    frame = FrameDecoder().feed(encode_verdict("é" * 1000))[0]
    assert len(frame.payload) == MAX_VERDICT
    # A multi-byte character cut in half and control characters never reach a terminal.
    assert decode_verdict(b"backend\x1b[31m down\xff\n") == "backend?[31m down\ufffd?"
