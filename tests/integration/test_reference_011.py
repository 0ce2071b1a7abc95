"""The paper-era reference server (0.1.x): it does not echo the key id in the client-initiated
flow. Its ServerHello key share, as captured on the wire, is ``ciphertext || 16 bytes``; 0.1.0
leaves those bytes uninitialised (whatever was in memory), 0.1.1 zeroes them. Everything else
(dec_keys with the client's key id, the key schedule) is as in 0.2.0.

A qkdproxy client completes such a handshake when, and only when, the tunnel's
``accept_unechoed_key_id`` is on; it is off by default and a risky setting (a WARNING from
check-config and at start-up, refused in strict mode).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from qkdproxy.core.hybrid import KEY_ID_SIZE, ZERO_KEY_ID
from qkdproxy.core.tls.keyexchange import Flow, KeyApi, ServerKeyExchange
from qkdproxy.core.tls.wire import Alert
from qkdproxy.daemon.app import Daemon, tunnel_qkd_options
from qkdproxy.daemon.config import ConfigError, load_config
from qkdproxy.daemon.kme_binding import KmeConnection
from qkdproxy.daemon.risk import assess
from qkdproxy.io.tls_stream import HandshakeError
from qkdproxy.tools.certs import DevPki
from qkdproxy.tools.loopback import loopback_pair
from tests.conftest import groups

QKD = groups("qkd_mlkem768")
DEADLINE = 15.0


def reference_01x_server(monkeypatch: pytest.MonkeyPatch, suffix: Any) -> None:
    """Make qkdproxy servers answer like reference 0.1.x: the key id slot of the server's
    key share holds ``suffix()`` instead of the client's key id (the QKD key is still the
    one the client named: 0.1.x called dec_keys with it)."""
    original = ServerKeyExchange.key_share

    def key_share(self: ServerKeyExchange, group: int) -> tuple[bytes, object]:
        share, private = original(self, group)
        return share[:-KEY_ID_SIZE] + suffix(), private

    monkeypatch.setattr(ServerKeyExchange, "key_share", key_share)


def config_text(pki_dir: Path, accept: str) -> str:
    return f"""
[kme.k]
url = "https://127.0.0.1:1"
sae_id = "sae-a"
peer_sae_id = "sae-b"
cert = "{pki_dir}/sae-a.pem"
key = "{pki_dir}/sae-a-key.pem"
ca = "{pki_dir}/ca.pem"

[[tunnel]]
name = "to-reference"
role = "client"
listen = "127.0.0.1:0"
connect = "127.0.0.1:9"
cert = "{pki_dir}/tunnel-client.pem"
key = "{pki_dir}/tunnel-client-key.pem"
ca = "{pki_dir}/ca.pem"
server_name = "server.qkdproxy.test"
kme = "k"
{accept}
"""


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    for name, data in DevPki.create().files().items():
        (directory / name).write_bytes(data)
    return directory


def options_for(tmp_path: Path, pki_dir: Path, accept: str) -> Any:
    path = tmp_path / "client.toml"
    path.write_text(config_text(pki_dir, accept))
    config = load_config(path)
    return tunnel_qkd_options(config.tunnels[0], config.kmes["k"])


@pytest.mark.parametrize("shape", ["0.1.0-uninitialised", "0.1.1-zeros"])
@pytest.mark.parametrize(
    "setting", ["", "accept_unechoed_key_id = false", "accept_unechoed_key_id = true"]
)
async def test_client_against_reference_01x_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pki_dir: Path, shape: str, setting: str
) -> None:
    suffix = (
        (lambda: os.urandom(KEY_ID_SIZE))
        if shape.endswith("uninitialised")
        else (lambda: ZERO_KEY_ID)
    )
    reference_01x_server(monkeypatch, suffix)
    options = options_for(tmp_path, pki_dir, setting)
    assert (options.flow, options.api) == (Flow.CLIENT_INITIATED, KeyApi.ETSI_014)
    accepted = setting.endswith("true")
    assert options.accept_unechoed_key_id is accepted
    async with loopback_pair(QKD) as pair:
        client = pair.client(QKD, options)
        if not accepted:
            with pytest.raises(HandshakeError) as info:
                await asyncio.wait_for(pair.handshake(client), DEADLINE)
            assert info.value.alert == Alert.ILLEGAL_PARAMETER
            assert info.value.reason == "server did not echo the QKD key id"
            return
        stream = await asyncio.wait_for(pair.handshake(client), DEADLINE)
        try:
            assert stream.record.group == "qkd_mlkem768"
            assert stream.record.qkd_key_id is not None
            await stream.write(b"ping")
            assert await asyncio.wait_for(stream.read(), DEADLINE) == b"ping"
        finally:
            await stream.close()
    ledger = pair.client_keys.ledger
    assert (ledger.taken, ledger.consumed) == (1, 1)


async def test_accept_unechoed_key_id_is_a_risky_setting_and_reaches_the_tunnel(
    tmp_path: Path, pki_dir: Path
) -> None:
    """check-config and start-up warn about it (strict mode refuses it: test_risk.py)."""
    path = tmp_path / "client.toml"
    path.write_text(config_text(pki_dir, "accept_unechoed_key_id = true"))
    config = load_config(path)
    [risk] = assess(config).warnings
    assert (risk.where, risk.code) == ("tunnel.to-reference", "accept_unechoed_key_id")
    daemon = Daemon(config)
    daemon.kmes["k"] = KmeConnection.open(config.kmes["k"])
    try:
        tunnel = daemon._tunnel(config.tunnels[0])
    finally:
        await daemon.kmes["k"].aclose()
    assert tunnel.keys.options.accept_unechoed_key_id
    # The option is fixed when the tunnel starts: a reload cannot change it.
    daemon.tunnels.append(tunnel)
    path.write_text(config_text(pki_dir, ""))
    assert daemon._restart_only_changes(load_config(path)) == [
        "tunnel to-reference: accept_unechoed_key_id needs a restart"
    ]


@pytest.mark.parametrize(
    ("change", "old", "new"),
    [
        ("role", 'role = "client"', 'role = "server"\nallow_any_peer = true'),
        ("flow", 'kme = "k"', 'kme = "k"\nflow = "server-initiated"'),
        ("kme", 'kme = "k"', ""),
    ],
)
def test_accept_unechoed_key_id_only_where_it_means_something(
    tmp_path: Path, pki_dir: Path, change: str, old: str, new: str
) -> None:
    path = tmp_path / "client.toml"
    path.write_text(config_text(pki_dir, "accept_unechoed_key_id = true").replace(old, new))
    with pytest.raises(ConfigError, match="accept_unechoed_key_id: applies to client tunnels"):
        load_config(path)
