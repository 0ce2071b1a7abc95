"""Async ETSI GS QKD 014 client (aiohttp) for real KMEs and the simulator.

Keep-alive connection reuse over mutual TLS (HTTP/1.1 only), a deadline on every call,
strict validation of every response, retries only for ``status`` (which consumes nothing),
and a circuit breaker so a failing KME is not hammered. Known quirks of real KMEs are
tolerated: 404 for unknown keys, one key per request (see ``max_key_per_request``).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import yarl
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.tracing import Trace

from qkdproxy.core.breaker import CircuitBreaker
from qkdproxy.core.etsi014.models import (
    ErrorBody,
    Etsi014FormatError,
    KeyContainer,
    KeyIds,
    KeyRequest,
    KeySizeMismatchError,
    Status,
    sae_path_segment,
    valid_sae_id,
)
from qkdproxy.core.keys import (
    KeyNotFoundError,
    KeySourceUnavailableError,
    QkdKey,
    QkdKeyError,
    key_id_to_text,
)
from qkdproxy.keys.kme_identity import ExpectedKme
from qkdproxy.keys.sources import KmeCallObserver, no_observer

MAX_RESPONSE_BYTES = 1024 * 1024
KEY_BITS = 256
STATUS_ATTEMPTS = 3


class KmeProtocolError(KeySourceUnavailableError):
    """The KME answered something that is not valid ETSI 014."""


class KmeUnauthorisedError(QkdKeyError):
    """401 on ``status`` or ``enc_keys``: the KME does not let this SAE (its client
    certificate) ask for keys towards that peer SAE. A configuration matter, not an outage."""

    kind = "unauthorised"


class KmeRefusedError(QkdKeyError):
    """Another 4xx: the KME is up and refused the request as made."""

    kind = "http_4xx"


# Error classes (the ``class`` label of kme_errors_total) that mean the KME itself is failing
# or unreachable: 5xx answers, network and TLS errors, answers that are not ETSI 014.
# Every 4xx is an answer from a working KME and never marks it down.
KME_DOWN_CLASSES = frozenset({"http_5xx", "timeout", "tls", "connect", "protocol", "unavailable"})


class Etsi014Client:
    """One SAE's connection to its KME at ``base_url`` (``https://host:port``)."""

    def __init__(
        self,
        base_url: str,
        ssl_context: ssl.SSLContext,
        *,
        timeout_s: float = 5.0,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: KmeCallObserver = no_observer,
        expected_kme: ExpectedKme | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._expected_kme = expected_kme
        if expected_kme is not None:
            ssl_context = expected_kme.prepare(ssl_context)
        self._observer = observer
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.breaker = breaker or CircuitBreaker()
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        # max_key_per_request per peer SAE, from status (see max_keys_per_request).
        self._request_caps: dict[str, int] = {}
        # From the last status: why this KME cannot give 256-bit keys, if it cannot.
        self.key_size_problem: str | None = None

    async def __aenter__(self) -> Etsi014Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = (
                aiohttp.TCPConnector(ssl=self._ssl, limit=32, keepalive_timeout=60)
                if self._expected_kme is None
                else IdentityCheckingConnector(
                    self._expected_kme, ssl=self._ssl, limit=32, keepalive_timeout=60
                )
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, version=aiohttp.HttpVersion11,
                raise_for_status=False,
            )  # fmt: skip
        return self._session

    async def status(self, slave_sae: str, attempts: int = STATUS_ATTEMPTS) -> Status:
        """``status`` for keys towards ``slave_sae``; retried, since it consumes nothing."""
        error: QkdKeyError | None = None
        for _ in range(attempts):
            try:
                status = Status.from_json(await self._call("GET", _path(slave_sae, "status")))
            except Etsi014FormatError as exc:
                raise KmeProtocolError(f"KME {self.base_url} status: {exc}") from None
            except KeySourceUnavailableError as exc:
                error = exc
                continue
            self.key_size_problem = status.key_size_problem(KEY_BITS)
            return status
        assert error is not None
        raise error

    async def max_keys_per_request(self, peer_sae: str) -> int:
        """How many key ids (or keys) one request towards ``peer_sae`` may carry.

        Read from ``status`` once and remembered until an ``enc_keys`` of several keys is
        refused (4xx: the KME may have lowered its limit, so the next call asks again; a
        refused ``dec_keys`` of several ids more often names an unknown one, and its ids are
        asked for one by one anyway). A KME that refuses ``status`` to this SAE (any 4xx) is
        taken to allow one per request; a failing KME gives 1 for this call only, and the
        next call asks again.
        """
        cap = self._request_caps.get(peer_sae)
        if cap is not None:
            return cap
        try:
            # One attempt: the key call that follows is the one whose failure should show.
            cap = (await self.status(peer_sae, attempts=1)).max_key_per_request
        except KeySourceUnavailableError:
            return 1
        except QkdKeyError:
            cap = 1
        self._request_caps[peer_sae] = cap
        return cap

    async def enc_keys(self, slave_sae: str, number: int = 1, size: int = 256) -> list[QkdKey]:
        """New keys shared with ``slave_sae`` (never retried: a retry could consume more)."""
        if size != KEY_BITS:
            raise ValueError("qkdproxy uses 256-bit keys")
        body = KeyRequest(number=number, size=size).to_json()
        try:
            data = await self._call("POST", _path(slave_sae, "enc_keys"), body)
        except KmeRefusedError as exc:
            if number > 1:
                # Paced refills ask for up to 64 keys: a KME that lowered its limit would
                # otherwise refuse every refill until the daemon restarts.
                self._request_caps.pop(slave_sae, None)
            if self.key_size_problem is None:
                raise
            # Most likely the reason; the status said so.
            raise KmeRefusedError(f"{exc}; KME {self.base_url} {self.key_size_problem}") from None
        keys = _container(data, size, number, f"KME {self.base_url} enc_keys")
        if len(keys.keys) != number:
            raise KmeProtocolError(
                f"KME {self.base_url} enc_keys: asked for {number} keys, got {len(keys.keys)}"
            )
        return [QkdKey(_key_id_bytes(k.key_id), k.key) for k in keys.keys]

    async def dec_keys(self, master_sae: str, key_ids: Sequence[bytes]) -> list[QkdKey]:
        """The keys ``master_sae`` took for us, in the order asked (never retried)."""
        texts = [key_id_to_text(k) for k in key_ids]
        data = await self._call(
            "POST", _path(master_sae, "dec_keys"), KeyIds(tuple(texts)).to_json()
        )
        keys = _container(data, 256, len(texts), f"KME {self.base_url} dec_keys")
        by_id = {k.key_id: k.key for k in keys.keys}
        if sorted(by_id) != sorted(texts):
            raise KmeProtocolError(
                f"KME {self.base_url} dec_keys: keys[].key_ID answered other key IDs than asked"
            )
        # The ids asked for are the keys' ids (the texts were formatted from them): not
        # parsed back from the texts.
        return [QkdKey(bytes(k), by_id[t]) for k, t in zip(key_ids, texts, strict=True)]

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        now = self._clock()
        if not self.breaker.allow(now):
            raise KeySourceUnavailableError(
                f"KME circuit open, next try in {self.breaker.retry_after(now):.1f} s"
            )
        started = time.perf_counter()
        call = path.rsplit("/", 1)[-1]
        try:
            result = await self._request(method, path, body, call)
        except QkdKeyError as exc:
            self._observer(call, time.perf_counter() - started, _error_class(exc))
            if isinstance(exc, KeySourceUnavailableError):
                self.breaker.record_failure(self._clock())
            else:
                # The KME answered (unknown key, bad request): it is alive.
                self.breaker.record_success()
            raise
        except BaseException:
            # Cancelled or broken mid-call: free the half-open trial slot.
            self.breaker.record_failure(self._clock())
            raise
        self._observer(call, time.perf_counter() - started, None)
        self.breaker.record_success()
        return result

    async def _request(self, method: str, path: str, body: dict[str, Any] | None, call: str) -> Any:
        try:
            async with self._client().request(
                # encoded: the path is percent-encoded already (SAE ids), keep it byte for byte
                method,
                yarl.URL(self.base_url + path, encoded=True),
                json=body,
                allow_redirects=False,
            ) as response:
                payload = await _read_bounded(response)
                code = response.status
        except (TimeoutError, aiohttp.ClientError, ssl.SSLError, OSError) as exc:
            error = KeySourceUnavailableError(f"KME unreachable: {transport_failure(exc)}")
            error.kind = _transport_class(exc)
            raise error from None
        if code == 200:
            return _decode(payload)
        raise error_for(call, code, payload)


class IdentityCheckingConnector(aiohttp.TCPConnector):
    """A connector that checks the KME's certificate against ``kme_identity`` right after
    each TLS handshake, before a request goes out on the connection."""

    def __init__(self, expected: ExpectedKme, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._expected = expected

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        transport = protocol.transport
        problem = self._expected.mismatch(
            transport.get_extra_info("ssl_object") if transport is not None else None
        )
        if problem is not None:
            if transport is not None:
                transport.close()
            raise aiohttp.ClientConnectorCertificateError(
                req.connection_key, ssl.SSLCertVerificationError(problem)
            )
        return protocol


def transport_failure(exc: BaseException) -> str:
    """What went wrong on the way to the KME, with the TLS verification message when there
    is one (``IP address mismatch``, ``unable to get local issuer certificate``, ...)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = exc.certificate_error
        detail = getattr(cause, "verify_message", None) or str(cause)
        text = f"TLS certificate verification failed: {detail}"
    elif isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        text = f"{type(exc).__name__} (no answer in time)"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:400]


def _transport_class(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError | aiohttp.ClientSSLError):
        return "tls"
    return "connect"


def _error_class(exc: QkdKeyError) -> str:
    if isinstance(exc, KmeProtocolError):
        return "protocol"
    if isinstance(exc, KeyNotFoundError):
        return "not_found"
    return exc.kind or "http_4xx"


def _path(sae: str, call: str) -> str:
    if not valid_sae_id(sae):
        raise ValueError(f"invalid SAE ID {sae!r}")
    return f"/api/v1/keys/{sae_path_segment(sae)}/{call}"


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, however it is chunked; KmeProtocolError beyond the size limit."""
    if (response.content_length or 0) > MAX_RESPONSE_BYTES:
        raise KmeProtocolError("KME response too large")
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            raise KmeProtocolError("KME response too large")
    return bytes(body)


def _decode(payload: bytes) -> Any:
    try:
        return json.loads(payload) if payload else None
    # RecursionError: json.loads gives up on deep nesting ("[" * 1000 is enough), and a
    # response up to MAX_RESPONSE_BYTES may nest far deeper.
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise KmeProtocolError("KME response is not JSON") from None


def _key_id_bytes(text: str) -> bytes:
    # Canonical 8-4-4-4-12 text only (a parsed key container's, checked by parse_key_id):
    # read directly, at a fifth of what uuid.UUID(text).bytes costs.
    return bytes.fromhex(text.replace("-", ""))


def _container(data: Any, size: int, number: int, where: str) -> KeyContainer:
    """Parse a key container; errors name the KME, the call (``where``) and the field."""
    try:
        return KeyContainer.from_json(data, size, max_keys=number)
    except KeySizeMismatchError as exc:
        raise KmeProtocolError(f"{where}: {exc} (qkdproxy needs {KEY_BITS}-bit keys)") from None
    except Etsi014FormatError as exc:
        raise KmeProtocolError(f"{where}: key container rejected: {exc}") from None


def error_for(call: str, code: int, payload: bytes) -> QkdKeyError:
    """The error for a non-200 answer to ``call``, classified by status code and call only.

    The message text (free-form, often not even JSON on real KMEs) is never interpreted; it
    is only quoted. dec_keys is always sent well formed, so any 400, 401 or 404 to it means
    the KME has no such key for this SAE. 401 elsewhere is an authorisation problem.
    """
    try:
        message = ErrorBody.from_json(json.loads(payload)).message
    except (ValueError, UnicodeDecodeError, RecursionError, Etsi014FormatError):
        message = ""
    text = f"KME answered {code}" + (f": {message}" if message else "")
    if code >= 500:
        error = KeySourceUnavailableError(text)
        error.kind = "http_5xx"
        return error
    if code < 400:
        return KmeProtocolError(f"unexpected HTTP status: {text}")
    if call == "dec_keys" and code in (400, 401, 404):
        return KeyNotFoundError(text)
    if code == 401:
        return KmeUnauthorisedError(
            f"{text} (not authorised: the KME does not accept this SAE's client certificate "
            f"for {call} towards that peer SAE; check the SAE ids and the KME's registration)"
        )
    return KmeRefusedError(text)
