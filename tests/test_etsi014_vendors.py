"""The ETSI 014 client and slave against KMEs that deviate from the spec in ways seen in the wild.

A fake KME (from test_etsi014) answers what each test scripts: one key id per request, vendor
wordings of "not found", HTML error pages, SAE ids that need percent-encoding.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from aiohttp import web

from qkdproxy.certs import DevPki
from qkdproxy.qkd.etsi014_sources import Etsi014Slave
from tests.test_etsi014 import (
    DEADLINE,
    container,
    etsi_client,
    fake_kme,
    key_entry,
    status_document,
)


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.create()


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
