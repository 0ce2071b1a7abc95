"""Listen/connect addresses: ``host:port`` (IPv4, ``[IPv6]:port``, names), ``unix:/path``,
and ``systemd:NAME`` (a socket passed by systemd socket activation). Pure parsing."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from qkdproxy.core.errors import SettingError


class AddressError(SettingError):
    """An address that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """A TCP host and port."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and ``localhost``."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A unix domain socket path."""

    path: str

    loopback = True

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class SystemdAddress:
    """A listening socket inherited from systemd (``FileDescriptorName=``)."""

    name: str

    # Where systemd bound it is only known at start; the tunnel checks it then.
    loopback = True

    def __str__(self) -> str:
        return f"systemd:{self.name}"


Address = TcpAddress | UnixAddress | SystemdAddress


def parse_address(text: str) -> Address:
    """Parse one address; :class:`AddressError` says what is wrong."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise AddressError("unix: needs a path")
        return UnixAddress(path)
    if text.startswith("systemd:"):
        name = text[len("systemd:") :]
        if not name:
            raise AddressError("systemd: needs a socket name")
        return SystemdAddress(name)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{text!r} is not host:port, unix:PATH or systemd:NAME")
    if host.startswith("["):
        if not host.endswith("]"):
            raise AddressError(f"{text!r}: unbalanced brackets")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{text!r}: not an IPv6 address in brackets") from None
    elif ":" in host:
        raise AddressError(f"{text!r}: write IPv6 addresses as [addr]:port")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise AddressError(f"{text!r}: port must be 0-65535 (0: any free port, listen only)")
    return TcpAddress(host, int(port_text))


def format_sockname(name: object) -> str:
    """A socket's address as the configuration writes it: ``[::1]:443``, ``unix:PATH``
    (``::1:443``, the naive join, is ambiguous and refused by the parser)."""
    if isinstance(name, tuple):
        return str(TcpAddress(str(name[0]), int(name[1])))
    return f"unix:{name!s}"
