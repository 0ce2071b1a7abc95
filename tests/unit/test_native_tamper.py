"""An on-path attacker against the native engine, byte by byte: every byte of every flight,
both directions, flipped (then the handshake runs to its end), and every flight cut at
every offset then closed. Between two native ends every byte; against tlslite (either
role) every third byte, which still hits each field of each message.

What must hold: the receiver of a tampered or truncated flight never completes, nobody
fails with an internal error, and both ends complete only if the flipped byte is one RFC
8446 5.1 says to ignore (the legacy_record_version of a plaintext record), and then with
the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qkdproxy.core.tls.connection import Outcome
from tests.conftest import groups
from tests.native_harness import BYTES_IN_TEXT, CLIENT, SERVER, Cut, Identities, Link, link

PAIRS = [("native", "native"), ("native", "tlslite"), ("tlslite", "native")]
SCENARIOS = {
    "direct": (("x25519",), None, False),
    "retry": (("x25519", "secp256r1"), ("secp256r1",), False),  # HelloRetryRequest first
    # Extended Key Update offered and ALPN negotiated: their extensions are tampered too.
    "eku-alpn": (("x25519",), None, True),
}
ALPN = ([b"h2", b"qkdproxy/1"], [b"qkdproxy/1"])
APPLICATION_DATA = 23


@pytest.fixture(scope="module")
def ids() -> Identities:
    return Identities.create()


def ignorable(data: bytes) -> set[int]:
    """Offsets of legacy_record_version in the plaintext records of ``data`` (RFC 8446
    5.1: ignored for all purposes; a protected record's header is its AEAD's data)."""
    found, pos = set(), 0
    while pos + 5 <= len(data):
        if data[pos] != APPLICATION_DATA:
            found |= {pos + 1, pos + 2}
        pos += 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
    return found


@dataclass
class Attack:
    """Edit transmission ``index`` of ``direction``; what the edit saw."""

    direction: str
    index: int
    offset: int
    truncate: bool = False
    applied: bool = False
    harmless: bool = False

    def __call__(self, name: str, n: int, data: bytes) -> bytes | Cut:
        if (name, n) != (self.direction, self.index) or self.offset >= len(data):
            return data
        self.applied = True
        if self.truncate:
            return Cut(data[: self.offset])
        self.harmless = self.offset in ignorable(data)
        tampered = bytearray(data)
        tampered[self.offset] ^= 0xFF
        return bytes(tampered)


def flights(ids: Identities, scenario: str, engines: tuple[str, str]) -> list[tuple[str, int, int]]:
    """(direction, index, length) of every transmission of an untouched handshake."""
    result = run(ids, scenario, engines, None)
    assert result.complete(CLIENT) and result.complete(SERVER), result.events
    return [(d, n, len(data)) for d in (CLIENT, SERVER) for n, data in enumerate(result.sent[d])]


def run(ids: Identities, scenario: str, engines: tuple[str, str], attack: Attack | None) -> Link:
    client_groups, server_groups, extras = SCENARIOS[scenario]
    return link(
        ids,
        groups(*client_groups),
        groups(*server_groups) if server_groups else None,
        client_engine=engines[0],
        server_engine=engines[1],
        hook=attack,
        eku=extras,
        alpn=ALPN if extras else (None, None),
    )


def judge(attack: Attack, result: Link, engines: tuple[str, str]) -> str | None:
    """What is wrong with the outcome of ``attack`` (None: it held)."""
    receiver = SERVER if attack.direction == CLIENT else CLIENT
    for name, engine in zip((CLIENT, SERVER), engines, strict=True):
        error = result.conn(name).error
        if error is not None and error.outcome is Outcome.INTERNAL:
            return f"{name} internal error: {error.reason}"
        # tlslite quotes the peer's (public) key share in some reasons; ours quote nothing.
        if error is not None and engine == "native" and BYTES_IN_TEXT.search(error.reason):
            return f"{name} failure reason carries bytes: {error.reason}"
    if attack.harmless and not attack.truncate:
        if not (result.complete(CLIENT) and result.complete(SERVER)):
            return f"an ignored version byte failed the handshake: {result.events}"
        result.assert_same_keys()
        return None
    if result.complete(receiver):
        return f"{receiver} completed on a {'truncated' if attack.truncate else 'tampered'} flight"
    error = result.conn(receiver).error
    if error is None:
        return f"{receiver} neither completed nor failed"
    if attack.truncate and error.outcome not in (Outcome.PEER_CLOSED, Outcome.ALERT):
        return f"{receiver} failed a truncation with {error.outcome}"
    return None


def sweep(ids: Identities, scenario: str, engines: tuple[str, str], *, truncate: bool) -> None:
    stride = 1 if engines == ("native", "native") else 3
    problems = []
    for direction, index, length in flights(ids, scenario, engines):
        for offset in range(0, length, stride):
            attack = Attack(direction, index, offset, truncate)
            result = run(ids, scenario, engines, attack)
            if attack.applied and (problem := judge(attack, result, engines)):
                problems.append(f"{direction} flight {index} byte {offset}: {problem}")
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("engines", PAIRS, ids=lambda p: f"{p[0]}-client-{p[1]}-server")
def test_every_flipped_byte_is_detected_or_ignored_by_rule(
    ids: Identities, engines: tuple[str, str], scenario: str
) -> None:
    sweep(ids, scenario, engines, truncate=False)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("engines", PAIRS, ids=lambda p: f"{p[0]}-client-{p[1]}-server")
def test_every_truncation_then_eof_fails_cleanly(
    ids: Identities, engines: tuple[str, str], scenario: str
) -> None:
    sweep(ids, scenario, engines, truncate=True)


def test_the_ignored_bytes_are_only_plaintext_record_versions(ids: Identities) -> None:
    """The exemption above is narrow: in a direct handshake it covers the ClientHello and
    ServerHello records and the two dummy change_cipher_spec records, nothing protected."""
    result = run(ids, "direct", ("native", "native"), None)
    client_hello, client_flight = result.sent[CLIENT]
    [server_flight] = result.sent[SERVER]
    assert ignorable(client_hello) == {1, 2}
    assert ignorable(client_flight) == {1, 2}  # its change_cipher_spec
    hello_end = 5 + int.from_bytes(server_flight[3:5], "big")
    assert ignorable(server_flight) == {1, 2, hello_end + 1, hello_end + 2}
