"""Extended Key Updates in the middle of receives cut anywhere: records behind an update in
the same receive, or in a record the last receive left incomplete, open under the new keys,
also while the responder's key is still on its way."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field

import pytest

from qkdproxy.core.tls.events import Failed, Truncated
from qkdproxy.sim.pki import CertificateAuthority
from tests.unit.test_eku import Link, ca, connected, key_ids, link

__all__ = ["ca"]  # the module fixture, used here too


@dataclass
class CuttingLink(Link):
    """A link whose deliveries arrive in pieces cut at random offsets (1 byte up)."""

    cuts: random.Random = field(default_factory=random.Random)

    def deliver(self, name: str) -> bool:
        data = self.layer(name).data_to_send()
        if not data:
            return False
        peer = "server" if name == "client" else "client"
        pos = 0
        while pos < len(data):
            step = self.cuts.choice((1, 2, 5, 6, 17, 22, 100, 16_400, 40_000, len(data)))
            self.handle(peer, self.layer(peer).receive(data[pos : pos + step], self.now))
            pos += step
            if self.held[peer] and self.cuts.random() < 0.3:
                self.release()  # the key arrives between two pieces
        return True


@pytest.mark.parametrize("seed", range(6))
def test_updates_inside_receives_cut_anywhere_keep_every_byte(
    ca: CertificateAuthority, seed: int
) -> None:
    p, _, _ = connected(ca)
    base = link(p)
    lnk = CuttingLink(base.client, base.server, base.kme, cuts=random.Random(seed))
    lnk.answer_keys = seed % 2 == 0  # odd seeds: the responder's key comes late
    sent = {"client": hashlib.sha256(), "server": hashlib.sha256()}
    for i in range(24):
        for name in ("client", "server"):
            chunk = os.urandom(lnk.cuts.choice((0, 1, 16_383, 16_384, 16_385, 50_000)))
            sent[name].update(chunk)
            lnk.layer(name).send_data(chunk)
        if i % 6 == 2:
            settle(lnk)  # one update at a time
            lnk.initiate("client" if i % 12 == 2 else "server")
        if i % 4 == 0:
            lnk.pump()
    settle(lnk)
    for name in ("client", "server"):
        failures = [e for e in lnk.events[name] if isinstance(e, Failed | Truncated)]
        assert not failures, failures
    assert hashlib.sha256(lnk.received["server"]).digest() == sent["client"].digest()
    assert hashlib.sha256(lnk.received["client"]).digest() == sent["server"].digest()
    assert len(key_ids(lnk, "client")) == 4


def settle(lnk: Link) -> None:
    """Deliver everything, answering the keys held back, until nothing moves."""
    for _ in range(5):
        lnk.release()
        lnk.pump()
