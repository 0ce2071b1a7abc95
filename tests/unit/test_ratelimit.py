"""Token buckets, per-source budgets and the log throttle, driven by a hand-held clock."""

from __future__ import annotations

import pytest

from qkdproxy.core.ratelimit import SOURCE_KEY_CACHE, SourceBuckets, TokenBucket, source_key
from qkdproxy.core.throttle import LogThrottle


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.9", "192.0.2.9"),
        ("/run/app.sock", "/run/app.sock"),
    ],
)
def test_source_key_groups_ipv6_by_64(host: str, key: str) -> None:
    assert source_key(host) == key


def test_source_keys_are_cached_within_a_bound() -> None:
    # A flood of distinct sources only evicts: the cache never grows past its bound and
    # every answer stays right.
    for n in range(1, SOURCE_KEY_CACHE + 100):
        host = f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}"
        assert source_key(host) == host
        assert source_key(f"2001:db8:1:{n:x}::1").endswith(f":{n:x}::/64")
    assert source_key.cache_info().currsize <= SOURCE_KEY_CACHE
    assert source_key("192.0.2.7") == source_key("192.0.2.7") == "192.0.2.7"


def test_token_bucket_spends_burst_then_refills_at_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)
    assert bucket.take(0.5)
    assert not bucket.take(0.5)
    assert bucket.available(100.0) == 3.0


def test_token_bucket_refuses_without_spending() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert not bucket.take(0.0, cost=3.0)
    assert bucket.available(0.0) == 2.0


def test_token_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert bucket.take(11.0)


def test_sources_have_separate_budgets() -> None:
    buckets = SourceBuckets(rate=0.0, burst=1.0)
    assert buckets.take("a", 0.0)
    assert not buckets.take("a", 0.0)
    assert buckets.take("b", 0.0)


def test_source_table_is_bounded_and_forgets_full_buckets_first() -> None:
    buckets = SourceBuckets(rate=1.0, burst=1.0, max_sources=2)
    assert buckets.take("drained", 0.0)
    assert buckets.take("idle", 0.0)
    # At t=0.5 neither bucket is full yet: the least recently used goes.
    assert buckets.take("new", 0.5)
    assert len(buckets) == 2
    # "idle" is still tracked and still empty.
    assert not buckets.take("idle", 0.5)


def test_source_buckets_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="burst"):
        SourceBuckets(rate=1.0, burst=0.0)


def test_log_throttle_counts_what_it_suppresses() -> None:
    throttle = LogThrottle(interval_s=10.0)
    assert throttle.admit("limit", 0.0) == 0
    assert throttle.admit("limit", 1.0) is None
    assert throttle.admit("limit", 2.0) is None
    assert throttle.admit("other", 2.0) == 0
    assert throttle.admit("limit", 10.0) == 2
    assert throttle.admit("limit", 15.0) is None
    assert throttle.admit("limit", 20.0) == 1
