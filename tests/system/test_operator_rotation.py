"""Certificate rotation under load with the shipped systemd units' mechanism, counting
refused connections (the target is 0).

The units read the files in place (no LoadCredential= copies) and reload with ExecReload
(SIGHUP). This test starts both daemons with the unit's own ExecStart (the /etc/qkdproxy
directory moved into a temporary one, the file names of the unit header), keeps a few
clients connecting through the tunnel, and rotates as an operator would, in two steps:
first both CA bundles gain the new CA, then both tunnel certificates and keys are
replaced by ones from the new CA. Each step is files renamed into place, then the unit's
ExecReload. Every connection must carry its echo intact; none may be refused.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.tools.certs import TUNNEL_SERVER_NAME, DevPki, _cert_pem, _key_pem
from tests.system.test_daemon_system import (
    DEADLINE,
    LISTENING,
    SERVER_ID,
    Harness,
    Proc,
    TomlValue,
    harness_fixture,  # noqa: F401 - fixture
    pki_fixture,  # noqa: F401 - fixture
    toml_table,
)
from tests.system.test_socket_activation import LAUNCHER
from tests.system_helpers import metric

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd/qkdproxy.service"
STATUS = re.compile(r"status on http://127\.0\.0\.1:(\d+) ")
PAYLOAD = os.urandom(4096)


def unit_start_args(etc: Path) -> list[str]:
    """The unit's ExecStart, /etc/qkdproxy moved to ``etc``, without the binary path."""
    text = UNIT.read_text()
    assert "LoadCredential=" not in text, "copies made at start would hide rotated files"
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M)
    start = re.search(r"^ExecStart=(\S+) (.*)$", text, re.M)
    assert start is not None
    return start[2].replace("/etc/qkdproxy", str(etc)).split()


def replace_file(path: Path, data: bytes) -> None:
    """What docs/OPERATIONS.md asks for: write a new file, then rename it over the old one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    fresh.chmod(0o600)  # a key readable by others is refused at start and on reload
    os.replace(fresh, path)


def install_identity(etc: Path, credentials: Credentials) -> None:
    replace_file(etc / "tunnel.pem", b"".join(_cert_pem(c) for c in credentials.chain))
    replace_file(etc / "tunnel-key.pem", _key_pem(credentials))


@dataclass
class Load:
    """Clients connecting through the tunnel until stopped; every outcome counted."""

    port: int
    ok: int = 0
    refused: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        self._progress = asyncio.Condition()

    async def moves(self, count: int) -> None:
        """Until ``count`` more connections carried their echo."""
        target = self.ok + count
        async with asyncio.timeout(DEADLINE), self._progress:
            await self._progress.wait_for(lambda: self.ok >= target)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except ConnectionRefusedError:
                self.refused += 1
                continue
            try:
                writer.write(PAYLOAD)
                await writer.drain()
                writer.write_eof()
                echoed = await asyncio.wait_for(reader.read(), DEADLINE)
                if echoed == PAYLOAD:
                    self.ok += 1
                    async with self._progress:
                        self._progress.notify_all()
                else:
                    self.failed += 1
            except (OSError, TimeoutError):
                self.failed += 1
            finally:
                writer.close()


async def start_like_the_unit(harness: Harness, etc: Path) -> tuple[Proc, int, int]:
    proc = await harness.spawn(etc.name, *unit_start_args(etc))
    line = await proc.wait_line(lambda text: LISTENING.search(text) is not None)
    status = await proc.wait_line(lambda text: STATUS.search(text) is not None)
    listening, serving = LISTENING.search(line), STATUS.search(status)
    assert listening is not None and serving is not None
    return proc, int(listening[4]), int(serving[1])


async def reload_like_the_unit(procs: list[Proc], done: int) -> None:
    """ExecReload (SIGHUP) to each; wait until each logged its ``done``-th reload."""
    for proc in procs:
        proc.signal(signal.SIGHUP)
    for proc in procs:
        await proc.wait_line(lambda _: reloads(proc) >= done)  # noqa: B023 - awaited here
        assert "reload refused" not in proc.stderr, proc.stderr


def reloads(proc: Proc) -> int:
    return sum("reloaded " in line for line in proc.lines)


async def server_certificate_expiry(status_port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", status_port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    text = (await asyncio.wait_for(reader.read(), DEADLINE)).decode()
    writer.close()
    return metric(text, "qkdproxy_certificate_expiration_timestamp_seconds", certificate="server")


async def test_rotation_under_load_refuses_no_connection(harness: Harness) -> None:
    old = DevPki.create()
    new_ca = CertificateAuthority.create("qkdproxy next CA", days=1000)
    _, backend_port = await harness.backend()
    server_etc, client_etc = harness.tmp / "server", harness.tmp / "client"
    status = toml_table("[status]", {"listen": "127.0.0.1:0"})
    no_kme: dict[str, TomlValue | None] = {"policy": "pq-required", "groups": ["X25519MLKEM768"]}
    for etc, credentials in ((server_etc, old.tunnel_server), (client_etc, old.tunnel_client)):
        etc.mkdir()
        install_identity(etc, credentials)
        replace_file(etc / "ca.pem", _cert_pem(old.ca.certificate))
    # Bare file names, as the unit header says: relative to the configuration file.
    files: dict[str, TomlValue | None] = {
        "cert": "tunnel.pem",
        "key": "tunnel-key.pem",
        "ca": "ca.pem",
    }
    (server_etc / "qkdproxy.toml").write_text(status + toml_table("[[tunnel]]", {
        "name": "web", "role": "server", "listen": "127.0.0.1:0",
        "connect": f"127.0.0.1:{backend_port}", "allow": ["uri:spiffe://qkdproxy.test/tunnel/client"],
        **files, **no_kme,
    }))  # fmt: skip
    server, server_port, server_status = await start_like_the_unit(harness, server_etc)
    (client_etc / "qkdproxy.toml").write_text(status + toml_table("[[tunnel]]", {
        "name": "web", "role": "client", "listen": "127.0.0.1:0",
        "connect": f"127.0.0.1:{server_port}", "server_name": TUNNEL_SERVER_NAME,
        "allow": [SERVER_ID], **files, **no_kme,
    }))  # fmt: skip
    client, client_port, _ = await start_like_the_unit(harness, client_etc)
    before = await server_certificate_expiry(server_status)

    load = Load(client_port)
    stop = asyncio.Event()
    workers = [asyncio.create_task(load.run(stop)) for _ in range(4)]

    try:
        await load.moves(20)
        # Step 1: both sides trust the old and the new CA.
        bundle = _cert_pem(old.ca.certificate) + _cert_pem(new_ca.certificate)
        for etc in (server_etc, client_etc):
            replace_file(etc / "ca.pem", bundle)
        await reload_like_the_unit([server, client], 1)
        await load.moves(20)
        # Step 2: both identities from the new CA (the old one could now be dropped).
        names = [TUNNEL_SERVER_NAME, "spiffe://qkdproxy.test/tunnel/server"]
        install_identity(server_etc, new_ca.issue("tunnel-server", names, days=400))
        install_identity(client_etc, new_ca.issue(
            "tunnel-client", ["spiffe://qkdproxy.test/tunnel/client"], server=False, days=400,
        ))  # fmt: skip
        await reload_like_the_unit([server, client], 2)
        await load.moves(20)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    after = await server_certificate_expiry(server_status)

    assert load.refused == 0
    assert load.failed == 0
    assert load.ok >= 60
    # The server now presents the new certificate (400 days instead of 825).
    days_left = (after - datetime.now(UTC).timestamp()) / 86400
    assert after < before and 399 < days_left <= 400


async def test_restart_with_the_socket_unit_refuses_no_connection(harness: Harness) -> None:
    """systemd/qkdproxy-tls.socket: systemd holds the TLS port, the service inherits it.
    The server daemon is stopped (SIGTERM, drain) and a new one started on the same socket,
    as `systemctl restart` does, under load. Connections that arrive in between wait in
    the kernel's queue and are served by the new process: none is refused or fails."""
    socket_unit = (ROOT / "systemd/qkdproxy-tls.socket").read_text()
    assert "FileDescriptorName=tls" in socket_unit and "Service=qkdproxy.service" in socket_unit
    _, backend_port = await harness.backend()
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)  # what systemd holds
    server_config = harness.write("server.toml", toml_table("[daemon]", {"drain_timeout_s": 5})
        + toml_table("[[tunnel]]", {
            "name": "web", "role": "server", "listen": "systemd:tls",
            "connect": f"127.0.0.1:{backend_port}", "cert": str(harness.pki / "tunnel-server.pem"),
            "key": str(harness.pki / "tunnel-server-key.pem"), "ca": str(harness.pki / "ca.pem"),
            "allow": ["uri:spiffe://qkdproxy.test/tunnel/client"], "policy": "pq-required",
            "groups": ["X25519MLKEM768"],
        }))  # fmt: skip
    port = listener.getsockname()[1]
    client = await harness.daemon(
        await harness.client_config("client.toml", port, {"kme": None, "policy": "pq-required",
                                                          "groups": ["X25519MLKEM768"]})
    )  # fmt: skip

    readers: list[asyncio.Task[bytes]] = []

    async def start_server() -> asyncio.subprocess.Process:
        # Like systemd: the socket is fd 3 in the service, LISTEN_FDNAMES names it.
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LAUNCHER, str(server_config),
            env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "tls"},
            stderr=asyncio.subprocess.PIPE, pass_fds=(3,),
            preexec_fn=lambda: os.dup2(listener.fileno(), 3),
        )  # fmt: skip
        assert process.stderr is not None
        async with asyncio.timeout(DEADLINE):
            while b"listening on" not in (line := await process.stderr.readline()):
                assert line, "the daemon exited before listening"
        # Keep reading its log: a full pipe would stall the daemon.
        readers.append(asyncio.create_task(process.stderr.read()))
        return process

    load = Load(client.port)
    stop = asyncio.Event()
    first = await start_server()
    workers = [asyncio.create_task(load.run(stop)) for _ in range(4)]
    try:
        await load.moves(20)
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), DEADLINE) == 0
        second = await start_server()  # systemd starts it once the old one exited
        try:
            await load.moves(20)
        finally:
            stop.set()
            await asyncio.gather(*workers)
            second.terminate()
            await asyncio.wait_for(second.wait(), DEADLINE)
    finally:
        stop.set()
        listener.close()
        await asyncio.gather(*readers)
    assert (load.refused, load.failed) == (0, 0)
    assert load.ok >= 40
