"""The names a bench's command line offers, kept apart from the benches: every ``qkdproxy``
command line is parsed with them, so importing this must cost nothing."""

from __future__ import annotations

from enum import Enum


class Generator(Enum):
    """Which load generator (``auto`` picks the best available)."""

    AUTO = "auto"
    IPERF3 = "iperf3"
    C = "c"
    PYTHON = "python"


# How `bench keys` drives connections: steady rates, as fast as they go, a burst then
# idleness, or none.
KEY_PATTERNS = ("1/s", "10/s", "50/s", "max", "burst", "idle")
# One handshake and key per connection, or connections as streams of pooled tunnels.
KEY_MODES = ("per-connection", "mux")
