"""The path benches' arithmetic: /proc parsing, ratios to stunnel, the sanity checks of the
baseline, the choice of load generator and its fallback, and the printed report."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from qkdproxy.cli.main import main
from qkdproxy.tools.bench import loadgen, native, tunnels
from qkdproxy.tools.bench.loadgen import LoadUnavailableError, Purpose, choose
from qkdproxy.tools.bench.names import Generator
from qkdproxy.tools.bench.output import TABLE_WIDTH, OutputFormat
from qkdproxy.tools.bench.pathstats import (
    ConnrateResult,
    ThroughputResult,
    combine_rounds,
    connrate_ratios,
    connrate_warnings,
    machine_note,
    throughput_ratios,
    throughput_warnings,
)
from qkdproxy.tools.bench.pathtables import CONNRATE_TABLES, report_text
from qkdproxy.tools.bench.proctime import cpu_ticks, parent_pid, rss_kib
from qkdproxy.tools.bench.tunnels import PathReport

# A real line's shape; the command name has a space and a parenthesis in it.
STAT = (
    "4242 (qkd (proxy) x) S 17 4242 4242 0 -1 4194560 3000 0 0 0 "
    "250 75 0 0 20 0 3 0 900 123456789 5000 18446744073709551615"
)


def test_proc_stat_fields_survive_a_strange_command_name() -> None:
    assert cpu_ticks(STAT) == 325
    assert parent_pid(STAT) == 17
    assert rss_kib("Name:\tx\nVmRSS:\t  12345 kB\nThreads: 3\n") == 12345
    assert rss_kib("Name:\tkernel-thread\n") == 0


def _conn(
    path: str, concurrency: int, rate: float, cpu: float | None, **kw: float
) -> ConnrateResult:
    return ConnrateResult(path, concurrency, rate, 2.0, 3.0, 300, cpu_ms_per_conn=cpu, **kw)  # type: ignore[arg-type]


SANE = [
    _conn("direct", 1, 8000.0, None, load_cpu_ms_per_conn=0.1),
    _conn("qkdproxy", 1, 110.0, 9.2, kib_per_idle_conn=109.0),
    _conn("stunnel", 1, 438.0, 2.0, kib_per_idle_conn=180.0, load_cpu_ms_per_conn=0.1),
    _conn("qkdproxy", 8, 181.0, 9.0),
    _conn("stunnel", 8, 598.0, 2.4),
]


def test_rounds_combine_into_one_row_over_all_their_connections_and_time() -> None:
    fast = replace(_conn("qkdproxy", 1, 200.0, 4.0, load_cpu_ms_per_conn=0.2), p50_ms=1.0)
    slow = replace(_conn("qkdproxy", 1, 100.0, 10.0, load_cpu_ms_per_conn=0.4), p99_ms=9.0)
    third = replace(fast, p50_ms=5.0, connections=600)
    row = combine_rounds([fast, slow, third], keys=2)
    # 300 in 1.5 s, 300 in 3 s, 600 in 3 s: 1,200 connections in 7.5 s.
    assert row.conn_per_s == pytest.approx(160.0)
    assert (row.connections, row.rounds, row.keys) == (1200, 3, 2)
    assert (row.p50_ms, row.p99_ms) == (2.0, 9.0)  # the median round's, the worst
    assert row.cpu_ms_per_conn == pytest.approx((4 * 300 + 10 * 300 + 4 * 600) / 1200)
    assert row.load_cpu_ms_per_conn == pytest.approx((0.2 * 300 + 0.4 * 300 + 0.2 * 600) / 1200)
    assert combine_rounds([fast], keys=None) == replace(fast, keys=None)  # one round: as is
    direct = _conn("direct", 1, 8000.0, None)
    assert combine_rounds([direct, direct], keys=None).cpu_ms_per_conn is None


def test_each_row_is_divided_by_the_stunnel_row_of_its_level() -> None:
    rows = {(r.path, r.concurrency): r for r in connrate_ratios(SANE)}
    qkd = rows["qkdproxy", 1]
    assert qkd.vs_stunnel == pytest.approx(110 / 438)
    assert qkd.cpu_vs_stunnel == pytest.approx(9.2 / 2.0)
    assert qkd.kib_vs_stunnel == pytest.approx(109 / 180)
    assert rows["qkdproxy", 8].vs_stunnel == pytest.approx(181 / 598)
    assert rows["stunnel", 8].vs_stunnel == 1.0
    # direct has no tunnel processes: no CPU, so no CPU ratio
    assert rows["direct", 1].cpu_vs_stunnel is None
    assert rows["direct", 1].vs_stunnel == pytest.approx(8000 / 438)


def test_without_stunnel_nothing_is_compared() -> None:
    rows = connrate_ratios([r for r in SANE if r.path != "stunnel"])
    assert all(r.vs_stunnel is None and r.cpu_vs_stunnel is None for r in rows)
    put = [ThroughputResult("qkdproxy", 1, 1.9, 10, 1.0, cpu_s_per_gb=4.7)]
    assert throughput_ratios(put)[0].vs_stunnel is None


def test_a_sane_baseline_raises_no_warning() -> None:
    assert connrate_warnings(connrate_ratios(SANE)) == []


def test_a_stalled_stunnel_is_called_out_three_ways() -> None:
    # The old configuration: syslog on without /dev/log, 91-145/s, p99 near 48 ms.
    stalled = [
        _conn("direct", 1, 13_000.0, None),
        ConnrateResult("stunnel", 1, 100.0, 3.0, 48.0, 300, cpu_ms_per_conn=2.4),
    ]
    text = " | ".join(connrate_warnings(stalled))
    assert "below 1% of the direct path" in text
    assert "10.00 ms but only 2.40 ms of CPU" in text
    assert "multi-millisecond stalls" in text


def test_a_load_limited_tunnel_run_is_called_out() -> None:
    # 500 connections/s at 1.8 ms of load CPU each: the generator was busy 90 % of the time.
    busy = [_conn("qkdproxy", 1, 500.0, 1.0, load_cpu_ms_per_conn=1.8)]
    assert any("busy 90%" in w for w in connrate_warnings(busy))
    put = [
        ThroughputResult("direct", 1, 20.0, 10, 1.0),
        ThroughputResult("stunnel", 1, 0.5, 10, 1.0, cpu_s_per_gb=2.0, load_cpu_s_per_gb=1.0),
    ]
    warnings = throughput_warnings(put)
    assert any("below 5% of the direct path" in w for w in warnings)
    assert not any("busy" in w for w in warnings)  # 0.5 Gbit/s at 1 s/GB: 6 % busy


def test_the_machine_note_appears_only_under_load() -> None:
    assert machine_note(0.5, 2) is None
    note = machine_note(2.6, 2)
    assert note is not None and "2.60 on 2 cores" in note


def test_no_compiler_falls_back_to_python_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither a compiler nor iperf3
    monkeypatch.delenv("CC", raising=False)
    assert native.find_compiler() is None
    choice = choose(Generator.AUTO, Purpose.SINK)
    assert choice.kind is Generator.PYTHON
    assert any("no C compiler" in n for n in choice.notes)
    with pytest.raises(LoadUnavailableError, match="no C compiler"):
        choose(Generator.C, Purpose.ECHO)
    with pytest.raises(LoadUnavailableError, match="iperf3 is not installed"):
        choose(Generator.IPERF3, Purpose.SINK)
    with pytest.raises(LoadUnavailableError, match="throughput only"):
        choose(Generator.IPERF3, Purpose.ECHO)


def test_a_compiler_that_fails_is_reported_not_raised_as_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CC", "false")  # exists, always fails
    with pytest.raises(native.NativeUnavailableError, match="could not build"):
        native.build(tmp_path)
    assert not any(tmp_path.rglob("loadgen")) and not any(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(loadgen, "build", lambda: native.build(tmp_path))
    assert choose(Generator.AUTO, Purpose.ECHO).kind is Generator.PYTHON


def test_the_report_has_ratios_memory_notes_and_loud_warnings() -> None:
    rows = connrate_ratios([*SANE, _conn("stunnel", 2, 1.0, 1.0)])
    report = PathReport(rows, ["load: c"], ["stunnel looks broken"])
    text = report_text(report, OutputFormat.TABLE, CONNRATE_TABLES)
    assert max(len(line) for line in text.splitlines()) <= TABLE_WIDTH
    assert "x stunnel" in text and "tunnel CPU ms" in text and "KiB per idle connection" in text
    assert "note: load: c" in text and "WARNING: stunnel looks broken" in text
    document = json.loads(report_text(report, OutputFormat.JSON, CONNRATE_TABLES))
    assert document["warnings"] == ["stunnel looks broken"]
    assert document["results"][1]["cpu_vs_stunnel"] == pytest.approx(4.6)
    csv_text = report_text(report, OutputFormat.CSV, CONNRATE_TABLES)
    assert csv_text.splitlines()[0].startswith("path,concurrency,conn_per_s")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--connections", "4", "--concurrency", "8"], "at least the highest"),
        (["--idle", "-1"], "--idle takes 0 to 4000"),
        (["--idle", "4001"], "--idle takes 0 to 4000"),
    ],
)
def test_path_benches_refuse_bad_input_before_starting_anything(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "connrate", *args]) == 2
    assert message in capsys.readouterr().err


def test_iperf3_is_not_a_connection_generator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "connrate", "--generator", "iperf3"])
    assert "invalid choice" in capsys.readouterr().err


async def test_without_stunnel_the_path_is_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)
    async with AsyncExitStack() as stack:
        assert await tunnels.start_stunnel(stack, tmp_path, 9) is None
    assert not list(tmp_path.iterdir())  # noqa: ASYNC240 - nothing written, nothing started
