"""A running daemon writes no private key byte to any file.

The server daemon (with an ETSI 014 KME, whose stdlib TLS context needs the SAE key) runs
under a tracer while it starts, carries a connection and reloads. With strace (when it is
installed): no write system call of any thread, native code included, puts key bytes in a
file on a file system. Otherwise, with a Python audit hook: no file is opened for writing
at all. In both cases its directory for temporary files ($TMPDIR) stays empty.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from tests.system.test_daemon_system import (
    LISTENING,
    Daemon,
    Harness,
    Proc,
    exchange,
    harness_fixture,  # noqa: F401 - fixture
    pki_fixture,  # noqa: F401 - fixture
)

AUDIT = """
import os, runpy, sys
report = os.open(sys.argv.pop(1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
def probing_for_a_library():
    # ctypes.util.find_library (the liboqs probe) lets gcc write scratch files in $TMPDIR.
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("ctypes", "util.py")):
            return True
        frame = frame.f_back
    return False
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        wants = (isinstance(mode, str) and set(mode) & set("wax+")) or (flags or 0) & WRITE
        if wants and not probing_for_a_library():
            os.write(report, f"{path}\\n".encode())
sys.addaudithook(hook)
sys.argv[0] = "qkdproxy"
runpy.run_module("qkdproxy", run_name="__main__", alter_sys=True)
"""
# strace -y shows the file behind each descriptor: write(5</tmp/x/key.pem>, "...", 241).
STRACE_WRITE = re.compile(r"^\d+ +(?:write|pwrite64|writev)\((\d+)<([^>]*)>, (.*)$")
HARMLESS = ("/dev/null", "/dev/tty", "/dev/urandom")


async def traced_server(h: Harness, tracer: str, config: Path) -> tuple[Daemon, Path]:
    report = h.tmp / f"{tracer}.txt"
    tmpdir = h.tmp / "watched-tmp"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONDONTWRITEBYTECODE": "1"}
    if tracer == "strace":
        command = ["strace", "-f", "-qq", "-y", "-s", "1000000", "-o", str(report),
                   "-e", "trace=write,pwrite64,writev,openat"]  # fmt: skip
        command += [sys.executable, "-m", "qkdproxy"]
    else:
        command = [sys.executable, "-c", AUDIT, str(report)]
    process = await asyncio.create_subprocess_exec(
        *command, "run", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=h.tmp,
    )  # fmt: skip
    proc = Proc("traced-server", process)
    h.procs.append(proc)
    line = await proc.wait_line(lambda text: LISTENING.search(text) is not None)
    match = LISTENING.search(line)
    assert match is not None
    return Daemon(proc, int(match.group(4)), config), report


@pytest.mark.parametrize("tracer", ["audit", "strace"])
async def test_a_running_daemon_writes_no_private_key_to_any_file(
    harness: Harness,
    tracer: str,
) -> None:
    # strace sees every write, native code's included; the audit hook stands in without it.
    if (tracer == "strace") != (shutil.which("strace") is not None):
        pytest.skip("strace is installed" if tracer == "audit" else "strace is not installed")
    _, backend_port = await harness.backend()
    server_config = await harness.server_config("server.toml", backend_port)
    server, report = await traced_server(harness, tracer, server_config)
    client = await harness.daemon(await harness.client_config("client.toml", server.port))
    payload = os.urandom(10_000)
    assert await exchange(client.port, payload) == payload  # KME calls on both sides
    daemon_pid = traced_pid(server.proc.process.pid, tracer)
    os.kill(daemon_pid, signal.SIGHUP)  # a reload re-reads every tunnel key
    await server.proc.wait_line(lambda text: "reloaded" in text)
    os.kill(daemon_pid, signal.SIGTERM)
    assert await server.proc.wait_exit() == 0

    trace = report.read_text() if report.exists() else ""
    if tracer == "audit":
        written = [p for p in trace.splitlines() if p not in HARMLESS]
        assert written == [], written
    else:
        # The tracer saw the daemon read its keys, so it watched the right process.
        assert "sae-b-key.pem" in trace and "tunnel-server-key.pem" in trace
        # ...and hand the key to OpenSSL through memory (which strace shows in clear).
        assert "</memfd:qkdproxy-credentials" in trace
        markers = ["PRIVATE KEY", *key_markers(harness.pki)]
        leaks = [f for f, data in strace_file_writes(trace) if any(m in data for m in markers)]
        assert leaks == []
        report.unlink()  # it holds the test keys, as written to the memfd
    assert list((harness.tmp / "watched-tmp").iterdir()) == []


def traced_pid(pid: int, tracer: str) -> int:
    """The daemon's process id: strace's only child, or the process itself."""
    if tracer != "strace":
        return pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def strace_file_writes(trace: str) -> list[tuple[str, str]]:
    """(file, data) of every write to a file on a file system (not a pipe, socket or memfd)."""
    out = []
    for line in trace.splitlines():
        match = STRACE_WRITE.match(line)
        path = match.group(2) if match else ""
        if match and path.startswith("/") and not path.startswith((*HARMLESS, "/memfd:")):
            out.append((match.group(2), match.group(3)))
    return out


def key_markers(pki_dir: Path) -> list[str]:
    """Lines of the daemon's private keys' PEM bodies, as strace would print them."""
    markers = []
    for name in ("sae-b-key.pem", "tunnel-server-key.pem"):
        body = [ln for ln in (pki_dir / name).read_text().splitlines() if "-----" not in ln]
        markers += [ln for ln in body if len(ln) >= 40]
    return markers
