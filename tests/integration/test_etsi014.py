"""ETSI GS QKD 014: data models, the simulator's server, the client, key sources, handshakes.

Everything below the models runs over real mutual-TLS sockets on loopback: against the KME
simulator pair, and against a fake KME this file controls to misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdproxy.core.breaker import BreakerState, CircuitBreaker
from qkdproxy.core.etsi014.models import (
    ErrorBody,
    Etsi014FormatError,
    KeyContainer,
    KeyIds,
    KeyRequest,
    Status,
)
from qkdproxy.core.keys import (
    KeyNotFoundError,
    KeySourceUnavailableError,
    QkdKey,
)
from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.keyexchange import Flow, KeyApi, QkdOptions
from qkdproxy.keys.announce import AnnouncedSlave
from qkdproxy.keys.etsi014_client import (
    Etsi014Client,
    KmeProtocolError,
    KmeRefusedError,
    KmeUnauthorisedError,
)
from qkdproxy.keys.etsi014_supply import MAX_COALESCED_IDS, Etsi014Master, Etsi014Slave
from qkdproxy.keys.sslctx import client_context, server_context
from qkdproxy.keys.supply import SupplySettings
from qkdproxy.sim.faults import Burst, FaultScript, Window
from qkdproxy.sim.link import LinkSettings
from qkdproxy.sim.node import IdentitySource
from qkdproxy.sim.simulator import KmePair, SimulatorSettings
from qkdproxy.tools.bench.kme_setup import simulated_kme_sources
from qkdproxy.tools.certs import DevPki
from qkdproxy.tools.loopback import loopback_pair
from tests.conftest import groups

DEADLINE = 10.0
KEYS_NOT_FOUND = "one or more keys specified are not found on KME"


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.create()


@pytest.fixture(scope="module")
def sae_c(pki: DevPki) -> Credentials:
    """An SAE that is neither master nor slave of any key."""
    return pki.ca.issue("sae-c", ["spiffe://qkdproxy.test/sae/sae-c"], server=False)


@asynccontextmanager
async def running_pair(
    pki: DevPki, simulator: SimulatorSettings | None = None
) -> AsyncIterator[KmePair]:
    pair = KmePair(
        simulator or SimulatorSettings(link=LinkSettings(pool_bits=256 * 1000)),
        [pki.kmes["kme-a"], pki.kmes["kme-b"]],
        [pki.ca.certificate],
    )
    await asyncio.wait_for(pair.start(), DEADLINE)
    try:
        yield pair
    finally:
        await asyncio.wait_for(pair.stop(), DEADLINE)


@pytest.fixture
async def pair(pki: DevPki) -> AsyncIterator[KmePair]:
    async with running_pair(pki) as running:
        yield running


@asynccontextmanager
async def sae_session(
    pki: DevPki, credentials: Credentials
) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=client_context(credentials, [pki.ca.certificate]))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=DEADLINE)
    ) as session:
        yield session


@asynccontextmanager
async def etsi_client(
    pki: DevPki, url: str, sae: str, **kwargs: Any
) -> AsyncIterator[Etsi014Client]:
    client = Etsi014Client(url, client_context(pki.saes[sae], [pki.ca.certificate]), **kwargs)
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class Answer:
    status: int
    content_type: str
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


async def http(
    session: aiohttp.ClientSession, method: str, url: str | yarl.URL, **kwargs: Any
) -> Answer:
    async with session.request(method, url, **kwargs) as response:
        return Answer(response.status, response.content_type, await response.text())


def keys_path(base: str, sae: str, call: str) -> str:
    return f"{base}/api/v1/keys/{sae}/{call}"


# =========================================================================== models

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.sampled_from(
        [
            str(uuid.UUID(int=1)),
            base64.b64encode(bytes(32)).decode(),
            "AAAA",
            "sae-b",
        ]
    )
)
FIELD_NAMES = [
    "keys", "key_ID", "key", "key_IDs", "master_SAE_ID", "number", "size", "message",
    "extension_mandatory", "extension_optional", "additional_slave_SAE_IDs", "key_size",
    "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
    "min_key_size", "max_SAE_ID_count", "source_KME_ID", "target_KME_ID", "slave_SAE_ID",
    "details", "key_ID_extension", "key_IDs_extension",
]  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), children, max_size=8)
    ),
    max_leaves=25,
)
PARSERS: list[Callable[[Any], object]] = [
    Status.from_json,
    KeyRequest.from_json,
    lambda data: KeyContainer.from_json(data, 256),
    KeyIds.from_json,
    ErrorBody.from_json,
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_parsers_raise_only_format_errors(data: Any) -> None:
    for parse in PARSERS:
        with suppress(Etsi014FormatError):
            parse(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def key_entry(key: bytes = bytes(32), key_id: str | None = None) -> dict[str, str]:
    return {"key_ID": key_id or str(uuid.uuid4()), "key": b64(key)}


def test_key_container_accepts_the_spec_document() -> None:
    entries = [key_entry(os.urandom(32)) for _ in range(3)]
    entries[0]["key_ID"] = entries[0]["key_ID"].upper()
    container = KeyContainer.from_json({"keys": entries, "key_container_extension": {}}, 256)
    assert [k.key_id for k in container.keys] == [e["key_ID"].lower() for e in entries]
    assert [b64(k.key) for k in container.keys] == [e["key"] for e in entries]
    assert container.to_json() == {
        "keys": [{"key_ID": e["key_ID"].lower(), "key": e["key"]} for e in entries]
    }
    assert "key=" not in repr(container.keys[0])


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"keys": [{"key_ID": str(uuid.uuid4()), "key": "not base64!"}]}, "base64"),
        ({"keys": [{"key_ID": str(uuid.uuid4()), "key": b64(bytes(32)).rstrip("=")}]}, "base64"),
        ({"keys": [{"key_ID": str(uuid.uuid4()), "key": b64(bytes(32)) + "\n"}]}, "base64"),
        ({"keys": [{"key_ID": str(uuid.uuid4()), "key": 12}]}, "base64"),
        ({"keys": [key_entry(bytes(31))]}, "248 bits"),
        ({"keys": [key_entry(bytes(33))]}, "264 bits"),
        ({"keys": [key_entry(key_id="not-a-uuid")]}, "UUID"),
        ({"keys": [key_entry(key_id="0" * 36)]}, "UUID"),
        ({"keys": [key_entry(key_id=uuid.uuid4().hex)]}, "UUID"),
        ({"keys": [key_entry(key_id=f"urn:uuid:{uuid.uuid4()}")]}, "UUID"),
        ({"keys": [{"key": b64(bytes(32))}]}, "UUID"),
        ({"keys": [key_entry(key_id=str(uuid.UUID(int=5)))] * 2}, "repeats"),
        ({"keys": [key_entry() for _ in range(3)]}, "1..2"),
        ({"keys": []}, "1..2"),
        ({}, "1..2"),
        ({"keys": {}}, "must be a list"),
        ({"keys": ["x"]}, "JSON object"),
        ([], "JSON object"),
    ],
)
def test_key_container_rejects(document: Any, problem: str) -> None:
    with pytest.raises(Etsi014FormatError, match=problem):
        KeyContainer.from_json(document, 256, max_keys=2)


@pytest.mark.parametrize(
    "key_id",
    [
        "0x345678-1234-5678-1234-567812345678",
        "12345678123456781234567812345678----",
        " 2345678-1234-5678-1234-567812345678",
    ],
)
def test_key_container_rejects_non_canonical_uuid_forms(key_id: str) -> None:
    with pytest.raises(Etsi014FormatError):
        KeyContainer.from_json({"keys": [key_entry(key_id=key_id)]}, 256)


def test_key_ids_accept_the_qukaydee_master_field_and_nothing_else() -> None:
    key_id = str(uuid.uuid4())
    parsed = KeyIds.from_json({"key_IDs": [{"key_ID": key_id, "master_SAE_ID": "sae-a"}]})
    assert parsed.key_ids == (key_id,)
    assert KeyIds.from_json({"key_IDs": [{"key_ID": key_id.upper()}]}).key_ids == (key_id,)
    assert parsed.to_json() == {"key_IDs": [{"key_ID": key_id}]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"key_IDs": [{"key_ID": key_id, "slave_SAE_ID": "sae-b"}]}, "slave_SAE_ID"),
        ({"key_IDs": [{"key_ID": key_id}], "extra": 1}, "extra"),
        ({"key_IDs": []}, "1..1024"),
        ({"key_IDs": [{"key_ID": "nope"}]}, "UUID"),
        ({"key_IDs": [key_id]}, "JSON object"),
    ]
    for bad, problem in cases:
        with pytest.raises(Etsi014FormatError, match=problem):
            KeyIds.from_json(bad)


def status_document(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "source_KME_ID": "kme-a", "target_KME_ID": "kme-b", "master_SAE_ID": "sae-a",
        "slave_SAE_ID": "sae-b", "key_size": 256, "stored_key_count": 10,
        "max_key_count": 100, "max_key_per_request": 128, "max_key_size": 1024,
        "min_key_size": 64, "max_SAE_ID_count": 0,
    }  # fmt: skip
    document.update(changes)
    return document


def test_status_parsing() -> None:
    status = Status.from_json(status_document(status_extension={"x": 1}))
    assert (status.master_sae_id, status.stored_key_count, status.key_size) == ("sae-a", 10, 256)
    assert Status.from_json(status.to_json()) == status
    for bad in (
        status_document(key_size=True),
        status_document(stored_key_count=1.0),
        status_document(max_key_count="100"),
        status_document(stored_key_count=-1),
        status_document(max_key_per_request=0),
        status_document(min_key_size=2048),
        status_document(master_SAE_ID=None),
        {k: v for k, v in status_document().items() if k != "key_size"},
    ):
        with pytest.raises(Etsi014FormatError):
            Status.from_json(bad)


def test_booleans_are_not_integers() -> None:
    with pytest.raises(Etsi014FormatError, match="number"):
        KeyRequest.from_json({"number": True})
    with pytest.raises(Etsi014FormatError, match="size"):
        KeyRequest.from_json({"size": False})
    with pytest.raises(Etsi014FormatError, match="key_size"):
        Status.from_json(status_document(key_size=True))


def test_key_request_parsing() -> None:
    assert KeyRequest.from_json({}) == KeyRequest()
    request = KeyRequest.from_json(
        {"number": 3, "size": 512, "additional_slave_SAE_IDs": ["sae-c"],
         "extension_mandatory": [{"a": 1}], "extension_optional": []}
    )  # fmt: skip
    assert (request.number, request.size, request.additional_slave_sae_ids) == (3, 512, ("sae-c",))
    assert request.extension_mandatory == ({"a": 1},)
    bad_requests: list[dict[str, Any]] = [
        {"number": "1"},
        {"size": None},
        {"additional_slave_SAE_IDs": ["sae-c", 3]},
        {"extension_mandatory": {}},
        {"colour": "blue"},
    ]
    for bad in bad_requests:
        with pytest.raises(Etsi014FormatError):
            KeyRequest.from_json(bad)


def test_error_body() -> None:
    assert ErrorBody.from_json({"message": "m", "details": [{"a": "b"}]}).message == "m"
    assert len(ErrorBody.from_json({"message": "x" * 2000}).message) == 512
    assert ErrorBody("m", ({"a": "b"},)).to_json() == {"message": "m", "details": [{"a": "b"}]}
    for bad in ({}, {"message": 5}, "message"):
        with pytest.raises(Etsi014FormatError):
            ErrorBody.from_json(bad)


# =========================================================================== server


async def test_status_figures_and_stored_count(pki: DevPki) -> None:
    link = LinkSettings(rate_bps=0.0, pool_bits=256 * 50, start_full=True)
    async with running_pair(pki, SimulatorSettings(link=link)) as pair:
        kme_a, kme_b = pair.urls_014
        async with sae_session(pki, pki.saes["sae-a"]) as session:
            answer = await http(session, "GET", keys_path(kme_a, "sae-b", "status"))
            assert answer.status == 200 and answer.content_type == "application/json"
            status = answer.json
            assert status == {
                "source_KME_ID": "kme-a", "target_KME_ID": "kme-b",
                "master_SAE_ID": "sae-a", "slave_SAE_ID": "sae-b", "key_size": 256,
                "stored_key_count": 50, "max_key_count": 50, "max_key_per_request": 128,
                "max_key_size": 8192, "min_key_size": 64, "max_SAE_ID_count": 0,
            }  # fmt: skip
            Status.from_json(status)
            answer = await http(
                session, "POST", keys_path(kme_a, "sae-b", "enc_keys"), json={"number": 7}
            )
            assert answer.status == 200 and len(answer.json["keys"]) == 7
            answer = await http(session, "GET", keys_path(kme_a, "sae-b", "status"))
            assert answer.json["stored_key_count"] == 43
            # the slave in the path is free: status towards someone else
            answer = await http(session, "GET", keys_path(kme_a, "sae-z", "status"))
            assert (answer.json["master_SAE_ID"], answer.json["slave_SAE_ID"]) == (
                "sae-a",
                "sae-z",
            )
        async with sae_session(pki, pki.saes["sae-b"]) as session:
            answer = await http(session, "GET", keys_path(kme_b, "sae-a", "status"))
            status = answer.json
            assert (status["source_KME_ID"], status["target_KME_ID"]) == ("kme-b", "kme-a")
            assert (status["master_SAE_ID"], status["slave_SAE_ID"]) == ("sae-b", "sae-a")
            assert status["stored_key_count"] == 43  # both KMEs see one link


async def test_reference_provider_calls(pki: DevPki, pair: KmePair) -> None:
    kme_a, kme_b = pair.urls_014
    async with sae_session(pki, pki.saes["sae-a"]) as master:
        answer = await http(master, "GET", keys_path(kme_a, "sae-b", "enc_keys?number=1&size=256"))
    assert answer.status == 200 and answer.content_type == "application/json"
    [entry] = answer.json["keys"]
    assert set(entry) == {"key_ID", "key"}
    assert str(uuid.UUID(entry["key_ID"])) == entry["key_ID"]
    assert len(entry["key"]) == 44 and entry["key"].endswith("=")
    assert len(base64.b64decode(entry["key"], validate=True)) == 32
    body = {"key_IDs": [{"key_ID": entry["key_ID"], "master_SAE_ID": "sae-a"}]}
    async with sae_session(pki, pki.saes["sae-b"]) as slave:
        answer = await http(slave, "POST", keys_path(kme_b, "sae-a", "dec_keys"), json=body)
        assert answer.status == 200
        assert answer.json == {"keys": [entry]}
        # single use
        again = await http(slave, "POST", keys_path(kme_b, "sae-a", "dec_keys"), json=body)
    assert again.status == 400 and again.json == {"message": KEYS_NOT_FOUND}


async def test_post_enc_keys_and_get_dec_keys(pki: DevPki, pair: KmePair) -> None:
    kme_a, kme_b = pair.urls_014
    async with sae_session(pki, pki.saes["sae-a"]) as master:
        answer = await http(
            master, "POST", keys_path(kme_a, "sae-b", "enc_keys"),
            json={"number": 3, "size": 512, "extension_optional": [{"x": 1}]},
        )  # fmt: skip
    assert answer.status == 200
    keys = answer.json["keys"]
    assert len(keys) == 3
    assert all(len(base64.b64decode(k["key"])) == 64 for k in keys)
    async with sae_session(pki, pki.saes["sae-b"]) as slave:
        for entry in reversed(keys):
            answer = await http(
                slave, "GET", keys_path(kme_b, "sae-a", "dec_keys"),
                params={"key_ID": entry["key_ID"]},
            )  # fmt: skip
            assert answer.status == 200 and answer.json == {"keys": [entry]}


async def test_dec_keys_by_an_sae_that_is_not_the_slave(
    pki: DevPki, sae_c: Credentials, pair: KmePair
) -> None:
    kme_a, kme_b = pair.urls_014
    async with sae_session(pki, pki.saes["sae-a"]) as master:
        [entry] = (await http(master, "GET", keys_path(kme_a, "sae-b", "enc_keys"))).json["keys"]
        # the master itself is no slave of its key either
        answer = await http(
            master, "GET", keys_path(kme_a, "sae-a", "dec_keys"), params={"key_ID": entry["key_ID"]}
        )
        assert answer.status == 401
    body = {"key_IDs": [{"key_ID": entry["key_ID"]}]}
    async with sae_session(pki, sae_c) as intruder:
        answer = await http(intruder, "POST", keys_path(kme_b, "sae-a", "dec_keys"), json=body)
    assert answer.status == 401 and answer.content_type == "application/json"
    assert "not a slave SAE" in answer.json["message"]
    async with sae_session(pki, pki.saes["sae-b"]) as slave:
        # wrong master in the path: as if the key did not exist
        answer = await http(slave, "POST", keys_path(kme_b, "sae-c", "dec_keys"), json=body)
        assert answer.status == 400 and answer.json["message"] == KEYS_NOT_FOUND
        answer = await http(slave, "POST", keys_path(kme_b, "sae-a", "dec_keys"), json=body)
    assert answer.status == 200 and answer.json == {"keys": [entry]}


@pytest.mark.parametrize(
    ("method", "query", "body", "message"),
    [
        ("GET", "enc_keys?size=260", None, "size shall be a multiple of 8"),
        ("POST", "enc_keys", {"size": 100}, "size shall be a multiple of 8"),
        (
            "POST",
            "enc_keys",
            {"extension_mandatory": [{"abc_route_type": "direct"}]},
            "not all extension_mandatory parameters are supported",
        ),
        ("GET", "enc_keys?number=0", None, "number must be between 1 and 128"),
        ("GET", "enc_keys?number=129", None, "number must be between 1 and 128"),
        ("POST", "enc_keys", {"number": 0}, "number must be between 1 and 128"),
        ("POST", "enc_keys", {"number": -3}, "number must be between 1 and 128"),
        ("GET", "enc_keys?number=-1", None, "number must be a positive integer"),
        ("GET", "enc_keys?number=1.0", None, "number must be a positive integer"),
        ("GET", "enc_keys?number=9999999999", None, "number must be a positive integer"),
        ("GET", "enc_keys?size=56", None, "size must be between 64 and 8192"),
        ("GET", "enc_keys?size=8200", None, "size must be between 64 and 8192"),
        ("GET", "enc_keys?size=0", None, "size must be between 64 and 8192"),
        ("GET", "enc_keys?number=1&colour=red", None, "only number and size"),
        ("POST", "enc_keys", {"number": 1, "colour": "red"}, "unknown field(s) colour"),
        ("POST", "enc_keys", {"number": True}, "number must be an integer"),
        ("POST", "enc_keys", [1], "must be a JSON object"),
        (
            "POST",
            "enc_keys",
            {"additional_slave_SAE_IDs": ["sae-c"]},
            "additional_slave_SAE_IDs are not supported",
        ),
        ("GET", f"dec_keys?key_ID={uuid.uuid4()}", None, KEYS_NOT_FOUND),
        ("POST", "dec_keys", {"key_IDs": [{"key_ID": str(uuid.uuid4())}]}, KEYS_NOT_FOUND),
        ("GET", "dec_keys?key_ID=abc", None, "key_ID must be a UUID string"),
        ("GET", "dec_keys", None, "exactly one key_ID"),
        (
            "GET",
            f"dec_keys?key_ID={uuid.uuid4()}&key_ID={uuid.uuid4()}",
            None,
            "exactly one key_ID",
        ),
        ("GET", f"dec_keys?key_ID={uuid.uuid4()}&number=1", None, "exactly one key_ID"),
        ("POST", "dec_keys", {"key_IDs": []}, "key_IDs must hold"),
        ("POST", "dec_keys", {"key_IDs": [{"key_ID": str(uuid.UUID(int=9))}] * 2}, KEYS_NOT_FOUND),
    ],
)
async def test_bad_requests_get_400_with_the_spec_message(
    pki: DevPki, pair: KmePair, method: str, query: str, body: Any, message: str
) -> None:
    kme_a = pair.urls_014[0]
    async with sae_session(pki, pki.saes["sae-a"]) as session:
        answer = await http(session, method, keys_path(kme_a, "sae-b", query), json=body)
    assert answer.status == 400, answer.text
    assert answer.content_type == "application/json"
    assert message in answer.json["message"]
    ErrorBody.from_json(answer.json)
    assert pair.link.pending_keys == 0


@pytest.mark.parametrize(
    ("call", "data", "content_type", "message"),
    [
        ("enc_keys", b"{not json", "application/json", "request body is not valid JSON"),
        ("dec_keys", b"\xff\xfe", "application/json", "request body is not valid JSON"),
        ("enc_keys", b'{"number": 1}', "text/plain", "request body must be application/json"),
        (
            "dec_keys",
            b"{}",
            "application/x-www-form-urlencoded",
            "request body must be application/json",
        ),
    ],
)
async def test_bad_bodies(
    pki: DevPki, pair: KmePair, call: str, data: bytes, content_type: str, message: str
) -> None:
    async with sae_session(pki, pki.saes["sae-a"]) as session:
        answer = await http(
            session, "POST", keys_path(pair.urls_014[0], "sae-b", call),
            data=data, headers={"Content-Type": content_type},
        )  # fmt: skip
    assert answer.status == 400
    assert answer.json["message"] == message


async def test_body_over_64_kib_is_refused(pki: DevPki, pair: KmePair) -> None:
    body = json.dumps({"number": 1, "extension_optional": [{"pad": "x" * 70_000}]})
    async with sae_session(pki, pki.saes["sae-a"]) as session:
        answer = await http(
            session, "POST", keys_path(pair.urls_014[0], "sae-b", "enc_keys"),
            data=body, headers={"Content-Type": "application/json"},
        )  # fmt: skip
    # ETSI 014 defines only 400/401/503: aiohttp's own 413 is turned into a 400 Error.
    assert answer.status == 400
    assert "larger than" in answer.json["message"]
    assert pair.link.pending_keys == 0


async def test_path_with_an_invalid_sae_id(pki: DevPki, pair: KmePair) -> None:
    """Any non-empty SAE id is valid (percent-encoded), up to 256 characters."""
    async with sae_session(pki, pki.saes["sae-a"]) as session:
        answer = await http(session, "GET", keys_path(pair.urls_014[0], "s" * 257, "status"))
    assert answer.status == 400
    assert "not a valid SAE ID" in answer.json["message"]


@pytest.mark.parametrize("query", ["number=%C2%B2", "size=%C2%B2"])
async def test_non_ascii_digits_in_the_query_are_a_bad_request(
    pki: DevPki, pair: KmePair, query: str
) -> None:
    async with sae_session(pki, pki.saes["sae-a"]) as session:
        answer = await http(
            session, "GET", keys_path(pair.urls_014[0], "sae-b", "enc_keys") + "?" + query
        )
    assert answer.status == 400
    assert answer.content_type == "application/json"


async def test_exhausted_pool_answers_503(pki: DevPki) -> None:
    link = LinkSettings(rate_bps=0.0, pool_bits=256 * 2, start_full=True)
    async with (
        running_pair(pki, SimulatorSettings(link=link)) as pair,
        sae_session(pki, pki.saes["sae-a"]) as session,
    ):
        url = keys_path(pair.urls_014[0], "sae-b", "enc_keys")
        answer = await http(session, "POST", url, json={"number": 3})
        assert answer.status == 503
        assert answer.json["message"] == "insufficient key material in the KME"
        assert pair.link.counters.exhausted == 1
        answer = await http(session, "POST", url, json={"number": 2})
        assert answer.status == 200 and len(answer.json["keys"]) == 2
        answer = await http(session, "GET", url)
        assert answer.status == 503
        status = await http(session, "GET", keys_path(pair.urls_014[0], "sae-b", "status"))
        assert status.json["stored_key_count"] == 0


async def test_identity_from_the_uri_san(pki: DevPki) -> None:
    simulator = SimulatorSettings(identity=IdentitySource.URI)
    async with (
        running_pair(pki, simulator) as pair,
        sae_session(pki, pki.saes["sae-a"]) as session,
    ):
        answer = await http(session, "GET", keys_path(pair.urls_014[0], "sae-b", "status"))
    assert answer.status == 200
    # The URI's last path segment: ids must stay usable in URL paths.
    assert answer.json["master_SAE_ID"] == "sae-a"


async def test_uri_identity_can_deliver_a_key_to_the_slave(pki: DevPki) -> None:
    simulator = SimulatorSettings(identity=IdentitySource.URI)
    async with running_pair(pki, simulator) as pair:
        kme_a, kme_b = pair.urls_014
        async with sae_session(pki, pki.saes["sae-a"]) as master:
            answer = await http(master, "GET", keys_path(kme_a, "sae-b", "enc_keys"))
        assert answer.status == 200
        key_id = answer.json["keys"][0]["key_ID"]
        statuses = []
        async with sae_session(pki, pki.saes["sae-b"]) as slave:
            for path in ("spiffe:%2F%2Fqkdproxy.test%2Fsae%2Fsae-a", "sae-a"):
                url = yarl.URL(f"{kme_b}/api/v1/keys/{path}/dec_keys?key_ID={key_id}", encoded=True)
                statuses.append((await http(slave, "GET", url)).status)
        assert 200 in statuses


async def test_client_without_a_certificate_cannot_connect(pki: DevPki, pair: KmePair) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anchor = pki.ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
    context.load_verify_locations(cadata=anchor)
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=DEADLINE)
    ) as session:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, OSError)):
            await http(session, "GET", keys_path(pair.urls_014[0], "sae-b", "status"))
    assert pair.nodes[0].faults.calls == 0  # no request reached the application


# =========================================================================== faults


async def test_error_burst_fails_exactly_its_calls(pki: DevPki) -> None:
    faults = FaultScript(error_bursts=(Burst(1, 2),))
    async with (
        running_pair(pki, SimulatorSettings(faults=faults)) as pair,
        sae_session(pki, pki.saes["sae-a"]) as session,
    ):
        url = keys_path(pair.urls_014[0], "sae-b", "enc_keys")
        answers = [await http(session, "GET", url) for _ in range(5)]
        assert [a.status for a in answers] == [200, 503, 503, 200, 200]
        assert answers[1].json == {"message": "KME failure (injected)"}
        # failed calls consumed nothing
        assert pair.link.pending_keys == 3
        # kme-b counts its own calls
        async with sae_session(pki, pki.saes["sae-b"]) as other:
            url_b = keys_path(pair.urls_014[1], "sae-a", "status")
            assert [(await http(other, "GET", url_b)).status for _ in range(3)] == [200, 503, 503]


async def test_reset_burst_then_the_client_recovers(pki: DevPki) -> None:
    faults = FaultScript(reset_bursts=(Burst(1, 1),))
    async with (
        running_pair(pki, SimulatorSettings(faults=faults)) as pair,
        etsi_client(pki, pair.urls_014[0], "sae-a") as client,
    ):
        [first] = await client.enc_keys("sae-b")
        with pytest.raises(KeySourceUnavailableError) as caught:
            await client.enc_keys("sae-b")
        assert type(caught.value) is KeySourceUnavailableError
        [second] = await client.enc_keys("sae-b")
        assert first.key_id != second.key_id
        assert client.breaker.state is BreakerState.CLOSED
        assert pair.nodes[0].faults.calls == 3


async def test_client_survives_a_kme_restart(pki: DevPki, pair: KmePair) -> None:
    async with (
        etsi_client(pki, pair.urls_014[0], "sae-a") as master,
        etsi_client(pki, pair.urls_014[1], "sae-b") as slave,
    ):
        [before] = await master.enc_keys("sae-b")
        port = pair.ports_014[0]
        await asyncio.wait_for(pair.restart(0), DEADLINE)
        assert pair.ports_014[0] == port
        [after] = await master.enc_keys("sae-b")
        # the link kept its keys across the restart
        keys = await slave.dec_keys("sae-a", [before.key_id, after.key_id])
        assert keys == [before, after]
        assert (await master.status("sae-b")).master_sae_id == "sae-a"


async def test_link_down_window_and_recovery(pki: DevPki) -> None:
    simulator = SimulatorSettings(
        link=LinkSettings(rate_bps=256.0, pool_bits=256 * 10, start_full=False),
        faults=FaultScript(link_down=(Window(0.0, 10.0),)),
    )
    async with running_pair(pki, simulator) as pair:
        offset = [5.0]
        base = pair.nodes[0].started
        for node in pair.nodes:
            node.clock = lambda: base + offset[0]
        async with etsi_client(pki, pair.urls_014[0], "sae-a") as client:
            # 503, whatever its message says: a server-side failure (counted against the
            # breaker, whose threshold two calls do not reach)
            with pytest.raises(KeySourceUnavailableError, match="503"):
                await client.enc_keys("sae-b")
            assert not pair.link.link_up
            offset[0] = 9.0  # still down: nothing generated
            with pytest.raises(KeySourceUnavailableError, match="503"):
                await client.enc_keys("sae-b")
            offset[0] = 12.0
            [key] = await client.enc_keys("sae-b")
            assert pair.link.link_up
            assert len(key.material) == 32
            assert client.breaker.state is BreakerState.CLOSED


async def test_scheduled_exhaustion_on_a_link_without_generation(pki: DevPki) -> None:
    simulator = SimulatorSettings(
        link=LinkSettings(rate_bps=0.0, pool_bits=256 * 10, start_full=True),
        faults=FaultScript(exhaust_at_s=(0.0,)),
    )
    async with (
        running_pair(pki, simulator) as pair,
        etsi_client(pki, pair.urls_014[0], "sae-a") as client,
    ):
        assert pair.link.stored_bits(pair.nodes[0].now()) == 256 * 10
        with pytest.raises(KeySourceUnavailableError, match="503: insufficient"):
            await client.enc_keys("sae-b")
        assert pair.link.stored_bits(pair.nodes[0].now()) == 0


async def test_scheduled_exhaustion_with_generation(pki: DevPki) -> None:
    simulator = SimulatorSettings(
        link=LinkSettings(rate_bps=256.0, pool_bits=256 * 4, start_full=True),
        faults=FaultScript(exhaust_at_s=(5.0,)),
    )
    async with running_pair(pki, simulator) as pair:
        base = pair.nodes[0].started
        for node in pair.nodes:
            node.clock = lambda: base + 10.0
        async with etsi_client(pki, pair.urls_014[0], "sae-a") as client:
            with pytest.raises(KeySourceUnavailableError, match="503"):
                await client.enc_keys("sae-b")


# =========================================================================== client vs fake KME

FakeHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeKme:
    """An ETSI 014 'KME' that answers what the test tells it to, counting requests."""

    port: int
    runner: web.AppRunner
    handler: FakeHandler | None = None
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, await request.read()))
        assert self.handler is not None
        return await self.handler(request)


@asynccontextmanager
async def fake_kme(pki: DevPki) -> AsyncIterator[FakeKme]:
    app = web.Application()
    runner = web.AppRunner(app, access_log=None)
    sock = socket.create_server(("127.0.0.1", 0))
    fake = FakeKme(sock.getsockname()[1], runner)
    app.router.add_route("*", "/{tail:.*}", fake.serve)
    await runner.setup()
    context = server_context(pki.kmes["kme-a"], [pki.ca.certificate])
    await web.SockSite(runner, sock, ssl_context=context).start()
    try:
        yield fake
    finally:
        fake.release.set()
        await asyncio.wait_for(runner.cleanup(), DEADLINE)


def reply(status: int = 200, body: Any = None, raw: bytes | None = None) -> FakeHandler:
    async def handler(request: web.Request) -> web.StreamResponse:
        payload = raw if raw is not None else json.dumps(body).encode()
        return web.Response(status=status, body=payload, content_type="application/json")

    return handler


def container(*entries: dict[str, str]) -> dict[str, Any]:
    return {"keys": list(entries)}


KEY_ID = uuid.UUID(int=0x1234)
OTHER_ID = uuid.UUID(int=0x5678)
GOOD = container(key_entry(bytes(range(32)), str(KEY_ID)))


async def test_client_requests_have_the_spec_shape(pki: DevPki) -> None:
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = reply(body=GOOD)
        [key] = await client.enc_keys("sae-b")
        assert key == QkdKey(KEY_ID.bytes, bytes(range(32)))
        [key] = await client.dec_keys("sae-b", [KEY_ID.bytes])
        assert key.material == bytes(range(32))
    assert [(m, p) for m, p, _ in fake.requests] == [
        ("POST", "/api/v1/keys/sae-b/enc_keys"),
        ("POST", "/api/v1/keys/sae-b/dec_keys"),
    ]
    assert json.loads(fake.requests[0][2]) == {"number": 1, "size": 256}
    assert json.loads(fake.requests[1][2]) == {"key_IDs": [{"key_ID": str(KEY_ID)}]}


@pytest.mark.parametrize(
    ("call", "handler", "error"),
    [
        ("enc", reply(raw=b"<html>hello</html>"), KmeProtocolError),
        ("enc", reply(raw=b""), KmeProtocolError),
        ("enc", reply(body={"keys": [{"key_ID": str(KEY_ID), "key": "***"}]}), KmeProtocolError),
        ("enc", reply(body=container(key_entry(bytes(31)))), KmeProtocolError),
        ("enc", reply(body=container(key_entry(), key_entry())), KmeProtocolError),
        ("enc2", reply(body=container(key_entry())), KmeProtocolError),
        ("enc", reply(body={"message": "ok"}), KmeProtocolError),
        ("dec", reply(body=container(key_entry(key_id=str(OTHER_ID)))), KmeProtocolError),
        ("enc", reply(raw=b'{"keys": [' + b" " * (2 * 1024 * 1024) + b"]}"), KmeProtocolError),
        ("dec", reply(404, {"message": "key not found"}), KeyNotFoundError),
        ("dec", reply(404, raw=b"null"), KeyNotFoundError),
        ("dec", reply(400, {"message": KEYS_NOT_FOUND}), KeyNotFoundError),
        ("dec", reply(401, {"message": "unauthorized"}), KeyNotFoundError),
        # Vendor wordings: the code decides, never the text.
        (
            "dec",
            reply(400, {"message": "Some of the requested keys do not exist in this KME."}),
            KeyNotFoundError,
        ),
        ("dec", reply(400, raw=b"<html>Bad Request</html>"), KeyNotFoundError),
        ("dec", reply(400, {"message": "keys not found"}), KeyNotFoundError),
        ("enc", reply(400, {"message": "size shall be a multiple of 8"}), KmeRefusedError),
        ("enc", reply(400, {"message": "key not found"}), KmeRefusedError),
        ("enc", reply(404, {"message": "not found"}), KmeRefusedError),
        (
            "enc",
            reply(401, raw=b"<html><body>401 Authorization Required</body></html>"),
            KmeUnauthorisedError,
        ),
        ("status", reply(401, {"message": "unauthorized"}), KmeUnauthorisedError),
        ("status", reply(403, {"message": "forbidden"}), KmeRefusedError),
        ("enc", reply(503, {"message": "busy"}), KeySourceUnavailableError),
        ("enc", reply(500, {"message": "oops"}), KeySourceUnavailableError),
        ("enc", reply(503, {"message": "insufficient key material"}), KeySourceUnavailableError),
        ("dec", reply(503, {"message": "keys not found"}), KeySourceUnavailableError),
        ("enc", reply(302, {"message": "moved"}), KmeProtocolError),
    ],
)
async def test_client_maps_bad_answers_to_the_right_error(
    pki: DevPki, call: str, handler: FakeHandler, error: type[Exception]
) -> None:
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = handler
        invoke: Awaitable[object] = (
            client.dec_keys("sae-b", [KEY_ID.bytes])
            if call == "dec"
            else client.status("sae-b")
            if call == "status"
            else client.enc_keys("sae-b", 2 if call == "enc2" else 1)
        )
        with pytest.raises(error) as caught:
            await invoke
        assert type(caught.value) is error
        if error is KmeUnauthorisedError:
            assert "not authorised" in str(caught.value)
        # A 4xx is an answer from a working KME: it never counts against the breaker.
        down = isinstance(caught.value, KeySourceUnavailableError)
        if not down:
            assert client.breaker.failures == 0
        elif "KME answered" in str(caught.value):
            assert client.breaker.failures > 0
        # never retried (status is, but not after an answer that is not a failure)
        assert len(fake.requests) == (3 if call == "status" and down else 1)


async def test_404_with_a_plain_text_body_is_key_not_found(pki: DevPki) -> None:
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:

        async def not_found(request: web.Request) -> web.StreamResponse:
            return web.Response(status=404, text="404: Not Found")

        fake.handler = not_found
        with pytest.raises(KeyNotFoundError):
            await client.dec_keys("sae-b", [KEY_ID.bytes])
        assert client.breaker.failures == 0


async def test_slow_kme_beyond_the_client_timeout(pki: DevPki) -> None:
    async with fake_kme(pki) as fake:

        async def stall(request: web.Request) -> web.StreamResponse:
            await fake.release.wait()
            return web.Response(status=503)

        fake.handler = stall
        # The KME never answers: any timeout shows it. 1 s, not less: the timeout also
        # covers the mutual-TLS connection, which a loaded CI machine can take 0.2 s to make
        # (the request then never reached the fake KME).
        async with etsi_client(pki, fake.url, "sae-a", timeout_s=1.0) as client:
            with pytest.raises(KeySourceUnavailableError) as caught:
                await asyncio.wait_for(client.enc_keys("sae-b"), DEADLINE)
            assert type(caught.value) is KeySourceUnavailableError
            assert "unreachable" in str(caught.value)
            assert len(fake.requests) == 1


async def test_client_reads_a_valid_answer_that_arrives_in_pieces(pki: DevPki) -> None:
    entry = json.dumps([key_entry(bytes(range(32)), str(KEY_ID))]).encode()
    body = b'{"keys":' + b" " * 1_000_000 + entry + b"}"
    assert len(body) < 1024 * 1024
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = reply(raw=body)
        [key] = await client.enc_keys("sae-b")
    assert key.key_id == KEY_ID.bytes


def status_reply(answers: list[tuple[int, Any]]) -> FakeHandler:
    async def handler(request: web.Request) -> web.StreamResponse:
        status, body = answers.pop(0)
        return web.json_response(body, status=status)

    return handler


async def test_status_is_retried_up_to_three_times(pki: DevPki) -> None:
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = status_reply(
            [(503, {"message": "busy"}), (502, {"message": "gateway"}), (200, status_document())]
        )
        status = await client.status("sae-b")
        assert status.stored_key_count == 10
        assert len(fake.requests) == 3
        assert client.breaker.state is BreakerState.CLOSED and client.breaker.failures == 0
        # three failures: the last error is raised, no fourth attempt
        fake.requests.clear()
        fake.handler = status_reply([(503, {"message": f"busy {i}"}) for i in range(4)])
        with pytest.raises(KeySourceUnavailableError, match="busy 2"):
            await client.status("sae-b")
        assert len(fake.requests) == 3


async def test_status_with_a_bad_document_is_not_retried(pki: DevPki) -> None:
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = reply(body=status_document(key_size="256"))
        with pytest.raises(KmeProtocolError, match="key_size"):
            await client.status("sae-b")
        assert len(fake.requests) == 1


async def test_enc_keys_is_not_retried_after_503(pki: DevPki) -> None:
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = reply(503, {"message": "busy"})
        with pytest.raises(KeySourceUnavailableError):
            await client.enc_keys("sae-b")
        assert len(fake.requests) == 1


async def test_client_refuses_bad_arguments_without_calling(pki: DevPki) -> None:
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        with pytest.raises(ValueError, match="256-bit"):
            await client.enc_keys("sae-b", size=512)
        with pytest.raises(ValueError, match="invalid SAE ID"):
            await client.enc_keys("")
        assert fake.requests == []


def state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


async def test_circuit_breaker_opens_and_recovers(pki: DevPki) -> None:
    now = [100.0]
    breaker = CircuitBreaker(threshold=3, base_backoff_s=1.0)
    async with fake_kme(pki) as fake:
        fake.handler = reply(503, {"message": "down"})
        async with etsi_client(
            pki, fake.url, "sae-a", breaker=breaker, clock=lambda: now[0]
        ) as client:
            for _ in range(3):
                with pytest.raises(KeySourceUnavailableError, match="503"):
                    await client.enc_keys("sae-b")
            assert len(fake.requests) == 3
            assert state(breaker) is BreakerState.OPEN
            with pytest.raises(KeySourceUnavailableError, match="circuit open"):
                await client.enc_keys("sae-b")
            with pytest.raises(KeySourceUnavailableError, match="circuit open"):
                await client.status("sae-b")  # status retries do not get through either
            assert len(fake.requests) == 3
            # after the backoff one trial call goes out; its success closes the breaker
            now[0] += 1.0
            fake.handler = reply(body=GOOD)
            await client.enc_keys("sae-b")
            assert len(fake.requests) == 4
            assert state(breaker) is BreakerState.CLOSED
            # an answered error (unknown key) proves the KME alive: no breaker failure
            fake.handler = reply(400, {"message": KEYS_NOT_FOUND})
            for _ in range(4):
                with pytest.raises(KeyNotFoundError):
                    await client.dec_keys("sae-b", [KEY_ID.bytes])
            assert breaker.state is BreakerState.CLOSED
            assert len(fake.requests) == 8


async def test_circuit_breaker_against_a_stopped_kme(pki: DevPki) -> None:
    now = [0.0]
    async with fake_kme(pki) as fake:
        fake.handler = reply(body=GOOD)
        url = fake.url
    # the fake is gone: nothing listens on its port any more
    async with etsi_client(pki, url, "sae-a", clock=lambda: now[0]) as client:
        for _ in range(3):
            with pytest.raises(KeySourceUnavailableError, match="unreachable"):
                await client.enc_keys("sae-b")
        assert client.breaker.state is BreakerState.OPEN
        with pytest.raises(KeySourceUnavailableError, match="circuit open"):
            await client.enc_keys("sae-b")
    assert fake.requests == []


async def test_open_circuit_makes_no_connection_attempt(pki: DevPki) -> None:
    """A 'KME' that accepts TCP connections and drops them at once; count the connections."""
    accepted = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with etsi_client(pki, f"https://127.0.0.1:{port}", "sae-a") as client:
            for _ in range(3):
                with pytest.raises(KeySourceUnavailableError, match="unreachable"):
                    await asyncio.wait_for(client.enc_keys("sae-b"), DEADLINE)
            assert accepted == 3
            with pytest.raises(KeySourceUnavailableError, match="circuit open"):
                await client.enc_keys("sae-b")
            assert accepted == 3
    finally:
        server.close()
        await server.wait_closed()


# =========================================================================== key sources


async def wait_for_depth(master: Etsi014Master, depth: int) -> None:
    """Await the running refill (one task fills up to the high watermark)."""
    refill = master._refill
    assert refill is not None
    await asyncio.wait_for(asyncio.shield(refill), DEADLINE)
    assert master.depth == depth


async def test_master_serves_from_its_prefetch_buffer(pki: DevPki, pair: KmePair) -> None:
    kme_a, kme_b = pair.urls_014
    async with (
        etsi_client(pki, kme_a, "sae-a") as client_a,
        etsi_client(pki, kme_b, "sae-b") as client_b,
    ):
        # A one-second window at a frozen clock: the takes below are a high rate.
        supply = SupplySettings(floor=6, ceiling=6, window_s=1.0)
        master = Etsi014Master(client_a, "sae-b", supply, clock=lambda: 0.0)
        try:
            master.ensure_refill()
            await wait_for_depth(master, 6)
            assert master.counters.prefetched == 6
            assert pair.link.pending_keys == 6
            master.ensure_refill()  # at its target: nothing to do
            assert master._refill is not None and master._refill.done()
            taken = [await master.take_key() for _ in range(4)]
            assert master.depth == 2
            assert master.counters.served_from_buffer == 4
            assert master.counters.fetched_on_demand == 0
            await wait_for_depth(master, 6)  # the first take started a refill
            assert master.counters.prefetched == 10
            assert len({k.key_id for k in taken}) == 4
            slave = Etsi014Slave(client_b, "sae-a")
            fetched = await asyncio.wait_for(
                asyncio.gather(*(slave.get_key(k.key_id) for k in taken)), DEADLINE
            )
            assert list(fetched) == taken
        finally:
            await master.aclose()
        assert master.depth == 0


async def test_master_drops_stale_keys(pki: DevPki, pair: KmePair) -> None:
    now = [0.0]
    async with etsi_client(pki, pair.urls_014[0], "sae-a") as client:
        master = Etsi014Master(
            client, "sae-b", SupplySettings(floor=4, ceiling=4, max_age_s=10.0),
            clock=lambda: now[0],
        )  # fmt: skip
        try:
            master.ensure_refill()
            await wait_for_depth(master, 4)
            stale = {e.key.key_id for e in master._buffer}
            now[0] = 10.5
            key = await master.take_key()
            assert key.key_id not in stale
            assert master.counters.expired == 4
            assert master.counters.fetched_on_demand == 1
            assert master.counters.served_from_buffer == 0
        finally:
            await master.aclose()


async def test_master_without_prefetch_fetches_on_demand(pki: DevPki, pair: KmePair) -> None:
    async with etsi_client(pki, pair.urls_014[0], "sae-a") as client:
        master = Etsi014Master(client, "sae-b")
        first, second = await master.take_key(), await master.take_key()
        assert first.key_id != second.key_id
        assert master.counters.fetched_on_demand == 2
        assert master.counters.prefetched == master.depth == 0
        assert pair.link.pending_keys == 2
        await master.aclose()


async def test_master_refill_errors_are_counted(pki: DevPki) -> None:
    async with fake_kme(pki) as fake, etsi_client(pki, fake.url, "sae-a") as client:
        fake.handler = reply(503, {"message": "insufficient key material"})
        master = Etsi014Master(client, "sae-b", SupplySettings(floor=4))
        master.ensure_refill()
        assert master._refill is not None
        await asyncio.wait_for(master._refill, DEADLINE)
        assert master.counters.refill_errors == 1
        with pytest.raises(KeySourceUnavailableError):
            await master.take_key()
        await master.aclose()


async def test_slave_coalesces_concurrent_lookups(pki: DevPki, pair: KmePair) -> None:
    kme_a, kme_b = pair.urls_014
    async with (
        etsi_client(pki, kme_a, "sae-a") as client_a,
        etsi_client(pki, kme_b, "sae-b") as client_b,
    ):
        keys = await client_a.enc_keys("sae-b", 10)
        slave = Etsi014Slave(client_b, "sae-a")
        order = list(reversed(keys))
        fetched = await asyncio.wait_for(
            asyncio.gather(*(slave.get_key(k.key_id) for k in order)), DEADLINE
        )
        assert list(fetched) == order
        assert slave.requests == 1
        assert pair.link.pending_keys == 0


async def test_an_announced_refill_batch_is_fetched_with_one_dec_keys(
    pki: DevPki, pair: KmePair
) -> None:
    # A refill's keys, named in one KEY_IDS frame (up to 64 ids), are fetched by the
    # server's announced-key prefetch with one dec_keys (coalesced in one loop turn).
    kme_a, kme_b = pair.urls_014
    async with (
        etsi_client(pki, kme_a, "sae-a") as client_a,
        etsi_client(pki, kme_b, "sae-b") as client_b,
    ):
        keys = await client_a.enc_keys("sae-b", MAX_COALESCED_IDS)
        inner = Etsi014Slave(client_b, "sae-a")
        slave = AnnouncedSlave(inner)
        slave.announced([k.key_id for k in keys])
        await asyncio.wait_for(slave.wait_fetched(), DEADLINE)
        assert inner.requests == 1
        assert [await slave.get_key(k.key_id) for k in keys] == keys
        assert slave.counters.served_from_cache == MAX_COALESCED_IDS
        await slave.aclose()


async def test_slave_isolates_an_unknown_id_in_a_batch(pki: DevPki, pair: KmePair) -> None:
    kme_a, kme_b = pair.urls_014
    async with (
        etsi_client(pki, kme_a, "sae-a") as client_a,
        etsi_client(pki, kme_b, "sae-b") as client_b,
    ):
        keys = await client_a.enc_keys("sae-b", 5)
        slave = Etsi014Slave(client_b, "sae-a")
        unknown = uuid.uuid4().bytes
        ids = [k.key_id for k in keys[:2]] + [unknown] + [k.key_id for k in keys[2:]]
        results = await asyncio.wait_for(
            asyncio.gather(*(slave.get_key(i) for i in ids), return_exceptions=True), DEADLINE
        )
        assert isinstance(results[2], KeyNotFoundError)
        assert [r for i, r in enumerate(results) if i != 2] == keys
        assert slave.requests == 1 + len(ids)
        assert pair.link.pending_keys == 0


async def test_slave_refuses_a_duplicate_concurrent_lookup(pki: DevPki, pair: KmePair) -> None:
    kme_a, kme_b = pair.urls_014
    async with (
        etsi_client(pki, kme_a, "sae-a") as client_a,
        etsi_client(pki, kme_b, "sae-b") as client_b,
    ):
        [key] = await client_a.enc_keys("sae-b")
        slave = Etsi014Slave(client_b, "sae-a")
        first, second = await asyncio.wait_for(
            asyncio.gather(
                slave.get_key(key.key_id), slave.get_key(key.key_id), return_exceptions=True
            ),
            DEADLINE,
        )
        assert first == key
        assert isinstance(second, KeyNotFoundError)
        assert slave.requests == 1


# =========================================================================== end to end


@pytest.mark.parametrize("flow", [Flow.CLIENT_INITIATED, Flow.SERVER_INITIATED])
async def test_qkd_handshake_over_the_simulated_kmes(flow: Flow) -> None:
    hybrids = groups("qkd_mlkem768")
    async with (
        simulated_kme_sources() as sources,
        loopback_pair(hybrids, sources=sources) as pair,
    ):
        client = pair.client(hybrids, QkdOptions(flow=flow, api=KeyApi.ETSI_014))
        stream = await asyncio.wait_for(pair.handshake(client), DEADLINE)
        payload = os.urandom(1000)
        await stream.write(payload)
        received = b""
        while len(received) < len(payload):
            chunk = await asyncio.wait_for(stream.read(), DEADLINE)
            assert chunk
            received += chunk
        assert received == payload
        record = stream.record
        await stream.close()
        async with asyncio.timeout(DEADLINE):
            await pair.wait_for_server(lambda: pair.echo.accepted >= 1)
        assert pair.server_failures == []
        for ledger in (pair.client_keys.ledger, pair.server_keys.ledger):
            assert ledger.taken == ledger.consumed + ledger.wasted
            assert ledger.consumed == 1
            assert ledger.outstanding == 0
    assert record.group == "qkd_mlkem768"
    assert (record.flow, record.api) == (flow, KeyApi.ETSI_014)
    assert record.qkd_key_id is not None
