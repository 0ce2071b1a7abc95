"""The native TLS 1.3 engine driven directly (no connection, no key exchange): the hello's
padding rule, ALPN selection and the hand-over of bytes that follow Finished."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from qkdproxy.core.groups import DEFAULT_GROUPS
from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.core.tls.engine import LocalAlertError
from qkdproxy.core.tls.native import NativeClient, NativeServer
from qkdproxy.core.tls.native.common import Identity
from qkdproxy.core.tls.wire import Alert
from qkdproxy.sim.pki import CertificateAuthority

X25519 = DEFAULT_GROUPS.by_name("x25519")


class Hooks:
    """Plain X25519 in place of the QKD-KEM key exchange."""

    def __init__(self) -> None:
        self._keys: dict[int, X25519PrivateKey] = {}

    def _key(self, group: int) -> X25519PrivateKey:
        return self._keys.setdefault(group, X25519PrivateKey.generate())

    def key_share(self, group: int) -> tuple[bytes, object]:
        return self._key(group).public_key().public_bytes_raw(), None

    def shared_secret(self, group: int, peer_share: bytes) -> bytes:
        return self._key(group).exchange(X25519PublicKey.from_public_bytes(peer_share))


@pytest.fixture(scope="module")
def identities() -> tuple[Identity, Identity]:
    ca = CertificateAuthority.create()
    client: Credentials = ca.issue("client", ["spiffe://test/client"], server=False)
    server: Credentials = ca.issue("server", ["server.test"], client=False)
    return Identity.of(client), Identity.of(server)


def engines(
    identities: tuple[Identity, Identity],
    client_alpn: list[bytes] | None = None,
    server_alpn: list[bytes] | None = None,
    server_name: str | None = "server.test",
) -> tuple[NativeClient, NativeServer]:
    client = NativeClient(
        Hooks(),
        identities[0],
        alpn=client_alpn,
        chain_check=lambda chain: None,
        server_name=server_name,
        random=os.urandom,
    )
    server = NativeServer(Hooks(), identities[1], alpn=server_alpn, random=os.urandom)
    client.start_client([X25519], X25519)
    server.start_server([X25519])
    return client, server


def run(client: NativeClient, server: NativeServer) -> None:
    for _ in range(4):
        server.feed(client.take_output())
        server.step()
        client.feed(server.take_output())
        if client.step():
            server.feed(client.take_output())
            assert server.step()
            return
    raise AssertionError("handshake did not complete")


@pytest.mark.parametrize("name_length", range(1, 400, 9))
def test_no_hello_is_256_to_511_bytes_long(
    identities: tuple[Identity, Identity], name_length: int
) -> None:
    """RFC 7685's workaround: such hellos are padded to 512 bytes (tlslite's rule). Each
    name adds its length to the hello (170 bytes with a one-letter name), so the sweep
    crosses the padded range."""
    client, _ = engines(identities, server_name="a" * name_length)
    record = client.take_output()
    body_length = int.from_bytes(record[6:9], "big")
    unpadded = 169 + name_length
    assert body_length == (512 if 256 <= unpadded <= 511 else unpadded)


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        ([b"qkdproxy/1"], b"qkdproxy/1"),
        ([b"h2", b"qkdproxy/1"], b"qkdproxy/1"),
        ([b"qkdproxy/1", b"qkdproxy-mux/1"], b"qkdproxy/1"),  # the client's order wins
        ([b"h2", b"http/1.1"], None),  # nothing in common: served without ALPN
        (None, None),
    ],
)
def test_the_server_picks_the_clients_first_protocol_it_speaks(
    identities: tuple[Identity, Identity], offered: list[bytes] | None, expected: bytes | None
) -> None:
    client, server = engines(
        identities, client_alpn=offered, server_alpn=[b"qkdproxy-mux/1", b"qkdproxy/1"]
    )
    run(client, server)
    assert server.alpn == expected
    assert client.alpn == expected


def test_a_server_without_protocols_ignores_the_clients(
    identities: tuple[Identity, Identity],
) -> None:
    client, server = engines(identities, client_alpn=[b"h2"], server_alpn=None)
    run(client, server)
    assert server.alpn is None and client.alpn is None


def test_records_behind_the_clients_finished_go_to_the_record_layer(
    identities: tuple[Identity, Identity],
) -> None:
    client, server = engines(identities)
    server.feed(client.take_output())
    server.step()
    client.feed(server.take_output())
    assert client.step()
    client_layer, leftover = client.hand_over()
    assert leftover == b""
    client_layer.send_data(b"early application data")
    server.feed(client.take_output() + client_layer.data_to_send())
    assert server.step()
    server_layer, leftover = server.hand_over()
    events = server_layer.receive(leftover, 0.0)
    assert [getattr(e, "data", None) for e in events] == [b"early application data"]
    assert (client.cipher_name, server.cipher_name) == ("aes256gcm", "aes256gcm")
    assert server.peer_chain == list(identities[0].chain)
    assert client.peer_chain == list(identities[1].chain)
    assert client.key_schedule() == server.key_schedule()


@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize("msg_type", [2, 11, 20, 24, 254])
def test_a_message_the_state_does_not_take_is_refused_on_its_header(
    identities: tuple[Identity, Identity], role: str, msg_type: int
) -> None:
    """Four bytes of a handshake message are enough to refuse it: its body (up to 64 KiB)
    is not waited for."""
    client, server = engines(identities)
    engine: NativeClient | NativeServer = client if role == "client" else server
    if msg_type == (2 if role == "client" else 1):
        pytest.skip("the message this state takes")
    header = bytes([msg_type]) + (60_000).to_bytes(3, "big")
    engine.feed(b"\x16\x03\x03\x00\x04" + header)
    with pytest.raises(LocalAlertError) as refused:
        engine.step()
    assert refused.value.description == Alert.UNEXPECTED_MESSAGE
