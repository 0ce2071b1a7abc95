"""The ETSI 014 client and slave against KMEs that deviate from the spec in ways seen in the wild.

A fake KME (from test_etsi014) answers what each test scripts: one key id per request, vendor
wordings of "not found", HTML error pages, SAE ids that need percent-encoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.keyexchange import KeyApi
from qkdproxy.daemon.config import ConfigError, KmeConfig, load_config
from qkdproxy.daemon.kme_binding import KmeConnection
from qkdproxy.keys.etsi014_client import Etsi014Client, KmeProtocolError, KmeRefusedError
from qkdproxy.keys.etsi014_supply import Etsi014Slave
from qkdproxy.keys.sslctx import client_context
from qkdproxy.tools.certs import DevPki
from tests.integration.test_etsi014 import (
    DEADLINE,
    container,
    etsi_client,
    fake_kme,
    key_entry,
    reply,
    running_pair,
    status_document,
)
from tests.kme_helpers import kme_config_file


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.create()


@asynccontextmanager
async def credential_client(
    pki: DevPki, url: str, credentials: Credentials
) -> AsyncIterator[Etsi014Client]:
    client = Etsi014Client(url, client_context(credentials, [pki.ca.certificate]))
    try:
        yield client
    finally:
        await client.aclose()


def requested_ids(body: bytes) -> list[str]:
    return [entry["key_ID"] for entry in json.loads(body)["key_IDs"]]


def vendor_kme(
    max_per_request: int | None, known: set[str], multi_refusal: str = "only one key_ID"
) -> Any:
    """Status with ``max_per_request`` (None: status is refused with 401); dec_keys answers
    400 ``multi_refusal`` to several ids, 400 to unknown ids, else the keys."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/status"):
            if max_per_request is None:
                return web.Response(status=401, text="<html>401</html>", content_type="text/html")
            return web.json_response(status_document(max_key_per_request=max_per_request))
        ids = requested_ids(await request.read())
        if len(ids) > 1:
            return web.json_response({"message": multi_refusal}, status=400)
        if ids[0] not in known:
            message = "Some of the requested keys do not exist in this KME."
            return web.json_response({"message": message}, status=400)
        return web.json_response(container(key_entry(bytes(32), ids[0])))

    return handler


async def fetch_all(slave: Etsi014Slave, ids: list[str]) -> list[Any]:
    return list(
        await asyncio.wait_for(
            asyncio.gather(
                *(slave.get_key(uuid.UUID(i).bytes) for i in ids), return_exceptions=True
            ),
            DEADLINE,
        )
    )


async def test_slave_caps_batches_at_max_key_per_request(pki: DevPki) -> None:
    ids = [str(uuid.uuid4()) for _ in range(5)]
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-b") as client:
        fake.handler = vendor_kme(1, set(ids))
        slave = Etsi014Slave(client, "sae-a")
        keys = await fetch_all(slave, ids)
        assert [k.key_id_text for k in keys] == ids
        # a second round does not ask status again
        more = [str(uuid.uuid4())]
        fake.handler = vendor_kme(1, set(more))
        await fetch_all(slave, more)
    paths = [path for _, path, _ in fake.requests]
    assert paths.count("/api/v1/keys/sae-a/status") == 1
    dec = [requested_ids(body) for _, path, body in fake.requests if path.endswith("dec_keys")]
    assert all(len(batch) == 1 for batch in dec)
    assert sorted(i for [i] in dec) == sorted([*ids, *more])


async def test_slave_retries_one_by_one_after_a_400_and_isolates_unknown_ids(
    pki: DevPki,
) -> None:
    """The KME advertises 64 but refuses several ids (400, its own wording): each id is
    asked for alone; the unknown one fails as not found, the others succeed."""
    ids = [str(uuid.uuid4()) for _ in range(4)]
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-b") as client:
        fake.handler = vendor_kme(64, set(ids[1:]), multi_refusal="too many key ids")
        slave = Etsi014Slave(client, "sae-a")
        results = await fetch_all(slave, ids)
        assert client.breaker.failures == 0
    assert isinstance(results[0], Exception)
    assert "do not exist" in str(results[0])
    assert [k.key_id_text for k in results[1:]] == ids[1:]
    dec = [requested_ids(body) for _, path, body in fake.requests if path.endswith("dec_keys")]
    assert len(dec[0]) == 4
    assert sorted(i for [i] in dec[1:]) == sorted(ids)


async def test_status_refused_to_the_slave_means_one_id_per_request(pki: DevPki) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-b") as client:
        fake.handler = vendor_kme(None, set(ids))
        slave = Etsi014Slave(client, "sae-a")
        assert [k.key_id_text for k in await fetch_all(slave, ids)] == ids
        assert await client.max_keys_per_request("sae-a") == 1
        assert client.breaker.failures == 0
    paths = [path for _, path, _ in fake.requests]
    assert paths.count("/api/v1/keys/sae-a/status") == 1
    assert len(paths) == 1 + len(ids)


ODD_SAE_IDS = ["SAE#002", "sae b/2", "sáe?x=1&y", "100%", ".", "..", "../admin"]


@pytest.mark.parametrize("sae", ODD_SAE_IDS)
async def test_sae_ids_are_percent_encoded_in_paths(pki: DevPki, sae: str) -> None:
    raw_paths: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        raw_paths.append(request.raw_path)
        return web.json_response(status_document())

    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = handler
        await client.status(sae)
    [raw] = raw_paths
    segment = raw.removeprefix("/api/v1/keys/").removesuffix("/status")
    assert "/" not in segment and "#" not in segment and "?" not in segment
    assert segment not in (".", "..")
    assert urllib.parse.unquote(segment) == sae


async def test_simulator_round_trip_with_sae_ids_that_need_encoding(pki: DevPki) -> None:
    """Certificates whose CN is the SAE id ('SAE#001', 'SAE/002 b'): keys flow both ways."""
    master_id, slave_id = "SAE#001", "SAE/002 b"
    master = pki.ca.issue(master_id, [], server=False)
    slave = pki.ca.issue(slave_id, [], server=False)
    async with (
        running_pair(pki) as pair,
        credential_client(pki, pair.urls_014[0], master) as client_a,
        credential_client(pki, pair.urls_014[1], slave) as client_b,
    ):
        status = await client_a.status(slave_id)
        assert (status.master_sae_id, status.slave_sae_id) == (master_id, slave_id)
        keys = await client_a.enc_keys(slave_id, 2)
        assert await client_b.dec_keys(master_id, [k.key_id for k in keys]) == keys


def test_configuration_accepts_any_non_empty_sae_id(tmp_path: Path) -> None:
    config = kme_config_file(tmp_path, sae_id="SAE#001", peer_sae_id="sae b/2 ü")
    kme = load_config(config).kmes["k"]
    assert (kme.sae_id, kme.peer_sae_id) == ("SAE#001", "sae b/2 ü")
    config.write_text(config.read_text().replace('"SAE#001"', '"' + "x" * 257 + '"'))
    with pytest.raises(ConfigError, match="sae_id: longer than 256"):
        load_config(config)


async def test_key_size_and_format_mismatches_name_the_kme_and_the_field(pki: DevPki) -> None:
    good = key_entry(bytes(32))
    cases = [
        (
            container(key_entry(bytes(16))),
            "enc_keys: key size mismatch: keys[0].key is 128 bits, 256 were asked for (qkdproxy needs 256-bit keys)",
        ),
        (
            container(good, {"key_ID": "nope", "key": good["key"]}),
            "enc_keys: key container rejected: keys[1].key_ID must be a UUID string",
        ),
        (
            container(good, {"key_ID": str(uuid.uuid4()), "key": "%%"}),
            "enc_keys: key container rejected: keys[1].key is not valid base64",
        ),
    ]
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        for body, expected in cases:
            fake.handler = reply(body=body)
            with pytest.raises(KmeProtocolError) as caught:
                await client.enc_keys("sae-b", 2 if "keys[1]" in expected else 1)
            assert str(caught.value) == f"KME {fake.url} {expected}"
        fake.handler = reply(body=status_document(max_key_per_request="many"))
        with pytest.raises(
            KmeProtocolError, match=r"status: max_key_per_request must be an integer"
        ):
            await client.status("sae-b")


async def test_a_kme_without_256_bit_keys_is_reported_as_such(pki: DevPki) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/status"):
            doc = status_document(key_size=128, min_key_size=64, max_key_size=128)
            return web.json_response(doc)
        return web.json_response({"message": "size out of range"}, status=400)

    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = handler
        await client.status("sae-b")
        assert client.key_size_problem == (
            "key size mismatch: 256-bit keys needed, the KME's status allows "
            "min_key_size=64 to max_key_size=128 (key_size=128)"
        )
        with pytest.raises(KmeRefusedError) as caught:
            await client.enc_keys("sae-b")
    assert str(caught.value) == (
        f"KME answered 400: size out of range; KME {fake.url} key size mismatch: 256-bit keys "
        "needed, the KME's status allows min_key_size=64 to max_key_size=128 (key_size=128)"
    )


class EventHandler(logging.Handler):
    """Sets an event on any log record (to wait for a log line without polling)."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__()
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        self.event.set()


async def test_the_status_poll_logs_a_key_size_mismatch(
    pki: DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name, data in pki.files().items():
        (tmp_path / name).write_bytes(data)
    small = status_document(key_size=128, min_key_size=64, max_key_size=128)
    async with fake_kme(pki) as fake:
        fake.handler = reply(body=small)
        config = KmeConfig(
            name="vendor", api=KeyApi.ETSI_014, endpoint=fake.url, sae_id="sae-a",
            peer_sae_id="sae-b", cert=tmp_path / "sae-a.pem", key=tmp_path / "sae-a-key.pem",
            ca=tmp_path / "ca.pem", prefetch=False,
        )  # fmt: skip
        connection = KmeConnection.open(config)
        logged = asyncio.Event()
        signal = EventHandler(logged)
        logger = logging.getLogger("qkdproxy.kme")
        logger.addHandler(signal)
        with caplog.at_level(logging.ERROR, logger="qkdproxy.kme"):
            connection.start()
            try:
                await asyncio.wait_for(logged.wait(), DEADLINE)
            finally:
                logger.removeHandler(signal)
                await connection.aclose()
    [record] = caplog.records
    assert record.getMessage() == (
        "kme vendor: key size mismatch: 256-bit keys needed, the KME's status allows "
        "min_key_size=64 to max_key_size=128 (key_size=128)"
    )


async def test_a_kme_that_lowers_its_request_limit_is_asked_for_it_again(pki: DevPki) -> None:
    limit = {"keys": 64}

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/status"):
            return web.json_response(status_document(max_key_per_request=limit["keys"]))
        number = json.loads(await request.read())["number"]
        if number > limit["keys"]:
            return web.json_response({"message": "number too large"}, status=400)
        return web.json_response(container(*(key_entry() for _ in range(number))))

    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = handler
        assert await client.max_keys_per_request("sae-b") == 64
        assert len(await client.enc_keys("sae-b", 20)) == 20
        assert await client.max_keys_per_request("sae-b") == 64  # remembered
        limit["keys"] = 4  # lowered while we run
        with pytest.raises(KmeRefusedError):
            await client.enc_keys("sae-b", 20)
        assert await client.max_keys_per_request("sae-b") == 4
        assert len(await client.enc_keys("sae-b", 4)) == 4
        assert client.breaker.failures == 0
    paths = [path for _, path, _ in fake.requests]
    assert paths.count("/api/v1/keys/sae-b/status") == 2
