"""What a daemon's start pays for before it runs: parsing any ``qkdproxy`` command line
(``qkdproxy run`` included) imports no bench. The benches cost about 0.15 s of imports,
which every sidecar start and every restart would otherwise pay."""

from __future__ import annotations

import json
import subprocess
import sys

# Run in a fresh interpreter: this process has imported the benches for other tests.
WHAT_RUN_IMPORTS = """
import json, sys
from qkdproxy.cli.main import build_parser
build_parser().parse_args(["run", "--config", "daemon.toml"])
print(json.dumps(sorted(sys.modules)))
"""


def test_parsing_a_daemon_command_line_imports_no_bench() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WHAT_RUN_IMPORTS], capture_output=True, text=True, check=True
    )
    modules = json.loads(result.stdout)
    benches = [
        m for m in modules
        if m.startswith(("qkdproxy.tools.bench.", "qkdproxy.cli.bench_run"))
        and m != "qkdproxy.tools.bench.names"
    ]  # fmt: skip
    assert benches == []
    assert "qkdproxy.cli.bench" in modules  # the arguments are there: `qkdproxy bench --help`


def test_a_bench_still_runs_through_its_lazily_imported_handler() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qkdproxy", "bench", "connrate", "--rounds", "0"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "qkdproxy bench connrate: --rounds takes 1 to 10"
