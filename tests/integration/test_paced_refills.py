"""Paced ETSI 014 refills against the KME simulator: the request limit a KME states in its
``status`` bounds the paced batch (a one-key-per-request KME gets none), and the keys of a
paced batch reach the peer through its KME, each once."""

from __future__ import annotations

import pytest

from qkdproxy.core.accounting import KeyAccount
from qkdproxy.keys.etsi014_supply import Etsi014Master, Etsi014Slave
from qkdproxy.keys.supply import REFILL_BATCH, REFILL_INTERVAL_S, SupplySettings
from qkdproxy.sim.link import LinkSettings
from qkdproxy.sim.quirks import Quirk
from qkdproxy.sim.simulator import SimulatorSettings
from qkdproxy.tools.certs import DevPki
from tests.integration.test_etsi014 import etsi_client, running_pair
from tests.unit.test_key_stewardship import Clock
from tests.unit.test_paced_refills import HEAVY, burst

SUPPLY = SupplySettings(floor=4, ceiling=128, window_s=1.0)


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.create()


@pytest.mark.parametrize("quirks", [frozenset(), frozenset({Quirk.ONE_KEY_PER_REQUEST})])
async def test_a_paced_supply_at_the_simulator(pki: DevPki, quirks: frozenset[Quirk]) -> None:
    # 400 takes at 800/s of a hand-driven clock (the KME answers in no time on it, so the
    # sizer's target is the floor, 4, and its refill level 2): the last second's demand,
    # 400/s, makes a paced batch of 20 keys where the KME gives up to 128 a request, and
    # none where it gives one.
    one_key = Quirk.ONE_KEY_PER_REQUEST in quirks
    simulator = SimulatorSettings(link=LinkSettings(pool_bits=256 * 2000), quirks=quirks)
    clock, account = Clock(), KeyAccount()
    async with running_pair(pki, simulator) as pair:
        kme_a, kme_b = pair.urls_014
        async with (
            etsi_client(pki, kme_a, "sae-a") as client_a,
            etsi_client(pki, kme_b, "sae-b") as client_b,
        ):
            master = Etsi014Master(client_a, "sae-b", SUPPLY, clock=clock, account=account)
            master.ensure_refill()
            await master.wait_refilled()
            used, takes = [], burst(HEAVY, 0.5)
            for moment in takes:
                clock.now = moment
                used.append(await master.take_key())
                await master.wait_refilled()
            assert master.counters.refill_errors == 0
            assert master.counters.fetched_on_demand == 0
            assert master.target == (4 if one_key else 2 + round(len(takes) * REFILL_INTERVAL_S))
            assert master.depth <= master.target
            assert pair.link.counters.exhausted == 0
            # The slave end gets every key the master used, each once, in requests the
            # KME allows (one id each where it allows one).
            slave = Etsi014Slave(client_b, "sae-a")
            fetched = [await slave.get_key(k.key_id) for k in used[-REFILL_BATCH:]]
            assert fetched == used[-REFILL_BATCH:]
            account.settle("consumed", len(used))
            await master.aclose()
            assert account.held == 0
