"""Configuration errors an operator can act on, and one CLI convention: errors name the
tunnel and the expected type in plain words, suggest the nearest key; ``--config``
everywhere (the positional form kept), command-line values override file values, and
``--json`` answers of one shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qkdproxy.cli import main as cli
from qkdproxy.cli.kme import _apply_config
from qkdproxy.core.tls.keyexchange import Flow, KeyApi
from qkdproxy.daemon.config import load_config
from qkdproxy.daemon.kme_binding import KmeConnection
from qkdproxy.tools.certs import write_dev_pki
from qkdproxy.tools.demo import DemoSummary, run_demo
from tests.unit.test_config import CLIENT, KME, problems

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (KME + CLIENT + 'max_connections = "100"\n',
         'tunnel.web.max_connections: must be an integer, not the string "100"'),
        (KME + CLIENT + "max_connections = 2.5\n",
         "tunnel.web.max_connections: must be an integer, not the number 2.5"),
        (KME + CLIENT.replace('"127.0.0.1:8443"', "8443"),
         'tunnel.web.listen: must be a string ("host:port"'),
        (KME + CLIENT + "idle_timeout = 5\n",
         'tunnel.web.idle_timeout: unknown key (did you mean "idle_timeout_s"?)'),
        (KME + CLIENT.replace('name = "web"', 'name = "my web"') + "colour = 1\n",
         'tunnel."my web".colour: unknown key'),
        ("[deamon]\n" + KME + CLIENT, 'deamon: unknown section (did you mean "daemon"?)'),
        ("[daemon]\nlog_levle = 'info'\n" + KME + CLIENT,
         'daemon.log_levle: unknown key (did you mean "log_level"?)'),
        (KME.replace("sae_id", "sae_idd", 1) + CLIENT, '(did you mean "sae_id"?)'),
        ("[daemon]\nlog_format = 'xml'\n" + KME + CLIENT, 'log_format: must be "text" or "json"'),
        ("[daemon]\ndrain_timeout_s = true\n" + KME + CLIENT,
         "daemon.drain_timeout_s: must be a number, not the boolean true"),
    ],
)  # fmt: skip
def test_errors_say_where_what_and_the_nearest_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(ROOT / "etc/qkdproxy-client.toml", etc)
    write_dev_pki(tmp_path / "pki")
    return etc / "qkdproxy-client.toml"


def test_check_config_takes_config_and_the_positional_form(
    examples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", "--config", str(examples)]) == 0
    assert cli.main(["check-config", str(examples)]) == 0
    assert capsys.readouterr().out.count(": OK (1 tunnels, 1 KMEs)") == 2
    assert cli.main(["check-config", "--config", str(examples), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"ok": True, "config": str(examples), "tunnels": 1, "kmes": 1, "problems": []}
    assert cli.main(["check-config"]) == 2


def test_check_config_and_probe_json_report_problems_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(KME + CLIENT + 'max_connections = "100"\n')
    assert cli.main(["check-config", "--config", str(bad), "--json"]) == 2
    checked = json.loads(capsys.readouterr().out)
    assert cli.main(["probe", "--config", str(bad), "--json"]) == 2
    probed = json.loads(capsys.readouterr().out)
    assert checked["ok"] is probed["ok"] is False
    assert checked["problems"] == probed["problems"]
    assert any("max_connections" in p for p in probed["problems"])
    assert probed["stage"] == "config"


def test_kme_command_line_overrides_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "kme.toml"
    config.write_text("[simulator]\nport_a = 8014\nport_b = 8015\nrate_bps = 100.0\n")
    args = cli.build_parser().parse_args(
        ["kme", "--config", str(config), "--port-a", "18014", "--rate-bps", "5"]
    )
    _apply_config(args)
    # Given on the command line: kept. Only in the file: taken from it.
    assert (args.port_a, args.rate_bps, args.port_b) == (18014, 5.0, 8015)


def test_demo_refuses_classical_groups_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["demo", "--group", "X25519"]) == 2
    assert "classical" in capsys.readouterr().err
    assert cli.main(["demo", "--group", "nope"]) == 2


def test_demo_over_004_says_why_the_server_flow_is_not_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[tuple[str, tuple[Flow, ...], KeyApi]] = []

    async def fake_demo(
        group: str, flows: tuple[Flow, ...], api: KeyApi, latency: float
    ) -> DemoSummary:
        asked.append((group, flows, api))
        return DemoSummary()

    monkeypatch.setattr(cli, "run_demo", fake_demo)
    assert cli.main(["demo", "--api", "004", "--flow", "both", "--json"]) == 0
    captured = capsys.readouterr()
    assert asked == [("qkd_mlkem768", (Flow.CLIENT_INITIATED,), KeyApi.ETSI_004)]
    assert "server-initiated" in captured.err
    assert "server-initiated" in json.loads(captured.out)["skipped"][0]


async def test_demo_runs_a_pq_group() -> None:
    summary = await run_demo("X25519MLKEM768", (Flow.CLIENT_INITIATED,), rounds=1)
    assert summary.ok, summary.errors
    assert summary.groups == ["X25519MLKEM768"]


async def test_the_kme_retry_interval_caps_the_breaker_backoff(tmp_path: Path) -> None:
    write_dev_pki(tmp_path / "pki")
    path = tmp_path / "c.toml"
    path.write_text(KME.replace("[kme.local]", "[kme.local]\nmax_retry_interval_s = 5") + CLIENT)
    kme = KmeConnection.open(load_config(path).kmes["local"])
    try:
        assert kme.client014 is not None
        assert kme.client014.breaker.max_backoff_s == 5.0
    finally:
        await kme.aclose()
