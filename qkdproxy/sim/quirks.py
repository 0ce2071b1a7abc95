"""Quirk profiles: deviations from ETSI GS QKD 014 seen in real KMEs and third-party
simulators, reproduced on demand so that qkdproxy (and ``kme-check``) can be tested against
each without third-party code. The default simulator has none of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from enum import StrEnum
from typing import TYPE_CHECKING

from qkdproxy.core.tls.credentials import Credentials
from qkdproxy.sim.pki import CertificateAuthority

if TYPE_CHECKING:  # node.py imports this module
    from qkdproxy.sim.node import KmeLimits


class Quirk(StrEnum):
    """One deviation from the spec."""

    # KME certificates carry the KME ID as CN and no SAN (hostname checks fail).
    CN_ONLY = "cn-only"
    # Unknown keys: 400 with a vendor message instead of the spec's wording.
    VENDOR_NOT_FOUND = "vendor-not-found"
    # 401 answers are an HTML page (a web server's), not an Error document.
    HTML_401 = "html-401"
    # max_key_per_request = 1; several key ids in one dec_keys are refused with 400.
    ONE_KEY_PER_REQUEST = "one-key-per-request"
    # dec_keys hands out a key again when asked twice (keys are not single use).
    REUSABLE_KEYS = "reusable-keys"
    # Unknown keys: 404 instead of 400.
    NOT_FOUND_404 = "404-unknown-keys"
    # ETSI 004: OPEN_CONNECT's destination is a KME address (server://host:port, what the
    # QKD-KEM reference provider sends), not the peer application's id; it then matches
    # whichever application joins the stream.
    KME_ADDRESS_DESTINATION = "kme-address-destination"


ETSI_014_QUIRKS = frozenset(Quirk) - {Quirk.KME_ADDRESS_DESTINATION}


VENDOR_NOT_FOUND_MESSAGE = "Some of the requested keys do not exist in this KME."
ONE_KEY_MESSAGE = "only one key_ID is supported"
HTML_401_BODY = (
    "<html><head><title>401 Authorization Required</title></head>"
    "<body><center><h1>401 Authorization Required</h1></center><hr>"
    "<center>nginx</center></body></html>"
)


def parse_quirks(names: Iterable[str]) -> frozenset[Quirk]:
    """Quirks by name; ValueError naming the valid ones."""
    try:
        return frozenset(Quirk(n) for n in names)
    except ValueError:
        valid = ", ".join(q.value for q in Quirk)
        raise ValueError(f"unknown quirk in {list(names)!r} (valid: {valid})") from None


def quirky_limits(limits: KmeLimits, quirks: frozenset[Quirk]) -> KmeLimits:
    """The limits a KME with ``quirks`` advertises."""
    if Quirk.ONE_KEY_PER_REQUEST in quirks:
        return replace(limits, max_key_per_request=1)
    return limits


def cn_only_kme_credentials(ca: CertificateAuthority, kme_ids: Sequence[str]) -> list[Credentials]:
    """KME certificates as many vendors issue them: CN = KME ID, no SAN."""
    return [ca.issue(kme_id, [], client=False) for kme_id in kme_ids]
