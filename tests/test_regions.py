"""One worldwide network (issue 17, SPEC §19): any relay, in any region, reaches any device.

Three regions on this machine (tests/region_support.py): a Redis each, relays
each, 40-80 ms one way between regions.  Every mailbox lives in its device's
home region, named by the oracle's signed access list; a relay verifies once
and stores each recipient's copy in that recipient's home store, and serves
a roaming device from its home store.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from client import DeliveryStatus, Device, PeerList
from proto import Identity
from region_support import World, three_regions

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]


@pytest.fixture
async def world() -> World:
    async with three_regions() as world:
        yield world


async def _next_message(device: Device, timeout_s: float = 10.0):
    async with asyncio.timeout(timeout_s):
        async for message in device.messages():
            return message


async def test_an_eu_device_on_a_us_relay_gets_mail_sent_through_an_ap_relay(world) -> None:
    alice, carol = Identity.generate(), Identity.generate()  # alice homed in eu, carol in ap
    world.place({alice.public: "eu", carol.public: "ap"})
    us, ap = await world.relay("us"), await world.relay("ap")
    # From the mailbox: alice is offline when carol sends.
    async with Device(carol, [ap.url], PeerList([alice.public])) as sender:
        await sender.send([alice.public], b"waiting for you", ttl_s=600, timeout=15)
        async with Device(alice, [us.url], PeerList([carol.public])) as roaming:
            message = await _next_message(roaming)
            assert (message.sender, message.payload) == (carol.public, b"waiting for you")
            # Live: alice is connected to the US relay, carol sends through AP.
            outgoing = await sender.send([alice.public], b"live", ttl_s=600, timeout=15)
            message = await _next_message(roaming)
            assert message.payload == b"live"
            # The receipt crosses back to carol's home (ap) and reaches her.
            statuses = await outgoing.wait_receipts(timeout=10)
            assert statuses == {alice.public: DeliveryStatus.DELIVERED}
    # Nothing of it was stored in the US or AP stores: alice's mailbox is in eu.
    for region in ("us", "ap"):
        store = world.relays[0].relay.store.stores[region]  # type: ignore[union-attr]
        assert await store.depth(alice.public) == 0
