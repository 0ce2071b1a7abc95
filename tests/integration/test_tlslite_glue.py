"""The tlslite integration: self-test of hook points, group registration, overrides."""

from __future__ import annotations

import asyncio

import pytest
import tlslite
import tlslite.recordlayer
import tlslite.session
from tlslite.api import TLSConnection
from tlslite.constants import GroupName
from tlslite.handshakesettings import TLS13_PERMITTED_GROUPS

from qkdproxy.core.groups import DEFAULT_GROUPS
from qkdproxy.core.hybrid import resolve
from qkdproxy.core.kem import default_registry
from qkdproxy.core.tls import tlslite_glue
from qkdproxy.core.tls.keyexchange import QkdOptions
from qkdproxy.io.tls_stream import HandshakeError
from qkdproxy.tools.loopback import loopback_pair


def test_self_test_passes_on_the_pinned_tlslite() -> None:
    tlslite_glue.self_test()


@pytest.mark.parametrize(
    ("owner", "name"),
    [(TLSConnection, "_KEMEncaps"), (tlslite.recordlayer, "createAESGCM")],
)
def test_self_test_names_a_missing_hook_point(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str
) -> None:
    monkeypatch.delattr(owner, name)
    with pytest.raises(tlslite_glue.SelfTestError, match=name):
        tlslite_glue.self_test()


def test_self_test_refuses_another_tlslite_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlslite, "__version__", "0.8.3")
    with pytest.raises(tlslite_glue.SelfTestError, match=r"0\.8\.2 required"):
        tlslite_glue.self_test()


def test_qkd_groups_are_registered_as_kems() -> None:
    group = DEFAULT_GROUPS.by_name("qkd_mlkem768")
    tlslite_glue.install([group])
    assert GroupName.qkd_mlkem768 == 0x3768
    assert 0x3768 in GroupName.allKEM
    assert "qkd_mlkem768" in TLS13_PERMITTED_GROUPS


async def test_code_point_overrides_do_not_leak_between_endpoints() -> None:
    overridden = DEFAULT_GROUPS.with_overrides({"qkd_mlkem768": 0x3769})
    moved = [resolve(overridden.by_name("qkd_mlkem768"), default_registry())]
    stock = [resolve(DEFAULT_GROUPS.by_name("qkd_mlkem768"), default_registry())]
    async with loopback_pair(moved, tls_engine="tlslite") as pair:
        # A server with the override and clients with and without it, in one process.
        assert GroupName.qkd_mlkem768 == 0x3768
        stream = await asyncio.wait_for(pair.handshake(pair.client(moved, QkdOptions())), 20)
        assert stream.record.group == "qkd_mlkem768"
        await stream.close()
        with pytest.raises(HandshakeError):  # 0x3768 on the wire: this server does not know it
            await asyncio.wait_for(pair.handshake(pair.client(stock, QkdOptions())), 20)
        stream = await asyncio.wait_for(pair.handshake(pair.client(moved, QkdOptions())), 20)
        await stream.close()
    assert GroupName.qkd_mlkem768 == 0x3768
    assert 0x3768 in GroupName.allKEM and 0x3769 in GroupName.allKEM
    async with loopback_pair(stock, tls_engine="tlslite") as pair:
        stream = await asyncio.wait_for(pair.handshake(pair.client(stock, QkdOptions())), 20)
        await stream.close()


def test_record_aead_round_trip_and_tamper() -> None:
    aead = tlslite_glue._create_aes_gcm(bytes(32))
    assert aead.name == "aes256gcm"
    sealed = aead.seal(bytes(12), b"plaintext", b"aad")
    assert aead.open(bytes(12), sealed, b"aad") == bytearray(b"plaintext")
    assert aead.open(bytes(12), sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad") is None
    chacha = tlslite_glue._create_chacha20(bytes(32))
    assert chacha.open(bytes(12), chacha.seal(bytes(12), b"x", b""), b"") == bytearray(b"x")


def test_self_test_runs_a_handshake_and_catches_a_changed_behaviour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if a tlslite release kept the server's traffic secret somewhere else: every name
    # still exists, only the behaviour differs, and a name check alone would pass.
    original = tlslite.session.Session.create

    def create(self: tlslite.session.Session, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        self.sr_app_secret = bytearray(len(self.sr_app_secret))

    monkeypatch.setattr(tlslite.session.Session, "create", create)
    with pytest.raises(tlslite_glue.SelfTestError, match="keys differ"):
        tlslite_glue.self_test()
