"""The command line, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    assert "median ms" in result.stdout and "x25519" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--groups", "qkd_nope"], "unknown group 'qkd_nope'"),
        (["--groups", "x25519", "--iterations", "0"], "--iterations must be at least 1"),
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
        (["throughput", "--megabytes", "4", "--streams", "1,2"], {"path", "streams", "gbit_s"}),
        (["connrate", "--connections", "10", "--concurrency", "1,2"],
         {"path", "concurrency", "conn_per_s", "p50_ms", "p99_ms"}),
    ],
)  # fmt: skip
def test_tunnel_benchmarks_json_contract(args: list[str], keys: set[str]) -> None:
    result = qkdproxy("bench", *args, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert {"direct", "qkdproxy"} <= {r["path"] for r in rows}
    for row in rows:
        assert keys <= set(row)
        assert row.get("gbit_s", 1) > 0 and row.get("conn_per_s", 1) > 0
