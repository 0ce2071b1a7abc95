"""``qkdproxy certs``, ``qkdproxy kme`` and ``bench handshake --api``, run as real processes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from qkdproxy.core.keys import KeySourceUnavailableError
from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.keys.etsi014_client import Etsi014Client
from qkdproxy.keys.sslctx import client_context
from qkdproxy.tools.certs import write_dev_pki

DEADLINE = 20.0
PKI_FILES = {
    "ca.pem",
    "kme-ca.pem",
    *(f"{name}{suffix}" for name in ("kme-a", "kme-b", "sae-a", "sae-b", "tunnel-server",
                                     "tunnel-client") for suffix in (".pem", "-key.pem")),
}  # fmt: skip


def qkdproxy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdproxy", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    write_dev_pki(directory)
    return directory


# --------------------------------------------------------------------------- certs


def test_certs_writes_the_pki_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "pki"
    result = qkdproxy("certs", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "wrote 14 files" in result.stdout
    assert {p.name for p in out.iterdir()} == PKI_FILES
    for path in out.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.name.endswith("-key.pem"):
            assert mode == 0o600, path.name
            assert b"PRIVATE KEY" in path.read_bytes()
        else:
            assert not mode & 0o022, path.name
            assert path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    ca_before = (out / "ca.pem").read_bytes()

    again = qkdproxy("certs", "--out", out)
    assert again.returncode == 1
    assert "exists" in again.stderr and "--force" in again.stderr
    assert f"{out / 'ca.pem'} exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert (out / "ca.pem").read_bytes() == ca_before

    forced = qkdproxy("certs", "--out", out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "ca.pem").read_bytes() != ca_before
    assert all(
        stat.S_IMODE((out / name).stat().st_mode) == 0o600
        for name in PKI_FILES
        if name.endswith("-key.pem")
    )


def test_certs_force_tightens_the_mode_of_existing_key_files(tmp_path: Path) -> None:
    write_dev_pki(tmp_path)
    key = tmp_path / "sae-a-key.pem"
    key.chmod(0o644)
    result = qkdproxy("certs", "--out", tmp_path, "--force")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- kme


@asynccontextmanager
async def kme_process(
    *args: str | Path,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, str]]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qkdproxy", "kme", *map(str, args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), DEADLINE)
        if not line:
            assert process.stderr is not None
            stderr = await asyncio.wait_for(process.stderr.read(), DEADLINE)
            pytest.fail(f"qkdproxy kme ended early: {stderr.decode()}")
        urls = json.loads(line)["kme"]
        yield process, urls
    finally:
        if process.returncode is None:
            process.kill()
            await asyncio.wait_for(process.wait(), DEADLINE)


def sae_client(pki: Path, sae: str, url: str) -> Etsi014Client:
    credentials = Credentials.load(pki / f"{sae}.pem", pki / f"{sae}-key.pem")
    anchors = load_trust_anchors(pki / "ca.pem")
    return Etsi014Client(url, client_context(credentials, anchors))


async def test_kme_serves_etsi014_from_the_written_pki_and_stops_on_sigterm(
    pki_dir: Path,
) -> None:
    async with kme_process("--pki", pki_dir) as (process, urls):
        assert set(urls) == {"kme-a", "kme-b"}
        assert all(u.startswith("https://127.0.0.1:") for u in urls.values())
        async with (
            sae_client(pki_dir, "sae-a", urls["kme-a"]) as master,
            sae_client(pki_dir, "sae-b", urls["kme-b"]) as slave,
        ):
            status = await asyncio.wait_for(master.status("sae-b"), DEADLINE)
            assert (status.source_kme_id, status.target_kme_id) == ("kme-a", "kme-b")
            assert status.master_sae_id == "sae-a"
            [key] = await asyncio.wait_for(master.enc_keys("sae-b"), DEADLINE)
            [same] = await asyncio.wait_for(slave.dec_keys("sae-a", [key.key_id]), DEADLINE)
            assert same == key
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), DEADLINE) == 0


async def test_kme_applies_a_fault_script_file(pki_dir: Path, tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"error_bursts": [{"start_call": 0, "count": 1}]}))
    async with kme_process("--pki", pki_dir, "--faults", faults, "--rate-bps", "0") as (
        process,
        urls,
    ):
        async with sae_client(pki_dir, "sae-a", urls["kme-a"]) as master:
            with pytest.raises(KeySourceUnavailableError, match="503"):
                await asyncio.wait_for(master.enc_keys("sae-b"), DEADLINE)
            [key] = await asyncio.wait_for(master.enc_keys("sae-b"), DEADLINE)
            assert len(key.material) == 32
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), DEADLINE) == 0


def test_kme_without_a_pki_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-pki"
    result = qkdproxy("kme", "--pki", missing)
    assert result.returncode == 2
    assert result.stderr.startswith("qkdproxy kme:")
    assert str(missing / "ca.pem") in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "faults.json"),
        ('{"seed": 1, "colour": "red"}', "unknown fault keys: colour"),
        ('{"latency": {"fixed_ms": -5}}', "latency must not be negative"),
        ('{"error_bursts": [{"start_call": 0}]}', "count"),
    ],
)
def test_kme_with_a_bad_fault_script(
    pki_dir: Path, tmp_path: Path, content: str, message: str
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(content)
    result = qkdproxy("kme", "--pki", pki_dir, "--faults", faults)
    assert result.returncode == 2
    assert result.stderr.startswith("qkdproxy kme:")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_kme_with_a_missing_fault_script(pki_dir: Path, tmp_path: Path) -> None:
    result = qkdproxy("kme", "--pki", pki_dir, "--faults", tmp_path / "nope.json")
    assert result.returncode == 2
    assert "nope.json" in result.stderr and "Traceback" not in result.stderr


def test_kme_with_a_fault_script_that_is_not_an_object(pki_dir: Path, tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text("[]")
    result = qkdproxy("kme", "--pki", pki_dir, "--faults", faults)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_kme_with_a_negative_rate(pki_dir: Path) -> None:
    result = qkdproxy("kme", "--pki", pki_dir, "--rate-bps", "-1")
    assert result.returncode == 2
    assert "rate_bps" in result.stderr and "Traceback" not in result.stderr


def test_kme_reports_a_port_in_use(pki_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = qkdproxy("kme", "--pki", pki_dir, "--port-a", str(port))
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- bench


def test_bench_handshake_over_the_kme_simulator() -> None:
    result = qkdproxy(
        "bench", "handshake", "--groups", "X25519MLKEM768,qkd_mlkem768",
        "--api", "014", "--iterations", "2", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert [r["group"] for r in rows] == ["X25519MLKEM768", "qkd_mlkem768"]
    assert {r["key_source"] for r in rows} == {"etsi-014"}
    assert all(r["prefetch"] is True and r["kme_latency_ms"] == 0.0 for r in rows)
    assert all(r["iterations"] == 2 for r in rows)


@pytest.mark.parametrize("extra", [["--kme-latency-ms", "5"], ["--prefetch", "off"]])
def test_bench_kme_options_need_an_api(extra: list[str]) -> None:
    result = qkdproxy("bench", "handshake", "--groups", "qkd_mlkem768", *extra)
    assert result.returncode == 2
    assert "need --api" in result.stderr
    assert "Traceback" not in result.stderr
