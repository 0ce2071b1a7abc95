"""The systemd notify protocol without dependencies: one datagram per state change."""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    """Sends ``KEY=value`` lines to ``$NOTIFY_SOCKET``; does nothing outside systemd."""

    def __init__(self, address: str | None = None) -> None:
        self._address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens."""
        return bool(self._address)

    def notify(self, **fields: str) -> None:
        """Send e.g. ``READY="1"``, ``STATUS="..."``; errors are ignored (best effort)."""
        if not self._address:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        # An address starting with '@' is in the abstract namespace.
        target = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        ):
            sock.sendto(message, target)


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), if any."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


def inherited_sockets() -> dict[str, list[socket.socket]]:
    """Listening sockets passed by systemd socket activation, by FileDescriptorName."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    sockets: dict[str, list[socket.socket]] = {}
    for offset in range(count):
        name = names[offset] if offset < len(names) and names[offset] else "unknown"
        sockets.setdefault(name, []).append(socket.socket(fileno=3 + offset))
    return sockets
