"""The status listener (aiohttp): /metrics, /healthz, /readyz and /status."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from qkdproxy.core.addresses import format_sockname

Readiness = Callable[[], tuple[bool, list[str]]]
StatusDocument = Callable[[], dict[str, Any]]


def create_app(
    registry: CollectorRegistry, readiness: Readiness, status: StatusDocument
) -> web.Application:
    """The status application; the callables read the daemon at request time."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready, reasons = readiness()
        body = json.dumps({"ready": ready, "reasons": reasons})
        return web.Response(
            text=body + "\n", status=200 if ready else 503, content_type="application/json"
        )

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response(status())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_json)
    return app


class StatusServer:
    """Serves the status application on one TCP address."""

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self.address = ""

    async def start(self, host: str, port: int) -> None:
        """Listen (port 0 picks a free port; ``address`` says which)."""
        await self._runner.setup()
        sock = socket.create_server((host, port))
        self.address = format_sockname(sock.getsockname())
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        """Stop serving."""
        await self._runner.cleanup()
