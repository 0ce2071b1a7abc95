"""A connection cut a second time while it closes is still accounted, between real daemons.

Found on Python 3.12.1 (a flaky "Exception in callback" in the suite): on a second
SIGTERM the daemon cancels its drain, and with it every connection the drain deadline had
cut and that was still closing (a close waits up to five seconds for a peer that does not
read). That second cancellation ended the connection's task inside its close, before its
line was written and before ``closed`` counted it: a connection that spent a QKD key
could leave no line saying where the key went. Every close here waits until it is cut, as
one towards a peer that stopped reading does, so the drain's own cancellation is the
second cut of every connection it cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from qkdproxy.daemon import tunnel as tunnel_module
from qkdproxy.io.tls_stream import close_transport
from tests.integration.test_cut_ends import ANSWER, Holding, half_done
from tests.integration.test_tunnel_runtime import port
from tests.system_helpers import eventually


def _closing_until_cut(listening: int) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    """The close of connections accepted on port ``listening``, as if their peers never
    released the socket: it waits until cancelled. Every other close is the real one."""

    async def close(writer: asyncio.StreamWriter) -> None:
        if writer.get_extra_info("sockname")[1] == listening:
            writer.close()
            await asyncio.Event().wait()
        await close_transport(writer)

    return close


@pytest.mark.parametrize("cut_on", ["client", "server"])
@pytest.mark.parametrize("mode", ["multiplexed", "per-connection"])
async def test_a_connection_cut_again_while_closing_still_gets_its_line(
    tmp_path: Path,
    mode: str,
    cut_on: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Holding(answer=ANSWER)
    async with half_done(tmp_path, backend, mode) as (s, server, client, _, writer):
        daemon = client if cut_on == "client" else server
        tunnel = daemon.tunnels[0]
        monkeypatch.setattr(tunnel_module, "close_transport", _closing_until_cut(port(daemon)))
        tunnel.stop_accepting()
        drain = asyncio.ensure_future(tunnel.drain(0.05))

        async def closing() -> bool:
            return tunnel.active == 0  # cut, and each connection's task is in its close

        await eventually(closing, "the cut connections closing")
        assert not drain.done()  # the closes wait for their peers
        drain.cancel()  # the second SIGTERM
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        lines = [r for r in s.records if r.role == daemon.config.tunnels[0].role]
        writer.close()
        backend.let_go()
    assert tunnel.stats.opened > 0
    assert tunnel.stats.closed == tunnel.stats.opened
    assert len(lines) == tunnel.stats.opened
    assert all(r.reason for r in lines), [r.reason for r in lines]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in errors if "Exception in callback" in r.getMessage()]
