"""ETSI 004 QoS negotiation (status 7 counter-proposals within configured bounds), status
messages that say what each status means, and the simulator accepting the reference
provider's use of OPEN_CONNECT's destination (its KME address)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qkdproxy.cli.kme import _settings as simulator_settings
from qkdproxy.cli.kme import parse_qos_demands
from qkdproxy.cli.main import build_parser
from qkdproxy.core.etsi004.codec import QoS
from qkdproxy.core.etsi004.qos import QosPolicy, describe_status
from qkdproxy.core.keys import KsidInUseError
from qkdproxy.core.tls.keyexchange import (
    ClientKeyExchange,
    HandshakeRejectedError,
    KeyApi,
    QkdOptions,
)
from qkdproxy.daemon.config import ConfigError, load_config
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.etsi004_client import QosNotMetError
from qkdproxy.keys.key_supply import run
from qkdproxy.keys.sources import KeySources
from qkdproxy.sim.pki import CertificateAuthority
from qkdproxy.sim.quirks import Quirk
from tests.conftest import groups
from tests.integration.test_etsi004 import Kmes, running_kmes
from tests.kme_helpers import kme_config_file

# What the QUBIP etsi-qkd-004 server's default check insists on (Min_bps and Jitter).
DEMANDS = (("min_bps", 1000), ("jitter", 10))
WITHIN = QosPolicy(bounds=(("min_bps", 0, 5000), ("jitter", 0, 20)))


@pytest.fixture
async def kmes(ca: CertificateAuthority) -> AsyncIterator[Kmes]:
    async with running_kmes(ca) as running:
        yield running


def demand(kmes: Kmes, demands: tuple[tuple[str, int], ...] = DEMANDS) -> None:
    for node in kmes.nodes.values():
        node.qos_demands = demands


async def test_counter_proposal_within_bounds_is_accepted_and_retried_once(kmes: Kmes) -> None:
    demand(kmes)
    alice = kmes.client("alice", "bob", "a", qos=WITHIN)
    bob = kmes.client("bob", "alice", "b", qos=WITHIN)
    ksid = await alice.open(None)
    assert kmes.nodes["a"].faults.calls == 2  # status 7, then the retry with the counter
    assert await bob.open(ksid) == ksid
    assert kmes.nodes["b"].faults.calls == 2
    assert await alice.get_key(ksid, 0) == await bob.get_key(ksid, 0)
    # The accepted QoS is kept: the next OPEN_CONNECT needs no negotiation.
    calls = kmes.nodes["a"].faults.calls
    await alice.open(None)
    assert kmes.nodes["a"].faults.calls == calls + 1


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (
            QosPolicy(bounds=(("min_bps", 0, 5000), ("jitter", 0, 5))),
            "Jitter 10 (asked 0; allowed 0..5)",
        ),
        (QosPolicy(), "Min_bps 1000 (asked 0; no bounds configured); Jitter 10 (asked 0; "),
    ],
)
async def test_counter_proposal_outside_bounds_names_the_parameters(
    kmes: Kmes, policy: QosPolicy, message: str
) -> None:
    demand(kmes)
    alice = kmes.client("alice", "bob", "a", qos=policy)
    with pytest.raises(QosNotMetError) as info:
        await alice.open(None)
    text = str(info.value)
    assert text.startswith("status 7 (OPEN_CONNECT failed because the requested QoS settings")
    assert message in text
    assert "Key_chunk_size" not in text and "mimetype" not in text
    assert kmes.nodes["a"].faults.calls == 1  # not retried
    assert info.value.counter_proposal.min_bps == 1000


async def test_a_second_counter_proposal_is_not_chased(kmes: Kmes) -> None:
    """The KME moves the goalposts after we accepted: one retry only, then a clear error."""
    demand(kmes)
    alice = kmes.client("alice", "bob", "a", qos=WITHIN)
    original = kmes.nodes["a"].admit
    calls = [0]

    async def moving() -> object:
        calls[0] += 1
        demand(kmes, (("min_bps", 1000 * calls[0]), ("jitter", 10)))
        return await original()

    kmes.nodes["a"].admit = moving  # type: ignore[method-assign,assignment]
    with pytest.raises(QosNotMetError, match=r"again after accepting .*Min_bps 0 -> 1000"):
        await alice.open(None)


async def test_handshake_reason_names_the_call_once(kmes: Kmes) -> None:
    demand(kmes)
    alice = kmes.client("alice", "bob", "a", qos=QosPolicy())
    context = KeyContext(KeySources(stream=alice), QkdOptions(api=KeyApi.ETSI_004))
    hybrid = groups("qkd_mlkem768")[0]
    client = ClientKeyExchange([hybrid], context)
    with pytest.raises(HandshakeRejectedError) as info:
        await run(client.offer(hybrid.group.code_point))
    reason = str(info.value)
    assert reason.count("ETSI 004 OPEN_CONNECT") == 1, reason
    assert "Min_bps 1000" in reason


def test_every_status_has_its_meaning() -> None:
    assert describe_status(5).startswith("status 5 (OPEN_CONNECT failed because the "
                                         "Key_stream_ID is in use")  # fmt: skip
    assert describe_status(4) == (
        "status 4 (no QKD connection available (link down, stream not open for this "
        "application, or KME failing))"
    )
    assert describe_status(99) == "status 99 (not defined by ETSI GS QKD 004)"


def test_qos_policy_judgement() -> None:
    asked = WITHIN.qos(32)
    counter = QoS(64, 0, 1000, 10, 0, 1000, 600, "text/plain")
    assert WITHIN.problems(asked, counter) == [
        "Key_chunk_size 64 (we need 32)",
        "Metadata_mimetype 'text/plain' (we read 'application/json')",
    ]
    fine = QoS(32, 0, 1000, 10, 0, 1000, 600, "Application/JSON")
    assert WITHIN.problems(asked, fine) == []
    assert WITHIN.adopt(asked, fine).metadata_mimetype == "application/json"
    with pytest.raises(ValueError, match="cannot be negotiated"):
        QosPolicy(bounds=(("key_chunk_size", 1, 64),))
    with pytest.raises(ValueError, match="low <= high"):
        QosPolicy(bounds=(("jitter", 5, 1),))


# ------------------------------------------------------- the reference's destination


async def test_reference_destination_is_refused_without_the_setting(kmes: Kmes) -> None:
    """The reference names its KME (server://host:port) as destination: by default the
    simulator wants the peer application's id, and the status 5 message says what to check."""
    reference = kmes.client("alice", f"server://127.0.0.1:{kmes.ports['a']}", "a")
    ksid = await reference.open(None)
    bob = kmes.client("bob", "alice", "b")
    with pytest.raises(KsidInUseError, match="check source and destination"):
        await bob.open(ksid)


@pytest.mark.parametrize("reference_side", ["client", "server"])
async def test_reference_destination_works_with_ordinary_sae_ids(
    kmes: Kmes, reference_side: str
) -> None:
    for node in kmes.nodes.values():
        node.quirks = frozenset({Quirk.KME_ADDRESS_DESTINATION})
    reference = kmes.client("alice", f"server://127.0.0.1:{kmes.ports['b']}", "a")
    qkdproxy = kmes.client("bob", "alice", "b")
    first, second = (reference, qkdproxy) if reference_side == "client" else (qkdproxy, reference)
    ksid = await first.open(None)
    assert await second.open(ksid) == ksid
    assert await first.get_key(ksid, 0) == await second.get_key(ksid, 0)
    # A third application still cannot join the pair's stream.
    with pytest.raises(KsidInUseError):
        await kmes.client("carol", "alice", "b").open(ksid)


# ---------------------------------------------------------------------- configuration


def config_with(tmp_path: Path, lines: str, api: str = "004") -> Path:
    return kme_config_file(tmp_path, lines, api=api)


def test_qos_configuration(tmp_path: Path) -> None:
    assert load_config(config_with(tmp_path, "")).kmes["k"].qos is None
    text = "qos = { min_bps = 100, timeout_ms = 2000 }\nqos_bounds = { jitter = [0, 50] }"
    policy = load_config(config_with(tmp_path, text)).kmes["k"].qos
    assert policy == QosPolicy(min_bps=100, timeout_ms=2000, bounds=(("jitter", 0, 50),))
    bad = [
        ("qos = { speed = 1 }", "qos: unknown field(s) speed"),
        ("qos_bounds = { jitter = [5] }", "qos_bounds: jitter must be [low, high]"),
        (
            "qos_bounds = { key_chunk_size = [1, 2] }",
            "qos_bounds: key_chunk_size cannot be negotiated",
        ),
        ("qos = { jitter = -1 }", "qos: jitter must be between 0 and"),
    ]
    for lines, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(config_with(tmp_path, lines))
    with pytest.raises(ConfigError, match="QoS is an ETSI 004 setting"):
        load_config(config_with(tmp_path, "qos = { jitter = 1 }", api="014"))


def test_simulator_command_line() -> None:
    args = build_parser().parse_args(
        ["kme", "--quirk", "kme-address-destination", "--qos-demand", "min_bps=1000",
         "--qos-demand", "jitter=10"]
    )  # fmt: skip
    settings = simulator_settings(args)
    assert settings.qos_demands == DEMANDS
    assert settings.quirks == {Quirk.KME_ADDRESS_DESTINATION}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_qos_demands(["speed=1"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_qos_demands(["jitter=-1"])
