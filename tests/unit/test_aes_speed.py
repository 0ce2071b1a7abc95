"""The crypto-library check of ``bench throughput`` (tools/bench/aes_speed.py)."""

from __future__ import annotations

import asyncio
import os

import pytest

from qkdproxy.tools.bench import aes_speed
from qkdproxy.tools.bench.aes_speed import AesSpeeds, describe, parse_openssl_speed

# What `openssl speed -seconds 1 -bytes 16384 -evp aes-256-gcm` prints on Debian 12.
ONE_SIZE = b"""version: 3.0.19
built on: Tue Jan 27 10:00:00 2026 UTC
options: bn(64,64)
The 'numbers' are in 1000s of bytes per second processed.
type          16384 bytes
AES-256-GCM    3246211.07k
"""
ALL_SIZES = (
    b"type             16 bytes     64 bytes    256 bytes   1024 bytes   8192 bytes  16384 bytes\n"
    b"AES-256-GCM     612345.12k  1712345.00k  3012345.00k  3512345.00k  3812345.00k  3911111.00k\n"
)


def test_the_rate_is_read_from_the_largest_block_size() -> None:
    assert parse_openssl_speed(ONE_SIZE) == pytest.approx(3.24621107)
    assert parse_openssl_speed(ALL_SIZES) == pytest.approx(3.911111)


@pytest.mark.parametrize(
    "output", [b"", b"AES-128-GCM 100.00k\n", b"AES-256-GCM fast\n", b"\xff\xfe" * 50]
)
def test_output_without_the_rate_gives_none(output: bytes) -> None:
    assert parse_openssl_speed(output) is None


def test_libraries_within_a_quarter_of_each_other_give_no_warning() -> None:
    note, warning = describe(AesSpeeds(4.0, 4.9), masked=False)
    assert warning is None
    assert "4.00 GB/s" in note and "4.90 GB/s" in note


def test_a_faster_library_of_ours_is_called_out_with_the_way_to_equal_it() -> None:
    _, warning = describe(AesSpeeds(3.5, 8.0), masked=False)
    assert warning is not None
    assert "2.29x as fast" in warning and "--equal-aes" in warning


def test_a_slower_library_of_ours_is_called_out_too() -> None:
    _, warning = describe(AesSpeeds(4.0, 2.0), masked=False)
    assert warning is not None and "0.50x as fast" in warning


def test_a_rate_not_measured_is_said_and_not_guessed() -> None:
    note, warning = describe(AesSpeeds(None, 8.0), masked=False)
    assert warning is None and "not measured" in note


def test_equal_aes_sets_the_mask_for_the_run_and_removes_it_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(aes_speed.CAP_VARIABLE, raising=False)
    with aes_speed.equal_aes(True):
        assert os.environ[aes_speed.CAP_VARIABLE] == aes_speed.EQUAL_AES_CAP
        note, _ = describe(AesSpeeds(4.0, 4.0), masked=True)
        assert aes_speed.EQUAL_AES_CAP in note
    assert aes_speed.CAP_VARIABLE not in os.environ
    with aes_speed.equal_aes(False):
        assert aes_speed.CAP_VARIABLE not in os.environ


def test_a_mask_the_caller_chose_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aes_speed.CAP_VARIABLE, ":~0x0")
    with aes_speed.equal_aes(True):
        assert os.environ[aes_speed.CAP_VARIABLE] == ":~0x0"
    assert os.environ[aes_speed.CAP_VARIABLE] == ":~0x0"


def test_our_rate_is_measured_in_a_process_of_its_own() -> None:
    speeds = asyncio.run(aes_speed.measure())
    assert speeds.ours is not None and speeds.ours > 0
    assert aes_speed.seal_rate(0.01) > 0
