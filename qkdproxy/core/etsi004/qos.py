"""ETSI GS QKD 004 QoS as qkdproxy asks for it, and the judgement of a KME's counter-proposal
(status 7). Pure: no I/O.

Key_chunk_size (the 32-byte QKD key) and Metadata_mimetype are not negotiable. Every other
field is asked for as configured, and a counter-proposal may change it only within the bounds
configured for it; a field without bounds must come back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qkdproxy.core.etsi004.codec import JSON_MIMETYPE, QoS, Status

# The negotiable fields: qkdproxy's name -> the spec's name (for messages).
NEGOTIABLE = {
    "max_bps": "Max_bps",
    "min_bps": "Min_bps",
    "jitter": "Jitter",
    "priority": "Priority",
    "timeout_ms": "Timeout",
    "ttl_s": "TTL",
}
U32_MAX = 2**32 - 1

# What each status means (ETSI GS QKD 004 V2.1.1, clause 6), for messages.
STATUS_MEANINGS = {
    Status.SUCCESS: "successful",
    Status.PEER_NOT_CONNECTED: "successful connection, but the peer is not connected",
    Status.INSUFFICIENT_KEY: "GET_KEY failed because insufficient key is available",
    Status.PEER_APP_NOT_CONNECTED: "GET_KEY failed because the peer application is not connected",
    Status.NO_QKD_CONNECTION: "no QKD connection available (link down, stream not open "
    "for this application, or KME failing)",
    Status.KSID_IN_USE: "OPEN_CONNECT failed because the Key_stream_ID is in use (this "
    "application opened it already, or it belongs to other applications: check source and "
    "destination; some KMEs expect the peer application's id there, others a KME address)",
    Status.TIMEOUT: "the call timed out",
    Status.QOS_NOT_MET: "OPEN_CONNECT failed because the requested QoS settings could not "
    "be met (counter-proposal in the answer)",
    Status.METADATA_TOO_SMALL: "GET_KEY failed because the metadata buffer is too small",
}


def describe_status(status: int) -> str:
    """``status 4 (no QKD connection available ...)``."""
    try:
        return f"status {int(status)} ({STATUS_MEANINGS[Status(status)]})"
    except (ValueError, KeyError):
        return f"status {int(status)} (not defined by ETSI GS QKD 004)"


@dataclass(frozen=True, slots=True)
class QosPolicy:
    """The QoS qkdproxy asks for and how far a counter-proposal may move each field."""

    max_bps: int = 0
    min_bps: int = 0
    jitter: int = 0
    priority: int = 0
    timeout_ms: int = 1000
    ttl_s: int = 600
    # (field, lowest, highest) accepted in a counter-proposal, for negotiable fields only.
    bounds: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        for name in NEGOTIABLE:
            if not 0 <= getattr(self, name) <= U32_MAX:
                raise ValueError(f"{name} must be between 0 and {U32_MAX}")
        for name, low, high in self.bounds:
            if name not in NEGOTIABLE:
                raise ValueError(f"{name} cannot be negotiated (one of: {', '.join(NEGOTIABLE)})")
            if not 0 <= low <= high <= U32_MAX:
                raise ValueError(f"bounds of {name} must be [low, high] with 0 <= low <= high")

    def qos(self, chunk_size: int) -> QoS:
        """The QoS of an OPEN_CONNECT request."""
        return QoS(
            chunk_size, self.max_bps, self.min_bps, self.jitter, self.priority,
            self.timeout_ms, self.ttl_s, JSON_MIMETYPE,
        )  # fmt: skip

    def problems(self, asked: QoS, counter: QoS) -> list[str]:
        """Why ``counter`` is not acceptable, one entry per field at fault (empty: accept)."""
        found = []
        if counter.key_chunk_size != asked.key_chunk_size:
            found.append(
                f"Key_chunk_size {counter.key_chunk_size} (we need {asked.key_chunk_size})"
            )
        if counter.metadata_mimetype.lower() != asked.metadata_mimetype.lower():
            found.append(
                f"Metadata_mimetype {counter.metadata_mimetype!r} "
                f"(we read {asked.metadata_mimetype!r})"
            )
        limits = {name: (low, high) for name, low, high in self.bounds}
        for name, spec_name in NEGOTIABLE.items():
            value, wanted = getattr(counter, name), getattr(asked, name)
            if value == wanted:
                continue
            if name not in limits:
                found.append(f"{spec_name} {value} (asked {wanted}; no bounds configured)")
            elif not limits[name][0] <= value <= limits[name][1]:
                low, high = limits[name]
                found.append(f"{spec_name} {value} (asked {wanted}; allowed {low}..{high})")
        return found

    def adopt(self, asked: QoS, counter: QoS) -> QoS:
        """The QoS to retry with: the counter-proposal's negotiable fields, our chunk size."""
        return replace(
            counter,
            key_chunk_size=asked.key_chunk_size,
            metadata_mimetype=asked.metadata_mimetype,
        )


def changed_fields(asked: QoS, counter: QoS) -> str:
    """``Min_bps 0 -> 1000, Jitter 0 -> 10``: what a counter-proposal changed."""
    changes = [
        f"{spec_name} {getattr(asked, name)} -> {getattr(counter, name)}"
        for name, spec_name in NEGOTIABLE.items()
        if getattr(asked, name) != getattr(counter, name)
    ]
    return ", ".join(changes) or "nothing"
