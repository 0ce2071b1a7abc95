"""The qkdproxy exception hierarchy: one base, and protocol errors split by whose fault.

Callers decide by type, never by searching message text. A :class:`RemoteProtocolError` is
the peer's fault (it broke the protocol, or sent a fatal alert); a
:class:`LocalProtocolError` is ours (an API used in the wrong state, a bug). Both carry the
TLS alert that ended (or would end) the connection.
"""

from __future__ import annotations


class QkdproxyError(Exception):
    """Base of every exception qkdproxy raises on purpose."""


class SettingError(QkdproxyError, ValueError):
    """The configuration is unusable: a setting, or a file, group or address it names.

    The one family start-up reports as "bad configuration" (exit 2). It stays a
    ValueError for callers written before it existed; nothing should catch it as one.
    """


class ProtocolError(QkdproxyError):
    """A TLS or qkdproxy/1 protocol failure, with the alert that goes with it."""

    def __init__(self, reason: str, alert: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert = alert


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (we answer with ``alert``) or sent the fatal ``alert``."""


class LocalProtocolError(ProtocolError):
    """We used a connection in a way its current state does not allow: a bug of ours."""
