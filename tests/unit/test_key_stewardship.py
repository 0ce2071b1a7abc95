"""Key stewardship, pure parts and key sources with a fake KME (no sockets, hand-driven clock):
the pre-authentication gate, demand-sized supplies, the refusal streak, the key account."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from qkdproxy.core.accounting import FATES, KeyAccount, KeyLedger
from qkdproxy.core.keys import KeyNotFoundError, QkdKey
from qkdproxy.core.ratelimit import TokenBucket, source_key
from qkdproxy.core.tls.keyexchange import HandshakeRejectedError, ServerKeyExchange
from qkdproxy.core.tls.wire import Alert
from qkdproxy.daemon.config import ConfigError, load_config
from qkdproxy.daemon.metrics import KmeState, StateCollector, TunnelState
from qkdproxy.keys.announce import AnnouncementSink
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.etsi014_client import Etsi014Client
from qkdproxy.keys.etsi014_supply import Etsi014Master
from qkdproxy.keys.key_supply import run
from qkdproxy.keys.preauth import (
    CLIENT_INITIATED,
    SERVER_INITIATED,
    Budget,
    GatedSlave,
    PreAuthSettings,
    SpendGate,
)
from qkdproxy.keys.responder import HELLO_SOURCE
from qkdproxy.keys.sources import REFUSALS_BEFORE_FLUSH, KeySources, RefusalStreak
from qkdproxy.keys.supply import (
    MAX_PACED_BATCH,
    REFILL_BATCH,
    REFILL_INTERVAL_S,
    SupplySettings,
    SupplySizer,
    refill_batch,
)
from tests.integration.test_peer_channel import FakeKme
from tests.unit.test_keyexchange import MLKEM768, client_hello


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def gate(flows: set[str], link: TokenBucket | None = None, clock: Clock | None = None) -> SpendGate:
    settings = PreAuthSettings(frozenset(flows), Budget(1.0, 10.0), Budget(1.0, 10.0))
    return SpendGate(settings, link or TokenBucket(100.0, 100.0), clock or Clock())


def as_source(host: str) -> None:
    HELLO_SOURCE.set(source_key(host))


# ------------------------------------------------------------------ the gate


def test_a_flow_that_is_off_is_refused_and_counted() -> None:
    only_client = gate({CLIENT_INITIATED})
    as_source("192.0.2.1")
    assert only_client.admit(SERVER_INITIATED) is not None
    assert only_client.admit(CLIENT_INITIATED) is None
    assert only_client.counters.refused == {"flow_off": 1}


def test_one_source_gets_its_burst_then_its_rate_and_others_are_unaffected() -> None:
    clock = Clock()
    both = gate({CLIENT_INITIATED, SERVER_INITIATED}, clock=clock)
    as_source("2001:db8::1")
    admitted = sum(both.admit(SERVER_INITIATED) is None for _ in range(50))
    assert admitted == 10
    # Another address of the same /64 is the same source.
    as_source("2001:db8::ffff:2")
    assert both.admit(SERVER_INITIATED) is not None
    as_source("2001:db8:1::1")
    assert both.admit(SERVER_INITIATED) is None
    clock.now = 3.0
    as_source("2001:db8::7")
    assert sum(both.admit(SERVER_INITIATED) is None for _ in range(10)) == 3
    assert both.counters.refused["source_budget"] == 40 + 1 + 7


def test_the_link_budget_is_shared_by_every_tunnel_of_a_kme() -> None:
    link = TokenBucket(0.0, 5.0)
    first, second = (gate({SERVER_INITIATED}, link) for _ in range(2))
    results = []
    for index in range(8):
        as_source(f"198.51.100.{index}")
        results.append((first if index % 2 else second).admit(SERVER_INITIATED) is None)
    assert results.count(True) == 5
    assert (
        first.counters.refused.get("link_budget", 0) + second.counters.refused.get("link_budget", 0)
        == 3
    )


async def test_unknown_key_ids_are_bounded_per_source() -> None:
    class Unknown:
        calls = 0

        async def get_key(self, key_id: bytes) -> QkdKey:
            self.calls += 1
            raise KeyNotFoundError("unknown")

    inner = Unknown()
    the_gate = gate({CLIENT_INITIATED})
    slave = GatedSlave(inner, the_gate)
    as_source("203.0.113.9")
    for _ in range(10):
        assert the_gate.admit(CLIENT_INITIATED) is None
        with pytest.raises(KeyNotFoundError):
            await slave.get_key(bytes(16))
    assert the_gate.admit(CLIENT_INITIATED) is not None
    assert inner.calls == 10
    as_source("203.0.113.10")
    assert the_gate.admit(CLIENT_INITIATED) is None


def test_the_gated_slave_passes_announcements_on_to_the_cache() -> None:
    class Cache:
        def __init__(self) -> None:
            self.ids: list[bytes] = []

        def announced(self, key_ids: Sequence[bytes]) -> None:
            self.ids += key_ids

        async def get_key(self, key_id: bytes) -> QkdKey:
            raise KeyNotFoundError("unused")

    cache = Cache()
    slave = GatedSlave(cache, gate({CLIENT_INITIATED}))
    assert isinstance(slave, AnnouncementSink)
    slave.announced([b"\x01" * 16])
    assert cache.ids == [b"\x01" * 16]


async def test_server_consults_the_gate_before_any_kme_call() -> None:
    kme = FakeKme()
    master = Etsi014Master(cast(Etsi014Client, kme), "sae-a")
    context = KeyContext(KeySources(master=master), gate=gate({CLIENT_INITIATED}))
    code = MLKEM768.group.code_point
    _, public = MLKEM768.generate()
    hello = client_hello([MLKEM768], {code: public + bytes(16)})  # zero id: server-initiated
    with pytest.raises(HandshakeRejectedError, match="flow is off") as info:
        await run(ServerKeyExchange([MLKEM768], context).on_client_hello(hello))
    assert info.value.alert is Alert.HANDSHAKE_FAILURE
    assert kme.calls == 0
    assert context.ledger.taken == 0


# ----------------------------------------------------------------- the supply


def test_supply_is_the_floor_when_idle_and_follows_rate_times_round_trip() -> None:
    sizer = SupplySizer(SupplySettings(floor=4, ceiling=64, margin=2.0, window_s=10.0))
    assert sizer.target(0.0) == 4
    sizer.round_trip(0.1)
    for tick in range(1000):  # 100 takes/s for 10 s
        sizer.took(tick / 100)
    assert sizer.target(10.0) == 4 + 20
    assert sizer.target(100.0) == 4  # idle again


def test_sparse_demand_holds_only_what_it_uses_before_keys_age_out() -> None:
    sizer = SupplySizer(SupplySettings(floor=4, max_age_s=120.0, window_s=60.0))
    sizer.took(0.0)  # one a minute: 60 s x 1/60 = 1 key is all that stays fresh enough
    assert sizer.target(1.0) == 1


def test_a_rise_in_demand_is_seen_within_seconds() -> None:
    sizer = SupplySizer(SupplySettings(floor=4, margin=2.0, window_s=60.0))
    sizer.round_trip(0.1)
    for tick in range(250):  # 50 takes/s for 5 s, after a quiet minute
        sizer.took(60.0 + tick / 50)
    # 50/s x 0.1 s x 2 on top of the floor (the minute's average would say 4 + 3).
    assert sizer.target(65.0) == 4 + 10


def test_supply_never_exceeds_its_ceiling() -> None:
    sizer = SupplySizer(SupplySettings(floor=2, ceiling=8, window_s=1.0))
    sizer.round_trip(1.0)
    for _ in range(500):
        sizer.took(0.0)
    assert sizer.target(0.5) == 8


@pytest.mark.parametrize(
    "bad",
    [{"floor": 5, "ceiling": 4}, {"max_age_s": 0}, {"margin": 0.5}, {"ceiling": 0, "floor": 0}],
)
def test_supply_settings_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="need"):
        SupplySettings(**bad)  # type: ignore[arg-type]


async def test_ten_idle_minutes_cost_at_most_the_floor() -> None:
    clock, kme = Clock(), FakeKme()
    account = KeyAccount()
    master = Etsi014Master(
        cast(Etsi014Client, kme), "sae-b", SupplySettings(), clock, account=account
    )
    master.ensure_refill()
    await master.wait_refilled()
    assert master.depth == 4
    for minute in range(1, 11):
        clock.now = minute * 60.0
        master.ensure_refill()  # what a scrape or a restart of polling would do: nothing
        await master.wait_refilled()
        assert master.depth in (0, 4)
    assert account.drawn == 4
    assert account.fates["expired"] == 4
    await master.aclose()


async def test_master_honours_max_key_per_request() -> None:
    kme = FakeKme(max_key_per_request=2)
    master = Etsi014Master(cast(Etsi014Client, kme), "sae-b", SupplySettings(floor=5))
    master.ensure_refill()
    await master.wait_refilled()
    assert kme.sizes_asked == [2, 2, 1]
    await master.aclose()


async def test_refills_carry_at_least_two_keys() -> None:
    # One enc_keys call (and the peer's dec_keys for the announced ids) per two connections,
    # not per connection; an empty supply still refills at once.
    kme = FakeKme()
    # A one-second window at a frozen clock: the takes below are a steady demand.
    supply = SupplySettings(floor=4, ceiling=4, window_s=1.0)
    master = Etsi014Master(cast(Etsi014Client, kme), "sae-b", supply, clock=lambda: 0.0)
    master.ensure_refill()
    await master.wait_refilled()
    await master.take_key()
    await master.wait_refilled()
    assert (kme.sizes_asked, master.depth) == ([4], 3)  # one below target: no call yet
    await master.take_key()
    await master.wait_refilled()
    assert (kme.sizes_asked, master.depth) == ([4, 2], 4)
    for _ in range(4):
        await master.take_key()
    await master.wait_refilled()
    assert kme.sizes_asked == [4, 2, 4] and master.depth == 4
    await master.aclose()


def test_refill_batches_stay_within_half_the_target() -> None:
    # Bigger batches mean fewer KME calls per connection, but a supply that waits for a
    # batch must still hold half its target: that covers the keys taken in a round trip.
    assert [refill_batch(t) for t in range(1, 9)] == [1, 2, 2, 2, 2, 3, 3, 4]
    for target in range(1, 300):
        batch = refill_batch(target)
        assert 1 <= batch <= min(target, REFILL_BATCH)
        if target >= 4:  # below that, a refill of at least two keys comes first
            assert target - batch >= target // 2


async def test_a_busy_supply_refills_in_batches_and_never_runs_below_half() -> None:
    kme = FakeKme()
    # A one-second window at a frozen clock: the takes below are a steady demand.
    supply = SupplySettings(floor=16, ceiling=16, window_s=1.0)
    master = Etsi014Master(cast(Etsi014Client, kme), "sae-b", supply, clock=lambda: 0.0)
    master.ensure_refill()
    await master.wait_refilled()
    lowest = master.depth
    for _ in range(64):
        await master.take_key()
        lowest = min(lowest, master.depth)
        await master.wait_refilled()
    # 64 keys in calls of 8 (one call per eight connections, and the same for the peer's
    # dec_keys of the announced ids), never an on-demand fetch, never below 8 held.
    assert kme.sizes_asked == [16] + [8] * 8
    assert master.counters.fetched_on_demand == 0
    assert lowest == 8
    await master.aclose()


def test_refill_levels_pace_kme_calls_only_under_heavy_demand() -> None:
    sizer = SupplySizer(SupplySettings(floor=4, ceiling=128, window_s=1.0))
    # Idle: the floor, refilled in the usual batch.
    assert sizer.refill_levels(0.0) == (4 - refill_batch(4), 4)
    # Light demand (20/s): a refill's paced batch (one key) is below the usual one, so the
    # levels are the target's, as before pacing existed.
    for i in range(20):
        sizer.took(i / 20)
    levels, target = sizer.refill_levels(1.0), sizer.target(1.0)
    assert levels == (target - refill_batch(target), target)
    # Heavy demand (800/s): the supply fills on top of its usual refill level with what the
    # demand takes over REFILL_INTERVAL_S, so the KME sees a refill per that interval.
    for i in range(800):
        sizer.took(1.0 + i / 800)
    levels, target = sizer.refill_levels(2.0), sizer.target(2.0)
    paced = round(800 * REFILL_INTERVAL_S)
    assert paced > REFILL_BATCH
    assert levels == (target - refill_batch(target), target - refill_batch(target) + paced)
    # The paced batch is bounded, and so is what the supply holds.
    for i in range(8000):
        sizer.took(2.0 + i / 8000)
    levels = sizer.refill_levels(3.0)
    assert levels.high - levels.low == MAX_PACED_BATCH
    capped = SupplySizer(SupplySettings(floor=4, ceiling=24, window_s=1.0))
    for i in range(800):
        capped.took(i / 800)
    assert capped.refill_levels(1.0).high == 24


def test_pacing_sees_a_rise_in_demand_within_a_second() -> None:
    # The sizer's own rate averages over seconds (400/s for one second reads as 80/s); the
    # paced batch follows the last second's demand.
    sizer = SupplySizer(SupplySettings(floor=4, ceiling=128))
    for i in range(400):
        sizer.took(i / 400)
    levels = sizer.refill_levels(1.0)
    assert levels.high - levels.low == round(400 * REFILL_INTERVAL_S)


def test_paced_refills_never_hold_more_than_the_demand_uses_before_keys_age() -> None:
    # 5 keys/s with keys that age out after 4 s: at most 10 keys are worth holding.
    sizer = SupplySizer(SupplySettings(floor=0, ceiling=128, max_age_s=4.0, window_s=1.0))
    for i in range(5):
        sizer.took(i / 5)
    levels = sizer.refill_levels(1.0)
    assert levels.high <= 10


async def test_a_supply_under_heavy_demand_calls_the_kme_once_per_refill_interval() -> None:
    kme = FakeKme()
    clock = Clock()
    supply = SupplySettings(floor=4, ceiling=128, window_s=1.0)
    master = Etsi014Master(cast(Etsi014Client, kme), "sae-b", supply, clock=clock)
    master.ensure_refill()
    await master.wait_refilled()
    rate = 400  # keys per second, one take each 2.5 ms
    for _ in range(rate):  # one second to measure the demand
        clock.now += 1 / rate
        await master.take_key()
        await master.wait_refilled()
    asked_before = len(kme.sizes_asked)
    for _ in range(rate):
        clock.now += 1 / rate
        await master.take_key()
        await master.wait_refilled()
    calls = len(kme.sizes_asked) - asked_before
    # One enc_keys per REFILL_INTERVAL_S of demand (20 keys each), where unpaced refills of
    # at most REFILL_BATCH keys would take 50 calls for the same 400 keys.
    assert calls <= round(1 / REFILL_INTERVAL_S) + 1
    assert min(kme.sizes_asked[asked_before:]) >= rate * REFILL_INTERVAL_S
    assert master.counters.fetched_on_demand == 0
    await master.aclose()


class HeldKme(FakeKme):
    """enc_keys answers only once ``release`` is set: takes can happen during the call."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def enc_keys(self, slave_sae: str, number: int = 1, size: int = 256) -> list[QkdKey]:
        await self.release.wait()
        self.release.clear()
        return await super().enc_keys(slave_sae, number, size)


async def refilling_supply() -> tuple[HeldKme, Etsi014Master]:
    """A full supply of 16 taken down to its refill level: a refill of 8 is on its way."""
    kme = HeldKme()
    supply = SupplySettings(floor=16, ceiling=16, window_s=1.0)
    master = Etsi014Master(cast(Etsi014Client, kme), "sae-b", supply, clock=lambda: 0.0)
    master.ensure_refill()
    kme.release.set()
    await master.wait_refilled()
    for _ in range(8):
        await master.take_key()
    await asyncio.sleep(0)
    return kme, master


async def answer_twice(kme: HeldKme) -> None:
    """Let the call under way return, and a further one (if any comes) return at once."""
    kme.release.set()
    await asyncio.sleep(0)
    kme.release.set()


@pytest.mark.parametrize(
    ("taken_meanwhile", "calls", "depth"),
    [
        # Still above the refill level when the batch came: the keys taken meanwhile wait
        # for the next refill (topping them up at once made a call of one to three keys
        # after every refill under load).
        (3, [16, 8], 13),
        # The round trip emptied the supply: it fills again at once.
        (8, [16, 8, 8], 16),
    ],
)
async def test_keys_taken_during_a_refill_are_topped_up_only_below_the_refill_level(
    taken_meanwhile: int, calls: list[int], depth: int
) -> None:
    kme, master = await refilling_supply()
    for _ in range(taken_meanwhile):
        await master.take_key()
    await answer_twice(kme)
    await master.wait_refilled()
    assert (kme.sizes_asked, master.depth) == (calls, depth)
    assert master.counters.fetched_on_demand == 0
    await master.aclose()


async def test_a_server_supply_never_announces() -> None:
    master = Etsi014Master(
        cast(Etsi014Client, FakeKme()), "sae-a", SupplySettings(floor=4), announces=False
    )
    master.ensure_refill()
    await master.wait_refilled()
    assert master.announce(64) == []
    await master.aclose()


# --------------------------------------------------- refusals and the account


def test_refusal_streak_flushes_only_after_several_in_a_row() -> None:
    streak = RefusalStreak(threshold=3, interval_s=10.0)
    assert not streak.refused(0.0)
    assert not streak.refused(0.0)
    streak.accepted()
    assert not streak.refused(1.0)
    assert not streak.refused(1.0)
    assert streak.refused(1.0)
    # Rate limited too: three more right away do not flush again.
    assert [streak.refused(2.0) for _ in range(3)] == [False] * 3
    assert streak.refused(11.5)


async def test_one_refusal_costs_one_key_not_the_supply() -> None:
    account = KeyAccount()
    master = Etsi014Master(
        cast(Etsi014Client, FakeKme()), "sae-b", SupplySettings(floor=8, ceiling=8),
        account=account,
    )  # fmt: skip
    master.ensure_refill()
    await master.wait_refilled()
    await master.take_key()
    assert not master.flush_after_refusal()
    assert master.depth == 7
    assert not master.flush_after_refusal()
    assert master.flush_after_refusal()
    assert master.depth == 0
    assert account.fates["flushed"] == 7
    await master.wait_refilled()
    await master.aclose()
    assert account.drawn == sum(account.fates.values()) + account.held


async def test_account_balances_at_every_step() -> None:
    account = KeyAccount()
    ledger = KeyLedger(account=account)
    master = Etsi014Master(
        cast(Etsi014Client, FakeKme()), "sae-b", SupplySettings(floor=4), account=account
    )
    master.ensure_refill()
    await master.wait_refilled()
    assert (account.drawn, account.held) == (4, 4)
    for fate in ("consumed", "handshake_failed", "hello_retry"):
        await master.take_key()
        ledger.record_taken()
        if fate == "consumed":
            ledger.record_consumed()
        else:
            ledger.record_wasted(fate)
    ledger.reclassify_refused()
    await master.wait_refilled()
    await master.aclose()
    assert account.held == 0
    assert account.drawn == sum(account.fates.values())
    assert account.fates["consumed"] == 1
    assert account.fates["refused"] == 1
    assert account.fates["hello_retry"] == 1
    assert account.fates["stranded"] > 0
    assert set(account.fates) == set(FATES)
    assert account.key_yield == pytest.approx(1 / account.drawn)


# ------------------------------------------------------------------ config


def write(tmp_path: Path, tunnel: str, kme: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        '[kme.k]\nurl = "https://127.0.0.1:1"\nsae_id = "a"\npeer_sae_id = "b"\n'
        'cert = "c"\nkey = "k"\nca = "ca"\n' + kme + '\n[[tunnel]]\nrole = "server"\n'
        'listen = "127.0.0.1:1"\nconnect = "127.0.0.1:2"\ncert = "c"\nkey = "k"\nca = "ca"\n'
        'allow_any_peer = true\nkme = "k"\n' + tunnel
    )
    return path


def test_config_flows_default_to_client_initiated_and_accept_short_names(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).tunnels[0].preauth.flows == {CLIENT_INITIATED}
    config = load_config(write(tmp_path, 'flows = ["client", "server-initiated"]\n'))
    assert config.tunnels[0].preauth.flows == {CLIENT_INITIATED, SERVER_INITIATED}


def test_config_supply_and_budgets(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "preauth_keys_per_source_per_s = 0.5\npreauth_keys_per_source_burst = 3\n",
            "supply_floor = 2\nsupply_ceiling = 16\nmax_key_age_s = 30\npreauth_keys_per_s = 4\n",
        )
    )
    kme, tunnel = config.kmes["k"], config.tunnels[0]
    assert (kme.supply.floor, kme.supply.ceiling, kme.supply.max_age_s) == (2, 16, 30.0)
    assert kme.preauth_link == Budget(4.0, 20.0)
    assert tunnel.preauth.per_source == Budget(0.5, 3.0)


@pytest.mark.parametrize(
    ("tunnel", "kme", "fragment"),
    [
        ('flows = ["sideways"]\n', "", "flows"),
        ("flows = []\n", "", "flows"),
        ("", "supply_floor = 9\nsupply_ceiling = 4\n", "supply_ceiling"),
        ("preauth_keys_per_source_per_s = -1\n", "", "preauth_keys_per_source_per_s"),
        ("", "supply_margin = 0.5\n", "supply_margin"),
        ("", "max_key_age_s = 0\n", "max_key_age_s"),
    ],
)
def test_config_refuses_bad_stewardship_settings(
    tmp_path: Path, tunnel: str, kme: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(tmp_path, tunnel, kme))


async def test_gate_reads_the_source_of_its_own_task() -> None:
    both = gate({SERVER_INITIATED})

    async def one(host: str) -> bool:
        as_source(host)
        await asyncio.sleep(0)
        return both.admit(SERVER_INITIATED) is None

    # Tasks copy the context: each sees its own source, however they interleave.
    results = await asyncio.gather(*(one(f"192.0.2.{i % 2}") for i in range(30)))
    assert results.count(True) == 20


def test_metrics_expose_the_account_refusals_and_fallback_reasons() -> None:
    account = KeyAccount()
    account.draw(10)
    account.settle("consumed", 6)
    account.settle("expired", 1)
    refusing = gate({CLIENT_INITIATED})
    as_source("192.0.2.7")
    refusing.admit(SERVER_INITIATED)
    collector = StateCollector(
        tunnels=[TunnelState("t", "client", lambda: 0, dict, lambda: {"opened": 0, "rejected": 0,
                 "fallbacks": 2}, fallback_reasons=lambda: {"kme_exhausted": 2})],
        kmes=[KmeState("k", lambda: True, lambda: None, lambda: 3, lambda: 0.0, lambda: 100,
                       dict, account=account, pool_trend=lambda: -2.0)],
        gates=[("t", refusing)],
    )  # fmt: skip
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'qkdproxy_qkd_keys_drawn_total{kme="k"} 10.0' in text
    assert 'qkdproxy_qkd_key_fates_total{fate="consumed",kme="k"} 6.0' in text
    assert 'qkdproxy_qkd_keys_held{kme="k"} 3.0' in text
    assert 'qkdproxy_qkd_key_yield{kme="k"} 0.857' in text
    # Net of refill: 100 keys shrinking by 2 a second.
    assert 'qkdproxy_kme_pool_exhaustion_seconds{kme="k"} 50.0' in text
    assert 'qkdproxy_preauth_refused_total{reason="flow_off",tunnel="t"} 1.0' in text
    assert (
        'qkdproxy_policy_fallback_reasons_total{reason="kme_exhausted",role="client",tunnel="t"} 2.0'
        in text
    )


@dataclass
class SlowKme(FakeKme):
    """FakeKme whose enc_keys takes a few event-loop turns and ``round_trip_s`` on the
    clock, so that takes, on-demand fetches and refills interleave as they do against a
    remote KME (and the sizer sees a round trip, so the target follows the demand)."""

    clock: Clock = field(default_factory=Clock)
    round_trip_s: float = 0.25

    async def enc_keys(self, slave_sae: str, number: int = 1, size: int = 256) -> list[QkdKey]:
        for _ in range(3):
            await asyncio.sleep(0)
        self.clock.now += self.round_trip_s
        return await super().enc_keys(slave_sae, number, size)


async def test_bursts_keep_the_account_balanced_and_hold_at_most_the_target() -> None:
    # Concurrent bursts (as an unauthenticated flood of zero-id hellos would cause, up to
    # the source budget) with refills in batches, keys ageing out, a flush and a stop: every
    # key the KME handed out is taken once or ends in one fate, and the supply never holds
    # more than the sizer's highest target, so the waste at a flush or a stop is bounded.
    clock, account = Clock(), KeyAccount()
    kme = SlowKme(max_key_per_request=5, clock=clock)
    supply = SupplySettings(floor=4, ceiling=24, max_age_s=30.0, window_s=10.0)
    master = Etsi014Master(cast(Etsi014Client, kme), "sae-b", supply, clock, account=account)
    master.ensure_refill()
    await master.wait_refilled()
    taken: list[bytes] = []
    highest_target, deepest = master.target, master.depth

    def check() -> None:
        nonlocal highest_target, deepest
        highest_target, deepest = max(highest_target, master.target), max(deepest, master.depth)
        assert account.drawn == len(kme.handed_out)
        assert account.held == len(taken) + master.depth
        assert len(set(taken)) == len(taken)

    # (seconds since the last burst, connections): quiet gaps longer than max_age_s too.
    for step, (gap, burst) in enumerate(
        [(0, 40), (2, 30), (3, 3), (1, 25), (40, 0), (5, 12), (1, 1)]
    ):
        clock.now += gap
        taken += [
            k.key_id for k in await asyncio.gather(*(master.take_key() for _ in range(burst)))
        ]
        check()
        await master.wait_refilled()
        check()
        if step == 3:
            for _ in range(REFUSALS_BEFORE_FLUSH):
                master.flush_after_refusal()
            await master.wait_refilled()
            check()
    assert deepest <= highest_target <= supply.ceiling
    assert master.counters.flushed <= highest_target
    before_stop = master.depth
    await master.aclose()
    assert account.fates["stranded"] == master.counters.stranded == before_stop <= highest_target
    assert account.held == len(taken)
    wasted = sum(account.fates.values())
    assert wasted == master.counters.expired + master.counters.flushed + before_stop
