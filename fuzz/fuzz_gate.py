#!/usr/bin/env python3
"""The hello gate (qkdproxy/core/tls/wire.py HelloGate) and the parse of what it holds.

Input: byte 0 picks the expected hello (bit 0) and whether a second one is allowed
(bit 1), byte 1 the chunk size bytes arrive in, the rest is the inbound stream. The gate
must never raise, never invent, drop or reorder bytes, hold a bounded amount, and be
independent of the chunking.
"""

from __future__ import annotations

import contextlib

import fuzzlib
from fuzzlib import atheris

with atheris.instrument_imports(include=fuzzlib.INSTRUMENTED):
    from qkdproxy.core.tls.hello import HelloParseError, parse_client_hello, parse_server_hello
    from qkdproxy.core.tls.wire import (
        MAX_HELD_BYTES,
        MAX_HELLO_SIZE,
        MAX_PLAINTEXT_RECORD,
        RECORD_HEADER_SIZE,
        GateEvent,
        HandshakeType,
        HeldHello,
        HelloGate,
        Release,
    )


def feed(
    expect: HandshakeType, chunks: list[bytes], another: bool
) -> tuple[HelloGate, list[GateEvent]]:
    gate = HelloGate(expect)
    if another:
        gate.allow_another()
    events: list[GateEvent] = []
    for chunk in chunks:
        events += gate.feed(chunk)
    return gate, events


def emitted(events: list[GateEvent]) -> bytes:
    return b"".join(e.data if isinstance(e, Release) else e.records for e in events)


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    client = bool(data[0] & 1)
    expect = HandshakeType.CLIENT_HELLO if client else HandshakeType.SERVER_HELLO
    another, size, wire = bool(data[0] & 2), data[1] + 1, data[2:]
    chunks = [wire[i : i + size] for i in range(0, len(wire), size)]
    gate, events = feed(expect, chunks, another)
    out = emitted(events)
    assert wire.startswith(out), "the gate changed or reordered bytes"
    assert not gate.passthrough or out == wire, "the gate dropped bytes"
    assert len(wire) - len(out) <= MAX_HELD_BYTES + RECORD_HEADER_SIZE + MAX_PLAINTEXT_RECORD
    hellos = [e for e in events if isinstance(e, HeldHello)]
    assert len(hellos) <= (2 if another else 1)
    _, whole = feed(expect, [wire], another)
    assert emitted(whole) == out, "chunking changed the outcome"
    for hello in hellos:
        assert hello.msg_type == expect
        assert len(hello.body) <= MAX_HELLO_SIZE
        with contextlib.suppress(HelloParseError):
            (parse_client_hello if client else parse_server_hello)(hello.body)


def seeds() -> list[bytes]:
    ccs, data_record = bytes([20, 3, 3, 0, 1, 1]), b"\x17\x03\x03\x00\x05abcde"
    out = []
    for client, server in fuzzlib.real_hellos():
        for flags, body, msg_type in ((1, client, 1), (0, server, 2)):
            message = fuzzlib.handshake(msg_type, body)
            for size in (2**14, 100):
                out.append(bytes([flags, 255]) + fuzzlib.records(message, size) + ccs + data_record)
    return out


if __name__ == "__main__":
    fuzzlib.run(test_one_input, seeds())
