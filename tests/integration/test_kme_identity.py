"""The KME's identity (ETSI 014 section 5.1): ``kme_identity`` for CN-only KME certificates,
still chained to the configured CA, and the TLS verification message in every error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from qkdproxy.core.keys import KeySourceUnavailableError
from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.daemon.config import ConfigError, load_config
from qkdproxy.keys.etsi004_client import Etsi004Client
from qkdproxy.keys.etsi014_client import Etsi014Client
from qkdproxy.keys.kme_identity import ExpectedKme
from qkdproxy.keys.sslctx import client_context
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.certs import DevPki
from qkdproxy.tools.probe import probe
from tests.kme_helpers import kme_config_file

DEADLINE = 10.0


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.create()


@asynccontextmanager
async def cn_only_pair(
    pki: DevPki, issuer: CertificateAuthority | None = None
) -> AsyncIterator[KmePair]:
    """KMEs whose certificates carry their KME ID in the CN and no SAN at all."""
    ca = issuer or pki.ca
    creds = [ca.issue("KME_A", [], client=False), ca.issue("KME_B", [], client=False)]
    pair = KmePair(SimulatorSettings(), creds, [pki.ca.certificate])
    await asyncio.wait_for(pair.start(), DEADLINE)
    try:
        yield pair
    finally:
        await asyncio.wait_for(pair.stop(), DEADLINE)


def client014(pki: DevPki, url: str, rules: list[str] | None) -> Etsi014Client:
    expected = ExpectedKme.parse(rules) if rules else None
    return Etsi014Client(
        url, client_context(pki.saes["sae-a"], [pki.ca.certificate]), expected_kme=expected
    )


async def status_error(client: Etsi014Client) -> str:
    try:
        with pytest.raises(KeySourceUnavailableError) as caught:
            await client.status("sae-b")
    finally:
        await client.aclose()
    return str(caught.value)


async def test_cn_only_kme_is_refused_by_default_with_the_verification_message(
    pki: DevPki,
) -> None:
    async with cn_only_pair(pki) as pair:
        message = await status_error(client014(pki, pair.urls_014[0], None))
    assert message.startswith("KME unreachable: TLS certificate verification failed: ")
    assert "IP address mismatch" in message


@pytest.mark.parametrize("rules", [["cn:KME_A"], ["dns:kme-a.example", "cn:KME_A"]])
async def test_kme_identity_by_cn_is_accepted(pki: DevPki, rules: list[str]) -> None:
    async with cn_only_pair(pki) as pair:
        client = client014(pki, pair.urls_014[0], rules)
        try:
            status = await client.status("sae-b")
            [key] = await client.enc_keys("sae-b")
        finally:
            await client.aclose()
    assert status.source_kme_id == "kme-a"
    assert len(key.material) == 32


async def test_kme_identity_mismatch_names_both_sides(pki: DevPki) -> None:
    async with cn_only_pair(pki) as pair:
        message = await status_error(client014(pki, pair.urls_014[0], ["cn:KME_B"]))
        assert pair.link.pending_keys == 0
    assert "KME identity mismatch: expected cn:KME_B" in message
    assert "CN='KME_A'" in message


async def test_kme_identity_still_requires_the_configured_ca(pki: DevPki) -> None:
    async with cn_only_pair(pki, CertificateAuthority.create("stranger")) as pair:
        message = await status_error(client014(pki, pair.urls_014[0], ["cn:KME_A"]))
    assert "TLS certificate verification failed" in message
    assert "unable to get local issuer certificate" in message


async def test_kme_identity_over_etsi_004(pki: DevPki) -> None:
    async with cn_only_pair(pki) as pair:
        port = pair.ports_004[0]
        context = client_context(pki.saes["sae-a"], [pki.ca.certificate])

        def make(rules: list[str] | None) -> Etsi004Client:
            expected = ExpectedKme.parse(rules) if rules else None
            return Etsi004Client(
                "127.0.0.1", port, context, "sae-a", "sae-b", expected_kme=expected
            )

        for rules, needle in ((None, "IP address mismatch"), (["cn:KME_B"], "expected cn:KME_B")):
            client = make(rules)
            with pytest.raises(KeySourceUnavailableError, match=needle):
                await client.open(None)
            await client.aclose()
        client = make(["cn:KME_A"])
        assert len(await client.open(None)) == 16
        await client.aclose()


def write_config(tmp_path: Path, identity: str) -> Path:
    return kme_config_file(tmp_path, identity)


def test_configuration_of_kme_identity(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, "")).kmes["k"].kme_identity == ()
    one = load_config(write_config(tmp_path, 'kme_identity = "cn:KME_B"'))
    assert one.kmes["k"].kme_identity == ("cn:KME_B",)
    two = load_config(write_config(tmp_path, 'kme_identity = ["cn:KME_B", "dns:kme.example"]'))
    assert two.kmes["k"].kme_identity == ("cn:KME_B", "dns:kme.example")
    for bad in ('kme_identity = "KME_B"', "kme_identity = 5", 'kme_identity = ["ip:1"]'):
        with pytest.raises(ConfigError, match=r"kme\.k\.kme_identity"):
            load_config(write_config(tmp_path, bad))


def test_credentials_without_names_have_no_san(pki: DevPki) -> None:
    creds: Credentials = pki.ca.issue("KME_X", [], client=False)
    assert not [e for e in creds.chain[0].extensions if e.oid.dotted_string == "2.5.29.17"]


async def test_probe_output_carries_the_tls_verification_message(
    pki: DevPki, tmp_path: Path
) -> None:
    for name, data in pki.files().items():
        (tmp_path / name).write_bytes(data)

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.close()

    peer = await asyncio.start_server(hold, "127.0.0.1", 0)
    async with peer, cn_only_pair(pki) as pair:
        path = tmp_path / "client.toml"
        path.write_text(f"""
[kme.k]
url = "{pair.urls_014[0]}"
sae_id = "sae-a"
peer_sae_id = "sae-b"
cert = "sae-a.pem"
key = "sae-a-key.pem"
ca = "ca.pem"

[[tunnel]]
role = "client"
listen = "127.0.0.1:0"
connect = "127.0.0.1:{peer.sockets[0].getsockname()[1]}"
cert = "tunnel-client.pem"
key = "tunnel-client-key.pem"
ca = "ca.pem"
server_name = "server.qkdproxy.test"
kme = "k"
""")
        config = load_config(path)
        result = await asyncio.wait_for(probe(config, config.tunnels[0]), DEADLINE)
    assert result["ok"] is False
    assert str(result["error"]).startswith(
        "handshake failed (we refused): ETSI 014 enc_keys: KME unreachable: TLS certificate "
        "verification failed: IP address mismatch"
    ), result
