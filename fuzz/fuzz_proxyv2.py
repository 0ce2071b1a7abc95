#!/usr/bin/env python3
"""PROXY protocol v2 headers (qkdproxy/core/proxyv2.py), which qkdproxy only writes.

The input drives the header's fields (addresses, ports, identity strings); the header
must decode, with the strict test-side decoder from tests/unit/test_fuzz_parsers.py, to exactly
those fields, or encoding must refuse with ValueError (a header over 64 KiB).
"""

from __future__ import annotations

import ipaddress

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from qkdproxy.core.proxyv2 import (
        PP2_SUBTYPE_SSL_CN,
        PP2_TYPE_QKDPROXY_GROUP,
        PP2_TYPE_QKDPROXY_PEER,
        ProxyInfo,
        encode_proxy_v2,
    )

from tests.unit.test_fuzz_parsers import decode_proxy_v2


def address(fdp: atheris.FuzzedDataProvider) -> tuple[str, int] | None:
    kind = fdp.ConsumeIntInRange(0, 2)
    if kind == 0:
        return None
    raw = fdp.ConsumeBytes(4 if kind == 1 else 16).ljust(4 if kind == 1 else 16, b"\0")
    return str(ipaddress.ip_address(raw)), fdp.ConsumeIntInRange(0, 65535)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    info = ProxyInfo(
        source=address(fdp),
        destination=address(fdp),
        connection_id=fdp.ConsumeIntInRange(0, 2**64),
        peer_identity=fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 70_000)),
        peer_cn=fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300)) or None,
        cipher=fdp.ConsumeUnicodeNoSurrogates(40),
        group=fdp.ConsumeUnicodeNoSurrogates(30) or None,
    )
    try:
        header = encode_proxy_v2(info)
    except ValueError:
        return
    decoded = decode_proxy_v2(header)
    assert decoded.tlvs[PP2_TYPE_QKDPROXY_PEER] == info.peer_identity.encode()
    assert decoded.tlvs.get(PP2_TYPE_QKDPROXY_GROUP) == (
        info.group.encode() if info.group else None
    )
    assert decoded.ssl_tlvs.get(PP2_SUBTYPE_SSL_CN) == (
        info.peer_cn.encode() if info.peer_cn else None
    )
    if info.source is None or info.destination is None:
        assert decoded.source is None
    else:
        assert decoded.source is not None
        assert decoded.source[1] == info.source[1]


def seeds() -> list[bytes]:
    return [bytes(range(256)), b"\x01" * 64, b"\x02" * 80]


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
