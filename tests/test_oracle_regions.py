"""The oracle assigns home regions (SPEC §19), on SQLite and PostgreSQL, over real sockets.

New devices are homed in the oracle's own region unless the enrolment names
another; an administrator moves a device or a whole group; every move is in
the audit log and in the next signed access list, which names the former
home for the drain window so relays move the waiting mail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
from oracle_support import Admin, oracle_database, oracle_settings, relay_headers
from test_oracle_api import admin, new_key  # noqa: F401  (`admin` logs in to `server` below)

from oracle import OracleServer
from proto import PublicKey
from proto.access import ACCESS_LIST_PATH, AccessList

REGIONS = {"region": "eu", "other_regions": ("us", "ap")}


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request, tmp_path) -> AsyncIterator[str]:
    async with oracle_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def server(database, tmp_path) -> AsyncIterator[OracleServer]:
    async with OracleServer(oracle_settings(tmp_path, database, **REGIONS)) as started:
        yield started


async def access_list(server: OracleServer) -> AccessList:
    async with aiohttp.ClientSession() as http, http.get(
            server.url + ACCESS_LIST_PATH, headers=relay_headers(server)) as response:
        assert response.status == 200
        return AccessList.verify(await response.read(), server.identity.public)


async def test_devices_are_homed_in_the_oracles_region_unless_told(admin, server) -> None:
    here, there = new_key(), new_key()
    assert (await admin.call("POST", "/v1/devices", {"key": here, "name": "here"},
                             expect=201))["home_region"] == "eu"
    assert (await admin.call("POST", "/v1/devices", {"key": there, "name": "there",
                                                     "region": "us"}, expect=201))["home_region"] == "us"
    for bad in ("mars", "EU", "", 7, "a" * 40):
        answer = await admin.call("POST", "/v1/devices", {"key": new_key(), "name": "x",
                                                          "region": bad}, expect=400)
        assert "region" in answer["error"]
    listed = await access_list(server)
    assert listed.regions == ("ap", "eu", "us") and listed.default_home == "eu"
    assert listed.home_of(PublicKey.from_text(here)) == "eu"
    assert listed.home_of(PublicKey.from_text(there)) == "us"
    assert listed.home_of(server.identity.public) == "eu"  # the oracle's own key, unplaced
    assert not listed.former_homes
    status = await admin.call("GET", "/v1/status")
    assert status["region"] == "eu" and status["regions"] == ["ap", "eu", "us"]


async def test_moving_a_device_names_its_former_home_and_is_audited(admin, server) -> None:
    key = new_key()
    await admin.call("POST", "/v1/devices", {"key": key, "name": "roamer"}, expect=201)
    before = (await access_list(server)).stamp
    moved = await admin.call("PUT", f"/v1/devices/{key}/region", {"region": "ap"})
    assert (moved["home_region"], moved["former_region"]) == ("ap", "eu")
    assert moved["moved_at_ms"] > 0
    listed = await access_list(server)
    assert listed.stamp > before
    assert listed.home_of(PublicKey.from_text(key)) == "ap"
    assert listed.former_homes == {PublicKey.from_text(key): "eu"}
    # The same home again changes nothing; an unknown one is refused; so is a revoked device.
    again = await admin.call("PUT", f"/v1/devices/{key}/region", {"region": "ap"})
    assert again["moved_at_ms"] == moved["moved_at_ms"]
    await admin.call("PUT", f"/v1/devices/{key}/region", {"region": "moon"}, expect=400)
    await admin.call("PUT", f"/v1/devices/{key}/region", {}, expect=400)
    await admin.call("PUT", f"/v1/devices/{new_key()}/region", {"region": "us"}, expect=404)
    await admin.call("POST", f"/v1/devices/{key}/revoke")
    await admin.call("PUT", f"/v1/devices/{key}/region", {"region": "us"}, expect=409)
    audit = await admin.call("GET", f"/v1/audit?target={key}")
    moves = [e for e in audit["entries"] if e["action"] == "device.move"]
    assert len(moves) == 1 and moves[0]["detail"] == {"from": "eu", "to": "ap"}
    assert moves[0]["actor"] == "admin"


async def test_moving_a_group_moves_every_active_member(admin, server) -> None:
    keys = [new_key() for _ in range(3)]
    outsider = new_key()
    group = await admin.call("POST", "/v1/groups", {"name": "fleet-a"}, expect=201)
    for number, key in enumerate(keys):
        await admin.call("POST", "/v1/devices", {"key": key, "name": f"d{number}",
                                                 "region": "us" if number == 0 else "eu"},
                         expect=201)
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{key}")
    await admin.call("POST", "/v1/devices", {"key": outsider, "name": "outsider"}, expect=201)
    await admin.call("POST", f"/v1/devices/{keys[2]}/revoke")
    answer = await admin.call("PUT", f"/v1/groups/{group['id']}/region", {"region": "us"})
    assert answer["moved"] == 1  # keys[0] is there already, keys[2] is revoked
    listed = await access_list(server)
    assert listed.home_of(PublicKey.from_text(keys[1])) == "us"
    assert listed.former_homes == {PublicKey.from_text(keys[1]): "eu"}
    assert listed.home_of(PublicKey.from_text(outsider)) == "eu"
    entries = (await admin.call("GET", "/v1/audit"))["entries"]
    assert [e["detail"] for e in entries if e["action"] == "group.move"] == [
        {"group": "fleet-a", "region": "us", "moved": 1}]
    assert [e["target"] for e in entries if e["action"] == "device.move"] == [keys[1]]
    await admin.call("PUT", f"/v1/groups/{group['id']}/region", {"region": "x y"}, expect=400)
    await admin.call("PUT", "/v1/groups/nope/region", {"region": "us"}, expect=404)


async def test_the_former_home_leaves_the_list_after_the_drain_window(database, tmp_path) -> None:
    settings = oracle_settings(tmp_path, database, **REGIONS, home_move_drain_s=1)
    async with OracleServer(settings) as server:
        key = new_key()
        registry = server.oracle.registry  # type: ignore[union-attr]
        await registry.enroll(key, "short")
        await registry.move_device(key, "us")
        assert (await access_list(server)).former_homes == {PublicKey.from_text(key): "eu"}
        await asyncio.sleep(1.1)
        await registry.enroll(new_key(), "any change")  # the next list is built from now
        assert not (await access_list(server)).former_homes


async def test_devices_from_before_regions_are_homed_at_start_and_keep_it(database,
                                                                          tmp_path) -> None:
    """An oracle started with regions for the first time homes every device in its own
    region (audited), and a rotated device keeps its home under its new key."""
    key = new_key()
    async with OracleServer(oracle_settings(tmp_path, database)) as plain:
        await plain.oracle.registry.enroll(key, "old")  # type: ignore[union-attr]
        plain_list = await access_list(plain)
        assert plain_list.regions == () and plain_list.home_of(PublicKey.from_text(key)) is None
    async with OracleServer(oracle_settings(tmp_path, database, **REGIONS)) as regional:
        registry = regional.oracle.registry  # type: ignore[union-attr]
        assert (await registry.get_device(key)).home_region == "eu"
        await registry.move_device(key, "ap")
        new = new_key()
        await registry.rotate_device(key, new, drain_until_ms=2**62)
        listed = await access_list(regional)
        assert listed.home_of(PublicKey.from_text(new)) == "ap"
        assert listed.home_of(PublicKey.from_text(key)) == "ap"  # draining: fetched from ap
        assert listed.former_homes == {PublicKey.from_text(new): "eu"}
        admin = await Admin.login(regional)
        try:
            entries = (await admin.call("GET", "/v1/audit?action=devices.home.assign"))["entries"]
        finally:
            await admin.close()
        assert [e["detail"] for e in entries] == [{"devices": 1}]


async def test_an_oracle_refuses_to_start_with_devices_homed_in_a_region_it_lacks(
        database, tmp_path) -> None:
    async with OracleServer(oracle_settings(tmp_path, database, **REGIONS)) as server:
        await server.oracle.registry.enroll(new_key(), "in ap", region="ap")  # type: ignore[union-attr]
    fewer = oracle_settings(tmp_path, database, region="eu", other_regions=("us",))
    with pytest.raises(Exception, match="region.*ap"):
        async with OracleServer(fewer):
            pass


async def test_without_regions_the_list_keeps_its_form_and_moves_are_refused(tmp_path) -> None:
    async with OracleServer(oracle_settings(tmp_path)) as server:
        admin = await Admin.login(server)
        try:
            key = new_key()
            answer = await admin.call("POST", "/v1/devices", {"key": key, "name": "x",
                                                              "region": "eu"}, expect=400)
            assert "no regions" in answer["error"]
            await admin.call("POST", "/v1/devices", {"key": key, "name": "x"}, expect=201)
            await admin.call("PUT", f"/v1/devices/{key}/region", {"region": "eu"}, expect=400)
        finally:
            await admin.close()
        listed = await access_list(server)
        assert listed.regions == () and listed.default_home is None


def test_oracle_region_settings_are_checked() -> None:
    from oracle.settings import OracleSettings
    for bad in ({"region": "EU"}, {"other_regions": ("us",)},
                {"region": "eu", "other_regions": ("eu",)},
                {"region": "eu", "other_regions": ("us", "us")},
                {"region": "eu", "other_regions": ("u s",)}):
        with pytest.raises(ValueError):
            replace(OracleSettings(), **bad).validate()
