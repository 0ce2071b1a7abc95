"""Risky settings: each one warned about by check-config and at start-up, refused in strict
mode; private key files that group or others can read refused unless allowed."""

from __future__ import annotations

import argparse
import shutil
import signal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from qkdproxy.cli.daemon import check_command
from qkdproxy.daemon.config import load_config
from qkdproxy.daemon.risk import assess, risky_settings
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.tools.certs import write_dev_pki
from tests.system.test_daemon_system import (
    CLIENT_ID,
    SERVER_NAME,
    Harness,
    exchange,
    harness_fixture,  # noqa: F401 - fixture
    pki_fixture,  # noqa: F401 - fixture
    toml_table,
)


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("risk-pki")
    write_dev_pki(directory)
    return directory


def write_config(tmp: Path, pki_dir: Path, daemon: dict[str, object], **tunnel: object) -> Path:
    values: dict[str, object] = {
        "name": "t", "role": "server", "listen": "127.0.0.1:0", "connect": "127.0.0.1:9",
        "cert": str(pki_dir / "tunnel-server.pem"), "key": str(pki_dir / "tunnel-server-key.pem"),
        "ca": str(pki_dir / "ca.pem"), "allow": [CLIENT_ID], "policy": "pq-required",
    }  # fmt: skip
    values.update(tunnel)
    text = toml_table("[daemon]", daemon) if daemon else ""  # type: ignore[arg-type]
    if values.get("kme"):
        text += toml_table("[kme.local]", {
            "url": "https://127.0.0.1:1", "sae_id": "sae-b", "peer_sae_id": "sae-a",
            "cert": str(pki_dir / "sae-b.pem"), "key": str(pki_dir / "sae-b-key.pem"),
            "ca": str(pki_dir / "ca.pem"),
        })  # fmt: skip
    path = tmp / "risk.toml"
    path.write_text(text + toml_table("[[tunnel]]", values))  # type: ignore[arg-type]
    return path


CLIENT: dict[str, object] = {"role": "client", "cert": "tunnel-client.pem", "allow": []}
RISKS = [
    ("allow_any_peer", {"allow": [], "allow_any_peer": True}),
    ("ip_server_name_without_allow", {**CLIENT, "server_name": "127.0.0.1"}),
    ("slow_timeouts", {"handshake_timeout_s": 3600, "idle_timeout_s": 0}),
    ("qkd_preferred_server", {"policy": "qkd-preferred", "kme": "local"}),
    ("public_plaintext", {"connect": "192.0.2.1:80", "allow_public_plaintext": True}),
    ("admission_off", {"max_handshakes_per_source": 0, "first_byte_timeout_s": 0}),
    (
        "accept_unechoed_key_id",
        {**CLIENT, "server_name": SERVER_NAME, "kme": "local", "accept_unechoed_key_id": True},
    ),
]


def tunnel_values(pki_dir: Path, changes: dict[str, object]) -> dict[str, object]:
    out = dict(changes)
    if out.get("cert") == "tunnel-client.pem":
        out["cert"] = str(pki_dir / "tunnel-client.pem")
        out["key"] = str(pki_dir / "tunnel-client-key.pem")
    return out


@pytest.mark.parametrize(("code", "changes"), RISKS, ids=[r[0] for r in RISKS])
def test_each_risky_setting_is_warned_then_refused_in_strict_mode(
    tmp_path: Path, dev_pki: Path, capsys: pytest.CaptureFixture[str], code: str,
    changes: dict[str, object],
) -> None:  # fmt: skip
    values = tunnel_values(dev_pki, changes)
    path = write_config(tmp_path, dev_pki, {}, **values)
    config = load_config(path)
    assert [r.code for r in risky_settings(config)] == [code]

    assert check_command(argparse.Namespace(config=path, file=None, json=False, strict=False)) == 0
    out = capsys.readouterr()
    assert "WARNING: risky setting: tunnel.t: " in out.err and f"[{code}]" in out.err
    assert "OK" in out.out

    assert check_command(argparse.Namespace(config=path, file=None, json=False, strict=True)) == 2
    assert "refused in strict mode" in capsys.readouterr().err
    strict = write_config(tmp_path, dev_pki, {"strict": True}, **values)
    assert (
        check_command(argparse.Namespace(config=strict, file=None, json=False, strict=False)) == 2
    )


def test_the_shipped_development_settings_have_no_risk(tmp_path: Path, dev_pki: Path) -> None:
    path = write_config(tmp_path, dev_pki, {})
    assert assess(load_config(path)).warnings == []
    client = write_config(tmp_path, dev_pki, {}, **tunnel_values(dev_pki, CLIENT),
                          server_name=SERVER_NAME)  # fmt: skip
    assert assess(load_config(client)).warnings == []


@pytest.mark.parametrize(("mode", "who"), [(0o640, "group"), (0o604, "others"),
                                           (0o644, "group and others")])  # fmt: skip
def test_a_key_file_others_can_read_is_refused_unless_allowed(
    tmp_path: Path, dev_pki: Path, capsys: pytest.CaptureFixture[str], mode: int, who: str
) -> None:
    key = tmp_path / "key.pem"
    shutil.copy(dev_pki / "tunnel-server-key.pem", key)
    key.chmod(mode)
    path = write_config(tmp_path, dev_pki, {}, key=str(key))
    assert check_command(argparse.Namespace(config=path, file=None, json=False, strict=False)) == 2
    err = capsys.readouterr().err
    assert f"private key {key} is accessible by {who}" in err and "chmod 600" in err

    allowed = write_config(tmp_path, dev_pki, {"allow_readable_keys": True}, key=str(key))
    assert (
        check_command(argparse.Namespace(config=allowed, file=None, json=False, strict=False)) == 0
    )
    assert "[readable_key]" in capsys.readouterr().err
    assert (
        check_command(argparse.Namespace(config=allowed, file=None, json=False, strict=True)) == 2
    )


def test_the_development_pki_writes_keys_only_the_owner_can_read(dev_pki: Path) -> None:
    keys = sorted(dev_pki.glob("*-key.pem"))
    assert keys and all(k.stat().st_mode & 0o077 == 0 for k in keys)


async def test_run_warns_at_start_up_and_refuses_in_strict_mode(
    harness: Harness,
) -> None:
    _, backend_port = await harness.backend()
    risky = {"kme": None, "policy": "pq-required", "groups": ["X25519MLKEM768"],
             "allow": None, "allow_any_peer": True}  # fmt: skip
    config = await harness.server_config("risky.toml", backend_port, risky)
    server = await harness.daemon(config)
    warning = await server.proc.wait_line(lambda line: "WARNING" in line)
    assert "risky setting" in warning and "[allow_any_peer]" in warning

    code, _, err = await harness.cli("run", "--config", config, "--strict")
    assert code == 2 and "[allow_any_peer] (refused in strict mode)" in err


async def test_a_reload_refuses_a_key_file_others_can_read(
    harness: Harness,
) -> None:
    _, backend_port = await harness.backend()
    key = harness.tmp / "server-key.pem"
    shutil.copy(harness.pki / "tunnel-server-key.pem", key)
    key.chmod(0o600)
    values = {"kme": None, "policy": "pq-required", "groups": ["X25519MLKEM768"], "key": str(key)}
    server = await harness.daemon(await harness.server_config("s.toml", backend_port, values))
    key.chmod(0o644)
    server.proc.signal(signal.SIGHUP)
    refused = await server.proc.wait_line(lambda line: "reload refused" in line)
    assert "accessible by group and others" in refused


async def test_a_qkd_preferred_server_logs_a_non_qkd_connection_as_fallback(
    harness: Harness,
) -> None:
    """Before, the server logged "fallback": false for a client that chose no QKD group."""
    _, backend_port = await harness.backend()
    server, client = await harness.pair(
        backend_port,
        server={"policy": "qkd-preferred", "groups": ["qkd_mlkem768", "X25519MLKEM768"]},
        client={"kme": None, "policy": "pq-required", "groups": ["X25519MLKEM768"]},
    )
    payload = b"x" * 1000
    assert await exchange(client.port, payload) == payload
    record = await server.proc.wait_record()
    assert (record["group"], record["fallback"]) == ("X25519MLKEM768", True)


def test_our_own_weak_certificate_is_a_risk(
    tmp_path: Path, dev_pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weak = CertificateAuthority.create().issue("t", ["server.qkdproxy.test"],
                                               key_type="rsa-1024")  # type: ignore[arg-type]  # fmt: skip
    cert, key = tmp_path / "weak.pem", tmp_path / "weak-key.pem"
    cert.write_bytes(weak.chain[0].public_bytes(serialization.Encoding.PEM))
    key.touch(mode=0o600)
    key.write_bytes(weak.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    path = write_config(tmp_path, dev_pki, {}, cert=str(cert), key=str(key))
    assert [r.code for r in assess(load_config(path)).warnings] == ["weak_own_certificate"]
    assert check_command(argparse.Namespace(config=path, file=None, json=False, strict=False)) == 0
    assert "certificate policy min_rsa_bits" in capsys.readouterr().err
