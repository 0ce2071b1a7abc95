"""On-path truncation through real daemons: a plaintext close_notify injected right after a
KeyUpdate (when the read sequence number is 0 again) must reset both plaintext sides.

An on-path attacker can spot a KeyUpdate by its size (a 22-byte protected record) even
though it cannot read it. Before the record layer was ours, tlslite took the 7 bytes
``15 03 03 00 02 01 00`` at sequence number 0 as the peer's clean close: a 4 MiB transfer
ended at about 1 MB and both the application and the backend saw an ordinary EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from tests.system_helpers import (
    FaultHarness,
    Transfer,
    fault_pki_fixture,  # noqa: F401 - fixture
    faults_fixture,  # noqa: F401 - fixture
    free_port,
)

MB = 1 << 20
PLAINTEXT_CLOSE_NOTIFY = bytes.fromhex("15030300020100")
KEY_UPDATE_RECORD_LENGTH = 22  # 5 bytes of message, the inner type, a 16-byte tag


class InjectingRelay:
    """A TCP relay between the two daemons that, in one direction, injects ``forged``
    right behind the first KeyUpdate-sized record it forwards."""

    def __init__(self, target_port: int, toward_server: bool, forged: bytes) -> None:
        self.target_port = target_port
        self.toward_server = toward_server
        self.forged = forged
        self.injected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._copy(reader, up_writer, inject=self.toward_server),
            self._copy(up_reader, writer, inject=not self.toward_server),
            return_exceptions=True,
        )

    async def _copy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, inject: bool
    ) -> None:
        try:
            while True:
                header = await reader.readexactly(5)
                body = await reader.readexactly(int.from_bytes(header[3:5], "big"))
                writer.write(header + body)
                if (
                    inject
                    and not self.injected.is_set()
                    and header[0] == 0x17
                    and len(body) == KEY_UPDATE_RECORD_LENGTH
                ):
                    writer.write(self.forged)
                    self.injected.set()
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.mark.parametrize("toward_server", [True, False], ids=["upload", "download"])
async def test_a_close_notify_injected_after_a_key_update_resets_both_sides(
    faults: FaultHarness, toward_server: bool
) -> None:
    kme = await faults.start_kme()
    backend, backend_port = await faults.recording_backend()
    rekey = {"rekey_bytes": 65536}
    server_port = free_port()
    server = await faults.node(faults.config(
        "server.toml",
        [faults.server_tunnel("t", backend_port, listen=f"127.0.0.1:{server_port}", **rekey)],
        {"local": faults.kme_table(kme.urls["kme-b"], "b")},
    ))  # fmt: skip
    relay = InjectingRelay(server_port, toward_server, PLAINTEXT_CLOSE_NOTIFY)
    relay_port = await relay.start()
    client = await faults.node(faults.config(
        "client.toml",
        [faults.client_tunnel("t", relay_port, listen=f"127.0.0.1:{free_port()}", **rekey)],
        {"local": faults.kme_table(kme.urls["kme-a"], "a")},
    ))  # fmt: skip
    try:
        # The application never sends EOF: its stream is still open when the forgery goes in
        # and after, so a clean end anywhere can only come from the forgery. (With 4 MiB and
        # EOF sent at once, a loaded machine let the client daemon pass all of it and its FIN
        # on before it read the forged record: the backend got the whole request, handed its
        # echo to socket buffers and closed, and a backend that has closed cannot be reset.)
        payload = os.urandom(MB)
        transfer = await Transfer(client.ports["t"], payload).open()
        with contextlib.suppress(OSError):  # the forgery may be found before all is sent
            await transfer.send(payload)
        await asyncio.wait_for(relay.injected.wait(), 60)
        ending = await transfer.end(within=60.0)
        # The application sees a reset after a prefix of the echo, never a clean end: the
        # forgery follows the first KeyUpdate, after about rekey_bytes of the payload.
        assert ending.how == "reset", (len(ending.received), ending.how)
        assert len(ending.received) < len(payload)
        assert payload.startswith(ending.received)
        # So does the backend (it may have had the whole payload: what it must not see is
        # an end).
        await backend.wait_until(lambda: len(backend.endings) == 1)
        how, size = backend.endings[0]
        assert how == "reset" and size <= len(payload), backend.endings
        on_server, on_client = [await node.proc.wait_record() for node in (server, client)]
        for record in (on_server, on_client):
            assert record["reason"].startswith("error: TlsStreamError"), record
        # The side the forgery was sent to refused it as such: a record layer that took it
        # for the peer's close_notify would still end both sides with resets (qkdproxy/1
        # reads a close_notify without FIN as a truncation), and only this tells them apart.
        refusing = on_server if toward_server else on_client
        assert "unprotected record (type 21)" in refusing["reason"], refusing
    finally:
        await relay.close()
