"""What a tunnelled byte costs: CPU seconds per GB or instructions per GiB of each daemon.

Figures that survive a loaded machine (docs/PERFORMANCE.md, "Cost of a byte"):

    python perf/byte_cost.py daemons [MiB] [PATH]   # daemon pair, /proc CPU time per GB
    python perf/byte_cost.py callgrind [MiB] [DIR]  # under callgrind, per GiB (DIR keeps dumps)

Both start the KME simulator and a client/server daemon pair (qkd_mlkem768, client flow,
prefetch on) and send MiB mebibytes (default 256, or 16 under callgrind) through one
connection of each path: ``qkdproxy`` (one tunnel per connection) and ``qkdproxy-mux``
(a stream in a multiplexed tunnel). The sender and the sink run in this process, outside
the measured daemons. ``callgrind`` counts the daemons' user-space instructions between
two ``callgrind_control --dump`` calls; slow, but the count does not move with the load.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

from connection_cost import TICKS, _cpu_s, _daemons, _dump, _last_total, _under_callgrind

from qkdproxy.tools.bench import processes
from qkdproxy.tools.bench.processes import ClientTunnel

CHUNK = 256 * 1024


def _user_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(") ", 1)[1].split()[11]) / TICKS


PATHS = {"qkdproxy": "bench", "qkdproxy-mux": "mux"}


class Sink:
    """The backend: counts what arrives and wakes the sender's waiter at the target."""

    def __init__(self) -> None:
        self.received = 0
        self.target = 0
        self.done = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 20):
            self.received += len(data)
            if self.target and self.received >= self.target:
                self.done.set()
        writer.close()


async def _send(port: int, sink: Sink, size: int) -> None:
    """Push ``size`` bytes through the tunnel at ``port`` and wait until the sink has them."""
    sink.received, sink.target = 0, size
    sink.done.clear()
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    block = os.urandom(CHUNK)
    for _ in range(size // CHUNK):
        writer.write(block)
        await writer.drain()
    await sink.done.wait()
    writer.close()
    await writer.wait_closed()


async def run(mib: int, callgrind: str | None = None, only: str | None = None) -> None:
    """Per-daemon CPU (or instructions) per byte on both paths."""
    sink = Sink()
    size = mib << 20
    async with processes.workspace(sink) as work:
        clients = tuple(ClientTunnel(name, multiplex=name == "mux") for name in PATHS.values())
        pair = await processes.start_daemon_pair(
            work.stack, work.base, work.backend_port, clients=clients
        )
        pids = _daemons()
        for path, tunnel in PATHS.items():
            if only and path != only:
                continue
            port = pair.ports[tunnel]
            await _send(port, sink, 4 * CHUNK)  # warm up: handshake, pool, buffers
            if callgrind is not None:
                await asyncio.sleep(1)
                for pid in pids.values():
                    await _dump(pid)
            before = {name: _cpu_s(pid) for name, pid in pids.items()}
            user = {name: _user_s(pid) for name, pid in pids.items()}
            await _send(port, sink, size)
            total = 0.0
            for name, pid in sorted(pids.items()):
                if callgrind is not None:
                    await _dump(pid)
                    per = _last_total(callgrind, name, pid) * (1 << 30) / size / 1e9
                    print(f"{path} {name}: {per:.2f} G instructions per GiB")
                else:
                    per = (_cpu_s(pid) - before[name]) * 1e9 / size
                    in_user = (_user_s(pid) - user[name]) * 1e9 / size
                    print(f"{path} {name}: {per:.2f} CPU s per GB ({in_user:.2f} user)")
                total += per
            print(f"{path} both: {total:.2f}")


def main(argv: list[str]) -> None:
    """Dispatch on the mode (see the module docstring)."""
    mode = argv[0] if argv else "daemons"
    if mode == "daemons":
        only = argv[2] if len(argv) > 2 else None  # one path (to profile it alone)
        asyncio.run(run(int(argv[1]) if len(argv) > 1 else 256, only=only))
    elif mode == "callgrind":
        mib = int(argv[1]) if len(argv) > 1 else 16
        if len(argv) > 2:  # keep the dumps for callgrind_annotate
            os.makedirs(argv[2], exist_ok=True)
            _under_callgrind(argv[2])
            asyncio.run(run(mib, callgrind=argv[2]))
            return
        with tempfile.TemporaryDirectory(prefix="qkdproxy-callgrind-") as out:
            _under_callgrind(out)
            asyncio.run(run(mib, callgrind=out))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
