"""Hostile-input fuzzing of every parser that sees bytes from the network or from a KME.

Pure (no sockets): hypothesis properties over generated and *mutated valid* inputs (bit flips,
truncation, length-field edits, insertions, oversize), since random bytes alone rarely get
past the first check. The invariant everywhere: the parser returns a well-formed value or
raises its own typed error, never anything else; where a value comes back, it is checked
against what was sent (round trips, canonical re-encoding, no fabricated bytes).

Budget: each test runs a small number of examples by default (the whole file stays cheap in
the normal suite). Set ``QKDPROXY_FUZZ_EXAMPLES`` to run every fuzz test (here and in
``test_fuzz_network.py``) with that many examples instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import ipaddress
import itertools
import json
import math
import os
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qkdproxy.core.etsi004.codec import (
    HEADER_SIZE as ETSI004_HEADER_SIZE,
)
from qkdproxy.core.etsi004.codec import (
    KSID_SIZE,
    MIMETYPE_SIZE,
    CloseRequest,
    CloseResponse,
    CloseServer,
    CodecError,
    ErrorFrame,
    GetKeyRequest,
    GetKeyResponse,
    OpenConnectRequest,
    OpenConnectResponse,
    QoS,
    decode,
)
from qkdproxy.core.etsi004.codec import (
    FrameDecoder as Etsi004Decoder,
)
from qkdproxy.core.etsi004.codec import (
    Status as Etsi004Status,
)
from qkdproxy.core.etsi004.codec import encode as etsi004_encode
from qkdproxy.core.etsi014.models import (
    ErrorBody,
    Etsi014FormatError,
    KeyContainer,
    KeyIds,
    KeyRequest,
    Status,
)
from qkdproxy.core.hybrid import KEY_ID_SIZE, ZERO_KEY_ID, HybridKem, detach_key_id
from qkdproxy.core.kem.base import KemError
from qkdproxy.core.keys import KeyNotFoundError, QkdKey, QkdKeyError
from qkdproxy.core.peer.frames import (
    MAX_PAYLOAD as FRAME_MAX_PAYLOAD,
)
from qkdproxy.core.peer.frames import (
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
)
from qkdproxy.core.peer.frames import (
    encode as frame_encode,
)
from qkdproxy.core.proxyv2 import (
    FAMILY_TCP4,
    FAMILY_TCP6,
    FAMILY_UNSPEC,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_QKDPROXY_GROUP,
    PP2_TYPE_QKDPROXY_PEER,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    SIGNATURE,
    ProxyInfo,
    encode_proxy_v2,
)
from qkdproxy.core.tls.hello import (
    EXT_KEY_SHARE,
    EXT_SUPPORTED_GROUPS,
    EXT_SUPPORTED_VERSIONS,
    HELLO_RETRY_RANDOM,
    ClientHello,
    HelloParseError,
    KeyShareEntry,
    ServerHello,
    parse_client_hello,
    parse_server_hello,
)
from qkdproxy.core.tls.keyexchange import (
    ClientKeyExchange,
    HandshakeRejectedError,
    ServerKeyExchange,
)
from qkdproxy.core.tls.records import HEADER, TrafficKeys, open_records, seal
from qkdproxy.core.tls.wire import (
    MAX_HELD_BYTES,
    MAX_HELLO_SIZE,
    MAX_PLAINTEXT_RECORD,
    RECORD_HEADER_SIZE,
    Alert,
    GateEvent,
    HandshakeType,
    HeldHello,
    HelloGate,
    Release,
)
from qkdproxy.daemon.config import Config, ConfigError, load_config
from qkdproxy.io.peer_channel import PeerChannel
from qkdproxy.io.tls_stream import TlsStream, TlsStreamError
from qkdproxy.keys.announce import AnnouncedSlave
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.etsi014_client import KmeProtocolError, _container, _decode, error_for
from qkdproxy.keys.key_supply import run
from qkdproxy.keys.sources import KeySources
from qkdproxy.sim.inprocess import InProcessQkdLink
from qkdproxy.tools.loopback import resolve_groups
from tests.integration.test_wire_hello import Captured, _capture

# ================================================================== budget and mutation

FUZZ_EXAMPLES_ENV = "QKDPROXY_FUZZ_EXAMPLES"


def fuzz_examples(default: int) -> int:
    """``default``, or the number in ``QKDPROXY_FUZZ_EXAMPLES`` (the one place it is read)."""
    text = os.environ.get(FUZZ_EXAMPLES_ENV, "").strip()
    return int(text) if text else default


def fuzz_settings(default: int) -> settings:
    """Hypothesis settings of one fuzz test (no deadline: examples vary a lot in cost)."""
    return settings(
        max_examples=fuzz_examples(default),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
            HealthCheck.large_base_example,
        ],
    )


# (offset, size): a big-endian length field inside some bytes.
LengthField = tuple[int, int]
# Bytes plus the length fields they contain; built up by the helpers below.
Piece = tuple[bytes, tuple[LengthField, ...]]

MUTATIONS = ("flip", "byte", "truncate", "delete", "insert", "duplicate", "length", "append")


def raw(data: bytes) -> Piece:
    return data, ()


def cat(*pieces: Piece) -> Piece:
    out, fields = bytearray(), list[LengthField]()
    for data, inner in pieces:
        fields += [(offset + len(out), size) for offset, size in inner]
        out += data
    return bytes(out), tuple(fields)


def vector(size: int, *pieces: Piece) -> Piece:
    """A TLS-style vector: ``size``-byte length, then the pieces."""
    body, fields = cat(*pieces)
    return len(body).to_bytes(size, "big") + body, (
        (0, size),
        *((offset + size, s) for offset, s in fields),
    )


# One mutation: its kind, where (a fraction of the length, in 1/65536), an amount, and
# bytes to insert or append. Drawn independently of the seed's content, so an example
# replays identically even when the seed is fresh each time (a real peer's random hello).
Mutation = tuple[str, int, int, bytes]
mutation_plans = st.lists(
    st.tuples(
        st.sampled_from(MUTATIONS),
        st.integers(0, 2**16 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=1, max_size=64),
    ),
    min_size=1,
    max_size=4,
)
SPECIAL_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF)


def apply_mutations(seed: bytes, fields: Sequence[LengthField], plan: Sequence[Mutation]) -> bytes:
    """``seed`` after ``plan``: bit flips, byte overwrites, truncation, deletion, insertion,
    duplication, length-field edits (0, 1, off by one, doubled, maximal) and oversize."""
    data = bytearray(seed)
    for kind, where, amount, chunk in plan:
        pos = where * len(data) >> 16
        if kind == "flip" and data:
            data[pos] ^= 1 << (amount % 8)
        elif kind == "byte" and data:
            data[pos] = SPECIAL_BYTES[amount % 5] if amount & 0x100 else amount % 256
        elif kind == "truncate":
            del data[pos:]
        elif kind == "delete":
            del data[pos : pos + 1 + amount % 64]
        elif kind == "insert":
            data[pos:pos] = chunk
        elif kind == "duplicate" and data:
            data[pos:pos] = data[pos : pos + 1 + amount % 256]
        elif kind == "length" and fields:
            offset, size = fields[where % len(fields)]
            if offset + size <= len(data):
                old = int.from_bytes(data[offset : offset + size], "big")
                top = 256**size - 1
                choices = (0, 1, old - 1, old + 1, old * 2, top, top // 2)
                new = choices[amount % 8] if amount % 8 < 7 else amount >> 3
                data[offset : offset + size] = (new % (top + 1)).to_bytes(size, "big")
        else:  # append (and the fallback of the kinds above on empty data)
            data += bytes(2**14 if amount % 2 else 2**16 + 1) if amount % 5 == 0 else chunk
    return bytes(data)


def mutated(seed: bytes, fields: Sequence[LengthField] = ()) -> st.SearchStrategy[bytes]:
    """``seed`` after 1-4 structural mutations; ``fields`` are its length fields."""
    return mutation_plans.map(lambda plan: apply_mutations(seed, fields, plan))


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


# ====================================================================== real hellos


@pytest.fixture(scope="module")
def real() -> Iterator[dict[str, Captured]]:
    """Hellos captured once from a real client and server (QKD and the triple hybrid)."""
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        yield {
            "qkd": runner.run(_capture(("qkd_mlkem768", "X25519MLKEM768"))),
            "triple": runner.run(_capture(("qkd_x25519mlkem768", "qkd_mlkem768"))),
        }


def client_hello_fields(body: bytes) -> tuple[LengthField, ...]:
    """Every length field of a well-formed ClientHello body."""
    fields: list[LengthField] = [(34, 1)]
    pos = 35 + body[34]
    fields.append((pos, 2))
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    fields.append((pos, 1))
    pos += 1 + body[pos]
    fields.append((pos, 2))
    fields += _extension_fields(body, pos + 2, len(body))
    return tuple(fields)


def server_hello_fields(body: bytes) -> tuple[LengthField, ...]:
    """Every length field of a well-formed ServerHello body."""
    pos = 35 + body[34] + 3
    return ((34, 1), (pos, 2), *_extension_fields(body, pos + 2, len(body), server=True))


def _extension_fields(body: bytes, pos: int, end: int, server: bool = False) -> list[LengthField]:
    fields: list[LengthField] = []
    while pos + 4 <= end:
        ext_type = int.from_bytes(body[pos : pos + 2], "big")
        length = int.from_bytes(body[pos + 2 : pos + 4], "big")
        fields.append((pos + 2, 2))
        data = pos + 4
        if ext_type == EXT_KEY_SHARE and server:
            fields.append((data + 2, 2))
        elif ext_type == EXT_KEY_SHARE:
            fields.append((data, 2))
            entry = data + 2
            while entry + 4 <= data + length:
                fields.append((entry + 2, 2))
                entry += 4 + int.from_bytes(body[entry + 2 : entry + 4], "big")
        elif ext_type == EXT_SUPPORTED_GROUPS:
            fields.append((data, 2))
        elif ext_type == EXT_SUPPORTED_VERSIONS and not server:
            fields.append((data, 1))
        pos = data + length
    return fields


def handshake_piece(msg_type: int, body: Piece) -> Piece:
    return cat(raw(bytes([msg_type])), vector(3, body))


def record_pieces(message: Piece, sizes: Sequence[int], content_type: int = 22) -> Piece:
    """``message`` cut into plaintext records (``sizes``, the last one taking the rest)."""
    data, fields = message
    out: list[Piece] = []
    pos = 0
    for size in [*sizes, len(data)]:
        if pos >= len(data):
            break
        end = min(pos + max(size, 1), len(data))
        inner = tuple((o - pos, s) for o, s in fields if pos <= o and o + s <= end)
        out.append(cat(raw(bytes([content_type, 3, 3])), vector(2, (data[pos:end], inner))))
        pos = end
    return cat(*out)


# ============================================================ TLS hellos: generated


GROUP_CODES = [0x3768, 0x11EC, 0x001D, 0x0017, 0x0200, 0xFE30, 0x1234]
EXTENSION_TYPES = [0, 10, 13, 16, 43, 45, 51, 0xFAFA]


@dataclass(frozen=True, slots=True)
class Generated:
    """A generated hello body, its length fields, and what the parser must return (None:
    it must refuse the body)."""

    body: bytes
    fields: tuple[LengthField, ...]
    expected: ClientHello | ServerHello | None


@st.composite
def client_hellos(draw: st.DrawFn) -> Generated:
    valid = True
    session_id = draw(st.binary(max_size=34))
    valid &= len(session_id) <= 32
    suites = draw(st.lists(st.sampled_from([0x1301, 0x1302, 0x1303, 0xC02F, 0x00FF]), max_size=4))
    valid &= bool(suites)
    types = draw(st.lists(st.sampled_from(EXTENSION_TYPES), max_size=6))
    valid &= len(set(types)) == len(types)
    extensions: list[Piece] = []
    groups: tuple[int, ...] = ()
    shares: tuple[KeyShareEntry, ...] = ()
    versions: tuple[int, ...] = ()
    for ext_type in types:
        if ext_type == EXT_SUPPORTED_GROUPS:
            groups = tuple(draw(st.lists(st.sampled_from(GROUP_CODES), max_size=5)))
            valid &= bool(groups)
            data = vector(2, raw(b"".join(map(u16, groups))))
        elif ext_type == EXT_SUPPORTED_VERSIONS:
            versions = tuple(draw(st.lists(st.sampled_from([0x0304, 0x0303, 0x7F1C]), max_size=4)))
            valid &= bool(versions)
            data = vector(1, raw(b"".join(map(u16, versions))))
        elif ext_type == EXT_KEY_SHARE:
            entries = draw(
                st.lists(
                    st.tuples(st.sampled_from(GROUP_CODES), st.binary(max_size=40)), max_size=3
                )
            )
            shares = tuple(KeyShareEntry(g, ke) for g, ke in entries)
            share_groups = [g for g, _ in entries]
            valid &= len(set(share_groups)) == len(share_groups) and all(ke for _, ke in entries)
            data = vector(2, *(cat(raw(u16(g)), vector(2, raw(ke))) for g, ke in entries))
        else:
            data = raw(draw(st.binary(max_size=20)))
        extensions.append(cat(raw(u16(ext_type)), vector(2, data)))
    with_block = bool(types) or draw(st.booleans())
    body = cat(
        raw(b"\x03\x03" + draw(st.binary(min_size=32, max_size=32))),
        vector(1, raw(session_id)),
        vector(2, raw(b"".join(map(u16, suites)))),
        vector(1, raw(draw(st.sampled_from([b"\0", b"\1\0"])))),
        vector(2, *extensions) if with_block else raw(b""),
    )
    expected = ClientHello(groups, shares, versions, tuple(suites)) if valid else None
    return Generated(body[0], body[1], expected)


@st.composite
def server_hellos(draw: st.DrawFn) -> Generated:
    valid = True
    retry_random = draw(st.booleans())
    session_id = draw(st.binary(max_size=34))
    valid &= len(session_id) <= 32
    types = draw(st.lists(st.sampled_from([43, 51, 41, 0xFAFA]), max_size=4))
    valid &= len(set(types)) == len(types)
    hello_retry = retry_random and EXT_SUPPORTED_VERSIONS in types
    group: int | None = None
    key_exchange: bytes | None = None
    extensions: list[Piece] = []
    for ext_type in types:
        if ext_type == EXT_KEY_SHARE:
            group = draw(st.sampled_from(GROUP_CODES))
            if draw(st.booleans()):  # the HelloRetryRequest form: the group alone
                data = raw(u16(group))
                valid &= hello_retry
            else:
                key_exchange = draw(st.binary(max_size=40))
                data = cat(raw(u16(group)), vector(2, raw(key_exchange)))
                valid &= not hello_retry and bool(key_exchange)
        elif ext_type == EXT_SUPPORTED_VERSIONS:
            data = raw(b"\x03\x04")
        else:
            data = raw(draw(st.binary(max_size=20)))
        extensions.append(cat(raw(u16(ext_type)), vector(2, data)))
    random = HELLO_RETRY_RANDOM if retry_random else draw(st.binary(min_size=32, max_size=32))
    body = cat(
        raw(b"\x03\x03" + random),
        vector(1, raw(session_id)),
        raw(b"\x13\x01\x00"),
        vector(2, *extensions),
    )
    if hello_retry:
        key_exchange = None
    expected = ServerHello(hello_retry, group, key_exchange) if valid else None
    return Generated(body[0], body[1], expected)


@fuzz_settings(300)
@given(client_hellos())
def test_generated_client_hellos_parse_to_exactly_their_fields(case: Generated) -> None:
    if case.expected is None:
        with pytest.raises(HelloParseError):
            parse_client_hello(case.body)
    else:
        assert parse_client_hello(case.body) == case.expected


@fuzz_settings(300)
@given(server_hellos())
def test_generated_server_hellos_parse_to_exactly_their_fields(case: Generated) -> None:
    if case.expected is None:
        with pytest.raises(HelloParseError):
            parse_server_hello(case.body)
    else:
        assert parse_server_hello(case.body) == case.expected


def assert_sane_client_hello(hello: ClientHello, body: bytes) -> None:
    """What a parse that succeeded on hostile bytes may return: nothing invented."""
    groups = [s.group for s in hello.key_shares]
    assert len(groups) == len(set(groups))
    for share in hello.key_shares:
        assert share.key_exchange and share.key_exchange in body
    assert hello.cipher_suites
    for values in (hello.supported_groups, hello.versions, hello.cipher_suites):
        assert all(0 <= v <= 0xFFFF for v in values)


def assert_sane_server_hello(hello: ServerHello, body: bytes) -> None:
    if hello.hello_retry:
        assert hello.key_exchange is None
        assert body[2:34] == HELLO_RETRY_RANDOM
    elif hello.key_exchange is not None:
        assert hello.key_exchange in body
        assert hello.group is not None


@fuzz_settings(400)
@given(st.data(), st.sampled_from(["qkd", "triple", "generated"]))
def test_mutated_client_hellos_raise_only_hello_parse_error(
    real: dict[str, Captured], data: st.DataObject, source: str
) -> None:
    if source == "generated":
        case = data.draw(client_hellos())
        seed, fields = case.body, case.fields
    else:
        seed = real[source].client_body
        fields = client_hello_fields(seed)
    body = data.draw(mutated(seed, fields))
    try:
        hello = parse_client_hello(body)
    except HelloParseError as exc:
        event(f"refused: {str(exc).split(' ')[0]}")
        return
    event("parsed")
    assert_sane_client_hello(hello, body)


@fuzz_settings(400)
@given(st.data(), st.sampled_from(["qkd", "triple", "generated"]))
def test_mutated_server_hellos_raise_only_hello_parse_error(
    real: dict[str, Captured], data: st.DataObject, source: str
) -> None:
    if source == "generated":
        case = data.draw(server_hellos())
        seed, fields = case.body, case.fields
    else:
        seed = real[source].server_body
        fields = server_hello_fields(seed)
    body = data.draw(mutated(seed, fields))
    try:
        hello = parse_server_hello(body)
    except HelloParseError as exc:
        event(f"refused: {str(exc).split(' ')[0]}")
        return
    event("parsed")
    assert_sane_server_hello(hello, body)


@fuzz_settings(200)
@given(st.data())
def test_a_changed_extensions_block_length_is_always_refused(
    real: dict[str, Captured], data: st.DataObject
) -> None:
    """The outermost length of the extensions must match exactly (strict parsing)."""
    body = bytearray(real[data.draw(st.sampled_from(["qkd", "triple"]))].client_body)
    offset = client_hello_fields(bytes(body))[3][0]
    old = int.from_bytes(body[offset : offset + 2], "big")
    new = data.draw(st.integers(0, 0xFFFF).filter(lambda n: n != old))
    body[offset : offset + 2] = u16(new)
    with pytest.raises(HelloParseError):
        parse_client_hello(bytes(body))


# ======================================================================= the hello gate


def gate_run(
    expect: HandshakeType, chunks: Sequence[bytes], allow_another: bool = False
) -> tuple[HelloGate, list[GateEvent]]:
    gate = HelloGate(expect)
    if allow_another:
        gate.allow_another()
    events: list[GateEvent] = []
    for chunk in chunks:
        events += gate.feed(chunk)
    return gate, events


def emitted(events: Sequence[GateEvent]) -> bytes:
    return b"".join(e.data if isinstance(e, Release) else e.records for e in events)


def chunked(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def gate_seed(capture: Captured, which: str, sizes: Sequence[int]) -> Piece:
    """Records carrying a real hello (fragmented at ``sizes``), as a client or server sends."""
    if which == "client":
        body = capture.client_body
        message = handshake_piece(HandshakeType.CLIENT_HELLO, (body, client_hello_fields(body)))
    else:
        body = capture.server_body
        message = handshake_piece(HandshakeType.SERVER_HELLO, (body, server_hello_fields(body)))
    ccs = raw(bytes([20, 3, 3, 0, 1, 1]))
    after = raw(b"\x17\x03\x03\x00\x05abcde")
    return cat(record_pieces(message, sizes), ccs, after)


@fuzz_settings(300)
@given(
    data=st.data(),
    which=st.sampled_from(["client", "server"]),
    sizes=st.lists(st.integers(1, 3000), max_size=4),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    allow_another=st.booleans(),
)
def test_gate_on_mutated_records_conserves_bytes_and_bounds_memory(
    real: dict[str, Captured],
    data: st.DataObject,
    which: str,
    sizes: list[int],
    cuts: list[int],
    allow_another: bool,
) -> None:
    seed, fields = gate_seed(real["qkd"], which, sizes)
    wire = data.draw(mutated(seed, fields) | st.binary(max_size=600))
    expect = HandshakeType.CLIENT_HELLO if which == "client" else HandshakeType.SERVER_HELLO
    gate, events = gate_run(expect, chunked(wire, cuts), allow_another)
    out = emitted(events)
    # Nothing invented, nothing reordered, nothing dropped: the engine sees a prefix of what
    # arrived, and everything once the gate has stopped intercepting.
    assert wire.startswith(out)
    if gate.passthrough:
        assert out == wire
    assert len(wire) - len(out) <= MAX_HELD_BYTES + RECORD_HEADER_SIZE + MAX_PLAINTEXT_RECORD
    hellos = [e for e in events if isinstance(e, HeldHello)]
    event(f"held {len(hellos)} hello(s), passthrough={gate.passthrough}")
    assert len(hellos) <= (2 if allow_another else 1)
    for hello in hellos:
        assert hello.msg_type == expect
        assert int.from_bytes(hello.message[1:4], "big") == len(hello.body) <= MAX_HELLO_SIZE
        parse = parse_client_hello if which == "client" else parse_server_hello
        with contextlib.suppress(HelloParseError):
            parse(hello.body)
    # Chunking does not matter: all at once gives the same stream and the same hellos.
    _, whole = gate_run(expect, [wire], allow_another)
    assert emitted(whole) == out
    assert [h.message for h in hellos] == [e.message for e in whole if isinstance(e, HeldHello)]


# ============================================================== key shares and hybrids


HYBRID_NAMES = ("qkd_mlkem768", "qkd_x25519mlkem768", "X25519MLKEM768", "x25519", "secp256r1")


Hybrids = dict[str, HybridKem]


@pytest.fixture(scope="module")
def hybrids() -> Hybrids:
    return dict(zip(HYBRID_NAMES, resolve_groups(HYBRID_NAMES), strict=True))


@fuzz_settings(200)
@given(name=st.sampled_from(HYBRID_NAMES), data=st.data(), what=st.sampled_from(["public", "ct"]))
def test_hybrid_share_splitting_raises_only_kem_error(
    hybrids: Hybrids, name: str, data: st.DataObject, what: str
) -> None:
    hybrid = hybrids[name]
    private, public = hybrid.generate()
    if what == "public":
        value = data.draw(mutated(public) | st.binary(max_size=2000) | st.just(public))
        try:
            ciphertext, secret = hybrid.encapsulate(value)
        except KemError:
            assert value != public
        else:
            assert len(value) == hybrid.public_size
            assert len(ciphertext) == hybrid.ciphertext_size
            assert len(secret) + (32 if hybrid.group.qkd else 0) == hybrid.secret_size
    else:
        ciphertext, secret = hybrid.encapsulate(public)
        value = data.draw(mutated(ciphertext) | st.just(ciphertext))
        try:
            recovered = hybrid.decapsulate(private, value)
        except KemError:
            assert value != ciphertext
        else:
            assert len(value) == hybrid.ciphertext_size
            if value == ciphertext:
                assert recovered == secret
    share = data.draw(st.binary(max_size=64))
    try:
        body, key_id = detach_key_id(share, 40)
    except KemError:
        assert len(share) != 40 + KEY_ID_SIZE
    else:
        assert body + key_id == share and len(key_id) == KEY_ID_SIZE


SERVER_ALERTS = {Alert.ILLEGAL_PARAMETER, Alert.HANDSHAKE_FAILURE}


@fuzz_settings(150)
@given(data=st.data(), preference=st.permutations(["qkd_mlkem768", "X25519MLKEM768", "x25519"]))
async def test_server_key_exchange_on_hostile_shares(
    hybrids: Hybrids, data: st.DataObject, preference: list[str]
) -> None:
    """A ClientHello with real, mutated or forged shares: a typed rejection, and every key the
    server took is settled (never more than one, never one for a share it could not use)."""
    link = InProcessQkdLink()
    master = link.sources("a").master
    assert master is not None
    genuine = await master.take_key()
    context = KeyContext(link.sources("b"))
    kex = ServerKeyExchange([hybrids[n] for n in preference], context)
    codes = {n: hybrids[n].group.code_point for n in preference}
    supported = data.draw(
        st.lists(st.sampled_from([*codes.values(), 0x1234, 0x0017]), min_size=1, max_size=4)
    )
    shares: dict[int, bytes] = {}
    for name in data.draw(st.lists(st.sampled_from(preference), unique=True, max_size=3)):
        hybrid = hybrids[name]
        _, public = hybrid.generate()
        key_id = data.draw(st.sampled_from([genuine.key_id, ZERO_KEY_ID, b"\x42" * KEY_ID_SIZE]))
        share = public + (key_id if hybrid.group.qkd else b"")
        shares[codes[name]] = data.draw(st.just(share) | mutated(share) | st.binary(max_size=80))
    hello = ClientHello(
        tuple(supported),
        tuple(KeyShareEntry(g, ke) for g, ke in shares.items() if ke),
        (0x0304,),
        (0x1301,),
    )
    rejected: HandshakeRejectedError | None = None
    try:
        retry = await run(kex.on_client_hello(hello))
    except HandshakeRejectedError as exc:
        rejected = exc
    event("rejected" if rejected is not None else "accepted")
    if rejected is not None:
        assert rejected.alert in SERVER_ALERTS
        assert context.ledger.taken == 0
    else:
        chosen = kex.chosen
        assert chosen is not None and chosen.group.code_point in supported
        if retry:
            assert hello.share_for(chosen.group.code_point) is None
            assert context.ledger.taken == 0
        else:
            share = shares[chosen.group.code_point]
            assert len(share) == chosen.client_share_size
            answer, _ = kex.key_share(chosen.group.code_point)
            assert len(answer) == chosen.server_share_size
            assert context.ledger.taken == (1 if chosen.group.qkd else 0)
            if chosen.group.qkd and share[-KEY_ID_SIZE:] != ZERO_KEY_ID:
                assert share[-KEY_ID_SIZE:] == genuine.key_id  # only a real key was fetched
                assert answer[-KEY_ID_SIZE:] == genuine.key_id  # and echoed
    await run(kex.finish(False))
    ledger = context.ledger
    assert ledger.taken == ledger.consumed + ledger.wasted and ledger.consumed == 0


@fuzz_settings(150)
@given(data=st.data(), name=st.sampled_from(["qkd_mlkem768", "qkd_x25519mlkem768", "x25519"]))
async def test_client_key_exchange_on_hostile_server_hellos(
    hybrids: Hybrids, data: st.DataObject, name: str
) -> None:
    """The client's answer to a real ServerHello share, mutated: a typed rejection, or a
    secret only when the server echoed the client's own key id (client-initiated flow)."""
    link = InProcessQkdLink()
    hybrid = hybrids[name]
    code = hybrid.group.code_point
    client_context = KeyContext(link.sources("a"))
    client = ClientKeyExchange([hybrid, hybrids["X25519MLKEM768"]], client_context)
    await run(client.offer(code))
    share, _ = client.key_share(code)
    server = ServerKeyExchange([hybrid], KeyContext(link.sources("b")))
    await run(server.on_client_hello(ClientHello((code,), (KeyShareEntry(code, share),), (), ())))
    answer, _ = server.key_share(code)
    group = data.draw(st.sampled_from([code, code, hybrids["X25519MLKEM768"].group.code_point, 7]))
    retry = data.draw(st.booleans())
    key_exchange = data.draw(st.just(answer) | mutated(answer) | st.binary(max_size=64))
    hello = ServerHello(retry, group, None if retry else key_exchange)
    rejected: HandshakeRejectedError | None = None
    try:
        await run(client.on_server_hello(hello))
    except HandshakeRejectedError as exc:
        rejected = exc
    event("rejected" if rejected is not None else "retry" if retry else "accepted")
    if rejected is not None:
        assert rejected.alert == Alert.ILLEGAL_PARAMETER
    elif retry:  # a valid retry: the client offered again; the same retry is refused
        # (the one-retry rule itself, unexpected_message, is the connection's: see
        # tests/unit/test_connection.py)
        with pytest.raises(HandshakeRejectedError) as second:
            await run(client.on_server_hello(hello))
        assert second.value.alert == Alert.ILLEGAL_PARAMETER
    else:
        assert group == code
        if hybrid.group.qkd:
            assert key_exchange[-KEY_ID_SIZE:] == share[-KEY_ID_SIZE:]
        secret = client.shared_secret(code, key_exchange)
        if key_exchange == answer:
            assert secret == server.shared_secret(code, share)
    await run(client.finish(False))
    ledger = client_context.ledger
    assert ledger.outstanding == 0 and ledger.consumed == 0
    assert ledger.taken <= 2


# ======================================================================= TLS records

KEY = bytes(range(32))
IV = int.from_bytes(bytes(range(100, 112)), "big")


@dataclass
class Counter:
    seqnum: int = 0


def traffic_keys(chacha: bool) -> TrafficKeys:
    aead = ChaCha20Poly1305(KEY) if chacha else AESGCM(KEY)
    return TrafficKeys(aead, IV, Counter())


@fuzz_settings(300)
@given(buffer=st.binary(max_size=3000), chacha=st.booleans())
def test_open_records_on_random_bytes_opens_nothing(buffer: bytes, chacha: bool) -> None:
    keys = traffic_keys(chacha)
    opened = open_records(keys, buffer)
    assert not opened.data and not opened.records and opened.consumed == 0
    assert keys.state.seqnum == 0


@fuzz_settings(300)
@given(
    messages=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    data=st.data(),
    chacha=st.booleans(),
    op=st.sampled_from(["mutate", "reorder", "replay", "drop", "splice"]),
)
def test_open_records_never_returns_altered_replayed_or_reordered_data(
    messages: list[bytes], data: st.DataObject, chacha: bool, op: str
) -> None:
    sender = traffic_keys(chacha)
    records = [bytes(seal(sender, m)) if m else seal_empty(sender) for m in messages]
    if op == "mutate":
        seed = cat(*(cat(raw(r[:3]), (r[3:5], ((0, 2),)), raw(r[5:])) for r in records))
        wire = data.draw(mutated(*seed))
    else:
        i = data.draw(st.integers(0, len(records) - 1))
        j = data.draw(st.integers(0, len(records) - 1))
        changed = list(records)
        if op == "reorder":
            changed[i], changed[j] = changed[j], changed[i]
        elif op == "replay":
            changed.insert(j, records[i])
        elif op == "drop":
            del changed[i]
        else:  # a record sealed with the same keys for another position
            other = traffic_keys(chacha)
            other.state.seqnum = data.draw(st.integers(0, 10).filter(lambda n: n != j))
            changed.insert(j, bytes(seal(other, b"injected")))
        wire = b"".join(changed)
    receiver = traffic_keys(chacha)
    opened = open_records(receiver, wire)
    count = opened.records
    opened_all = count == len(records) and opened.consumed == len(wire)
    event("opened all" if opened_all else f"opened {'some' if count else 'none'}")
    # Whatever comes out is the genuine sequence, from the start, and nothing after a
    # record that fails: the rest is tlslite's (which sends bad_record_mac).
    assert opened.data == b"".join(messages[:count])
    assert receiver.state.seqnum == count
    assert wire[: opened.consumed] == b"".join(records[:count])
    assert opened.consumed <= len(wire)


def seal_empty(keys: TrafficKeys) -> bytes:
    """An application-data record with no content (legal; seal() sends none)."""
    inner = b"\x17"
    header = HEADER.pack(0x17, 0x0303, len(inner) + 16)
    record = header + keys.aead.encrypt(keys.nonce(), inner, header)
    keys.state.seqnum += 1
    return record


# ===================================================================== qkdproxy/1 frames


@st.composite
def frame_streams(draw: st.DrawFn) -> Piece:
    """A valid ``qkdproxy/1`` byte stream with its length fields."""
    pieces: list[Piece] = []
    for kind in draw(st.lists(st.sampled_from(list(FrameType)), min_size=1, max_size=6)):
        if kind is FrameType.DATA:
            payload = draw(st.binary(max_size=200))
        elif kind is FrameType.FIN:
            payload = b""
        else:
            count = draw(st.integers(1, 4))
            payload = draw(st.binary(min_size=16 * count, max_size=16 * count))
        pieces.append(cat(raw(bytes([kind])), vector(3, raw(payload))))
    return cat(*pieces)


def bytewise_frames(wire: bytes) -> tuple[list[Frame], bool]:
    """The reference: frames decoded one byte at a time, and whether the stream is broken."""
    decoder, frames = FrameDecoder(), list[Frame]()
    for i in range(len(wire)):
        try:
            frames += decoder.feed(wire[i : i + 1])
        except FrameError:
            return frames, True
    return frames, False


@fuzz_settings(300)
@given(data=st.data(), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_frame_decoder_is_chunking_independent_on_hostile_streams(
    data: st.DataObject, cuts: list[int]
) -> None:
    seed = data.draw(frame_streams())
    wire = data.draw(mutated(*seed) | st.just(seed[0]) | st.binary(max_size=300))
    expected, broken = bytewise_frames(wire)
    decoder, frames, failed = FrameDecoder(), list[Frame](), False
    for chunk in chunked(wire, cuts):
        try:
            frames += decoder.feed(chunk)
        except FrameError:
            failed = True
            break
        # An announced length over the limit fails at once: no payload is ever buffered.
        assert decoder.pending <= 4 + FRAME_MAX_PAYLOAD
    event("broken" if failed else "decoded")
    assert failed == broken
    assert frames == expected[: len(frames)]
    if not failed:
        assert frames == expected
    for frame in frames:
        if frame.type in (FrameType.KEY_IDS, FrameType.KSIDS):
            ids = frame.key_ids()
            assert ids and all(len(k) == 16 for k in ids) and b"".join(ids) == frame.payload
        if frame.type is FrameType.FIN:
            assert frame.payload == b""


@dataclass
class FakeStream:
    """Stands in for a TlsStream: hands out the given chunks, then a clean end."""

    chunks: list[bytes]
    closed: bool = False
    written: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A real stream returns b"" only at the end.
        self.chunks = [c for c in self.chunks if c]

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    async def close(self) -> None:
        self.closed = True


@dataclass
class Sink:
    """A slave/stream key source that records the ids announced to it."""

    announced_ids: list[bytes] = field(default_factory=list)

    def announced(self, key_ids: Sequence[bytes]) -> None:
        self.announced_ids += key_ids

    async def get_key(self, key_id: bytes) -> QkdKey:
        raise KeyNotFoundError("not in this test")


@fuzz_settings(200)
@given(data=st.data(), cuts=st.lists(st.integers(min_value=0), max_size=6))
async def test_peer_channel_on_hostile_frames(data: st.DataObject, cuts: list[int]) -> None:
    """The channel returns exactly the DATA before FIN, routes announcements, and turns any
    framing violation into TlsStreamError after closing the stream."""
    seed = data.draw(frame_streams())
    wire = data.draw(mutated(*seed) | st.just(seed[0]))
    stream = FakeStream(chunked(wire, cuts))
    slave, streams = Sink(), Sink()
    channel = PeerChannel(
        cast(TlsStream, stream), KeySources(slave=slave, stream=cast(Any, streams))
    )
    received = bytearray()
    try:
        while piece := await channel.receive():
            received += piece
    except TlsStreamError as exc:
        assert stream.closed
        error, truncated = True, exc.truncated
    else:
        error, truncated = False, False
    event("stream error" if error else "clean end")
    frames, broken = bytewise_frames(wire)
    fin = next((i for i, f in enumerate(frames) if f.type is FrameType.FIN), None)
    before_fin = frames if fin is None else frames[:fin]
    data_before = b"".join(f.payload for f in before_fin if f.type is FrameType.DATA)
    assert data_before.startswith(bytes(received))
    if not error:
        # A clean end needs FIN: a close_notify alone is a truncation.
        assert bytes(received) == data_before
        assert fin is not None
    elif truncated:
        assert fin is None and bytes(received) == data_before
    elif not broken:
        # Only DATA after FIN (in the same read) is refused without a decoding error.
        assert fin is not None
        assert any(f.type is FrameType.DATA and f.payload for f in frames[fin + 1 :])
    announced = [k for f in frames if f.type is FrameType.KEY_IDS for k in f.key_ids()]
    assert announced[: len(slave.announced_ids)] == slave.announced_ids
    assert all(len(k) == 16 for k in slave.announced_ids + streams.announced_ids)


async def test_peer_channel_refuses_data_after_fin_in_the_same_read() -> None:
    """Regression: DATA behind FIN in one read was delivered; in a later read it was not.
    Now it breaks the connection, like any framing violation (and, like one, takes the
    bytes of that read with it)."""
    wire = frame_encode(FrameType.DATA, b"a") + frame_encode(FrameType.FIN)
    wire += frame_encode(FrameType.DATA, b"after the end")
    stream = FakeStream([wire])
    channel = PeerChannel(cast(TlsStream, stream), KeySources())
    with pytest.raises(TlsStreamError, match="after FIN"):
        await channel.receive()
    assert stream.closed
    # Split over two reads, the stream simply ends at FIN, as it did before.
    stream = FakeStream([wire[:9], wire[9:]])
    channel = PeerChannel(cast(TlsStream, stream), KeySources())
    assert await channel.receive() == b"a"
    assert await channel.receive() == b""


# ====================================================================== key announcements


@dataclass
class OnceSlave:
    """A KME-like slave: each known key is delivered once, then it is unknown."""

    keys: dict[bytes, bytes]
    delivered: list[bytes] = field(default_factory=list)

    async def get_key(self, key_id: bytes) -> QkdKey:
        await asyncio.sleep(0)  # a real fetch yields to the loop
        material = self.keys.pop(bytes(key_id), None)
        if material is None:
            raise KeyNotFoundError("unknown or already delivered")
        self.delivered.append(bytes(key_id))
        return QkdKey(bytes(key_id), material)


@fuzz_settings(150)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["announce", "get", "tick", "settle"]),
            st.lists(st.integers(0, 11), max_size=6),
        ),
        max_size=25,
    ),
    max_keys=st.integers(1, 6),
)
async def test_announced_slave_never_hands_out_a_key_twice(
    ops: list[tuple[str, list[int]]], max_keys: int
) -> None:
    ids = [uuid.UUID(int=i + 1).bytes for i in range(12)]
    known = {k: os.urandom(32) for k in ids[:8]}  # ids 8..11 are unknown to the KME
    inner = OnceSlave(dict(known))
    now = [0.0]
    slave = AnnouncedSlave(inner, max_keys=max_keys, max_age_s=5.0, clock=lambda: now[0])
    handed: list[bytes] = []
    try:
        for op, picks in ops:
            chosen = [ids[i] for i in picks]
            if op == "announce":
                slave.announced(chosen)
            elif op == "get":
                for key_id in chosen[:1]:
                    try:
                        key = await slave.get_key(key_id)
                    except QkdKeyError:
                        continue
                    assert key.key_id == key_id and key.material == known[key_id]
                    handed.append(key_id)
            elif op == "tick":
                now[0] += 3.0
            else:
                await slave.wait_fetched()
            assert slave.depth <= max_keys
        await slave.wait_fetched()
    finally:
        await slave.aclose()
    event(f"handed out {len(handed)} key(s)")
    assert len(handed) == len(set(handed))
    assert len(inner.delivered) == len(set(inner.delivered))
    counters = slave.counters
    assert counters.served_from_cache <= counters.prefetched
    assert counters.prefetched + counters.fetch_failed == counters.announced


# ====================================================================== ETSI 014 JSON


def valid_document(kind: str) -> Any:
    key_id = str(uuid.UUID(int=0x1234_5678_9ABC))
    if kind == "container":
        return {"keys": [{"key_ID": key_id, "key": base64.b64encode(bytes(range(32))).decode()}]}
    if kind == "key_ids":
        return {"key_IDs": [{"key_ID": key_id, "master_SAE_ID": "sae-a"}]}
    if kind == "request":
        return {"number": 1, "size": 256, "additional_slave_SAE_IDs": []}
    if kind == "status":
        return {
            "source_KME_ID": "kme-a", "target_KME_ID": "kme-b", "master_SAE_ID": "sae-a",
            "slave_SAE_ID": "sae-b", "key_size": 256, "stored_key_count": 10,
            "max_key_count": 100, "max_key_per_request": 128, "max_key_size": 1024,
            "min_key_size": 64, "max_SAE_ID_count": 0,
        }  # fmt: skip
    return {"message": "bad request", "details": [{"x": 1}]}


UUID_TEXT = str(uuid.UUID(int=0xFEDC_BA98))
JSON_ODDITIES: list[Any] = [
    None, True, 0, -1, 2**63, 1.5, float("inf"), "", "x" * 600, [], {}, [[]],
    str(UUID_TEXT).upper(), "{" + UUID_TEXT + "}", "urn:uuid:" + UUID_TEXT, UUID_TEXT[:-1],
    base64.b64encode(bytes(32)).decode().rstrip("="), base64.urlsafe_b64encode(b"\xfb" * 32).decode(),
    base64.b64encode(bytes(31)).decode(), " " + base64.b64encode(bytes(32)).decode(),
    base64.b64encode(bytes(32)).decode() + "\n",
]  # fmt: skip


@st.composite
def json_mutated(draw: st.DrawFn, document: Any) -> Any:
    """``document`` with 1-3 edits somewhere in its tree: a value replaced, a key deleted or
    added, a list entry duplicated or dropped, a whole level replaced by a scalar."""
    doc = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        parent, key = _pick_node(draw, doc)
        if parent is None:
            doc = copy.deepcopy(draw(st.sampled_from(JSON_ODDITIES)))
            continue
        action = draw(st.sampled_from(["replace", "delete", "add", "duplicate"]))
        oddity = copy.deepcopy(draw(st.sampled_from(JSON_ODDITIES)))
        if isinstance(parent, dict):
            if action == "delete":
                parent.pop(key, None)
            elif action == "add":
                parent[draw(st.sampled_from(["key", "key_ID", "extra", "number"]))] = oddity
            else:
                parent[key] = oddity
        elif isinstance(parent, list) and parent:
            index = key % len(parent)
            if action == "delete":
                del parent[index]
            elif action == "duplicate":
                parent.append(copy.deepcopy(parent[index]))
            else:
                parent[index] = oddity
    return doc


def _pick_node(draw: st.DrawFn, doc: Any) -> tuple[Any, Any]:
    """A (container, key) somewhere in ``doc``; (None, None) means the root itself."""
    nodes: list[tuple[Any, Any]] = [(None, None)]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                nodes.append((node, k))
                walk(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                nodes.append((node, i))
                walk(v)

    walk(doc)
    picked: tuple[Any, Any] = draw(st.sampled_from(nodes))
    return picked


@fuzz_settings(400)
@given(data=st.data(), kind=st.sampled_from(["container", "key_ids", "request", "status", "error"]))
def test_mutated_etsi014_documents_raise_only_format_errors(data: st.DataObject, kind: str) -> None:
    document = data.draw(json_mutated(valid_document(kind)) | st.just(valid_document(kind)))
    try:
        if kind == "container":
            container = KeyContainer.from_json(document, 256)
            ids = [k.key_id for k in container.keys]
            assert len(set(ids)) == len(ids)
            for key in container.keys:
                assert len(key.key) == 32 and key.key_id == str(uuid.UUID(key.key_id))
        elif kind == "key_ids":
            for key_id in KeyIds.from_json(document).key_ids:
                assert key_id == str(uuid.UUID(key_id))
        elif kind == "request":
            request = KeyRequest.from_json(document)
            assert isinstance(request.number, int) and not isinstance(request.number, bool)
        elif kind == "status":
            status = Status.from_json(document)
            assert status.min_key_size <= status.max_key_size
        else:
            assert len(ErrorBody.from_json(document).message) <= 512
    except Etsi014FormatError:
        event("format error")
    else:
        event("parsed")


def deep_json(depth: int) -> bytes:
    return b'{"keys": ' + b"[" * depth + b"]" * depth + b"}"


@fuzz_settings(300)
@given(
    status=st.sampled_from([200, 200, 400, 401, 404, 500, 503, 302]),
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda d: json.dumps(d).encode(), st.just(valid_document("container"))),
        st.builds(
            lambda d: json.dumps(d, allow_nan=True).encode(),
            json_mutated(valid_document("container")),
        ),
        st.builds(deep_json, st.integers(1, 5000)),
        st.builds(
            lambda m: json.dumps({"message": m}).encode(),
            st.sampled_from(["key not found", "insufficient keys", "x" * 2000, ""]),
        ),
    ),
)
def test_client_response_handling_raises_only_typed_key_errors(status: int, body: bytes) -> None:
    """What the ETSI 014 client does with a KME's answer (status code and body)."""
    if status != 200:
        for call in ("status", "enc_keys", "dec_keys"):
            error = error_for(call, status, body)
            assert isinstance(error, QkdKeyError)
            assert len(str(error)) < 800
        return
    try:
        document = _decode(body)
        container = _container(document, 256, 1, "KME")
    except KmeProtocolError:
        event("protocol error")
        return
    event("key accepted")
    [key] = container.keys
    assert len(key.key) == 32


def test_deeply_nested_json_from_a_kme_is_a_protocol_error() -> None:
    """Regression: json.loads raises RecursionError on deep nesting, which escaped _decode."""
    with pytest.raises(KmeProtocolError, match="not JSON"):
        _decode(deep_json(100_000))
    error = error_for("dec_keys", 400, b'{"message": ' + b"[" * 100_000 + b"}")
    assert str(error) == "KME answered 400"


# ====================================================================== ETSI 004 frames

QOS = QoS(32, timeout_ms=1000, ttl_s=600)
KSID = uuid.UUID(int=7).bytes
ETSI004_SEEDS = [
    etsi004_encode(OpenConnectRequest("alice", "bob", QOS, KSID)),
    etsi004_encode(OpenConnectRequest("alice", "bob", QOS)),
    etsi004_encode(OpenConnectResponse(Etsi004Status.SUCCESS, QOS, KSID)),
    etsi004_encode(GetKeyRequest(KSID, 0, 1024)),
    etsi004_encode(GetKeyResponse(Etsi004Status.SUCCESS, 0, bytes(32), b'{"index":0}')),
    etsi004_encode(GetKeyResponse(Etsi004Status.METADATA_TOO_SMALL, 3, metadata_needed=70)),
    etsi004_encode(CloseRequest(KSID)),
    etsi004_encode(CloseResponse(Etsi004Status.NO_QKD_CONNECTION)),
    etsi004_encode(ErrorFrame()),
    etsi004_encode(CloseServer()),
]


def etsi004_fields(frame: bytes) -> tuple[LengthField, ...]:
    """The payload length, and in GET_KEY responses the key and metadata lengths."""
    fields: list[LengthField] = [(4, 4)]
    if frame[3] == 0x05:
        key_length = int.from_bytes(frame[16:20], "big")
        fields += [(16, 4), (20 + key_length, 4)]
    return tuple(fields)


@fuzz_settings(500)
@given(data=st.data())
def test_mutated_etsi004_frames_are_refused_or_decode_canonically(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(ETSI004_SEEDS))
    wire = data.draw(mutated(seed, etsi004_fields(seed)) | st.binary(max_size=400))
    try:
        message = decode(wire)
    except CodecError:
        event("refused")
        return
    event(f"decoded {type(message).__name__}")
    # Strict and canonical: anything accepted is exactly what the encoder writes.
    assert etsi004_encode(message) == wire
    if isinstance(message, OpenConnectRequest | OpenConnectResponse | CloseRequest):
        assert len(message.ksid) == KSID_SIZE
    if isinstance(message, OpenConnectRequest | OpenConnectResponse):
        assert len(message.qos.metadata_mimetype) < MIMETYPE_SIZE


@fuzz_settings(300)
@given(
    data=st.data(),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    max_payload=st.sampled_from([64, 1024, 65536]),
)
def test_etsi004_decoder_on_hostile_streams_is_bounded_and_stays_failed(
    data: st.DataObject, cuts: list[int], max_payload: int
) -> None:
    seeds = data.draw(st.lists(st.sampled_from(ETSI004_SEEDS), min_size=1, max_size=4))
    stream = b"".join(seeds)
    wire = data.draw(mutated(stream, etsi004_fields(seeds[0])) | st.just(stream))
    decoder = Etsi004Decoder(max_payload)
    messages: list[object] = []
    failed = False
    for chunk in chunked(wire, cuts):
        try:
            decoder.feed(chunk)
            while (message := decoder.next_message()) is not None:
                messages.append(message)
        except CodecError:
            failed = True
            break
        assert decoder.buffered < ETSI004_HEADER_SIZE + max_payload
    if failed:
        with pytest.raises(CodecError):
            decoder.next_message()
        with pytest.raises(CodecError):
            decoder.feed(ETSI004_SEEDS[0])
    # Whatever was decoded re-encodes to the start of the stream.
    encoded = b"".join(etsi004_encode(cast(Any, m)) for m in messages)
    assert wire.startswith(encoded)


# ====================================================================== PROXY protocol v2


@dataclass(frozen=True, slots=True)
class DecodedProxy:
    family: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: dict[int, bytes]
    ssl_client: int
    ssl_verify: int
    ssl_tlvs: dict[int, bytes]


def decode_proxy_v2(header: bytes) -> DecodedProxy:
    """A strict decoder of one PROXY v2 header (haproxy's proxy-protocol.txt, section 2.2).

    Every length is checked, the whole header must be consumed, TLVs may not repeat, and
    the address block must have the size its family requires. ValueError otherwise.
    """
    if len(header) < 16 or header[:12] != SIGNATURE:
        raise ValueError("no v2 signature")
    if header[12] != 0x21:
        raise ValueError("not version 2 / PROXY command")
    family = header[13]
    length = int.from_bytes(header[14:16], "big")
    body = header[16:]
    if len(body) != length:
        raise ValueError("length does not match")
    sizes = {FAMILY_TCP4: 12, FAMILY_TCP6: 36, FAMILY_UNSPEC: 0}
    if family not in sizes or len(body) < sizes[family]:
        raise ValueError("bad family or address block")
    source = destination = None
    if family != FAMILY_UNSPEC:
        width = 4 if family == FAMILY_TCP4 else 16
        src = ipaddress.ip_address(body[:width])
        dst = ipaddress.ip_address(body[width : 2 * width])
        sport, dport = struct.unpack("!HH", body[2 * width : 2 * width + 4])
        source, destination = (str(src), sport), (str(dst), dport)
    tlvs = _tlvs(body[sizes[family] :])
    ssl = tlvs.get(PP2_TYPE_SSL, b"")
    if len(ssl) < 5:
        raise ValueError("SSL TLV too short")
    client, verify = struct.unpack("!BI", ssl[:5])
    return DecodedProxy(family, source, destination, tlvs, client, verify, _tlvs(ssl[5:]))


def _tlvs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 3 > len(data):
            raise ValueError("truncated TLV header")
        kind, length = struct.unpack("!BH", data[pos : pos + 3])
        if pos + 3 + length > len(data):
            raise ValueError("truncated TLV value")
        if kind in out:
            raise ValueError(f"TLV {kind:#x} repeated")
        out[kind] = data[pos + 3 : pos + 3 + length]
        pos += 3 + length
    return out


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
endpoints = st.tuples(addresses, st.integers(0, 65535))
names = st.text(max_size=300)


@fuzz_settings(400)
@given(
    source=st.none() | endpoints,
    destination=st.none() | endpoints,
    connection_id=st.integers(0, 2**64),
    peer=names,
    cn=st.none() | names,
    cipher=st.sampled_from(["TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256", ""]),
    group=st.none() | st.sampled_from(["qkd_mlkem768", "X25519MLKEM768", "é"]),
)
def test_proxy_v2_header_round_trips_through_a_strict_decoder(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    connection_id: int,
    peer: str,
    cn: str | None,
    cipher: str,
    group: str | None,
) -> None:
    info = ProxyInfo(source, destination, connection_id, peer, cn, cipher, group)
    decoded = decode_proxy_v2(encode_proxy_v2(info))
    if source is None or destination is None:
        assert decoded.family == FAMILY_UNSPEC and decoded.source is None
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        mixed = src.version != dst.version
        assert decoded.family == (FAMILY_TCP4 if src.version == dst.version == 4 else FAMILY_TCP6)
        assert decoded.source is not None and decoded.destination is not None
        for sent, got in ((source, decoded.source), (destination, decoded.destination)):
            address = ipaddress.ip_address(sent[0])
            if mixed and address.version == 4:
                mapped = ipaddress.IPv6Address(got[0]).ipv4_mapped
                assert mapped == address
            else:
                assert ipaddress.ip_address(got[0]) == address
            assert got[1] == sent[1]
    assert decoded.tlvs[PP2_TYPE_UNIQUE_ID] == str(connection_id).encode()
    assert len(decoded.tlvs[PP2_TYPE_UNIQUE_ID]) <= 128  # the spec's limit for unique ids
    assert decoded.tlvs[PP2_TYPE_QKDPROXY_PEER] == peer.encode()
    assert decoded.tlvs.get(PP2_TYPE_QKDPROXY_GROUP) == (group.encode() if group else None)
    assert decoded.ssl_client == 0x03 and decoded.ssl_verify == 0
    assert decoded.ssl_tlvs[PP2_SUBTYPE_SSL_VERSION] == b"TLSv1.3"
    assert decoded.ssl_tlvs[PP2_SUBTYPE_SSL_CIPHER] == cipher.encode()
    assert decoded.ssl_tlvs.get(PP2_SUBTYPE_SSL_CN) == (cn.encode() if cn else None)


@pytest.mark.parametrize(
    ("peer", "cn"),
    [("p" * 40_000, "c" * 30_000), ("p" * 65_500, None), ("p" * 70_000, None)],
    ids=["sum-of-tlvs", "just-fits-tlv-not-header", "one-tlv"],
)
def test_proxy_v2_header_too_long_is_a_value_error(peer: str, cn: str | None) -> None:
    """Regression: an identity that fit each TLV but not the 16-bit header length made
    struct.error escape instead of a ValueError."""
    with pytest.raises(ValueError, match="too long"):
        encode_proxy_v2(ProxyInfo(None, None, 1, peer, cn, "TLS_AES_128_GCM_SHA256", "g"))


# ====================================================================== configuration

GOOD_CONFIG: dict[str, Any] = {
    "daemon": {"drain_timeout_s": 30, "log_level": "info"},
    "status": {"listen": "127.0.0.1:9100"},
    "kme": {
        "local": {
            "api": "014", "url": "https://127.0.0.1:8014", "sae_id": "sae-a",
            "peer_sae_id": "sae-b", "cert": "c.pem", "key": "k.pem", "ca": "ca.pem",
        }
    },
    "tunnel": [
        {
            "name": "web", "role": "client", "listen": "127.0.0.1:8443",
            "connect": "127.0.0.1:9443", "server_name": "server.qkdproxy.test",
            "cert": "c.pem", "key": "k.pem", "ca": "ca.pem", "kme": "local",
            "max_connections": 10, "idle_timeout_s": 60.0,
        },
        {
            "name": "backend", "role": "server", "listen": "0.0.0.0:9443",
            "connect": "127.0.0.1:9000", "cert": "s.pem", "key": "s-key.pem", "ca": "ca.pem",
            "allow": ["uri:spiffe://qkdproxy.test/tunnel/client"], "kme": "local",
            "rekey_bytes": 1000000,
        },
    ],
}  # fmt: skip

TOML_DATETIME = "1979-05-27T07:32:00Z"  # written bare: a TOML datetime
toml_scalars = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["014", "004", "client", "server", "127.0.0.1:1", "unix:/x", "qkd_mlkem768"]),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([10**400, -(10**400), 0, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.just(TOML_DATETIME),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["name", "role", "x", "listen"]), children, max_size=3)
    ),
    max_leaves=8,
)


def toml_value(value: Any) -> str:
    """One value as TOML (inline tables and arrays; the datetime marker stays bare)."""
    if value == TOML_DATETIME:
        return TOML_DATETIME
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(config: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in config.items())


@st.composite
def config_mutated(draw: st.DrawFn) -> dict[str, Any]:
    config: dict[str, Any] = copy.deepcopy(GOOD_CONFIG)
    for _ in range(draw(st.integers(1, 3))):
        parent, key = _pick_node(draw, config)
        if parent is None:
            continue
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if isinstance(parent, dict):
            if action == "delete":
                parent.pop(key, None)
            elif action == "add":
                parent[draw(st.sampled_from(["bogus", "tunnel", "kme", "name"]))] = draw(
                    toml_values
                )
            else:
                parent[key] = draw(toml_values)
        elif isinstance(parent, list) and parent:
            parent[key % len(parent)] = draw(toml_values)
    return config


def assert_config_outcome(path: Path) -> Config | None:
    """load_config returns a Config or raises ConfigError naming the file; nothing else."""
    try:
        return load_config(path)
    except ConfigError as exc:
        problems = exc.problems
    assert problems
    assert all(p.startswith(str(path)) for p in problems), problems
    return None


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config") / "qkdproxy.toml"


def test_the_config_seed_is_valid(config_path: Path) -> None:
    config_path.write_text(toml_document(GOOD_CONFIG))
    config = assert_config_outcome(config_path)
    assert config is not None and len(config.tunnels) == 2


@fuzz_settings(400)
@given(config=config_mutated())
def test_mutated_config_values_give_config_errors(
    config_path: Path, config: dict[str, Any]
) -> None:
    config_path.write_text(toml_document(config))
    event("loaded" if assert_config_outcome(config_path) else "config error")


@fuzz_settings(300)
@given(data=st.data())
def test_mutated_config_text_gives_config_errors(config_path: Path, data: st.DataObject) -> None:
    text = toml_document(GOOD_CONFIG).encode()
    config_path.write_bytes(data.draw(mutated(text) | st.binary(max_size=200)))
    event("loaded" if assert_config_outcome(config_path) else "config error")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        pytest.param({"daemon": 5}, "daemon: must be a table", id="daemon-scalar"),
        pytest.param({"status": "on"}, "status: must be a table", id="status-scalar"),
        pytest.param({"kme": "x"}, "kme: must be a table", id="kme-scalar"),
        pytest.param({"kme": {"local": 5}}, "kme.local: must be a table", id="kme-entry"),
        pytest.param({"tunnel": {"name": "x"}}, "tunnel: must be an array", id="tunnel-table"),
        pytest.param({"tunnel": [1]}, "tunnel[0]: must be a table", id="tunnel-entry"),
        pytest.param({"max_connections": math.inf}, "max_connections: must be", id="inf"),
        pytest.param({"max_connections": math.nan}, "max_connections: must be", id="nan"),
        pytest.param({"idle_timeout_s": math.nan}, "idle_timeout_s: must be", id="nan-time"),
        pytest.param({"rekey_bytes": -math.inf}, "rekey_bytes: must be", id="-inf"),
        pytest.param({"connect_timeout_s": 10**400}, "connect_timeout_s: must be", id="huge"),
    ],
)
def test_config_values_that_used_to_raise_tracebacks(
    config_path: Path, edit: dict[str, Any], fragment: str
) -> None:
    """Regression: each of these escaped load_config as TypeError/ValueError/OverflowError."""
    config = copy.deepcopy(GOOD_CONFIG)
    for key, value in edit.items():
        if key in config:
            config[key] = value
        else:
            config["tunnel"][0][key] = value
    config_path.write_text(toml_document(config))
    with pytest.raises(ConfigError) as info:
        load_config(config_path)
    assert any(fragment in p for p in info.value.problems), info.value.problems
