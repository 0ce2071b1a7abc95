"""systemd socket activation: the daemon serves on a listening socket it inherits (fd 3)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

from qkdproxy.tools.certs import write_dev_pki

CONFIG = """
[[tunnel]]
name = "activated"
role = "server"
listen = "systemd:tls"
connect = "127.0.0.1:{backend}"
cert = "pki/tunnel-server.pem"
key = "pki/tunnel-server-key.pem"
ca = "pki/ca.pem"
allow = ["uri:spiffe://qkdproxy.test/tunnel/client"]
policy = "pq-required"
"""

# Sets LISTEN_PID to its own pid (as systemd does after fork), then becomes the daemon.
LAUNCHER = (
    "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
    "os.execv(sys.executable, [sys.executable, '-m', 'qkdproxy', 'run', '--config', sys.argv[1]])"
)


async def test_daemon_serves_on_an_inherited_socket(tmp_path: Path) -> None:
    write_dev_pki(tmp_path / "pki")
    (tmp_path / "server.toml").write_text(CONFIG.format(backend=1))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "tls"}
    # Like systemd: the socket becomes fd 3 in the child (pass_fds keeps fd 3 open there).
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, str(tmp_path / "server.toml"),
        env=env, stderr=asyncio.subprocess.PIPE,
        pass_fds=(3,), preexec_fn=lambda: os.dup2(listener.fileno(), 3),
    )  # fmt: skip
    try:
        assert process.stderr is not None
        line = b""
        async with asyncio.timeout(30):
            while b"listening on" not in line:
                line = await process.stderr.readline()
                assert line, "the daemon exited before listening"
        assert f"127.0.0.1:{port}".encode() in line
        # The inherited socket accepts: a connection reaches the daemon (which answers a
        # non-TLS hello with an alert and closes).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"not a ClientHello\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer == b"" or answer[0] == 0x15
        writer.close()
    finally:
        listener.close()
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
    assert process.returncode == 0
