"""Bench output an operator can read: tables within 100 columns (everything in --json),
ratio columns filled, one note per distinct reason in ``groups``, plot legends in words."""

from __future__ import annotations

import json

from qkdproxy.cli.bench_run import _in_process_charts
from qkdproxy.cli.main import format_groups
from qkdproxy.core.groups import DEFAULT_GROUPS
from qkdproxy.tools.bench import tunnel_handshake
from qkdproxy.tools.bench.output import TABLE_WIDTH, OutputFormat, render
from qkdproxy.tools.bench.tunnel_handshake import Scenario, _summaries, with_counterparts

WIDE_ROW: dict[str, object] = {
    "group": "qkd_frodo1344shake", "flow": "server", "qkd": True, "median_ms": 12.345,
    "p90_ms": 13.0, "handshakes_per_s": 80.1, "mean_ms": 12.5, "std_ms": 0.4,
    "p99_ms": 14.0, "kme_latency_ms": 100.0, "prefetch": False, "iterations": 20,
    "pq_counterpart": "frodo1344shake", "ratio_to_pq": 1.02,
}  # fmt: skip


def test_tables_fit_100_columns_and_name_what_they_leave_out() -> None:
    rows = [WIDE_ROW, {**WIDE_ROW, "group": "MLKEM768"}]
    text = render(rows, OutputFormat.TABLE, "title", "footer",
                  first=tunnel_handshake.TABLE_COLUMNS)  # fmt: skip
    assert max(len(line) for line in text.splitlines()) <= TABLE_WIDTH
    header = next(line for line in text.splitlines() if "group" in line)
    assert "ratio_to_pq" in header and "median_ms" in header
    assert "not shown (see --json or --csv)" in text and "handshakes_per_s" in text
    assert json.loads(render(rows, OutputFormat.JSON))["results"] == rows


def test_qkd_groups_get_their_pq_counterpart_and_a_ratio() -> None:
    qkd = DEFAULT_GROUPS.by_name("qkd_mlkem768")
    pq = DEFAULT_GROUPS.by_name("MLKEM768")
    assert with_counterparts([qkd]) == [pq, qkd]
    samples = {"MLKEM768-client": [2.0, 2.0], "qkd_mlkem768-client": [3.0, 3.0]}
    results = _summaries(Scenario(0.0, True), [pq, qkd], ["client"], samples)
    assert [(r.group, r.pq_counterpart, r.ratio_to_pq) for r in results] == [
        ("MLKEM768", "MLKEM768", 1.0),
        ("qkd_mlkem768", "MLKEM768", 1.5),
    ]


def test_groups_write_a_shared_reason_once() -> None:
    cause = "the liboqs shared library was not found (install liboqs)"
    rows: list[dict[str, object]] = [
        {"group": f"qkd_g{i}", "code_point": "0x3000", "kind": "qkd-kem", "available": False,
         "reason": f"group qkd_g{i}: KEM-{i} is not available: {cause}"}
        for i in range(22)
    ]  # fmt: skip
    text = format_groups(rows)
    assert text.count(cause) == 1
    assert "qkd_g7" in text and "unavailable (KEM-7) [1]" in text


def test_plot_legends_say_prefetch_on_or_off() -> None:
    rows: list[dict[str, object]] = [
        {"group": "g", "flow": "client", "kme_latency_ms": 0.0, "prefetch": ahead,
         "median_ms": 1.0}
        for ahead in (True, False)
    ]  # fmt: skip
    labels = list(_in_process_charts(rows)[0].series)
    assert labels == [
        "client flow, KME 0.0 ms, prefetch on",
        "client flow, KME 0.0 ms, prefetch off",
    ]
