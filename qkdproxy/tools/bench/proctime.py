"""CPU time and memory of measured processes, from ``/proc`` (Linux).

A process's own CPU time (``utime + stime`` in ``/proc/<pid>/stat``, every thread included)
survives a loaded machine far better than wall-clock rates: other jobs slow a tunnel down
but do not make it spend more cycles per connection. Each measured process is counted with
its descendants, so a daemon that starts worker processes is measured whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# utime and stime are fields 14 and 15 of /proc/<pid>/stat (1-based); the command name
# (field 2) is in parentheses and may itself contain spaces or parentheses.
_UTIME = 13
_STIME = 14
_PPID = 3


class ProcUnavailableError(RuntimeError):
    """No /proc here: CPU and memory per connection cannot be measured."""


def _fields(stat: str) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` line, the command name as one field."""
    start, end = stat.index("("), stat.rindex(")")
    return [stat[:start].strip(), stat[start + 1 : end], *stat[end + 1 :].split()]


def cpu_ticks(stat: str) -> int:
    """User plus system CPU time, in clock ticks, from a ``/proc/<pid>/stat`` line."""
    fields = _fields(stat)
    return int(fields[_UTIME]) + int(fields[_STIME])


def parent_pid(stat: str) -> int:
    """The parent process id from a ``/proc/<pid>/stat`` line."""
    return int(_fields(stat)[_PPID])


def rss_kib(status: str) -> int:
    """Resident set size in KiB from ``/proc/<pid>/status`` text (0 if not shown)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def available() -> bool:
    """Whether this machine has a Linux ``/proc`` to read."""
    return (PROC / "self" / "stat").is_file()


def _read(pid: int, name: str) -> str | None:
    try:
        return (PROC / str(pid) / name).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None  # it exited between listing and reading


def with_descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` and every live process below them."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _read(int(entry.name), "stat")) is not None:
            children.setdefault(parent_pid(stat), []).append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


@dataclass(frozen=True, slots=True)
class ProcessGroup:
    """Processes measured together (for example both ends of a tunnel pair)."""

    roots: tuple[int, ...]

    def cpu_seconds(self) -> float:
        """CPU time used so far by the group's live processes and their descendants."""
        ticks = 0
        for pid in with_descendants(self.roots):
            if (stat := _read(pid, "stat")) is not None:
                ticks += cpu_ticks(stat)
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        """Resident memory of the group's processes and their descendants, in KiB."""
        return sum(
            rss_kib(status)
            for pid in with_descendants(self.roots)
            if (status := _read(pid, "status")) is not None
        )
