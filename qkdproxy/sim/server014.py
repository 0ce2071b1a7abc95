"""ETSI GS QKD 014 over HTTPS with mutual TLS, served by a simulated KME (aiohttp).

Paths, verbs, JSON documents, HTTP codes and error messages follow the spec; the caller's
SAE id comes from its client certificate (CN or URI SAN), never from the URL. It accepts
the calls of the QKD-KEM reference provider (GET ``enc_keys?number=1&size=256``, POST
``dec_keys`` whose entries may carry ``master_SAE_ID``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from aiohttp import web

from qkdproxy.core.etsi014.models import (
    ErrorBody,
    Etsi014FormatError,
    Key,
    KeyContainer,
    KeyIds,
    KeyRequest,
    Status,
    parse_key_id,
    valid_sae_id,
)
from qkdproxy.keys.sslctx import peer_identity
from qkdproxy.sim.link import KeyNotForCallerError, KeyUnknownError, PoolExhaustedError
from qkdproxy.sim.node import KmeNode
from qkdproxy.sim.quirks import HTML_401_BODY, ONE_KEY_MESSAGE, VENDOR_NOT_FOUND_MESSAGE, Quirk

NODE = web.AppKey("node", KmeNode)
MAX_BODY = 64 * 1024

# Spec message strings (ETSI GS QKD 014 V1.1.1, 6.x)
SIZE_NOT_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MANDATORY_NOT_SUPPORTED = "not all extension_mandatory parameters are supported"
KEYS_NOT_FOUND = "one or more keys specified are not found on KME"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    401: web.HTTPUnauthorized,
    404: web.HTTPNotFound,  # quirk profile 404-unknown-keys only
    503: web.HTTPServiceUnavailable,
}


def _fail(status: int, message: str) -> NoReturn:
    """Answer with one of the spec's codes and an Error document."""
    body = json.dumps(ErrorBody(message).to_json())
    raise _ERRORS[status](text=body, content_type="application/json")


@web.middleware
async def _faults_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[NODE]
    decision = await node.admit()
    if decision.reset and request.transport is not None:
        request.transport.abort()
        _fail(503, "connection reset (injected)")
    if decision.fail:
        _fail(503, "KME failure (injected)")
    try:
        return await handler(request)
    except web.HTTPUnauthorized:
        if Quirk.HTML_401 not in node.quirks:
            raise
        raise web.HTTPUnauthorized(text=HTML_401_BODY, content_type="text/html") from None
    except Etsi014FormatError as exc:
        _fail(400, str(exc))
    except web.HTTPRequestEntityTooLarge:
        # ETSI 014 defines 400, 401 and 503 only.
        _fail(400, f"request body larger than {MAX_BODY} bytes")
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        # The router's own answers (unknown path, unknown verb) were text/plain; every answer
        # of this API is an Error document. The code stays: it says what is wrong.
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(ErrorBody(exc.reason).to_json(), status=exc.status, headers=allow)


def _caller(request: web.Request) -> str:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    caller = peer_identity(ssl_object, request.app[NODE].identity.value)
    if caller is None:
        _fail(401, "client certificate carries no SAE identity")
    return caller


def _sae(request: web.Request, name: str) -> str:
    sae = request.match_info[name]
    if not valid_sae_id(sae):
        _fail(400, f"{name} is not a valid SAE ID")
    return sae


def _query_int(request: web.Request, name: str, default: int | None) -> int | None:
    text = request.query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        _fail(400, f"{name} must be a positive integer")
    return int(text)


async def _json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        _fail(400, "request body must be application/json")
    try:
        return json.loads(await request.read())
    # RecursionError: deeply nested JSON (about 1000 levels, well inside MAX_BODY) made
    # json.loads raise it, and the caller got a 500 without an Error document.
    except (ValueError, UnicodeDecodeError, RecursionError):
        _fail(400, "request body is not valid JSON")


async def status(request: web.Request) -> web.Response:
    """GET /api/v1/keys/{slave_SAE_ID}/status"""
    node = request.app[NODE]
    master, slave = _caller(request), _sae(request, "slave_SAE_ID")
    limits = node.limits
    doc = Status(
        source_kme_id=node.kme_id,
        target_kme_id=node.peer_kme_id,
        master_sae_id=master,
        slave_sae_id=slave,
        key_size=limits.key_size,
        stored_key_count=node.link.stored_bits(node.now()) // limits.key_size,
        max_key_count=node.link.settings.pool_bits // limits.key_size,
        max_key_per_request=limits.max_key_per_request,
        max_key_size=limits.max_key_size,
        min_key_size=limits.min_key_size,
        max_sae_id_count=limits.max_sae_id_count,
    )
    return web.json_response(doc.to_json())


async def enc_keys(request: web.Request) -> web.Response:
    """GET (``number``, ``size`` only) or POST /api/v1/keys/{slave_SAE_ID}/enc_keys"""
    node = request.app[NODE]
    master, slave = _caller(request), _sae(request, "slave_SAE_ID")
    if request.method == "POST":
        key_request = KeyRequest.from_json(await _json(request))
    else:
        if set(request.query) - {"number", "size"}:
            _fail(400, "only number and size may be given as query parameters")
        key_request = KeyRequest(
            number=_query_int(request, "number", 1) or 0, size=_query_int(request, "size", None)
        )
    size = node.limits.key_size if key_request.size is None else key_request.size
    _check_key_request(node, key_request, size)
    try:
        keys = node.link.make_keys(
            master, frozenset({slave, *key_request.additional_slave_sae_ids}),
            key_request.number, size, node.now(),
        )  # fmt: skip
    except PoolExhaustedError:
        _fail(503, "insufficient key material in the KME")
    container = KeyContainer(tuple(Key(str(uuid.UUID(bytes=i)), k) for i, k in keys))
    return web.json_response(container.to_json())


def _check_key_request(node: KmeNode, key_request: KeyRequest, size: int) -> None:
    limits = node.limits
    if size % 8:
        _fail(400, SIZE_NOT_MULTIPLE_OF_8)
    if not limits.min_key_size <= size <= limits.max_key_size:
        _fail(400, f"size must be between {limits.min_key_size} and {limits.max_key_size}")
    if not 1 <= key_request.number <= limits.max_key_per_request:
        _fail(400, f"number must be between 1 and {limits.max_key_per_request}")
    if key_request.extension_mandatory:
        _fail(400, MANDATORY_NOT_SUPPORTED)
    if len(key_request.additional_slave_sae_ids) > limits.max_sae_id_count or not all(
        valid_sae_id(s) for s in key_request.additional_slave_sae_ids
    ):
        _fail(400, "additional_slave_SAE_IDs are not supported for these SAEs")


async def dec_keys(request: web.Request) -> web.Response:
    """GET (one ``key_ID``) or POST /api/v1/keys/{master_SAE_ID}/dec_keys"""
    node = request.app[NODE]
    slave, master = _caller(request), _sae(request, "master_SAE_ID")
    if request.method == "POST":
        key_ids = KeyIds.from_json(await _json(request)).key_ids
    else:
        values = request.query.getall("key_ID", [])
        if len(values) != 1 or set(request.query) != {"key_ID"}:
            _fail(400, "GET dec_keys takes exactly one key_ID parameter")
        key_ids = (parse_key_id(values[0]),)
    quirks = node.quirks
    if Quirk.ONE_KEY_PER_REQUEST in quirks and len(key_ids) > 1:
        _fail(400, ONE_KEY_MESSAGE)
    try:
        take = node.link.read_keys if Quirk.REUSABLE_KEYS in quirks else node.link.take_keys
        materials = take(slave, master, [uuid.UUID(k).bytes for k in key_ids], node.now())
    except KeyUnknownError:
        if Quirk.NOT_FOUND_404 in quirks:
            _fail(404, "key not found")
        _fail(400, VENDOR_NOT_FOUND_MESSAGE if Quirk.VENDOR_NOT_FOUND in quirks else KEYS_NOT_FOUND)
    except KeyNotForCallerError:
        _fail(401, "the requesting SAE is not a slave SAE of these keys")
    container = KeyContainer(tuple(Key(k, m) for k, m in zip(key_ids, materials, strict=True)))
    return web.json_response(container.to_json())


def create_app(node: KmeNode) -> web.Application:
    """The ETSI 014 application of one KME."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_faults_and_errors])
    app[NODE] = node
    app.router.add_get("/api/v1/keys/{slave_SAE_ID}/status", status)
    app.router.add_route("GET", "/api/v1/keys/{slave_SAE_ID}/enc_keys", enc_keys)
    app.router.add_route("POST", "/api/v1/keys/{slave_SAE_ID}/enc_keys", enc_keys)
    app.router.add_route("GET", "/api/v1/keys/{master_SAE_ID}/dec_keys", dec_keys)
    app.router.add_route("POST", "/api/v1/keys/{master_SAE_ID}/dec_keys", dec_keys)
    return app
