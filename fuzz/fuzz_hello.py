#!/usr/bin/env python3
"""ClientHello / ServerHello parsers (qkdproxy/core/tls/hello.py).

First input byte: odd parses a ClientHello body, even a ServerHello body; the rest is the
body. Anything but a ClientHello/ServerHello or HelloParseError is a crash, and so is a
parse that returns what was not in the input.
"""

from __future__ import annotations

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from qkdproxy.core.tls.hello import (
        ClientHello,
        HelloParseError,
        parse_client_hello,
        parse_server_hello,
    )


def test_one_input(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    try:
        hello = parse_client_hello(body) if data[0] & 1 else parse_server_hello(body)
    except HelloParseError:
        return
    if isinstance(hello, ClientHello):
        groups = [share.group for share in hello.key_shares]
        assert len(groups) == len(set(groups)), "two shares for one group"
        assert all(s.key_exchange and s.key_exchange in body for s in hello.key_shares)
        assert hello.cipher_suites, "no cipher suites"
    else:
        assert not (hello.hello_retry and hello.key_exchange is not None)
        assert hello.key_exchange is None or hello.key_exchange in body


def seeds() -> list[bytes]:
    out = []
    for client, server in fuzzlib.real_hellos():
        out += [b"\x01" + client, b"\x00" + server]
    return out


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
