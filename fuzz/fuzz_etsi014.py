#!/usr/bin/env python3
"""ETSI GS QKD 014 JSON (qkdproxy/core/etsi014/models.py) and what the client makes of a KME's
answer (qkdproxy/keys/etsi014_client.py: _decode, _container, error_for).

Byte 0 picks the HTTP status the "KME" answered with (200 most of the time); the rest is
the response body. Only KmeProtocolError / QkdKeyError / Etsi014FormatError may come out.
"""

from __future__ import annotations

import base64
import contextlib
import json
import uuid

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from qkdproxy.core.etsi014.models import (
        ErrorBody,
        Etsi014FormatError,
        KeyContainer,
        KeyIds,
        KeyRequest,
        Status,
    )
    from qkdproxy.core.keys import QkdKeyError
    from qkdproxy.keys.etsi014_client import KmeProtocolError, _container, _decode, error_for

STATUSES = [200, 200, 200, 200, 400, 401, 404, 500, 503]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    status, body = STATUSES[data[0] % len(STATUSES)], data[1:]
    if status != 200:
        assert isinstance(error_for("dec_keys", status, body), QkdKeyError)
        return
    try:
        document = _decode(body)
    except KmeProtocolError:
        return
    for parse in (Status.from_json, KeyRequest.from_json, KeyIds.from_json, ErrorBody.from_json):
        with contextlib.suppress(Etsi014FormatError):
            parse(document)
    try:
        container = _container(document, 256, 4, "KME")
    except KmeProtocolError:
        return
    ids = [key.key_id for key in container.keys]
    assert len(ids) == len(set(ids))
    assert all(len(key.key) == 32 for key in container.keys)
    assert KeyContainer.from_json(document, 256) == container


def seeds() -> list[bytes]:
    key_id = str(uuid.UUID(int=0x1234))
    key = base64.b64encode(bytes(range(32))).decode()
    documents = [
        {"keys": [{"key_ID": key_id, "key": key}]},
        {"key_IDs": [{"key_ID": key_id, "master_SAE_ID": "sae-a"}]},
        {"number": 1, "size": 256},
        {"message": "one or more keys specified are not found on KME", "details": []},
        {
            "source_KME_ID": "a", "target_KME_ID": "b", "master_SAE_ID": "c",
            "slave_SAE_ID": "d", "key_size": 256, "stored_key_count": 1, "max_key_count": 9,
            "max_key_per_request": 1, "max_key_size": 256, "min_key_size": 64,
            "max_SAE_ID_count": 0,
        },
    ]  # fmt: skip
    return [b"\x00" + json.dumps(d).encode() for d in documents] + [
        b"\x04" + json.dumps(documents[3]).encode()
    ]


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
