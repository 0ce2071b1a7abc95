"""What bounds the 8-concurrent connection rate: one process per daemon, key waits, or the
interpreter?

Each experiment starts a stunnel pair and two qkdproxy daemon pairs (each with its own KME
simulator) in front of the C backend, then measures them in turn, round by round, with the
C load generator at 8 concurrent (as ``bench connrate``), printing rates and CPU time per
connection of the tunnel processes, with ratios to stunnel in the same round:

    python perf/processes_per_side.py pairs [N]          # one pair at 8 vs both at 4 + 4
    python perf/processes_per_side.py margin [N] [M]     # supply_margin 6 vs M (default 12)
    python perf/processes_per_side.py python [N] PATH    # this interpreter vs PATH

``pairs`` is the best case for worker processes: a second client and server daemon with
their own keys, so no key supply is shared and nothing crosses between processes, and the
load split evenly. ``margin`` holds more keys ahead (fewer handshakes waiting for an
announced key's fetch). ``python`` runs the second pair on another interpreter with
qkdproxy installed (for example a venv made with Debian's ``/usr/bin/python3``). Results:
docs/PERFORMANCE.md, "What bounds the 8-concurrent rate".
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from dataclasses import dataclass

from qkdproxy.tools.bench.loadgen import ConnBatch, Load, Purpose, choose, start_load
from qkdproxy.tools.bench.names import Generator
from qkdproxy.tools.bench.processes import scratch, start_daemon_pair
from qkdproxy.tools.bench.proctime import ProcessGroup
from qkdproxy.tools.bench.tunnels import start_stunnel

ROUNDS = 4
WARMUP = 200
CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class Variant:
    """How the second pair differs from the first."""

    label: str
    kme_extra: str = ""
    python: str = sys.executable
    split: bool = False


@dataclass(frozen=True, slots=True)
class Path:
    """One measured path: where the generator connects and what burns its CPU."""

    port: int
    processes: ProcessGroup


async def _measure(path: Path, batches: Awaitable[list[ConnBatch]]) -> tuple[float, float]:
    """Connections per second and tunnel CPU ms per connection of ``batches`` on ``path``."""
    before = path.processes.cpu_seconds()
    done = await batches
    cpu = path.processes.cpu_seconds() - before
    count = sum(batch.connections for batch in done)
    return count / max(batch.seconds for batch in done), 1000 * cpu / count


async def _at(load: Load, path: Path, count: int) -> list[ConnBatch]:
    return [await load.connections(path.port, count, CONCURRENCY)]


async def _split(load: Load, paths: tuple[Path, Path], count: int) -> list[ConnBatch]:
    """Both pairs at once, half the connections and half the concurrency each."""
    half = CONCURRENCY // 2
    return list(await asyncio.gather(*(load.connections(p.port, count // 2, half) for p in paths)))


async def run(variant: Variant, count: int) -> None:
    """Measure stunnel, the first pair and ``variant`` in turn, ``ROUNDS`` times."""
    async with scratch() as (base, stack), scratch() as (second_base, second_stack):
        load = await start_load(stack, choose(Generator.AUTO, Purpose.ECHO), Purpose.ECHO)
        first = await start_daemon_pair(stack, base, load.backend_port)
        second = await start_daemon_pair(
            second_stack, second_base, load.backend_port,
            kme_extra=variant.kme_extra, python=variant.python,
        )  # fmt: skip
        found = await start_stunnel(stack, base, load.backend_port)
        if found is None:
            raise SystemExit("stunnel is not installed: no baseline")
        stunnel = Path(*found)
        ours = tuple(
            Path(pair.ports["bench"], ProcessGroup(tuple(pair.daemon_pids)))
            for pair in (first, second)
        )
        both = Path(0, ProcessGroup(ours[0].processes.roots + ours[1].processes.roots))
        for path in (*ours, stunnel):
            await load.connections(path.port, WARMUP, CONCURRENCY)
        for number in range(ROUNDS):
            rate, cpu = await _measure(stunnel, _at(load, stunnel, count))
            one = await _measure(ours[0], _at(load, ours[0], count))
            if variant.split:
                other = await _measure(both, _split(load, (ours[0], ours[1]), count))
            else:
                other = await _measure(ours[1], _at(load, ours[1], count))
            print(
                f"round {number}: stunnel {rate:.0f}/s {cpu:.2f} ms; "
                + "; ".join(
                    f"{label} {r:.0f}/s ({r / rate:.2f}x) {c:.2f} ms ({c / cpu:.2f}x)"
                    for label, (r, c) in (("one pair", one), (variant.label, other))
                ),
                flush=True,
            )


def main() -> None:
    """``pairs [N]``, ``margin [N] [M]`` or ``python [N] PATH``."""
    args = sys.argv[1:]
    count = int(args[1]) if len(args) > 1 else 2000
    if args[:1] == ["pairs"]:
        variant = Variant("two pairs at 4 + 4", split=True)
    elif args[:1] == ["margin"]:
        margin = float(args[2]) if len(args) > 2 else 12.0
        variant = Variant(f"supply_margin {margin:g}", kme_extra=f"supply_margin = {margin}\n")
    elif args[:1] == ["python"] and len(args) > 2:
        variant = Variant(f"on {args[2]}", python=args[2])
    else:
        raise SystemExit(__doc__)
    asyncio.run(run(variant, count))


if __name__ == "__main__":
    main()
