"""qkdproxy against each quirk profile of the KME simulator (qkdproxy.sim.quirks).

For every profile, the daemon's own KME connections (KmeConnection: ETSI 014 client, prefetching
master, coalescing slave, kme_identity) feed a client and a server endpoint over loopback;
16 parallel connections per flow move random bytes that come back intact.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from qkdproxy.core.tls.keyexchange import Flow, KeyApi, QkdOptions
from qkdproxy.daemon.config import KmeConfig
from qkdproxy.daemon.kme_binding import KmeConnection
from qkdproxy.keys.sources import KeySources
from qkdproxy.sim.quirks import ETSI_014_QUIRKS, Quirk, parse_quirks
from qkdproxy.tools.certs import DevPki
from qkdproxy.tools.loopback import loopback_pair
from tests.conftest import groups
from tests.kme_helpers import quirky_pair

QKD = groups("qkd_mlkem768")
PARALLEL = 16
DEADLINE = 30.0


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.create()


@pytest.fixture(scope="module")
def pki_dir(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    for name, data in pki.files().items():
        (directory / name).write_bytes(data)
    return directory


def kme_config(
    pki_dir: Path, url: str, sae: str, peer: str, kme_id: str, cn_only: bool
) -> KmeConfig:
    return KmeConfig(
        name=kme_id, api=KeyApi.ETSI_014, endpoint=url, sae_id=sae, peer_sae_id=peer,
        cert=pki_dir / f"{sae}.pem", key=pki_dir / f"{sae}-key.pem", ca=pki_dir / "ca.pem",
        kme_identity=(f"cn:{kme_id}",) if cn_only else (),
    )  # fmt: skip


async def one_connection(pair_handshake: object, size: int) -> str | None:
    stream = await pair_handshake  # type: ignore[misc]
    try:
        payload = os.urandom(size)
        await stream.write(payload)
        received = bytearray()
        while len(received) < size:
            chunk = await stream.read()
            assert chunk, "EOF before the echo was complete"
            received += chunk
        assert bytes(received) == payload
        return stream.record.qkd_key_id  # type: ignore[no-any-return]
    finally:
        await stream.close()


@pytest.mark.parametrize("quirk", sorted(q.value for q in ETSI_014_QUIRKS))
async def test_tunnel_pair_moves_data_in_both_flows_against_each_quirk(
    pki: DevPki, pki_dir: Path, quirk: str
) -> None:
    quirks = parse_quirks([quirk])
    cn_only = Quirk.CN_ONLY in quirks
    async with quirky_pair(pki, quirks) as kmes, AsyncExitStack() as stack:
        connections = []
        for url, sae, peer, kme_id in (
            (kmes.urls_014[0], "sae-a", "sae-b", "kme-a"),
            (kmes.urls_014[1], "sae-b", "sae-a", "kme-b"),
        ):
            connection = KmeConnection.open(kme_config(pki_dir, url, sae, peer, kme_id, cn_only))
            stack.push_async_callback(connection.aclose)
            connection.start()
            connections.append(connection)
        # Each end originates keys in one of the two flows: both get a master supply.
        client_sources, server_sources = (
            KeySources(c.master_for("peer"), c.sources.slave, c.sources.stream) for c in connections
        )
        async with loopback_pair(QKD, sources=(client_sources, server_sources)) as pair:
            key_ids: list[str | None] = []
            for flow in (Flow.CLIENT_INITIATED, Flow.SERVER_INITIATED):
                client = pair.client(QKD, QkdOptions(flow=flow, api=KeyApi.ETSI_014))
                key_ids += await asyncio.wait_for(
                    asyncio.gather(
                        *(one_connection(pair.handshake(client), 3000 + i) for i in range(PARALLEL))
                    ),
                    DEADLINE,
                )
            async with asyncio.timeout(DEADLINE):
                await pair.wait_for_server(lambda: pair.echo.accepted >= 2 * PARALLEL)
            assert pair.server_failures == []
        assert all(connection.up for connection in connections)
    assert None not in key_ids
    assert len(set(key_ids)) == 2 * PARALLEL  # no key used twice
    for ledger in (pair.client_keys.ledger, pair.server_keys.ledger):
        assert ledger.consumed == 2 * PARALLEL
        assert ledger.outstanding == 0
