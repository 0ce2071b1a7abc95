"""Key-exchange policies: which groups a tunnel may use, and when it may fall back. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from qkdproxy.core.groups import DEFAULT_GROUPS, GroupError, GroupSpec


class Policy(StrEnum):
    """What must feed the session key."""

    QKD_PQ_REQUIRED = "qkd-pq-required"
    PQ_REQUIRED = "pq-required"
    QKD_PREFERRED = "qkd-preferred"


DEFAULT_QKD = ("qkd_mlkem768",)
DEFAULT_PQ = ("X25519MLKEM768",)


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """Groups to offer normally, and (``qkd-preferred`` only) when the KME is unavailable."""

    groups: tuple[GroupSpec, ...]
    fallback: tuple[GroupSpec, ...] = ()


def plan_groups(policy: Policy, names: Sequence[str] | None, has_kme: bool) -> GroupPlan:
    """Check ``names`` against ``policy``; ValueError says why they do not fit."""
    try:
        groups = [DEFAULT_GROUPS.by_name(n) for n in names] if names else None
    except GroupError as exc:
        raise ValueError(str(exc)) from None
    if policy is Policy.PQ_REQUIRED:
        chosen = groups or [DEFAULT_GROUPS.by_name(n) for n in DEFAULT_PQ]
        if any(not g.post_quantum for g in chosen):
            raise ValueError("pq-required allows post-quantum groups only")
        if any(g.qkd for g in chosen) and not has_kme:
            raise ValueError("QKD groups need a kme")
        return GroupPlan(tuple(chosen))
    if not has_kme:
        raise ValueError(f"{policy} needs a kme")
    defaults = DEFAULT_QKD if policy is Policy.QKD_PQ_REQUIRED else DEFAULT_QKD + DEFAULT_PQ
    chosen = groups or [DEFAULT_GROUPS.by_name(n) for n in defaults]
    qkd = tuple(g for g in chosen if g.qkd)
    if not qkd:
        raise ValueError(f"{policy} needs at least one QKD group")
    if policy is Policy.QKD_PQ_REQUIRED:
        if len(qkd) != len(chosen):
            raise ValueError("qkd-pq-required allows QKD groups only (it never downgrades)")
        return GroupPlan(qkd)
    fallback = tuple(g for g in chosen if not g.qkd)
    if not fallback or any(not g.post_quantum for g in fallback):
        raise ValueError("qkd-preferred needs post-quantum fallback groups (e.g. X25519MLKEM768)")
    return GroupPlan(tuple(chosen), fallback)
