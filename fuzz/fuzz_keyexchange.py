#!/usr/bin/env python3
"""Key shares and key ids, server and client side (qkdproxy/core/tls/keyexchange.py, the hybrid
share splitting in qkdproxy/core/hybrid.py), driven by parsed hostile hellos.

Byte 0 even: the rest is a ClientHello body for a server preferring qkd_mlkem768,
X25519MLKEM768, x25519. Odd: the rest is a ServerHello body for a client that offered
qkd_mlkem768. The KME knows one key id (KNOWN_ID, which the seeds carry); every outcome
must be a HandshakeRejectedError or a prepared secret, with every key taken settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from qkdproxy.core.hybrid import KEY_ID_SIZE
    from qkdproxy.core.keys import KeyNotFoundError, QkdKey
    from qkdproxy.core.tls.hello import HelloParseError, parse_client_hello, parse_server_hello
    from qkdproxy.core.tls.keyexchange import (
        ClientKeyExchange,
        HandshakeRejectedError,
        ServerKeyExchange,
    )
    from qkdproxy.keys.sources import KeySources
    from qkdproxy.tools.loopback import resolve_groups
from qkdproxy.keys.context import KeyContext

KNOWN_ID = b"\x42" * KEY_ID_SIZE
GROUPS = resolve_groups(["qkd_mlkem768", "X25519MLKEM768", "x25519"])
LOOP = asyncio.new_event_loop()


class FakeKme:
    """Master hands out KNOWN_ID keys; slave knows KNOWN_ID only."""

    async def take_key(self) -> QkdKey:
        return QkdKey(KNOWN_ID, os.urandom(32))

    async def get_key(self, key_id: bytes) -> QkdKey:
        if bytes(key_id) != KNOWN_ID:
            raise KeyNotFoundError("unknown key id")
        return QkdKey(KNOWN_ID, os.urandom(32))


def context() -> KeyContext:
    kme = FakeKme()
    return KeyContext(KeySources(master=kme, slave=kme))


async def server_side(body: bytes) -> None:
    hello = parse_client_hello(body)
    keys = context()
    kex = ServerKeyExchange(GROUPS, keys)
    with contextlib.suppress(HandshakeRejectedError):
        await kex.on_client_hello(hello)
    await kex.finish(False)
    assert keys.ledger.outstanding == 0
    assert keys.ledger.taken <= 1


async def client_side(body: bytes) -> None:
    hello = parse_server_hello(body)
    keys = context()
    kex = ClientKeyExchange(GROUPS, keys)
    await kex.offer(GROUPS[0].group.code_point)
    try:
        await kex.on_server_hello(hello)
        await kex.on_server_hello(hello)  # a second HelloRetryRequest, or a replay
    except HandshakeRejectedError:
        pass
    await kex.finish(False)
    assert keys.ledger.outstanding == 0
    assert keys.ledger.taken <= 2


def test_one_input(data: bytes) -> None:
    if not data:
        return
    work = client_side if data[0] & 1 else server_side
    with contextlib.suppress(HelloParseError):
        LOOP.run_until_complete(work(data[1:]))


def seeds() -> list[bytes]:
    qkd = {g.group.code_point for g in resolve_groups(["qkd_mlkem768", "qkd_x25519mlkem768"])}
    out = []
    for client, server in fuzzlib.real_hellos():
        [entry] = parse_client_hello(client).key_shares
        share = entry.key_exchange
        with_known = share[:-KEY_ID_SIZE] + KNOWN_ID if entry.group in qkd else share
        out.append(b"\x00" + client.replace(share, with_known))
        server_share = parse_server_hello(server).key_exchange or b""
        out.append(b"\x01" + server.replace(server_share[-KEY_ID_SIZE:], KNOWN_ID))
    return out


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
