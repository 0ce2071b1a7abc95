"""How every benchmark reports: a table for people, JSON or CSV for tools, progress on stderr.

Results are lists of flat dicts whose keys are the contract other tools read. Progress goes
to stderr and only when it is a terminal, so stdout stays clean for ``--json``/``--csv``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

Row = dict[str, object]
# Tables fit a 100-column terminal; the columns that do not fit are named under the table
# and are all in --json and --csv.
TABLE_WIDTH = 100


class OutputFormat(Enum):
    """What a bench prints on stdout."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"


def render(
    rows: Sequence[Row],
    fmt: OutputFormat,
    title: str = "",
    footer: str = "",
    first: Sequence[str] = (),
    *,
    extra: Mapping[str, object] | None = None,
) -> str:
    """The results as one string in ``fmt`` (JSON: ``{"results": [...]}``, plus ``extra``'s
    keys at the top level).

    A table keeps the columns ``first`` names, then the others in order, as long as it fits
    :data:`TABLE_WIDTH` columns; JSON and CSV always carry every column."""
    if fmt is OutputFormat.JSON:
        return json.dumps({"results": list(rows), **(extra or {})}, indent=2)
    columns = list(rows[0]) if rows else []
    if fmt is OutputFormat.CSV:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    shown = fitting_columns(rows, [*first, *(c for c in columns if c not in first)])
    left_out = [c for c in columns if c not in shown]
    if left_out:
        note = f"not shown (see --json or --csv): {', '.join(left_out)}"
        footer = f"{footer}\n{note}" if footer else note
    return _table(rows, shown, title, footer)


def fitting_columns(rows: Sequence[Row], ordered: Sequence[str]) -> list[str]:
    """The longest prefix of ``ordered`` whose table fits :data:`TABLE_WIDTH`."""
    shown: list[str] = []
    width = 1  # the left border
    for column in ordered:
        cells = [len(_cell(row.get(column))) for row in rows]
        width += max([len(column), *cells]) + 3  # padding on both sides and a border
        if width > TABLE_WIDTH and shown:
            break
        shown.append(column)
    return shown


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def _table(rows: Sequence[Row], columns: list[str], title: str, footer: str) -> str:
    table = Table(title=title or None, caption=footer or None, caption_justify="left")
    for column in columns:
        numeric = any(
            isinstance(row.get(column), int | float) and not isinstance(row.get(column), bool)
            for row in rows
        )
        table.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    console = Console(file=io.StringIO(), width=TABLE_WIDTH, color_system=None)
    console.print(table)
    text: str = console.file.getvalue()  # type: ignore[attr-defined]
    return text.rstrip("\n")


class Advance(Protocol):
    """Called once per finished unit of work."""

    def __call__(self, units: int = 1) -> None: ...


@contextmanager
def progress(description: str, total: int) -> Iterator[Advance]:
    """A progress bar on stderr for ``total`` units (silent when stderr is not a terminal)."""
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=True,
        disable=not console.is_terminal,
    )  # fmt: skip
    with bar:
        task = bar.add_task(description, total=total)

        def advance(units: int = 1) -> None:
            bar.advance(task, units)

        yield advance
