"""``qkdproxy kme-check``: every check passes against the simulator, each quirk profile is
named by the check it breaks, and no more keys are drawn than announced."""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from qkdproxy.cli.main import main
from qkdproxy.core.etsi014.conformance import KEY_BUDGET, Verdict
from qkdproxy.keys.kme_identity import ExpectedKme
from qkdproxy.sim.quirks import parse_quirks
from qkdproxy.sim.simulator import KmePair
from qkdproxy.tools.certs import DevPki
from qkdproxy.tools.kme_check import KeyBudget, Side, run_checks, verdicts
from tests.kme_helpers import quirky_pair

DEADLINE = 30.0
KEY_BYTES = 32


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.create()


def simulator(pki: DevPki, *quirk_names: str) -> AbstractAsyncContextManager[KmePair]:
    return quirky_pair(pki, parse_quirks(quirk_names))


def sides(pki: DevPki, pair: KmePair, identity: tuple[str, str] | None = None) -> tuple[Side, Side]:
    anchors = (pki.ca.certificate,)
    expected = [ExpectedKme.parse([i]) for i in identity] if identity else [None, None]
    return (
        Side("master", pair.urls_014[0], "sae-a", pki.saes["sae-a"], anchors, expected[0]),
        Side("slave", pair.urls_014[1], "sae-b", pki.saes["sae-b"], anchors, expected[1]),
    )


def keys_delivered(pair: KmePair) -> int:
    return pair.link.counters.delivered_bytes // KEY_BYTES


async def test_every_check_passes_against_the_simulator(pki: DevPki) -> None:
    async with simulator(pki) as pair:
        budget = KeyBudget()
        results = await asyncio.wait_for(run_checks(*sides(pki, pair), budget), DEADLINE)
        delivered = keys_delivered(pair)
    failed = [r for r in results if r.verdict is not Verdict.PASS]
    assert failed == []
    assert len(results) >= 18
    assert {r.check for r in results} >= {
        "kme-identity-master", "tls-versions-slave", "status-fields", "max-key-per-request",
        "sae-id-encoding", "enc-keys-post", "dec-keys-post", "enc-keys-get", "dec-keys-get",
        "single-use", "unknown-key", "unauthorised-dec-keys", "bad-size-refused",
    }  # fmt: skip
    assert all(r.section for r in results)
    assert delivered == budget.drawn <= KEY_BUDGET


# quirk -> the checks that name it (every other check passes)
DEVIATIONS: dict[str, dict[str, tuple[Verdict, str]]] = {
    "cn-only": {
        "kme-identity-master": (Verdict.FAIL, "IP address mismatch"),
        "kme-identity-slave": (Verdict.FAIL, "set kme_identity"),
    },
    "vendor-not-found": {
        "unknown-key": (Verdict.WARN, "not the spec's message"),
        "single-use": (Verdict.WARN, "do not exist in this KME"),
    },
    "html-401": {"unauthorised-dec-keys": (Verdict.WARN, "text/html body")},
    "one-key-per-request": {
        "max-key-per-request": (Verdict.WARN, "max_key_per_request is 1"),
        "several-keys-per-request": (Verdict.SKIP, "max_key_per_request is 1"),
    },
    "reusable-keys": {"single-use": (Verdict.FAIL, "same key twice")},
    "404-unknown-keys": {
        "unknown-key": (Verdict.WARN, "404 for unknown keys"),
        "single-use": (Verdict.WARN, "404"),
    },
}


@pytest.mark.parametrize("quirk", list(DEVIATIONS))
async def test_each_quirk_profile_is_named(pki: DevPki, quirk: str) -> None:
    async with simulator(pki, quirk) as pair:
        budget = KeyBudget()
        results = await asyncio.wait_for(run_checks(*sides(pki, pair), budget), DEADLINE)
        delivered = keys_delivered(pair)
    expected = DEVIATIONS[quirk]
    for r in results:
        if r.check in expected:
            verdict, needle = expected[r.check]
            assert r.verdict is verdict, r
            assert needle in r.detail, r
        else:
            assert r.verdict is Verdict.PASS, r
    assert set(expected) <= {r.check for r in results}
    assert delivered == budget.drawn <= KEY_BUDGET


async def test_cn_only_kme_with_kme_identity_is_a_warning_only(pki: DevPki) -> None:
    async with simulator(pki, "cn-only") as pair:
        results = await asyncio.wait_for(
            run_checks(*sides(pki, pair, ("cn:kme-a", "cn:kme-b"))), DEADLINE
        )
    found = verdicts(results)
    assert found.pop("kme-identity-master") is Verdict.WARN
    assert found.pop("kme-identity-slave") is Verdict.WARN
    assert set(found.values()) == {Verdict.PASS}


async def test_a_smaller_budget_is_never_exceeded(pki: DevPki) -> None:
    async with simulator(pki) as pair:
        budget = KeyBudget(limit=2)
        results = await asyncio.wait_for(run_checks(*sides(pki, pair), budget), DEADLINE)
        delivered = keys_delivered(pair)
    assert delivered == budget.drawn <= 2
    assert "key budget spent" in {r.detail for r in results if r.verdict is Verdict.SKIP}


def write_config(directory: Path, pki: DevPki, pair: KmePair) -> Path:
    for name, data in pki.files().items():
        (directory / name).write_bytes(data)
    path = directory / "qkdproxy.toml"
    sections = []
    for name, url, sae, peer in (
        ("a", pair.urls_014[0], "sae-a", "sae-b"),
        ("b", pair.urls_014[1], "sae-b", "sae-a"),
    ):
        sections.append(f"""
[kme.{name}]
url = "{url}"
sae_id = "{sae}"
peer_sae_id = "{peer}"
cert = "{sae}.pem"
key = "{sae}-key.pem"
ca = "ca.pem"
""")
    path.write_text(
        "".join(sections)
        + """
[[tunnel]]
role = "client"
listen = "127.0.0.1:0"
connect = "127.0.0.1:9"
cert = "tunnel-client.pem"
key = "tunnel-client-key.pem"
ca = "ca.pem"
server_name = "server.qkdproxy.test"
kme = "a"
"""
    )
    return path


async def test_command_line_from_a_daemon_config(
    pki: DevPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with simulator(pki) as pair:
        config = write_config(tmp_path, pki, pair)
        code = await asyncio.wait_for(
            asyncio.to_thread(main, ["kme-check", "--config", str(config)]), DEADLINE
        )
        text = capsys.readouterr().out.splitlines()
        assert code == 0
        assert text[0].endswith(f"draws at most {KEY_BUDGET} keys from this KME pair")
        assert text[1].split() == ["CHECK", "SECTION", "RESULT", "DETAIL"]
        assert "FAIL" not in "\n".join(text)
        code = await asyncio.wait_for(
            asyncio.to_thread(main, ["kme-check", "--config", str(config), "--json"]), DEADLINE
        )
        captured = capsys.readouterr()
        delivered = keys_delivered(pair)
    document = json.loads(captured.out)
    assert code == 0
    assert "draws at most" in captured.err
    assert document["ok"] is True
    assert document["key_budget"] == KEY_BUDGET
    assert 0 < document["keys_drawn"] <= KEY_BUDGET
    assert delivered == 2 * document["keys_drawn"]
    assert {c["result"] for c in document["checks"]} == {"PASS"}
    assert all(set(c) == {"check", "section", "result", "detail"} for c in document["checks"])


async def test_command_line_exit_codes(
    pki: DevPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with simulator(pki, "reusable-keys") as pair:
        config = write_config(tmp_path, pki, pair)
        code = await asyncio.wait_for(
            asyncio.to_thread(main, ["kme-check", "--config", str(config), "--json"]), DEADLINE
        )
    assert code == 1
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False
    assert main(["kme-check"]) == 2
    assert "give --config" in capsys.readouterr().err
