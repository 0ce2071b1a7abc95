"""The native engine against tlslite-ng, each in either role: both ends must derive the
same secrets (application traffic secrets, and the main secret and transcript hash that
Extended Key Update chains from), and agree on what was negotiated."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qkdproxy.core.tls.connection import HandshakeComplete, TlsConnection
from qkdproxy.core.tls.keyexchange import Flow, QkdOptions
from qkdproxy.sim.pki import CertificateAuthority
from tests.conftest import groups
from tests.native_harness import CLIENT, SERVER, Identities, link
from tests.unit import test_connection
from tests.unit.test_eku import connected, key_ids
from tests.unit.test_eku import link as eku_link

PAIRS = [("native", "native"), ("native", "tlslite"), ("tlslite", "native"), ("tlslite", "tlslite")]
pairs = pytest.mark.parametrize(
    "engines", PAIRS, ids=lambda p: f"{p[0]}-client-{p[1]}-server", indirect=True
)


@pytest.fixture
def engines(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """The connection tests' pair builder, with these engines."""
    saved = dict(test_connection._engine)
    test_connection._engine["client"], test_connection._engine["server"] = request.param
    yield request.param
    test_connection._engine.update(saved)


@pytest.fixture(scope="module")
def ids() -> Identities:
    return Identities.create()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def secrets(conn: TlsConnection) -> tuple[bytes, bytes]:
    """(read, write) application traffic secrets of an established connection."""
    assert conn.records is not None
    return conn.records.read.secret, conn.records.write.secret


@pairs
@pytest.mark.parametrize(
    ("client_groups", "server_groups"),
    [(("x25519",), None), (("X25519MLKEM768",), None), (("x25519", "secp256r1"), ("secp256r1",))],
    ids=["x25519", "X25519MLKEM768", "retry"],
)
def test_both_ends_derive_the_same_traffic_secrets(
    ids: Identities,
    engines: tuple[str, str],
    client_groups: tuple[str, ...],
    server_groups: tuple[str, ...] | None,
) -> None:
    result = link(
        ids,
        groups(*client_groups),
        groups(*server_groups) if server_groups else None,
        client_engine=engines[0],
        server_engine=engines[1],
    )
    assert result.complete(CLIENT) and result.complete(SERVER), result.events
    client_read, client_write = secrets(result.client)
    server_read, server_write = secrets(result.server)
    assert client_write == server_read and client_read == server_write
    assert client_write != client_read
    client_schedule = result.client._engine.key_schedule()
    server_schedule = result.server._engine.key_schedule()
    assert client_schedule == server_schedule


@pairs
@pytest.mark.parametrize(
    ("offers", "accepts", "chosen"),
    [
        ([b"h2", b"http/1.1"], [b"http/1.1", b"h2"], "h2"),  # the client's order wins
        ([b"qkdproxy/1"], [b"h2", b"qkdproxy/1"], "qkdproxy/1"),
        ([b"h2"], [b"qkdproxy/1"], None),  # nothing in common: served without ALPN
        ([b"h2"], None, None),
        (None, [b"h2"], None),
    ],
)
def test_both_ends_agree_on_alpn(
    ids: Identities,
    engines: tuple[str, str],
    offers: list[bytes] | None,
    accepts: list[bytes] | None,
    chosen: str | None,
) -> None:
    result = link(
        ids,
        groups("x25519"),
        client_engine=engines[0],
        server_engine=engines[1],
        alpn=(offers, accepts),
    )
    done = [e for n in (CLIENT, SERVER) for e in result.events[n]]
    completes = [e for e in done if isinstance(e, HandshakeComplete)]
    assert len(completes) == 2, result.events
    assert {c.alpn for c in completes} == {chosen}
    assert len({c.cipher for c in completes}) == 1


@pairs
@pytest.mark.parametrize("initiator", ["client", "server"])
@pytest.mark.parametrize("flow", [Flow.CLIENT_INITIATED, Flow.SERVER_INITIATED])
def test_extended_key_updates_chain_from_the_same_schedule(
    ca: CertificateAuthority, engines: tuple[str, str], initiator: str, flow: Flow
) -> None:
    """The engine hands Extended Key Update its main secret and transcript hash: if the two
    ends' differed, the first update would install keys the peer cannot open."""
    p, _, _ = connected(ca, options=QkdOptions(flow=flow))
    assert p.client._engine.key_schedule() == p.server._engine.key_schedule()
    lnk = eku_link(p)
    for round_ in range(2):
        lnk.initiate(initiator)
        lnk.client.send_data(b"c%d" % round_)
        lnk.server.send_data(b"s%d" % round_)
        lnk.pump()
    assert bytes(lnk.received["server"]) == b"c0c1"
    assert bytes(lnk.received["client"]) == b"s0s1"
    assert key_ids(lnk, "client") == key_ids(lnk, "server")
    assert len(key_ids(lnk, "client")) == 2
