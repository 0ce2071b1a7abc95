"""No secret the native engine derives reaches a log line, a failure reason or an exception
text, on success or on any failure a peer can cause.

tests/integration/test_security_properties.py checks the daemons' logs on good handshakes;
this records the native engine's own derivations (HKDF-Extract, and HKDF-Expand-Label for
its secrets, Finished keys, traffic keys and IVs) and drives the failures a peer or an
on-path attacker can cause through TlsConnection, with every logger at DEBUG, reading the
failure reasons and error texts too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator

import pytest

from qkdproxy.core.tls import record_layer
from qkdproxy.core.tls.native import messages as m
from qkdproxy.core.tls.native import schedule
from tests.conftest import groups
from tests.integration.test_security_properties import Secrets
from tests.native_forge import Forge
from tests.native_harness import CLIENT, SERVER, Cut, Identities, Link, link
from tests.unit.test_native_hostile import (
    CERT,
    CR,
    CV,
    EE,
    FIN,
    flight,
    scripted_client,
    scripted_server,
)


@pytest.fixture(scope="module")
def ids() -> Identities:
    return Identities.create()


def public_constants() -> set[bytes]:
    """What every handshake without a PSK derives alike: not secrets."""
    out = set()
    for name in ("sha256", "sha384"):
        zeros = bytes(hashlib.new(name).digest_size)
        early = schedule._extract(zeros, zeros, name)
        empty = hashlib.new(name).digest()
        out |= {early, schedule.derive_secret(early, b"derived", empty, name)}
    return out


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch, ids: Identities) -> Secrets:
    found = Secrets()
    found.public = public_constants()
    for module, name, label in (
        (schedule, "_extract", "TLS 1.3 extracted secret (native)"),
        # Derive-Secret and the Finished keys both expand through this one.
        (schedule, "hkdf_expand_label", "TLS 1.3 secret or Finished key (native)"),
        (record_layer, "hkdf_expand_label", "TLS 1.3 traffic key or IV"),
    ):
        monkeypatch.setattr(module, name, found.recorder(label, getattr(module, name)))
    for who, credentials in (("client", ids.client), ("server", ids.server)):
        found.private_key(f"{who} key", credentials.private_key)
    return found


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


def text_of(result: Link) -> list[str]:
    """Every failure reason, event and error text the handshake produced."""
    out = []
    for name in (CLIENT, SERVER):
        out += [repr(event) for event in result.events[name]]
        error = result.conn(name).error
        if error is not None:
            out += [error.reason, str(error), repr(error)]
    return out


def flipped(offset: int) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        tampered = bytearray(data)
        tampered[offset % len(data)] ^= 0xFF
        return bytes(tampered)

    return edit


def on(direction: str, index: int, edit: Callable[[bytes], bytes | Cut]) -> object:
    def hook(name: str, n: int, data: bytes) -> bytes | Cut:
        return edit(data) if (name, n) == (direction, index) else data

    return hook


def test_no_native_secret_in_logs_reasons_or_errors(
    ids: Identities, secrets: Secrets, logs: pytest.LogCaptureFixture
) -> None:
    x25519, retry = groups("x25519"), (groups("x25519", "secp256r1"), groups("secp256r1"))
    results = [
        link(ids, x25519),
        link(ids, *retry),
        link(ids, groups("X25519MLKEM768"), eku=True),
        # Failures: a protected record, the server Finished and a signature broken in
        # flight; a wrong Finished from the client; a server signing nonsense.
        *(link(ids, x25519, hook=on(SERVER, 0, flipped(o))) for o in (-1, -20, 300, 500)),  # type: ignore[arg-type]
        link(ids, x25519, hook=on(CLIENT, 1, flipped(-3))),  # type: ignore[arg-type]
        link(ids, x25519, hook=on(CLIENT, 1, lambda d: Cut(d[:-10]))),  # type: ignore[arg-type]
        link(
            ids,
            x25519,
            client_engine=scripted_client(
                ids, script=flight(CERT, CV, lambda f: f.finished(bytes(32)))
            ),
        ),
        link(
            ids,
            x25519,
            server_engine=scripted_server(
                ids,
                flight(
                    EE, CR, CERT, lambda f: f.certificate_verify(0x0403, lambda c: b"\x30\x00"), FIN
                ),
            ),
        ),
        link(
            ids,
            x25519,
            server_engine=scripted_server(
                ids,
                flight(EE, CR, CERT, CV, lambda f: Forge.sealed(m.message(m.FINISHED, bytes(48)))),
            ),
        ),
    ]
    complete = [r for r in results if r.complete(CLIENT) and r.complete(SERVER)]
    assert len(complete) == 3
    for result in complete:
        result.assert_same_keys()
    failed = [r for r in results if r.client.error or r.server.error]
    assert len(failed) == len(results) - 3
    text = "\n".join([*logs.messages, *(line for r in results for line in text_of(r))])
    labels = set(secrets.values.values())
    # The search covered what it should: every kind of native secret was recorded.
    assert {
        "TLS 1.3 extracted secret (native)",
        "TLS 1.3 secret or Finished key (native)",
        "TLS 1.3 traffic key or IV",
    } <= labels
    assert secrets.find(text) == []
