"""The whole chain across three regions: the real oracle homes devices, relays route by its
signed list, an administrator moves a device's home, its waiting mail follows (SPEC §19)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from oracle_support import TRUSTED_RELAY, Admin, eventually, oracle_settings

from client import Device, PeerList
from oracle import OracleServer
from proto import Identity, PublicKey
from region_support import World, three_regions
from relay_process import free_port

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with three_regions() as world:
        yield world


async def _next_payload(device: Device, timeout_s: float = 15.0) -> bytes:
    async with asyncio.timeout(timeout_s):
        async for message in device.messages():
            return message.payload
    raise AssertionError("no message")


async def test_the_oracle_homes_devices_and_moving_one_moves_its_mail(world, tmp_path) -> None:
    eu_port = free_port()
    settings = oracle_settings(tmp_path, region="eu", other_regions=("us", "ap"),
                               relays=(f"ws://127.0.0.1:{eu_port}/v1/connect",))
    async with OracleServer(settings) as oracle:
        enforcing = {"oracle_url": oracle.url, "oracle_key": oracle.identity.public.text,
                     "relay_key": TRUSTED_RELAY.secret_text(), "require_enrollment": True}
        eu = await world.relay("eu", port=eu_port, **enforcing)
        us = await world.relay("us", **enforcing)
        ap = await world.relay("ap", **enforcing)
        admin = await Admin.login(oracle)
        try:
            alice, bob = Identity.generate(), Identity.generate()
            await admin.call("POST", "/v1/devices", {"key": alice.public.text, "name": "alice"},
                             expect=201)
            await admin.call("POST", "/v1/devices", {"key": bob.public.text, "name": "bob",
                                                     "region": "us"}, expect=201)
            group = await admin.call("POST", "/v1/groups", {"name": "pair"}, expect=201)
            for key in (alice.public, bob.public):
                await admin.call("PUT", f"/v1/groups/{group['id']}/members/{key.text}")

            async def applied_everywhere(home: str) -> bool:
                return all(server.relay.access.current is not None  # type: ignore[union-attr]
                           and server.relay.access.home_of(bob.public) == home  # type: ignore[union-attr]
                           for server in (eu, us, ap))

            await eventually(lambda: applied_everywhere("us"), timeout=10)
            stores = us.relay.regions.stores  # type: ignore[union-attr]
            # bob roams on the AP relay: his peer list, pushed through the EU relay, waits in
            # his home (us) and reaches him there; then alice's message does too.
            bobs_peers = PeerList()  # kept across bob's two runs, as a home would keep it
            async with Device(bob, [ap.url], bobs_peers,
                              oracle_key=oracle.identity.public) as roaming, \
                    Device(alice, [eu.url], oracle_key=oracle.identity.public) as sender:
                await eventually(lambda: _knows(roaming, alice.public), timeout=15)
                await eventually(lambda: _knows(sender, bob.public), timeout=15)
                await sender.send([bob.public], b"to bob, wherever", ttl_s=600, timeout=15)
                assert await _next_payload(roaming) == b"to bob, wherever"
                # Acknowledged in his home store over the WAN before he goes.
                await eventually(lambda: _empty(stores["us"], bob.public), timeout=10)
            # bob is offline; two messages wait in us; the admin moves bob to ap.
            async with Device(alice, [eu.url], oracle_key=oracle.identity.public) as sender:
                for text in (b"one", b"two"):
                    await sender.send([bob.public], text, ttl_s=600, timeout=15)
            assert await stores["us"].depth(bob.public) == 2
            moved = await admin.call("PUT", f"/v1/devices/{bob.public.text}/region",
                                     {"region": "ap"})
            assert (moved["home_region"], moved["former_region"]) == ("ap", "us")
            await eventually(lambda: applied_everywhere("ap"), timeout=10)
            async with Device(bob, [us.url], bobs_peers,
                              oracle_key=oracle.identity.public) as back:
                got = {await _next_payload(back), await _next_payload(back)}
                assert got == {b"one", b"two"}
                # Everything moved out of us, and was delivered and acknowledged from ap.
                for region in ("us", "ap"):
                    await eventually(lambda: _empty(stores[region], bob.public), timeout=10)
        finally:
            await admin.close()


async def _knows(device: Device, key: PublicKey) -> bool:
    return key in device.peers


async def _empty(store, key: PublicKey) -> bool:
    return await store.depth(key) == 0
