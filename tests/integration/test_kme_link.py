"""The KME simulator's pure parts: link model, fault scripts and injector, circuit breaker.

No I/O and no clocks: every call gets its time as an argument.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdproxy.core.breaker import BreakerState, CircuitBreaker
from qkdproxy.sim.faults import Burst, FaultInjector, FaultScript, FaultScriptError, Window
from qkdproxy.sim.link import (
    CHUNK_BYTES,
    KeyNotForCallerError,
    KeyUnknownError,
    KsidInUseError,
    LinkSettings,
    PoolExhaustedError,
    QkdLinkModel,
)

CHUNK_BITS = CHUNK_BYTES * 8
SLAVE_B = frozenset({"sae-b"})


def counting_bytes() -> Callable[[int], bytes]:
    """Deterministic, never-repeating 'random' bytes, so equal material means same chunk."""
    counter = itertools.count()

    def draw(n: int) -> bytes:
        return b"".join(next(counter).to_bytes(4, "big") for _ in range(n // 4 + 1))[:n]

    return draw


def model(
    rate_bps: float = 0.0,
    pool_chunks: int = 8,
    key_ttl_s: float = 1000.0,
    start_full: bool = True,
    now: float = 0.0,
) -> QkdLinkModel:
    settings = LinkSettings(rate_bps, pool_chunks * CHUNK_BITS, key_ttl_s, start_full)
    return QkdLinkModel(settings, now, counting_bytes())


# --------------------------------------------------------------------------- generation


def test_generation_follows_rate_over_explicit_times() -> None:
    link = model(rate_bps=CHUNK_BITS, pool_chunks=10, start_full=False)  # one chunk per second
    assert link.stored_bits(0.0) == 0
    assert link.stored_bits(0.99) == 0
    assert link.stored_bits(1.0) == CHUNK_BITS
    assert link.stored_bits(3.5) == 3 * CHUNK_BITS
    # the half second carried over is not lost
    assert link.stored_bits(4.0) == 4 * CHUNK_BITS
    assert link.counters.generated_bytes == 4 * CHUNK_BYTES


def test_pool_is_capped_and_surplus_generation_is_dropped() -> None:
    link = model(rate_bps=CHUNK_BITS, pool_chunks=4, start_full=False)
    assert link.capacity_chunks == 4
    assert link.stored_bits(100.0) == 4 * CHUNK_BITS
    assert link.counters.generated_bytes == 4 * CHUNK_BYTES
    # a full pool does not bank generation for later
    link.draw(CHUNK_BYTES, 100.0)
    assert link.stored_bits(100.0) == 3 * CHUNK_BITS
    assert link.stored_bits(101.0) == 4 * CHUNK_BITS


@pytest.mark.parametrize(("start_full", "expected"), [(False, 0), (True, 6)])
def test_start_full(start_full: bool, expected: int) -> None:
    link = model(pool_chunks=6, start_full=start_full)
    assert link.stored_bits(0.0) == expected * CHUNK_BITS
    assert link.counters.generated_bytes == expected * CHUNK_BYTES


def test_zero_rate_never_generates() -> None:
    link = model(rate_bps=0.0, pool_chunks=4, start_full=False)
    assert link.stored_bits(1e9) == 0


def test_link_down_stops_generation() -> None:
    link = model(rate_bps=CHUNK_BITS, pool_chunks=10, start_full=False)
    link.link_up = False
    assert link.stored_bits(5.0) == 0
    link.link_up = True
    # nothing was banked while the link was down
    assert link.stored_bits(5.0) == 0
    assert link.stored_bits(7.0) == 2 * CHUNK_BITS


def test_link_settings_are_validated() -> None:
    for bad in ({"rate_bps": -1.0}, {"pool_bits": -1}, {"key_ttl_s": 0.0}):
        with pytest.raises(ValueError, match="must be"):
            LinkSettings(**bad)


# --------------------------------------------------------------------------- expiry


def test_pool_material_expires_after_ttl() -> None:
    link = model(rate_bps=0.0, pool_chunks=3, key_ttl_s=10.0)
    assert link.stored_bits(10.0) == 3 * CHUNK_BITS  # exactly ttl old: still good
    assert link.stored_bits(10.001) == 0
    assert link.counters.expired_pool_bytes == 3 * CHUNK_BYTES


def test_idle_full_pool_is_refreshed_not_emptied_by_expiry() -> None:
    link = model(rate_bps=CHUNK_BITS, pool_chunks=4, key_ttl_s=10.0)  # 1 chunk/s, full at 0
    # 90 s have passed since the initial material expired: the pool should be full of
    # material generated in the last 10 s.
    assert link.stored_bits(100.0) > 0
    assert len(link.make_keys("sae-a", SLAVE_B, 1, 256, 100.0)) == 1


def test_pending_keys_expire_after_ttl_and_are_counted() -> None:
    link = model(pool_chunks=8, key_ttl_s=10.0)
    [(old_id, _)] = link.make_keys("sae-a", SLAVE_B, 1, 256, 0.0)
    [(young_id, young)] = link.make_keys("sae-a", SLAVE_B, 1, 256, 5.0)
    assert link.pending_keys == 2
    assert link.stored_bits(10.0) >= 0 and link.pending_keys == 2  # ttl not passed yet
    with pytest.raises(KeyUnknownError):
        link.take_keys("sae-b", "sae-a", [old_id], 12.0)
    assert link.counters.expired_keys == 1
    assert link.take_keys("sae-b", "sae-a", [young_id], 12.0) == [young]
    assert link.pending_keys == 0


# --------------------------------------------------------------------------- ETSI 014


def test_make_keys_draws_material_of_the_asked_size() -> None:
    link = model(pool_chunks=10)
    keys = link.make_keys("sae-a", SLAVE_B, 3, 256, 0.0)
    assert len(keys) == 3
    assert len({key_id for key_id, _ in keys}) == 3
    assert all(len(key_id) == 16 and len(material) == 32 for key_id, material in keys)
    assert len({material for _, material in keys}) == 3
    assert link.stored_bits(0.0) == 7 * CHUNK_BITS
    # a 512-bit key takes two whole chunks, a 64-bit key one whole chunk
    [(_, long_key)] = link.make_keys("sae-a", SLAVE_B, 1, 512, 0.0)
    [(_, short_key)] = link.make_keys("sae-a", SLAVE_B, 1, 64, 0.0)
    assert (len(long_key), len(short_key)) == (64, 8)
    assert link.stored_bits(0.0) == 4 * CHUNK_BITS
    assert link.counters.delivered_bytes == 3 * 32 + 64 + 8


def test_make_keys_is_all_or_nothing_when_the_pool_is_short() -> None:
    link = model(pool_chunks=4)
    with pytest.raises(PoolExhaustedError):
        link.make_keys("sae-a", SLAVE_B, 5, 256, 0.0)
    assert link.counters.exhausted == 1
    assert link.stored_bits(0.0) == 4 * CHUNK_BITS
    assert link.pending_keys == 0
    with pytest.raises(PoolExhaustedError):
        link.make_keys("sae-a", SLAVE_B, 2, 512 + 8, 0.0)  # 3 chunks each
    assert link.counters.exhausted == 2
    assert len(link.make_keys("sae-a", SLAVE_B, 4, 256, 0.0)) == 4
    assert link.stored_bits(0.0) == 0


def test_exhaust_empties_the_pool() -> None:
    link = model(pool_chunks=4)
    link.exhaust(0.0)
    assert link.stored_bits(0.0) == 0
    with pytest.raises(PoolExhaustedError):
        link.make_keys("sae-a", SLAVE_B, 1, 256, 0.0)
    with pytest.raises(PoolExhaustedError):
        link.draw(1, 0.0)
    assert link.counters.exhausted == 2


def test_exhaust_after_idle_time_leaves_the_pool_empty() -> None:
    link = model(rate_bps=CHUNK_BITS, pool_chunks=4, start_full=True)  # full at t=0
    # at t=50 the pool is (still) full; the fault script empties it now
    link.exhaust(50.0)
    assert link.stored_bits(50.0) == 0


def test_take_keys_rules() -> None:
    link = model(pool_chunks=16)
    made = dict(link.make_keys("sae-a", frozenset({"sae-b", "sae-d"}), 3, 256, 0.0))
    ids = list(made)
    # wrong master in the path
    with pytest.raises(KeyUnknownError):
        link.take_keys("sae-b", "sae-x", ids[:1], 0.0)
    # caller is not a named slave
    with pytest.raises(KeyNotForCallerError):
        link.take_keys("sae-c", "sae-a", ids[:1], 0.0)
    # the master itself is not a slave either
    with pytest.raises(KeyNotForCallerError):
        link.take_keys("sae-a", "sae-a", ids[:1], 0.0)
    # the same id twice in one request
    with pytest.raises(KeyUnknownError, match="twice"):
        link.take_keys("sae-b", "sae-a", [ids[0], ids[0]], 0.0)
    # an unknown id fails the whole request: nothing is consumed
    with pytest.raises(KeyUnknownError):
        link.take_keys("sae-b", "sae-a", [ids[0], b"\x00" * 16], 0.0)
    assert link.pending_keys == 3
    # any named slave may take them, each exactly once, in the order asked
    assert link.take_keys("sae-d", "sae-a", [ids[2], ids[0]], 0.0) == [made[ids[2]], made[ids[0]]]
    with pytest.raises(KeyUnknownError):
        link.take_keys("sae-b", "sae-a", [ids[0]], 0.0)
    # one spent id in a batch fails the batch; the good one stays available
    with pytest.raises(KeyUnknownError):
        link.take_keys("sae-b", "sae-a", [ids[1], ids[2]], 0.0)
    assert link.take_keys("sae-b", "sae-a", [ids[1]], 0.0) == [made[ids[1]]]
    assert link.pending_keys == 0


def test_take_keys_refused_for_caller_keeps_the_key() -> None:
    link = model(pool_chunks=4)
    [(key_id, material)] = link.make_keys("sae-a", SLAVE_B, 1, 256, 0.0)
    with pytest.raises(KeyNotForCallerError):
        link.take_keys("sae-c", "sae-a", [key_id], 0.0)
    assert link.take_keys("sae-b", "sae-a", [key_id], 0.0) == [material]


# --------------------------------------------------------------------------- ETSI 004

KSID = bytes(range(16))


def test_stream_open_twice_by_the_same_application_is_refused() -> None:
    link = model(pool_chunks=4)
    link.open_stream(KSID, "app-a", 32, 60.0, 0.0)
    with pytest.raises(KsidInUseError):
        link.open_stream(KSID, "app-a", 32, 60.0, 0.0)
    state = link.open_stream(KSID, "app-b", 32, 60.0, 0.0)
    assert state.members == {"app-a", "app-b"}
    assert link.stream(KSID) is state


def test_stream_chunk_is_allocated_once_and_delivered_once_per_member() -> None:
    link = model(pool_chunks=4)
    link.open_stream(KSID, "app-a", 32, 60.0, 0.0)
    link.open_stream(KSID, "app-b", 32, 60.0, 0.0)
    first = link.stream_key(KSID, "app-a", 0, 0.0)
    assert len(first) == 32
    assert link.stored_bits(0.0) == 3 * CHUNK_BITS
    with pytest.raises(KeyUnknownError):
        link.stream_key(KSID, "app-a", 0, 0.0)
    assert link.stream_key(KSID, "app-b", 0, 0.0) == first
    assert link.stored_bits(0.0) == 3 * CHUNK_BITS  # the peer's copy drew nothing
    with pytest.raises(KeyUnknownError):
        link.stream_key(KSID, "app-b", 0, 0.0)
    # the next index is a different key, from a different chunk
    second = link.stream_key(KSID, "app-b", 1, 0.0)
    assert second != first
    assert link.stream_key(KSID, "app-a", 1, 0.0) == second
    assert link.stored_bits(0.0) == 2 * CHUNK_BITS


def test_no_allocation_after_close_but_allocated_keys_are_still_delivered() -> None:
    link = model(pool_chunks=4)
    link.open_stream(KSID, "app-a", 32, 60.0, 0.0)
    link.open_stream(KSID, "app-b", 32, 60.0, 0.0)
    key = link.stream_key(KSID, "app-a", 0, 0.0)
    link.close_stream(KSID, "app-a")
    with pytest.raises(KeyUnknownError, match="closed"):
        link.stream_key(KSID, "app-b", 1, 0.0)
    assert link.stream_key(KSID, "app-b", 0, 0.0) == key
    assert link.stream(KSID) is not None
    link.close_stream(KSID, "app-b")
    assert link.stream(KSID) is None
    link.close_stream(KSID, "app-b")  # closing an unknown stream is harmless
    # the KSID is free again
    link.open_stream(KSID, "app-a", 32, 60.0, 0.0)


def test_idle_streams_expire_after_their_ttl() -> None:
    link = model(pool_chunks=4)
    other = bytes(16)
    link.open_stream(KSID, "app-a", 32, 5.0, 0.0)
    link.stream_key(KSID, "app-a", 0, 3.0)  # use keeps it alive
    link.open_stream(other, "app-a", 32, 5.0, 8.0)
    assert link.stream(KSID) is not None  # idle for exactly 5 s
    link.open_stream(other, "app-b", 32, 5.0, 8.1)
    assert link.stream(KSID) is None
    assert link.stream(other) is not None
    # the application may open the expired KSID again
    link.open_stream(KSID, "app-a", 32, 5.0, 8.2)


# --------------------------------------------------------------------------- property


@st.composite
def link_operations(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    operation = st.one_of(
        st.tuples(
            st.just("make"),
            st.integers(1, 4),
            st.sampled_from([64, 128, 200, 256, 264, 512]),
            st.sampled_from([SLAVE_B, frozenset({"sae-b", "sae-c"})]),
        ),
        st.tuples(
            st.just("take"),
            st.lists(st.integers(0, 40), min_size=1, max_size=4),
            st.sampled_from(["sae-b", "sae-c"]),
            st.sampled_from(["sae-a", "sae-x"]),
        ),
        st.tuples(st.just("advance"), st.floats(0.0, 8.0)),
    )
    return draw(st.lists(operation, max_size=40))


@settings(max_examples=150, deadline=None)
@given(link_operations())
def test_random_operations_never_deliver_a_key_twice(operations: list[tuple[Any, ...]]) -> None:
    link = QkdLinkModel(LinkSettings(CHUNK_BITS * 2, CHUNK_BITS * 12, 10.0, True), 0.0)
    now = 0.0
    made: dict[bytes, bytes] = {}
    ordered: list[bytes] = []
    delivered: set[bytes] = set()
    for op in operations:
        if op[0] == "advance":
            now += op[1]
        elif op[0] == "make":
            _, number, size, slaves = op
            try:
                keys = link.make_keys("sae-a", slaves, number, size, now)
            except PoolExhaustedError:
                continue
            assert len(keys) == number
            for key_id, material in keys:
                assert key_id not in made
                assert len(material) == size // 8
                made[key_id] = material
                ordered.append(key_id)
        else:
            _, picks, caller, master = op
            ids = [ordered[i] if i < len(ordered) else bytes([i]) * 16 for i in picks]
            try:
                materials = link.take_keys(caller, master, ids, now)
            except (KeyUnknownError, KeyNotForCallerError):
                continue
            assert master == "sae-a"
            assert len(set(ids)) == len(ids)
            for key_id, material in zip(ids, materials, strict=True):
                assert key_id not in delivered
                delivered.add(key_id)
                assert material == made[key_id]
        assert link.stored_bits(now) <= link.capacity_chunks * CHUNK_BITS


# --------------------------------------------------------------------------- fault scripts

DOC_SCRIPT: dict[str, Any] = {
    "seed": 7,
    "latency": {"fixed_ms": 100, "jitter_ms": 5},
    "error_bursts": [{"start_call": 10, "count": 3}],
    "reset_bursts": [{"start_call": 20, "count": 1}],
    "link_down": [{"start_s": 5, "end_s": 8}],
    "exhaust_at_s": [12],
}


def test_fault_script_from_mapping() -> None:
    script = FaultScript.from_mapping(DOC_SCRIPT)
    assert script == FaultScript(
        seed=7,
        fixed_ms=100.0,
        jitter_ms=5.0,
        error_bursts=(Burst(10, 3),),
        reset_bursts=(Burst(20, 1),),
        link_down=(Window(5.0, 8.0),),
        exhaust_at_s=(12.0,),
    )
    assert FaultScript.from_mapping({}) == FaultScript()


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"seed": 1, "latency_ms": 5}, "latency_ms"),
        ({"bursts": [], "zz": 1}, "bursts, zz"),
        ({"error_bursts": [{"start_call": 1}]}, "count"),
        ({"link_down": [{"start_s": 1}]}, "end_s"),
        ({"latency": {"fixed_ms": -1}}, "latency must not be negative"),
        ({"latency": {"jitter_ms": -0.5}}, "latency must not be negative"),
    ],
)
def test_fault_script_errors_name_the_problem(data: dict[str, Any], named: str) -> None:
    with pytest.raises(FaultScriptError) as caught:
        FaultScript.from_mapping(data)
    assert named in str(caught.value)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"seed": "abc"}, "seed"),
        ({"seed": None}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"latency": 5}, "latency"),
        ({"latency": {"fixed_ms": "fast"}}, "fixed_ms"),
        ({"error_bursts": 5}, "error_bursts"),
        ({"error_bursts": [7]}, "error_bursts"),
        ({"reset_bursts": [{"start_call": [], "count": 1}]}, "start_call"),
        ({"link_down": [{"start_s": "x", "end_s": 2}]}, "start_s"),
        ({"exhaust_at_s": 3}, "exhaust_at_s"),
        ({"exhaust_at_s": ["soon"]}, "exhaust_at_s"),
        ([], "JSON object"),
    ],
)
def test_fault_script_bad_types_name_the_key(data: Any, named: str) -> None:
    with pytest.raises(FaultScriptError, match=named):
        FaultScript.from_mapping(data)


def test_fault_script_type_error_names_the_key() -> None:
    with pytest.raises(FaultScriptError) as caught:
        FaultScript.from_mapping({"latency": {"fixed_ms": "fast"}})
    assert "fixed_ms" in str(caught.value)


@pytest.mark.parametrize("data", [[], [1], 5, None])
def test_fault_script_that_is_not_a_mapping(data: Any) -> None:
    with pytest.raises(FaultScriptError):
        FaultScript.from_mapping(data)


# --------------------------------------------------------------------------- fault injector


def delays(seed: int, calls: int = 30) -> list[float]:
    injector = FaultInjector(FaultScript(seed=seed, fixed_ms=10.0, jitter_ms=20.0))
    return [injector.decide().delay_s for _ in range(calls)]


def test_fault_injector_is_deterministic_per_seed() -> None:
    assert delays(3) == delays(3)
    assert delays(3) != delays(4)
    values = delays(3)
    assert all(0.0 <= d <= 0.030 for d in values)
    assert 0.0 in values or min(values) < 0.010  # jitter goes both ways, clipped at zero
    assert max(values) > 0.010


def test_fault_injector_without_latency_never_delays() -> None:
    injector = FaultInjector()
    assert all(injector.decide().delay_s == 0.0 for _ in range(10))


def test_fault_injector_bursts_hit_exactly_their_calls() -> None:
    injector = FaultInjector(
        FaultScript(error_bursts=(Burst(2, 3), Burst(9, 1)), reset_bursts=(Burst(4, 2),))
    )
    decisions = [injector.decide() for _ in range(12)]
    assert [i for i, d in enumerate(decisions) if d.fail] == [2, 3, 4, 9]
    assert [i for i, d in enumerate(decisions) if d.reset] == [4, 5]
    assert injector.calls == 12


def test_fault_injector_link_down_windows() -> None:
    injector = FaultInjector(FaultScript(link_down=(Window(5.0, 8.0), Window(20.0, 21.0))))
    assert [injector.link_up(t) for t in (0.0, 4.99, 5.0, 7.99, 8.0, 20.5, 21.0)] == [
        True,
        True,
        False,
        False,
        True,
        False,
        True,
    ]


def test_due_exhaustions_fire_once() -> None:
    injector = FaultInjector(FaultScript(exhaust_at_s=(1.0, 3.0, 3.0)))
    assert injector.due_exhaustions(0.5) == 0
    assert injector.due_exhaustions(1.0) == 1
    assert injector.due_exhaustions(2.0) == 0
    assert injector.due_exhaustions(100.0) == 1  # 3.0 listed twice is one event
    assert injector.due_exhaustions(200.0) == 0


# --------------------------------------------------------------------------- breaker


def state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


def test_breaker_opens_after_threshold_and_fails_fast() -> None:
    breaker = CircuitBreaker(threshold=3, base_backoff_s=0.5)
    for now in (0.0, 0.1):
        assert breaker.allow(now)
        breaker.record_failure(now)
        assert state(breaker) is BreakerState.CLOSED
    breaker.record_failure(0.2)
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow(0.2)
    assert not breaker.allow(0.69)
    assert breaker.retry_after(0.2) == pytest.approx(0.5)
    assert breaker.retry_after(0.6) == pytest.approx(0.1)


def test_breaker_half_open_after_backoff_then_success_closes() -> None:
    breaker = CircuitBreaker(threshold=1, base_backoff_s=0.5)
    breaker.record_failure(10.0)
    assert not breaker.allow(10.4)
    assert breaker.allow(10.5)
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.retry_after(10.5) == 0.0
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.failures == 0
    assert breaker.allow(10.5)
    # the backoff was forgotten: the next opening starts from the base again
    breaker.record_failure(20.0)
    assert breaker.retry_after(20.0) == pytest.approx(0.5)


def test_breaker_backoff_doubles_and_is_capped() -> None:
    breaker = CircuitBreaker(threshold=2, base_backoff_s=0.5, max_backoff_s=6.0)
    now = 0.0
    breaker.record_failure(now)
    breaker.record_failure(now)
    backoffs = [breaker.retry_after(now)]
    for _ in range(6):
        now += backoffs[-1]
        assert breaker.allow(now)
        assert state(breaker) is BreakerState.HALF_OPEN
        breaker.record_failure(now)  # the trial call failed
        assert state(breaker) is BreakerState.OPEN
        backoffs.append(breaker.retry_after(now))
    assert backoffs == pytest.approx([0.5, 1.0, 2.0, 4.0, 6.0, 6.0, 6.0])


def test_breaker_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(threshold=3)
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    breaker.record_success()
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    assert state(breaker) is BreakerState.CLOSED


def test_breaker_half_open_lets_exactly_one_trial_call_through() -> None:
    breaker = CircuitBreaker(threshold=1, base_backoff_s=0.5)
    breaker.record_failure(0.0)
    assert breaker.allow(1.0)  # the trial call
    assert not breaker.allow(1.0)  # a second caller while the trial is in flight
