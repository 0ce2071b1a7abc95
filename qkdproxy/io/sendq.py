"""What a connected TCP socket still holds for its peer, and the reset that drops it.

A reset (SO_LINGER 0, then close) discards the kernel's send queue with our transport's
buffer, so what they held never reaches the peer; both are read before the reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import sys
import termios

# Linux ioctls (<linux/sockios.h>): bytes of a TCP socket's send queue not acknowledged by
# the peer yet (SIOCOUTQ, the same request as TIOCOUTQ), and of those, not sent yet.
SIOCOUTQ = termios.TIOCOUTQ
SIOCOUTQNSD = 0x894B
_LINUX = sys.platform == "linux"


def queued(writer: asyncio.StreamWriter, *, unacknowledged: bool) -> int:
    """Bytes written to ``writer`` that a reset now would drop: those in the transport's
    buffer and, on Linux, in the socket's send queue: not acknowledged by the peer yet
    (``unacknowledged``: some may have arrived, only their acknowledgement not) or not
    sent yet.

    Elsewhere (no such ioctl), on a socket that is not TCP or one closed already, the
    buffer only: fewer than a reset drops, as the send queue is not known.
    """
    held = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if _LINUX and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        request = SIOCOUTQ if unacknowledged else SIOCOUTQNSD
        # ValueError: the transport is closed already (fd -1); nothing is left to drop.
        with contextlib.suppress(OSError, ValueError):
            held += int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])
    return held


def reset(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP RST (SO_LINGER 0): no FIN handshake, no TIME_WAIT here,
    and what the transport and the socket still held is dropped.

    A unix socket is only closed: it has no reset, and its peer reads EOF after what it
    was sent (docs/RELIABILITY.md "Known limits")."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # ValueError: the transport is closed already (fd -1); nothing is left to reset.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
