"""The command line, run as a real process."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qkdproxy.tools.bench.aes_speed import EQUAL_AES_CAP
from tests.conftest import requires_matplotlib

REQUIRED_KEYS = {"group", "flow", "qkd", "median_ms", "p90_ms", "handshakes_per_s"}


def qkdproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdproxy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("flow", ["client", "server"])
def test_bench_handshake_json_contract(flow: str) -> None:
    result = qkdproxy(
        "bench", "handshake", "--groups", "X25519MLKEM768,qkd_mlkem768",
        "--flow", flow, "--iterations", "3", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert [r["group"] for r in rows] == ["X25519MLKEM768", "qkd_mlkem768"]
    for row in rows:
        assert set(row) >= REQUIRED_KEYS
        assert row["flow"] == flow
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"]
        assert row["handshakes_per_s"] > 0
    assert [r["qkd"] for r in rows] == [False, True]
    assert rows[0]["ratio_to_baseline"] == 1.0


def test_bench_handshake_table() -> None:
    result = qkdproxy("bench", "handshake", "--groups", "x25519", "--iterations", "2")
    assert result.returncode == 0, result.stderr
    assert "median_ms" in result.stdout and "x25519" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--groups", "qkd_nope"], "unknown group 'qkd_nope'"),
        (["--groups", "x25519", "--iterations", "0"], "--iterations must be at least 1"),
        (["--groups", "x25519", "--kme-latency-ms", "fast"], "comma-separated numbers"),
        (["--groups", "x25519", "--kme-latency-ms", "100"], "need --api (or --tunnels)"),
        (["--tunnels", "--api", "004"], "--tunnels measures ETSI 014 KMEs"),
    ],
)
def test_bench_handshake_bad_input(args: list[str], message: str) -> None:
    result = qkdproxy("bench", "handshake", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_groups_json_lists_availability() -> None:
    result = qkdproxy("groups", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["group"]: row for row in json.loads(result.stdout)["groups"]}
    assert rows["qkd_mlkem768"]["available"] is True
    assert rows["qkd_mlkem768"]["code_point"] == "0x3768"
    assert rows["qkd_mlkem768"]["client_share_bytes"] == 1200
    unavailable = [row for row in rows.values() if not row["available"]]
    assert all(row["reason"] for row in unavailable)


@pytest.mark.parametrize("args", [[], ["bench"], ["bench", "handshake"], ["groups"]])
def test_help_everywhere(args: list[str]) -> None:
    result = qkdproxy(*args, "--help")
    assert result.returncode == 0
    assert "usage: qkdproxy" in result.stdout


@pytest.mark.parametrize(
    ("args", "keys"),
    [
        # The Python fallback here (the C generator is exercised by connrate below).
        (["throughput", "--megabytes", "4", "--streams", "1,2", "--generator", "python",
          "--equal-aes"],
         {"path", "streams", "gbit_s", "cpu_s_per_gb", "kme_cpu_s_per_gb", "load_cpu_s_per_gb",
          "vs_stunnel", "cpu_vs_stunnel", "generator"}),
        (["connrate", "--connections", "10", "--concurrency", "1,2", "--idle", "4", "--floor",
          "--rounds", "2"],
         {"path", "concurrency", "conn_per_s", "p50_ms", "p99_ms", "cpu_ms_per_conn",
          "kme_cpu_ms_per_conn", "load_cpu_ms_per_conn", "kib_per_idle_conn", "vs_stunnel",
          "cpu_vs_stunnel", "kib_vs_stunnel", "generator", "rounds", "connections"}),
    ],
)  # fmt: skip
def test_tunnel_benchmarks_json_contract(args: list[str], keys: set[str]) -> None:
    result = qkdproxy("bench", *args, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    rows = document["results"]
    assert isinstance(document["notes"], list) and isinstance(document["warnings"], list)
    assert {"direct", "qkdproxy"} <= {r["path"] for r in rows}
    assert ("relay-floor" in {r["path"] for r in rows}) == ("--floor" in args)
    for row in rows:
        assert keys <= set(row)
        if "--rounds" in args:  # every row combines both rounds' connections
            assert (row["rounds"], row["connections"]) == (2, 20), row
        assert row.get("gbit_s", 1) > 0 and row.get("conn_per_s", 1) > 0
        # Every tunnel path's own processes are measured (direct has none). CPU time is
        # counted in clock ticks (10 ms): one path's 4 MB may round to 0, the run cannot.
        cost = row.get("cpu_ms_per_conn", row.get("cpu_s_per_gb"))
        assert (cost is None) == (row["path"] == "direct")
        assert cost is None or cost >= 0
    assert sum(r.get("cpu_ms_per_conn", r.get("cpu_s_per_gb")) or 0 for r in rows) > 0
    if "--equal-aes" in args:  # both crypto libraries measured, under the run's mask
        aes = [n for n in document["notes"] if n.startswith("AES-256-GCM")]
        assert len(aes) == 1 and EQUAL_AES_CAP in aes[0]
        assert "(cryptography) not measured" not in aes[0]
    python = {r["generator"] for r in rows} == {"python"}
    limited = [w for w in document["warnings"] if "baselines are Python-limited" in w]
    assert bool(limited) == python
    assert python == ("WARNING: the load generator and backend run in" in result.stderr)


@requires_matplotlib
def test_bench_kem_contract_plain_and_qkd_at_each_latency(tmp_path: Path) -> None:
    plot = tmp_path / "kem.png"
    result = qkdproxy(
        "bench", "kem", "--iterations", "3", "--kme-latency-ms", "0,30",
        "--json", "--plot", str(plot),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    keys = {"kem", "operation", "qkd", "kme_latency_ms", "median_ms", "mean_ms", "std_ms"}
    assert all(keys <= set(row) for row in rows)
    cells = {(r["kem"], r["operation"], r["qkd"], r["kme_latency_ms"]) for r in rows}
    for op in ("keygen", "encaps", "decaps"):
        for qkd in (False, True):
            assert ("ML-KEM-768", op, qkd, 30.0) in cells
    slow = {r["operation"]: r["median_ms"] for r in rows
            if r["qkd"] and r["kme_latency_ms"] == 30.0 and r["kem"] == "ML-KEM-768"}  # fmt: skip
    # keygen and encaps each wait on a KME call; decaps never does.
    assert slow["keygen"] >= 30 and slow["encaps"] >= 30 and slow["decaps"] < 30
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_bench_handshake_through_tunnels_csv() -> None:
    result = qkdproxy(
        "bench", "handshake", "--tunnels", "--groups", "MLKEM768,qkd_mlkem768",
        "--iterations", "2", "--kme-latency-ms", "0", "--prefetch", "on", "--csv",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {(r["group"], r["flow"]) for r in rows} == {
        ("MLKEM768", "-"),
        ("qkd_mlkem768", "client"),
        ("qkd_mlkem768", "server"),
    }
    for row in rows:
        assert REQUIRED_KEYS | {"mean_ms", "std_ms", "p99_ms", "ratio_to_pq"} <= set(row)
        assert float(row["median_ms"]) > 0
    qkd = [r for r in rows if r["group"] == "qkd_mlkem768"]
    assert all(r["pq_counterpart"] == "MLKEM768" and float(r["ratio_to_pq"]) > 0 for r in qkd)


def test_json_and_csv_are_exclusive() -> None:
    result = qkdproxy("bench", "kme", "--json", "--csv")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_bench_soak_json_and_csv_report_a_clean_run() -> None:
    result = qkdproxy("bench", "soak", "--seconds", "1", "--concurrency", "2", "--json")
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)["results"]
    assert run["ok"] is True and run["problems"] == []
    assert run["connections"] > 0 and run["mismatches"] == 0
    assert run["keys"]["reused_key_ids"] == 0
    csv_run = qkdproxy("bench", "soak", "--seconds", "0.5", "--concurrency", "1", "--csv",
                       "--no-tracemalloc")  # fmt: skip
    assert csv_run.returncode == 0, csv_run.stderr
    (row,) = list(csv.DictReader(io.StringIO(csv_run.stdout)))
    assert row["ok"] == "True" and int(row["connections"]) > 0


@requires_matplotlib
def test_results_are_printed_even_when_the_plot_cannot_be_written(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "plot.png"
    result = qkdproxy(
        "bench", "kme", "--requests", "20", "--concurrency", "2", "--json", "--plot", str(target)
    )
    assert result.returncode == 2
    assert json.loads(result.stdout)["results"][0]["requests"] == 20
    assert "cannot write the plot" in result.stderr and "Traceback" not in result.stderr


def test_bench_keys_reports_the_key_economy_of_a_short_run() -> None:
    result = qkdproxy(
        "bench", "keys", "--links", "fast", "--kme-latency-ms", "0", "--patterns", "10/s,idle",
        "--seconds", "1", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    steady, idle = json.loads(result.stdout)["results"]
    assert steady["connections"] == 10 and steady["failed"] == 0
    assert steady["keys_consumed"] == 10
    assert steady["keys_drawn"] == steady["keys_consumed"] + steady["keys_held_at_end"]
    assert 0 < steady["from_memory"] <= 1 and steady["handshake_p50_ms"] > 0
    # Idle: the floor and nothing more.
    assert (idle["connections"], idle["keys_drawn"], idle["keys_consumed"]) == (0, 4, 0)


def test_bench_keys_bad_input() -> None:
    result = qkdproxy("bench", "keys", "--patterns", "2/min")
    assert result.returncode == 2
    assert "--patterns takes" in result.stderr and "Traceback" not in result.stderr
