"""Benchmark plumbing without running benchmarks: output formats, group pairing, charts."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from qkdproxy.core.groups import DEFAULT_GROUPS
from qkdproxy.tools.bench.output import OutputFormat, render
from qkdproxy.tools.bench.plot import BarChart, save
from qkdproxy.tools.bench.tunnel_handshake import pq_counterpart, table_groups
from tests.conftest import requires_matplotlib

ROWS: list[dict[str, object]] = [
    {"path": "qkdproxy", "streams": 1, "gbit_s": 5.25, "note": 'a "quoted", value'},
    {"path": "stunnel", "streams": 1, "gbit_s": 6.5, "note": None},
]


def test_json_is_one_object_with_results() -> None:
    assert json.loads(render(ROWS, OutputFormat.JSON)) == {"results": ROWS}


def test_csv_round_trips_through_a_csv_reader() -> None:
    rows = list(csv.DictReader(io.StringIO(render(ROWS, OutputFormat.CSV))))
    assert rows[0]["note"] == 'a "quoted", value'
    assert rows[1]["gbit_s"] == "6.5" and rows[1]["note"] == ""


def test_table_has_every_column_and_value_and_the_footer() -> None:
    text = render(ROWS, OutputFormat.TABLE, "Title", "footer line")
    for needle in ("path", "gbit_s", "qkdproxy", "5.25", "6.50", "Title", "footer line"):
        assert needle in text


def test_empty_results_render_in_every_format() -> None:
    assert json.loads(render([], OutputFormat.JSON)) == {"results": []}
    assert render([], OutputFormat.CSV) == ""
    render([], OutputFormat.TABLE)


def test_every_qkd_group_is_preceded_by_its_pq_only_counterpart() -> None:
    groups = table_groups()
    names = [g.name for g in groups]
    assert names[:2] == ["MLKEM768", "qkd_mlkem768"]
    for index, group in enumerate(groups):
        counterpart = pq_counterpart(group, groups) if group.qkd else None
        if counterpart is not None:
            assert names.index(counterpart.name) < index
            assert counterpart.components == group.components and not counterpart.qkd


def test_the_triple_hybrid_pairs_with_x25519mlkem768() -> None:
    triple = DEFAULT_GROUPS.by_name("qkd_x25519mlkem768")
    match = pq_counterpart(triple, DEFAULT_GROUPS.all())
    assert match is not None and match.name == "X25519MLKEM768"


@requires_matplotlib
def test_a_chart_with_missing_bars_is_saved_as_png(tmp_path: Path) -> None:
    chart = BarChart("t", "ms", ["a", "b"], {"x": [1.0, None], "y": [2.0, 3.0]}, log_scale=True)
    save([chart, chart], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
