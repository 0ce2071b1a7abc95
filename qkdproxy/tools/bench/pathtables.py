"""How ``bench connrate`` and ``bench throughput`` print a run: rates, then costs, then
memory, as separate tables that each fit 100 columns; then the notes and warnings.

JSON carries every column plus ``notes`` and ``warnings``; CSV carries every column (the
caller prints the warnings on stderr).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from qkdproxy.tools.bench.output import TABLE_WIDTH, OutputFormat, Row, render
from qkdproxy.tools.bench.pathstats import DIRECT
from qkdproxy.tools.bench.tunnels import PathReport, R

# A table: its title and its columns as (JSON key, header). Headers are short so that
# each table fits 100 columns; the title says what they measure.
Table = tuple[str, tuple[tuple[str, str], ...]]

CONNRATE_TABLES: tuple[Table, ...] = (
    ("New connections per second by path and concurrency (same run)",
     (("path", "path"), ("concurrency", "concurrency"), ("conn_per_s", "conn/s"),
      ("vs_stunnel", "x stunnel"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
      ("keys", "QKD keys"))),
    ("CPU ms per connection: both tunnel processes, the KME simulator, the generator and "
     "backend (load)",
     (("path", "path"), ("concurrency", "concurrency"), ("cpu_ms_per_conn", "tunnel CPU ms"),
      ("cpu_vs_stunnel", "x stunnel"), ("kme_cpu_ms_per_conn", "KME CPU ms"),
      ("load_cpu_ms_per_conn", "load CPU ms"))),
)  # fmt: skip
MEMORY_TABLE: Table = (
    "Memory per idle connection: both tunnel processes",
    (("path", "path"), ("kib_per_idle_conn", "KiB per idle connection"),
     ("kib_vs_stunnel", "x stunnel")),
)  # fmt: skip
THROUGHPUT_TABLES: tuple[Table, ...] = (
    ("Bulk transfer by path and streams (same run)",
     (("path", "path"), ("streams", "streams"), ("gbit_s", "Gbit/s"),
      ("vs_stunnel", "x stunnel"), ("seconds", "seconds"), ("bytes", "bytes"))),
    ("CPU seconds per GB (10^9 bytes): both tunnel processes, the KME simulator, the "
     "generator and backend (load)",
     (("path", "path"), ("streams", "streams"), ("cpu_s_per_gb", "tunnel CPU s"),
      ("cpu_vs_stunnel", "x stunnel"), ("kme_cpu_s_per_gb", "KME CPU s"),
      ("load_cpu_s_per_gb", "load CPU s"))),
)  # fmt: skip


def _table(rows: Sequence[Row], table: Table) -> str:
    title, columns = table
    shown = [{header: row[key] for key, header in columns} for row in rows]
    return render(shown, OutputFormat.TABLE, title)


def _memory_rows(rows: Sequence[Row]) -> list[Row]:
    """One row per tunnel path that measured memory."""
    seen: dict[object, Row] = {}
    for row in rows:
        if row["path"] != DIRECT and row.get("kib_per_idle_conn") is not None:
            seen.setdefault(row["path"], row)
    return list(seen.values())


def report_text(report: PathReport[R], fmt: OutputFormat, tables: Sequence[Table]) -> str:
    """The run in ``fmt``: tables with notes and warnings, or JSON, or CSV."""
    rows = [r.as_dict() for r in report.results]
    if fmt is not OutputFormat.TABLE:
        extra = {"notes": report.notes, "warnings": report.warnings}
        return render(rows, fmt, extra=extra if fmt is OutputFormat.JSON else None)
    parts = [_table(rows, table) for table in tables]
    if memory := _memory_rows(rows):
        parts.append(_table(memory, MEMORY_TABLE))
    lines = [f"note: {note}" for note in report.notes]
    lines += [f"WARNING: {warning}" for warning in report.warnings]
    lines.append(
        "--json and --csv carry every column, under the keys documented in docs/BENCHMARKS.md"
    )
    wrapped = (textwrap.fill(line, TABLE_WIDTH, subsequent_indent="  ") for line in lines)
    return "\n\n".join(parts) + "\n\n" + "\n".join(wrapped)
