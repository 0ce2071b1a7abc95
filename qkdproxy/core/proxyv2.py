"""PROXY protocol v2 header (haproxy spec), sent first to the backend. Pure encoding.

It carries the client's address and, in TLVs, the TLS facts the backend cannot see: TLS
version and cipher, the verified peer certificate's CN (PP2_SUBTYPE_SSL_CN), the peer's
identity as qkdproxy matched it (URI/DNS SAN) and the key-exchange group, in the
application-specific TLV range.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_COMMAND_PROXY = 0x21
FAMILY_TCP4, FAMILY_TCP6, FAMILY_UNSPEC = 0x11, 0x21, 0x00
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN = 0x01, 0x02
# Application-specific TLV types (0xE0-0xEF).
PP2_TYPE_QKDPROXY_PEER = 0xE0
PP2_TYPE_QKDPROXY_GROUP = 0xE1


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What the header says about one tunnelled connection."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    connection_id: int
    peer_identity: str
    peer_cn: str | None
    cipher: str
    group: str | None


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("PROXY v2 TLV value too long")
    return struct.pack("!BH", kind, len(value)) + value


def _addresses(info: ProxyInfo) -> tuple[int, bytes]:
    if info.source is None or info.destination is None:
        return FAMILY_UNSPEC, b""
    src, dst = ipaddress.ip_address(info.source[0]), ipaddress.ip_address(info.destination[0])
    if src.version != dst.version:
        # A v4 client reaching a v6 listener (or the reverse): map both to v6.
        src, dst = (
            ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst)
        )
    family = FAMILY_TCP4 if src.version == 4 else FAMILY_TCP6
    return family, src.packed + dst.packed + struct.pack("!HH", info.source[1], info.destination[1])


def encode_proxy_v2(info: ProxyInfo) -> bytes:
    """The complete v2 header."""
    family, addresses = _addresses(info)
    ssl_subtlvs = _tlv(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3") + _tlv(
        PP2_SUBTYPE_SSL_CIPHER, info.cipher.encode()
    )
    if info.peer_cn:
        ssl_subtlvs += _tlv(PP2_SUBTYPE_SSL_CN, info.peer_cn.encode())
    # verify = 0: the client certificate was verified.
    ssl = struct.pack("!BI", PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 0) + ssl_subtlvs
    tlvs = (
        _tlv(PP2_TYPE_UNIQUE_ID, str(info.connection_id).encode())
        + _tlv(PP2_TYPE_SSL, ssl)
        + _tlv(PP2_TYPE_QKDPROXY_PEER, info.peer_identity.encode())
    )
    if info.group:
        tlvs += _tlv(PP2_TYPE_QKDPROXY_GROUP, info.group.encode())
    body = addresses + tlvs
    # Each TLV is bounded above, but their sum must fit the header's 16-bit length too
    # (struct.error escaped here before, e.g. for a long identity plus a long CN).
    if len(body) > 0xFFFF:
        raise ValueError("PROXY v2 header too long")
    return SIGNATURE + struct.pack("!BBH", VERSION_COMMAND_PROXY, family, len(body)) + body
