"""Helpers shared by the KME interop tests: a one-KME daemon configuration, and a simulator
pair with quirk profiles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from qkdproxy.sim.quirks import Quirk, cn_only_kme_credentials
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.certs import DevPki

DEADLINE = 30.0
SERVER_TUNNEL = """
[[tunnel]]
role = "server"
listen = "127.0.0.1:1"
connect = "127.0.0.1:2"
cert = "c.pem"
key = "k.pem"
ca = "ca.pem"
allow_any_peer = true
kme = "k"
"""


def kme_config_file(
    tmp_path: Path,
    extra: str = "",
    *,
    api: str = "014",
    sae_id: str = "a",
    peer_sae_id: str = "b",
) -> Path:
    """A configuration with ``[kme.k]`` (plus the ``extra`` lines) and one server tunnel."""
    endpoint = 'address = "127.0.0.1:1"' if api == "004" else 'url = "https://127.0.0.1:1"'
    path = tmp_path / "q.toml"
    path.write_text(
        f'[kme.k]\napi = "{api}"\n{endpoint}\nsae_id = "{sae_id}"\n'
        f'peer_sae_id = "{peer_sae_id}"\ncert = "c.pem"\nkey = "k.pem"\nca = "ca.pem"\n'
        f"{extra}\n{SERVER_TUNNEL}"
    )
    return path


@asynccontextmanager
async def quirky_pair(pki: DevPki, quirks: frozenset[Quirk]) -> AsyncIterator[KmePair]:
    """The simulator pair with ``quirks`` (CN-only certificates for ``cn-only``)."""
    kme_ids = ["kme-a", "kme-b"]
    credentials = (
        cn_only_kme_credentials(pki.ca, kme_ids)
        if Quirk.CN_ONLY in quirks
        else [pki.kmes[k] for k in kme_ids]
    )
    pair = KmePair(SimulatorSettings(quirks=quirks), credentials, [pki.ca.certificate])
    await asyncio.wait_for(pair.start(), DEADLINE)
    try:
        yield pair
    finally:
        await asyncio.wait_for(pair.stop(), DEADLINE)
