"""Malformed ClientHellos from an unauthenticated client, over a real socket, to a real
server daemon with the KME simulator behind it.

tlslite's Parser methods are replaced by inlined versions and tlslite's hello lookups are
ours (core/tls/tlslite_glue.py): every byte here goes through them before the client is
authenticated. Each hello below is truncated, oversized, has a length at a vector
boundary, duplicated extensions, or key shares of 511/512 bytes (the padding boundary).
The server must answer each with a plaintext fatal alert or a close, keep serving, log no
traceback, and draw no key: the server-initiated flow is on, so a well-formed hello with a
zero key id *would* cost one (the control at the end shows the count moves).
"""

from __future__ import annotations

import asyncio
import contextlib

from qkdproxy.core.hybrid import KEY_ID_SIZE, ZERO_KEY_ID
from qkdproxy.core.tls.hello import EXT_KEY_SHARE, EXT_SUPPORTED_VERSIONS, parse_client_hello
from qkdproxy.core.tls.wire import HandshakeType
from tests.integration.test_hostile import assert_alert_or_close
from tests.integration.test_wire_hello import (
    IO_DEADLINE,
    client_key_share_ext,
    extensions_offset,
    first_message,
    handshake_message,
    join_client_hello,
    records,
    split_client_hello,
    u16,
)
from tests.system.test_key_attacks import BOTH, fates, pair, zero_id_hello
from tests.system_helpers import (
    FaultHarness,
    Node,
    eventually,
    fault_pki_fixture,  # noqa: F401 - fixture
    faults_fixture,  # noqa: F401 - fixture
    works,
)

X25519 = 0x001D
UNKNOWN_EXT = 0xFAFA


async def answer_to(port: int, payload: bytes) -> bytes:
    """Send ``payload`` then EOF; everything the server sent before it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), IO_DEADLINE)
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def idle(node: Node) -> None:
    """Once no connection is open (not :meth:`Node.settled`: the daemon rate-limits the log
    records of repeated failures, so not every connection has one)."""

    async def no_connection() -> bool:
        return all(t["active"] == 0 for t in (await node.status())["tunnels"])

    await eventually(no_connection, f"{node.proc.name}: no connection open")


def hostile_hellos(hello_records: bytes) -> dict[str, bytes]:
    """Variants of a real zero-key-id ClientHello (records), none of them well formed."""
    body = first_message(hello_records)[4:]
    prefix, extensions = split_client_hello(body)
    [share] = parse_client_hello(body).key_shares
    assert share.key_exchange.endswith(ZERO_KEY_ID) and len(ZERO_KEY_ID) == KEY_ID_SIZE

    def hello(new_body: bytes, record_sizes: list[int] | None = None) -> bytes:
        return records(handshake_message(HandshakeType.CLIENT_HELLO, new_body), record_sizes)

    def with_extensions(exts: list[tuple[int, bytes]]) -> bytes:
        return hello(join_client_hello(prefix, exts))

    def with_shares(*entries: tuple[int, bytes]) -> bytes:
        data = client_key_share_ext(list(entries))[4:]
        return with_extensions([(t, data if t == EXT_KEY_SHARE else d) for t, d in extensions])

    def duplicated(ext_type: int) -> bytes:
        [data] = [d for t, d in extensions if t == ext_type]
        return with_extensions([*extensions, (ext_type, data)])

    def header_length(value: int) -> bytes:
        message = handshake_message(HandshakeType.CLIENT_HELLO, body)
        return records(message[:1] + value.to_bytes(3, "big") + message[4:])

    ext_start = extensions_offset(body)
    last_length = len(body) - len(extensions[-1][1]) - 2
    cases = {
        "duplicate key_share": duplicated(EXT_KEY_SHARE),
        "duplicate supported_versions": duplicated(EXT_SUPPORTED_VERSIONS),
        "duplicate unknown extension": with_extensions(
            [*extensions, (UNKNOWN_EXT, b""), (UNKNOWN_EXT, b"")]
        ),
        "share of 511 bytes": with_shares((share.group, bytes(511))),
        "share of 512 bytes": with_shares((share.group, bytes(512))),
        "shares of 511 bytes in all": with_shares((X25519, bytes(32)), (share.group, bytes(479))),
        "shares of 512 bytes in all": with_shares((X25519, bytes(32)), (share.group, bytes(480))),
        "empty share": with_shares((share.group, b"")),
        "two shares for one group": with_shares(
            (share.group, share.key_exchange), (share.group, share.key_exchange)
        ),
        "extensions block length 0": hello(body[:ext_start] + u16(0) + body[ext_start + 2 :]),
        "extensions block length 65535": hello(
            body[:ext_start] + u16(0xFFFF) + body[ext_start + 2 :]
        ),
        "session id of 33 bytes": hello(
            body[:34] + bytes([33]) + bytes(33) + body[35 + body[34] :]
        ),
        "session id length 255": hello(body[:34] + bytes([255]) + body[35:]),
        "odd cipher suites": hello(body[: 35 + body[34]] + u16(3) + body[35 + body[34] + 2 :]),
        "last extension past the end": hello(
            body[:last_length] + u16(0xFFFF) + body[last_length + 2 :]
        ),
        # Trailing bytes: in one record over 2**14 bytes, and 64 KiB in records of 2**14.
        "oversized record": hello(body + bytes(2**14)),
        "oversized hello": hello(body + bytes(2**16), [2**14] * 5),
    }
    for value in (0, 1, 2**8 - 1, 2**16 - 1, 2**24 - 1, len(body) - 1, len(body) + 1):
        cases[f"handshake length {value}"] = header_length(value)
    for cut in (0, 1, 2, 33, 34, 35, len(prefix), ext_start + 2, len(body) // 2, len(body) - 1):
        cases[f"body cut at {cut}"] = hello(body[:cut])
        cases[f"records cut at {cut}"] = hello_records[: 5 + 4 + cut]
    return cases


async def test_malformed_hellos_get_an_alert_or_a_close_and_cost_no_key(
    faults: FaultHarness,
) -> None:
    hello = await zero_id_hello(faults)
    server, client = await pair(faults, BOTH)
    port = server.ports["t"]
    assert await works(client.ports["c"])  # the pair works, and the supplies are filled
    await server.settled()
    before = await fates(server)

    answers = {
        name: await answer_to(port, payload) for name, payload in hostile_hellos(hello).items()
    }
    for name, answer in answers.items():
        try:
            assert_alert_or_close(answer)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    await idle(server)
    after = await fates(server)
    assert after == before, "a malformed hello cost a key"
    assert "Traceback" not in server.proc.stderr
    assert await works(client.ports["c"])  # still serving

    # Control: the captured hello itself, well formed, costs the server one key.
    await answer_to(port, hello)
    await idle(server)
    assert (await fates(server))["failed_handshake"] == after["failed_handshake"] + 1
