"""A lighter default set-up: the README's `.[dev]` leaves out the Kubernetes validator and
plotting (their own extras, installed by CI), and the README says which tests skip
without which tool."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dev_extra_leaves_heavy_tools_to_their_own_extras_used_by_ci() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    dev = " ".join(extras["dev"])
    assert "kubernetes-validate" not in dev and "matplotlib" not in dev
    assert any("kubernetes-validate" in d for d in extras["k8s"])
    assert any("matplotlib" in d for d in extras["plot"])
    ci = (ROOT / ".ci/run").read_text()
    install = re.search(r"pip install -q -e '\.\[([a-z0-9,]+)\]'", ci)
    assert install and {"dev", "k8s", "plot"} <= set(install[1].split(","))
    # The README's set-up command still works as written.
    assert "pip install -e '.[dev]'" in (ROOT / "README.md").read_text()


def test_readme_lists_the_tools_whose_tests_skip() -> None:
    readme = (ROOT / "README.md").read_text()
    for tool in ("promtool", "systemd-analyze", "kubernetes-validate", "matplotlib", "liboqs"):
        assert re.search(rf"^\| `?{re.escape(tool)}", readme, re.MULTILINE), tool
