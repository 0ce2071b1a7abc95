"""The ClientHello a real client sends, padded as tlslite would pad it.

The glue skips tlslite's padding check (a second serialisation of the hello) when the key
shares alone exceed 511 bytes. On the wire, each client's hello must keep the shape tlslite
gives it: the same extensions in the same order, the same lengths, padding where tlslite
adds padding (hellos of 256 to 511 bytes), and the 511/512-byte share boundary on both sides.
"""

from __future__ import annotations

import pytest
from tlslite.handshakehelpers import HandshakeHelpers

from qkdproxy.core.tls import tlslite_glue as glue
from qkdproxy.core.tls.keyexchange import QkdOptions
from qkdproxy.tools.loopback import loopback_pair
from tests.integration.test_hostile import QKD, kems
from tests.integration.test_wire_hello import (
    capture_client_hello,
    first_message,
    split_client_hello,
)

EXT_PADDING = 21
Shape = tuple[int, list[tuple[int, int]]]


async def hello_shape(names: tuple[str, ...], engine: str = "tlslite") -> Shape:
    """The length of the ClientHello a real client offering ``names`` sends, and its
    extensions as (type, length): the random parts differ between hellos, these do not."""
    async with loopback_pair(kems(QKD), tls_engine=engine) as pair:
        hello = first_message(await capture_client_hello(pair.client(kems(*names), QkdOptions())))
    _, extensions = split_client_hello(hello[4:])
    return len(hello), [(ext_type, len(data)) for ext_type, data in extensions]


PADDING_CASES = pytest.mark.parametrize(
    ("names", "padded"),
    [
        # Shares of 32 to 97 bytes: hellos of 256 to 511 bytes, tlslite's check runs.
        (("x25519",), True),
        (("secp256r1",), True),
        (("secp384r1",), True),
        (("x25519", "secp256r1", "secp384r1"), True),
        # Shares over 511 bytes: the check is skipped.
        (("MLKEM768",), False),
        ((QKD,), False),
        ((QKD, "x25519"), False),
    ],
)


@PADDING_CASES
async def test_the_wire_hello_is_padded_as_tlslite_pads_it(
    names: tuple[str, ...], padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = await hello_shape(names)
    assert HandshakeHelpers.alignClientHelloPadding is glue._align_client_hello_padding
    monkeypatch.setattr(
        HandshakeHelpers, "alignClientHelloPadding", staticmethod(glue._tlslite_align_padding)
    )
    theirs = await hello_shape(names)
    assert ours == theirs
    assert any(ext_type == EXT_PADDING for ext_type, _ in ours[1]) == padded


@PADDING_CASES
async def test_the_native_hello_is_padded_by_the_same_rule(
    names: tuple[str, ...], padded: bool
) -> None:
    """The native engine's hellos are shorter (fewer extensions) but follow the same rule:
    never 256 to 511 bytes long; padding only ever brings one to 512."""
    length, extensions = await hello_shape(names, engine="native")
    body = length - 4
    assert not 256 <= body <= 511
    if any(ext_type == EXT_PADDING for ext_type, _ in extensions):
        assert body == 512
