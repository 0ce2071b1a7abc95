"""``qkdproxy probe`` tells the truth: it waits for the server's verdict (a ``qkdproxy/1``
PROBE frame) and fails, with the reason, when the server refuses us after the handshake
(wrong identity, another CA) or cannot reach its backend. Real daemons on loopback, no KME
(the verdict does not depend on the key exchange), so each case costs one handshake.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkdproxy.certs import write_dev_pki
from qkdproxy.tls.frames import (
    MAX_VERDICT,
    FrameDecoder,
    FrameError,
    FrameType,
    decode_verdict,
    encode,
    encode_verdict,
)
from tests.test_daemon_system import (
    Harness,
    TomlValue,
    free_port,
    harness_fixture,  # noqa: F401 - fixture
    pki_fixture,  # noqa: F401 - fixture
)

NO_KME: dict[str, TomlValue | None] = {
    "kme": None, "policy": "pq-required", "groups": ["X25519MLKEM768"],
}  # fmt: skip


async def probe_against(
    harness: Harness, server: dict[str, TomlValue | None], backend_port: int, human: bool = False
) -> tuple[int, dict[str, object], str]:
    daemon = await harness.daemon(
        await harness.server_config("server.toml", backend_port, NO_KME | server)
    )
    client = await harness.client_config("client.toml", daemon.port, NO_KME)
    code, stdout, _ = await harness.cli("probe", "--config", client, "--json")
    text = ""
    if human:
        human_code, text, _ = await harness.cli("probe", "--config", client)
        assert human_code == code
        # Human output: no Python reprs.
        assert "True" not in text and "None" not in text and "False" not in text
    await daemon.proc.terminate()
    return code, json.loads(stdout), text


async def test_probe_succeeds_only_once_the_backend_is_reached(harness: Harness) -> None:
    _, backend_port = await harness.backend()
    code, result, human = await probe_against(harness, {}, backend_port, human=True)
    assert code == 0, result
    assert result["ok"] is True
    assert result["backend"] == "reached"
    assert result["group"] == "X25519MLKEM768"
    assert human.startswith("OK")


async def test_probe_fails_when_the_server_backend_is_down(harness: Harness) -> None:
    code, result, human = await probe_against(harness, {}, free_port(), human=True)
    assert code == 1
    assert result["ok"] is False
    assert result["reason"] == "backend_unreachable"
    assert "backend unreachable" in str(result["error"])
    assert human.startswith("FAILED")


async def test_probe_fails_with_access_denied_for_a_wrong_identity(harness: Harness) -> None:
    _, backend_port = await harness.backend()
    code, result, _ = await probe_against(
        harness, {"allow": ["uri:spiffe://qkdproxy.test/tunnel/someone-else"]}, backend_port
    )
    assert code == 1
    assert result["ok"] is False
    assert result["reason"] == "access_denied"


async def test_probe_fails_with_unknown_ca_for_a_client_of_another_ca(
    harness: Harness, tmp_path: Path
) -> None:
    other = tmp_path / "other-pki"
    write_dev_pki(other)
    _, backend_port = await harness.backend()
    code, result, _ = await probe_against(harness, {"ca": str(other / "ca.pem")}, backend_port)
    assert code == 1
    assert result["ok"] is False
    assert result["reason"] == "unknown_ca"


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
