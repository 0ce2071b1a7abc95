"""How every benchmark reports: a table for people, JSON or CSV for tools, progress on stderr.

Results are lists of flat dicts whose keys are the contract other tools read. Progress goes
to stderr and only when it is a terminal, so stdout stays clean for ``--json``/``--csv``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

Row = dict[str, object]


class OutputFormat(Enum):
    """What a bench prints on stdout."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"


def render(rows: Sequence[Row], fmt: OutputFormat, title: str = "", footer: str = "") -> str:
    """The results as one string in ``fmt`` (JSON: ``{"results": [...]}``)."""
    if fmt is OutputFormat.JSON:
        return json.dumps({"results": list(rows)}, indent=2)
    columns = list(rows[0]) if rows else []
    if fmt is OutputFormat.CSV:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    return _table(rows, columns, title, footer)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def _table(rows: Sequence[Row], columns: list[str], title: str, footer: str) -> str:
    table = Table(title=title or None, caption=footer or None, caption_justify="left")
    for column in columns:
        numeric = bool(rows) and isinstance(rows[0][column], int | float)
        table.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    console = Console(file=io.StringIO(), width=200, color_system=None)
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
