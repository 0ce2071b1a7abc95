"""The status listener's request budget: per address, and for the costly paths overall."""

from __future__ import annotations

from qkdproxy.daemon.status import (
    COSTLY_BURST,
    REQUEST_BURST_PER_SOURCE,
    REQUESTS_PER_SOURCE_S,
    RequestBudget,
)


def answered(budget: RequestBudget, source: str, path: str, count: int, now: float) -> int:
    return sum(budget.admit(source, path, now) for _ in range(count))


def test_one_address_gets_its_burst_then_its_rate() -> None:
    budget = RequestBudget()
    assert answered(budget, "10.0.0.1", "/healthz", 100, 0.0) == REQUEST_BURST_PER_SOURCE
    assert answered(budget, "10.0.0.1", "/healthz", 100, 1.0) == REQUESTS_PER_SOURCE_S
    # Another address, and another /64, have budgets of their own; one /64 shares one.
    assert budget.admit("10.0.0.2", "/healthz", 1.0)
    assert answered(budget, "2001:db8::1", "/readyz", 100, 1.0) == REQUEST_BURST_PER_SOURCE
    assert not budget.admit("2001:db8::ffff", "/readyz", 1.0)
    assert budget.admit("2001:db8:0:1::1", "/readyz", 1.0)
    # An IPv4-mapped IPv6 address is its IPv4 address.
    assert not budget.admit("::ffff:10.0.0.1", "/healthz", 1.0)


def test_many_addresses_share_the_costly_paths_but_not_the_probes() -> None:
    budget = RequestBudget()
    costly = sum(budget.admit(f"10.0.{n // 256}.{n % 256}", "/metrics", 0.0) for n in range(400))
    assert costly == COSTLY_BURST
    assert not budget.admit("10.9.9.9", "/status", 0.0)
    # A fresh address's probes pass while /metrics and /status are spent.
    assert budget.admit("10.9.9.9", "/healthz", 0.0)
    assert budget.admit("10.9.9.9", "/readyz", 0.0)
