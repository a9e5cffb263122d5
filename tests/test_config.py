"""Configuration (SPEC §21) end to end: the oracle's API, a real relay, real devices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from oracle_support import (Admin, eventually, fresh_postgres_database, oracle_settings,
                            postgres_available)
from wire import RawDevice, error_code, now_ms

from client.config import ConfigUpdate
from client.device import Device
from continuum.server import RelayServer
from oracle import OracleServer
from proto import Identity, Kind, canonical, seal_envelope
from proto.envelope import decode_envelope
from proto.config import ConfigPush, ConfigReport
from proto.frames import Accepted
from proto.payloads import Receipt

pytestmark = pytest.mark.timeout(120)


# The oracle sends each device its own envelope: a fleet's worth at once is above the
# default per-sender rate (50/s, burst 100), which a deployment raises for its oracle's pushes.
FLEET_RATE = {"rate_per_s": 10_000.0, "rate_burst": 10_000}


@pytest.fixture
async def relay_and_oracle(start_relay,
                           tmp_path) -> AsyncIterator[tuple[RelayServer, OracleServer]]:
    relay = await start_relay(**FLEET_RATE)
    async with OracleServer(oracle_settings(tmp_path, relays=(relay.url,))) as oracle:
        yield relay, oracle


@pytest.fixture
async def admin(relay_and_oracle) -> AsyncIterator[Admin]:
    client = await Admin.login(relay_and_oracle[1])
    yield client
    await client.close()


def device(identity: Identity, relay: RelayServer, oracle: OracleServer, **kwargs) -> Device:
    return Device(identity, relays=[relay.url], oracle_key=oracle.identity.public, **kwargs)


async def enroll(admin: Admin, identities: list[Identity]) -> None:
    for number, identity in enumerate(identities):
        await admin.call("POST", "/v1/devices", {"key": identity.public.text,
                                                 "name": f"d{number:03}"}, expect=201)


async def behind(admin: Admin) -> list[str]:
    return (await admin.call("GET", "/v1/config/behind"))["devices"]


async def test_a_group_change_reaches_100_devices_two_offline_each_reporting_it(
        relay_and_oracle, admin, tmp_path) -> None:
    relay, oracle = relay_and_oracle
    identities = [Identity.generate() for _ in range(100)]
    online, offline = identities[:98], identities[98:]
    await enroll(admin, identities)
    group = await admin.call("POST", "/v1/groups", {"name": "fleet"}, expect=201)
    for identity in identities:
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{identity.public.text}")
    await eventually(lambda: _no_pending_pushes(admin), timeout=60)
    applied: dict[str, list[ConfigUpdate]] = {}

    def handler(identity: Identity):
        def on_config(update: ConfigUpdate) -> dict:
            applied.setdefault(identity.public.text, []).append(update)
            return {"interval_s": update.document["interval_s"], "who": identity.public.text}
        return on_config

    devices = [device(i, relay, oracle) for i in online]
    for dev, identity in zip(devices, online):
        dev.on_config(handler(identity))
        await dev.__aenter__()
    try:
        await asyncio.gather(*(dev.wait_connected(30) for dev in devices))
        answer = await admin.call("PUT", f"/v1/groups/{group['id']}/config",
                                  {"interval_s": 30, "log": {"level": "info"}})
        assert answer["issued"] == 100
        offline_keys = sorted(i.public.text for i in offline)
        await eventually(lambda: _behind_is(admin, offline_keys), timeout=60)
        for identity in online:
            updates = applied[identity.public.text]
            assert [u.document for u in updates] == [{"interval_s": 30, "log": {"level": "info"}}]
        detail = await admin.call("GET", f"/v1/devices/{online[0].public.text}/config")
        assert detail["reported"]["version"] == detail["version"] == updates[0].version
        assert detail["reported"]["state"] == {"interval_s": 30, "who": online[0].public.text}
        assert not detail["behind"]
    finally:
        for dev in devices:
            await dev.__aexit__(None, None, None)
    # The two offline devices find it in their mailboxes when they come back.
    late = [device(i, relay, oracle, home=tmp_path / f"late{n}") for n, i in enumerate(offline)]
    for dev, identity in zip(late, offline):
        dev.on_config(handler(identity))
        await dev.__aenter__()
    try:
        await eventually(lambda: _behind_is(admin, []), timeout=30)
        for dev in late:
            assert dev.config.document == {"interval_s": 30, "log": {"level": "info"}}
    finally:
        for dev in late:
            await dev.__aexit__(None, None, None)
    status = await admin.call("GET", "/v1/status")
    assert status["config_behind"] == 0


async def _no_pending_pushes(admin: Admin) -> bool:
    return (await admin.call("GET", "/v1/status"))["pending_pushes"] == 0


async def _behind_is(admin: Admin, keys: list[str]) -> bool:
    return await behind(admin) == keys


def config_envelope(sender: Identity, to: Identity, epoch: int, version: int, document: dict):
    return seal_envelope(sender, Kind.CONFIG, [to.public],
                         ConfigPush(epoch, version, document).encode(), ttl_s=600,
                         now_ms=now_ms())


async def test_replays_forgeries_and_older_versions_never_apply_even_after_a_restart(
        relay_and_oracle, start_relay, tmp_path) -> None:
    relay, oracle = relay_and_oracle
    # A second relay, sharing nothing with the first: it takes the replay the first refuses.
    elsewhere = await start_relay()
    target, forger = Identity.generate(), Identity.generate()
    home = tmp_path / "target"
    seen: list[int] = []
    async with device(target, relay, oracle, home=home) as dev:
        dev.on_config(lambda update: seen.append(update.version) or {"v": update.version})
        await dev.wait_connected(10)
        async with await RawDevice.connect(relay.url, oracle.identity) as as_oracle:
            v2 = config_envelope(oracle.identity, target, 5, 2, {"v": 2})
            assert isinstance(await as_oracle.send(v2), Accepted)
            await eventually(lambda: _applied(dev, 2))
        async with await RawDevice.connect(relay.url, forger) as f:
            assert isinstance(await f.send(config_envelope(forger, target, 9, 9, {"v": 9})),
                              Accepted)
        await eventually(lambda: _counted(dev, "dropped_unauthorized_config", 1))
    async with device(target, elsewhere, oracle, home=home) as dev:
        dev.on_config(lambda update: seen.append(update.version) or {})
        assert dev.config.stamp == (5, 2) and dev.config.document == {"v": 2}
        await dev.wait_connected(10)
        async with await RawDevice.connect(relay.url, oracle.identity) as as_oracle:
            assert error_code(await as_oracle.send(v2)) == "REPLAY"  # the first relay knows it
        async with await RawDevice.connect(elsewhere.url, oracle.identity) as as_oracle:
            older = config_envelope(oracle.identity, target, 5, 1, {"v": 1})
            assert isinstance(await as_oracle.send(older), Accepted)
            await eventually(lambda: _counted(dev, "configs_older", 1))
            # The very envelope again, after the restart: a duplicate.
            assert isinstance(await as_oracle.send(v2), Accepted)
            await eventually(lambda: _counted(dev, "duplicates", 1))
    assert seen == [2] and dev.config.document == {"v": 2}


async def test_a_handler_that_fails_applies_nothing_and_the_oracle_sees_it_behind(
        relay_and_oracle, admin, tmp_path) -> None:
    relay, oracle = relay_and_oracle
    one = Identity.generate()
    await enroll(admin, [one])
    path = f"/v1/devices/{one.public.text}/config"

    async def handler(update: ConfigUpdate) -> dict:
        if update.document.get("fail"):
            raise RuntimeError("cannot apply")
        return {"ok": update.document["n"]}

    async with device(one, relay, oracle, home=tmp_path / "one") as dev:
        dev.on_config(handler)
        await admin.call("PUT", path, {"n": 1})
        await eventually(lambda: _reported(admin, path, 1))
        await admin.call("PUT", path, {"n": 2, "fail": True})
        view = await eventually(lambda: _reported_at(admin, path, 2))
        assert view["reported"]["version"] == 1 and view["version"] == 2 and view["behind"]
        assert view["reported"]["state"] == {"ok": 1} and dev.config.document == {"n": 1}
        assert await behind(admin) == [one.public.text]
        await admin.call("PUT", path, {"n": 3})
        await eventually(lambda: _reported(admin, path, 3))
    assert dev.config.document == {"n": 3}


async def _applied(dev: Device, version: int) -> bool:
    return dev.config.stamp.version == version


async def _counted(dev: Device, name: str, count: int) -> bool:
    return getattr(dev.stats, name) == count


async def _reported(admin: Admin, path: str, version: int) -> bool:
    view = await admin.call("GET", path)
    return view["reported"]["version"] == version and not view["behind"]


async def _reported_at(admin: Admin, path: str, after_version: int) -> dict | None:
    """The view once a report came in after the device was issued `after_version` (a push's
    `sent_at_ms` is when its send began, so its answer is never older)."""
    view = await admin.call("GET", path)
    return view if (view["version"] == after_version and view["reported"]["at_ms"]
                    and view["sent_at_ms"] and view["reported"]["at_ms"] >= view["sent_at_ms"]) \
        else None


async def test_config_routes_need_an_administrator(relay_and_oracle) -> None:
    _, oracle = relay_and_oracle
    async with aiohttp.ClientSession() as anonymous:
        for method, path in (("GET", "/v1/config/behind"), ("PUT", "/v1/groups/x/config")):
            async with anonymous.request(method, oracle.url + path, json={}) as response:
                assert response.status in (401, 403)


async def test_reports_from_strangers_malformed_and_replayed_reports_are_not_recorded(
        relay_and_oracle, admin) -> None:
    relay, oracle = relay_and_oracle
    assert oracle.oracle is not None
    member, marker, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    await enroll(admin, [member, marker])
    to_oracle = [oracle.identity.public]

    def report(sender: Identity, plaintext: bytes):
        return seal_envelope(sender, Kind.CONFIG_REPORT, to_oracle, plaintext, ttl_s=600,
                             now_ms=now_ms())

    async with await RawDevice.connect(relay.url, stranger) as raw:
        claimed = report(stranger, ConfigReport(1, 99, {"x": 1}).encode())
        assert isinstance(await raw.send(claimed), Accepted)
    async with await RawDevice.connect(relay.url, member) as raw:
        for bad in (canonical.encode([1, 5, "[not an object"]), canonical.encode([1, 5]),
                    b"\xff" * 40):
            assert isinstance(await raw.send(report(member, bad)), Accepted)
        # The same stamp again replaces the state; an older one after it (a replay through a
        # relay that never stored the original) changes nothing.
        for stamp, state in (((3, 7), {"ok": True}), ((3, 7), {"ok": "still"}),
                             ((3, 5), {"ok": False}), ((2, 9), {"ok": False})):
            sent = report(member, ConfigReport(*stamp, state).encode())
            assert isinstance(await raw.send(sent), Accepted)
    # The oracle's mailbox keeps order: once the marker's report is recorded, so are these.
    async with await RawDevice.connect(relay.url, marker) as raw:
        assert isinstance(await raw.send(report(marker, ConfigReport(1, 1, {}).encode())),
                          Accepted)
    await eventually(lambda: _reported_state(admin, f"/v1/devices/{marker.public.text}/config",
                                             {}))
    view = await admin.call("GET", f"/v1/devices/{member.public.text}/config")
    assert view["reported"] == {"epoch": 3, "version": 7, "state": {"ok": "still"},
                                "at_ms": view["reported"]["at_ms"]}
    # The oracle's own device (private: what it dropped) took none of the others.
    stats = oracle.oracle.pusher._device.stats  # type: ignore[union-attr]
    assert stats.dropped_non_peer == 1 and stats.dropped_invalid == 3
    await admin.call("GET", f"/v1/devices/{stranger.public.text}/config", expect=404)


async def test_a_revoked_device_reports_nothing_the_oracle_records(relay_and_oracle,
                                                                   admin) -> None:
    """Revoked, a device may still reach the oracle's mailbox: through a relay that has not
    taken the new access list yet, or one that enforces none (as here).  Its receipt for the
    peer list it was sent before, and its configuration report, change nothing shown."""
    relay, oracle = relay_and_oracle
    member, marker = Identity.generate(), Identity.generate()
    await enroll(admin, [member, marker])
    group = await admin.call("POST", "/v1/groups", {"name": "pair"}, expect=201)
    for identity in (member, marker):
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{identity.public.text}")
    await admin.call("PUT", f"/v1/devices/{member.public.text}/config", {"a": 1})
    await eventually(lambda: _no_pending_pushes(admin), timeout=15)
    await admin.call("POST", f"/v1/devices/{member.public.text}/revoke")
    before = await admin.call("GET", f"/v1/devices/{member.public.text}")
    config_before = await admin.call("GET", f"/v1/devices/{member.public.text}/config")
    to_oracle = [oracle.identity.public]
    async with await RawDevice.connect(relay.url, member) as raw:
        while True:  # its mailbox: the peer list, then the configuration, sent before
            envelope = decode_envelope((await raw.next_delivery()).envelope)
            if envelope.open(member).kind is Kind.PEER_CHANGE:
                break
        for kind, plaintext in ((Kind.RECEIPT, Receipt.of(envelope).encode()),
                                (Kind.CONFIG_REPORT, ConfigReport(
                                    config_before["epoch"], config_before["version"],
                                    {"stolen": True}).encode())):
            sent = seal_envelope(member, kind, to_oracle, plaintext, ttl_s=600, now_ms=now_ms())
            assert isinstance(await raw.send(sent), Accepted)
    # The oracle's mailbox keeps order: once the marker's report is recorded, so are those.
    async with await RawDevice.connect(relay.url, marker) as raw:
        marked = ConfigReport(1, 1, {"marker": True}).encode()
        assert isinstance(await raw.send(seal_envelope(
            marker, Kind.CONFIG_REPORT, to_oracle, marked, ttl_s=600, now_ms=now_ms())),
            Accepted)
    await eventually(lambda: _reported_state(admin, f"/v1/devices/{marker.public.text}/config",
                                             {"marker": True}))
    after = await admin.call("GET", f"/v1/devices/{member.public.text}")
    assert (after["acked_version"], after["last_seen_ms"]) == (
        before["acked_version"], before["last_seen_ms"])
    assert after["pushes"] == before["pushes"]  # no list shown acknowledged
    view = await admin.call("GET", f"/v1/devices/{member.public.text}/config")
    assert view["reported"] == config_before["reported"]


async def _no_pending_pushes(admin: Admin) -> bool:
    return (await admin.call("GET", "/v1/status"))["pending_pushes"] == 0


async def _reported_state(admin: Admin, path: str, state: dict) -> dict | None:
    view = await admin.call("GET", path)
    return view if view["reported"]["state"] == state else None


async def test_a_rotated_key_keeps_its_configuration_and_its_count(relay_and_oracle,
                                                                   admin) -> None:
    """The device's applied stamp was issued to its old key: the new key's first document
    must outrank it (SPEC §15, §21), and its own document and groups come along."""
    _, oracle = relay_and_oracle
    assert oracle.oracle is not None
    old, new = Identity.generate(), Identity.generate()
    await enroll(admin, [old])
    group = await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201)
    await admin.call("PUT", f"/v1/groups/{group['id']}/members/{old.public.text}")
    await admin.call("PUT", f"/v1/groups/{group['id']}/config", {"a": 1})
    before = await admin.call("PUT", f"/v1/devices/{old.public.text}/config", {"b": 2})
    assert before["version"] == 2
    await oracle.oracle.registry.rotate_device(old.public.text, new.public.text,
                                               now_ms() + 60_000)
    after = await admin.call("GET", f"/v1/devices/{new.public.text}/config")
    assert after["desired"] == {"b": 2} and after["merged"] == {"a": 1, "b": 2}
    assert after["version"] == 3 and after["epoch"] == before["epoch"]


async def test_delivery_and_reports_on_postgresql(start_relay, tmp_path) -> None:
    """The outbox and report queries of migration 0006 on PostgreSQL (the API's are in
    test_config_api.py on both databases)."""
    if not postgres_available():
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432")
    relay = await start_relay(**FLEET_RATE)
    async with fresh_postgres_database() as dsn, \
            OracleServer(oracle_settings(tmp_path, dsn, relays=(relay.url,))) as oracle:
        admin = await Admin.login(oracle)
        try:
            identities = [Identity.generate() for _ in range(3)]
            await enroll(admin, identities)
            group = await admin.call("POST", "/v1/groups", {"name": "pg"}, expect=201)
            for identity in identities:
                await admin.call("PUT", f"/v1/groups/{group['id']}/members/{identity.public.text}")
            devices = [device(i, relay, oracle) for i in identities[:2]]
            for dev in devices:
                dev.on_config(lambda update: {"seen": update.version})
                await dev.__aenter__()
            try:
                await admin.call("PUT", f"/v1/groups/{group['id']}/config", {"k": "v"})
                await eventually(lambda: _behind_is(admin, [identities[2].public.text]),
                                 timeout=20)
            finally:
                for dev in devices:
                    await dev.__aexit__(None, None, None)
            late = device(identities[2], relay, oracle)
            late.on_config(lambda update: {"seen": update.version})
            async with late:
                await eventually(lambda: _behind_is(admin, []), timeout=20)
            view = await admin.call("GET", f"/v1/devices/{identities[2].public.text}/config")
            assert view["reported"]["state"] == {"seen": view["version"]}
        finally:
            await admin.close()
