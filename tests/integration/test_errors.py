"""Typed errors: configuration problems apart from other ValueErrors, our own bugs reported
as internal_error (with their traceback), never as the peer's fault."""

from __future__ import annotations

import asyncio

import pytest

from qkdproxy.core.addresses import AddressError
from qkdproxy.core.errors import QkdproxyError, SettingError
from qkdproxy.core.etsi014.models import Etsi014FormatError
from qkdproxy.core.groups import GroupError
from qkdproxy.core.hybrid import GroupUnavailableError
from qkdproxy.core.kem.base import KemError
from qkdproxy.core.keys import QkdKeyError
from qkdproxy.core.peer.frames import FrameError
from qkdproxy.core.tls.credentials import CredentialError
from qkdproxy.core.tls.hello import ClientHello, HelloParseError
from qkdproxy.core.tls.keyexchange import KeySteps, QkdOptions, ServerKeyExchange
from qkdproxy.core.tls.wire import Alert
from qkdproxy.daemon.config import ConfigError
from qkdproxy.daemon.tunnel import failure_class
from qkdproxy.io.tls_stream import HandshakeError, Outcome, TlsStreamError
from qkdproxy.tools.loopback import loopback_pair
from tests.conftest import groups


@pytest.mark.parametrize(
    "error", [ConfigError, CredentialError, GroupError, GroupUnavailableError, AddressError]
)
def test_configuration_problems_are_setting_errors(error: type[Exception]) -> None:
    assert issubclass(error, SettingError)


@pytest.mark.parametrize("error", [KemError, FrameError, HelloParseError, Etsi014FormatError])
def test_malformed_input_is_not_a_configuration_problem(error: type[Exception]) -> None:
    # These used to share only ValueError with configuration errors, so any of them at
    # start-up was reported as "bad configuration" (exit 2).
    assert not issubclass(error, SettingError)


@pytest.mark.parametrize("error", [HandshakeError, TlsStreamError, QkdKeyError, SettingError])
def test_one_base_for_every_qkdproxy_error(error: type[Exception]) -> None:
    assert issubclass(error, QkdproxyError)


async def test_a_bug_of_ours_in_a_handshake_is_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: ServerKeyExchange, hello: ClientHello) -> KeySteps[bool]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ServerKeyExchange, "on_client_hello", broken)
    failures: list[BaseException] = []
    async with loopback_pair(groups("x25519"), server_failures=failures) as pair:
        with pytest.raises(HandshakeError) as refused:
            await asyncio.wait_for(pair.handshake(pair.client(groups("x25519"), QkdOptions())), 20)
        async with asyncio.timeout(10):
            await pair.wait_for_server(lambda: bool(failures))
    # The client learns it was our fault through the alert, not a misleading one ...
    assert (refused.value.alert, refused.value.remote) == (Alert.INTERNAL_ERROR, True)
    # ... and the server records it as internal, keeping the traceback in its log.
    server = failures[0]
    assert isinstance(server, HandshakeError)
    assert (server.outcome, server.remote) == (Outcome.INTERNAL, False)
    assert failure_class(server) == "internal_error"
    assert "a bug" not in server.reason
    logged = [r for r in caplog.records if r.getMessage() == "internal error in a handshake"]
    assert logged and logged[0].exc_info is not None
