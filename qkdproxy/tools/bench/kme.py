"""``qkdproxy bench kme``: ETSI 014 requests per second against a simulator KME process.

The simulator runs as its own process (``qkdproxy kme``), as a KME would on another host;
this process drives single-key ``enc_keys`` calls over keep-alive mutual TLS with a fixed
number of concurrent callers.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qkdproxy.core.tls.credentials import Credentials, load_trust_anchors
from qkdproxy.keys.etsi014_client import Etsi014Client
from qkdproxy.keys.sslctx import client_context
from qkdproxy.tools.certs import write_dev_pki

STARTUP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class KmeBenchResult:
    """Requests per second and latency of one run."""

    requests: int
    concurrency: int
    requests_per_s: float
    median_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


async def run_kme_bench(requests: int, concurrency: int) -> KmeBenchResult:
    """Start a simulator process, warm up, then time ``requests`` enc_keys calls."""
    with tempfile.TemporaryDirectory(prefix="qkdproxy-bench-") as tmp:
        pki = Path(tmp)
        write_dev_pki(pki)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qkdproxy", "kme", "--pki", str(pki),
            "--pool-bits", str(256 * (requests + 10_000)),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), STARTUP_TIMEOUT_S)
            url = json.loads(line)["kme"]["kme-a"]
            credentials = Credentials.load(pki / "sae-a.pem", pki / "sae-a-key.pem")
            context = client_context(credentials, load_trust_anchors(pki / "ca.pem"))
            async with Etsi014Client(url, context) as client:
                return await _drive(client, requests, concurrency)
        finally:
            process.terminate()
            await process.wait()


async def _drive(client: Etsi014Client, requests: int, concurrency: int) -> KmeBenchResult:
    latencies: list[float] = []

    async def caller(count: int, record: bool) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await client.enc_keys("sae-b", 1)
            if record:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller(20, False) for _ in range(concurrency)))
    started = time.perf_counter()
    share, extra = divmod(requests, concurrency)
    await asyncio.gather(*(caller(share + (i < extra), True) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return KmeBenchResult(
        requests=requests,
        concurrency=concurrency,
        requests_per_s=requests / elapsed,
        median_ms=statistics.median(ordered) * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
    )
