"""What a record cut into many small receives costs the record layer: a peer or an on-path
attacker choosing tiny TCP segments must not make every receive decrypt-attempt (and zero
an output buffer the size of) the incomplete record again."""

from __future__ import annotations

import pytest

from qkdproxy.core.tls import record_layer
from qkdproxy.core.tls.events import DataReceived, Failed
from qkdproxy.core.tls.records import MAX_CIPHERTEXT, open_records
from tests.unit.test_record_layer import data_of, pair


@pytest.mark.parametrize("segment", [1, 7, 1460])
def test_a_record_in_small_receives_is_opened_once_it_is_whole(
    monkeypatch: pytest.MonkeyPatch, segment: int
) -> None:
    calls = 0
    real = open_records

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(record_layer, "open_records", counting)
    client, server = pair()
    payload = bytes(range(256)) * 256  # 4 records of 16 KiB
    client.send_data(payload)
    wire = client.data_to_send()
    events = []
    for pos in range(0, len(wire), segment):
        events += server.receive(wire[pos : pos + segment], 0.0)
    assert data_of(events) == payload
    # One batch per receive that completes a record or starts one: not one per receive.
    assert calls <= 2 * (-(-len(wire) // MAX_CIPHERTEXT) + 4)


def test_a_hostile_header_is_refused_once_whole_not_after_its_length() -> None:
    # A header claiming 64 KiB behind a genuine record, cut after 3 bytes: the next byte
    # completes the header and it is refused right away (nothing waits for 64 KiB).
    client, server = pair()
    client.send_data(b"genuine")
    wire = bytes(client.data_to_send()) + bytes([0x17, 0x03, 0x03, 0xFF, 0xFF])
    events = server.receive(wire[:-2], 0.0)
    assert [bytes(e.data) for e in events if isinstance(e, DataReceived)] == [b"genuine"]
    events = server.receive(wire[-2:] + bytes(100), 0.0)
    assert any(isinstance(e, Failed) for e in events)
