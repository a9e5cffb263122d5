"""Presence end to end: real relays report enrolled devices' connections to a real oracle.

An in-process relay (or a relay process, where it is SIGKILLed) long-polls an
in-process oracle and reports connections and message counts to it; devices
connect over real WebSockets on 127.0.0.1.  What the oracle shows through
its API is what the relays saw: online, on which relay, since when, last
seen, messages sent, received and refused, and each connection in the
device's history; a relay that dies is noticed once its lease passes; an
oracle restart costs one snapshot per relay, not a replay.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from access_support import healthz, metric
from oracle_support import Admin, eventually, oracle_settings
from relay_process import RelayProcess, free_port
from test_peer_groups import StartRelay, caught_up, deployment, enroll, group_of
from wire import RawDevice, error_code, sealed

from oracle import OracleServer
from proto import Identity
from proto.frames import Accepted

def pusher_connected(oracle: OracleServer) -> bool:
    assert oracle.oracle is not None
    return bool(oracle.oracle.pusher.connected)


FAST = {"presence_interval_s": 0.05, "presence_heartbeat_s": 1.0}


async def presence(admin: Admin, identity: Identity) -> dict:
    return (await admin.call("GET", f"/v1/devices/{identity.public.text}"))["presence"]


async def listed(admin: Admin, query: str) -> set[str]:
    return {d["key"] for d in (await admin.call("GET", f"/v1/devices?{query}"))["devices"]}


async def test_the_oracle_sees_who_is_connected_where_and_what_they_sent(
        tmp_path: Path, start_relay: StartRelay) -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    async with deployment(tmp_path, start_relay, **FAST) as (relay, oracle, admin):
        await enroll(admin, alice, bob, mallory)
        await group_of(admin, alice, bob)
        await caught_up(relay, admin)
        never = await presence(admin, alice)
        assert never["online"] is False and never["last_seen_ms"] is None
        assert relay.relay is not None
        relay_key = relay.relay.identity.public.text

        async with await RawDevice.connect(relay.url, alice) as a:
            async def online() -> dict | None:
                p = await presence(admin, alice)
                return p if p["online"] else None
            now = await eventually(online, timeout=10)
            assert now["relay_key"] == relay_key and now["connected_at_ms"] is not None
            assert alice.public.text in await listed(admin, "online=true")
            assert alice.public.text not in await listed(admin, "online=false")
            assert bob.public.text in await listed(admin, "online=false")
            for text in (b"one", b"two", b"three"):
                assert isinstance(await a.send(sealed(alice, [bob.public], text)), Accepted)
            assert error_code(await a.send(sealed(alice, [mallory.public]))) == "NOT_PEER"

            async def counted() -> dict | None:
                p = await presence(admin, alice)
                return p if p["messages"] == {"sent": 3, "received": 0, "refused": 1} else None
            await eventually(counted, timeout=10)  # counts travel while the device stays on

        async def offline() -> dict | None:
            p = await presence(admin, alice)
            return p if not p["online"] else None
        gone = await eventually(offline, timeout=10)
        assert gone["last_seen_ms"] >= now["connected_at_ms"] and gone["relay_key"] is None

        async with await RawDevice.connect(relay.url, bob) as b:
            for _ in range(3):
                await b.next_delivery()  # acked: received

            async def received() -> bool:
                return (await presence(admin, bob))["messages"]["received"] == 3
            await eventually(received, timeout=10)

        history = (await admin.call("GET", f"/v1/devices/{alice.public.text}"))["presence_history"]
        assert len(history) == 1
        assert history[0]["relay_key"] == relay_key
        assert history[0]["disconnected_at_ms"] >= history[0]["connected_at_ms"]
        assert history[0]["messages"] == {"sent": 3, "received": 0, "refused": 1}
        # Keys the oracle never enrolled are not tracked: the oracle's own key is connected to
        # this relay (it pushes through it), yet the relay holds no connection to report.
        assert relay.relay.presence is not None and relay.relay.presence.tracker.held == 0
        assert pusher_connected(oracle)


async def test_a_relay_killed_with_sigkill_takes_its_devices_offline_after_its_lease(
        tmp_path: Path) -> None:
    alice = Identity.generate()
    oracle_port = free_port()
    oracle_key = Identity.load_or_create(tmp_path / "oracle.key").public
    relay = RelayProcess("--oracle-url", f"http://127.0.0.1:{oracle_port}",
                         "--oracle-key", oracle_key.text, "--presence-interval-s", "0.05",
                         "--presence-heartbeat-s", "1")
    await relay.start()
    try:
        async with OracleServer(oracle_settings(tmp_path, port=oracle_port, relays=(relay.url,),
                                                silence_check_s=0.2)) as oracle:
            admin = await Admin.login(oracle)
            try:
                await enroll(admin, alice)

                async def enforced() -> bool:  # the relay holds the list that enrols alice
                    version = (await admin.call("GET", "/v1/status"))["access_list_version"]
                    stamp = (await healthz(f"http://127.0.0.1:{relay.port}"))["access_list"]
                    return stamp.get("stamp", "").endswith(f".{version}")
                await eventually(enforced, timeout=15)
                device = await RawDevice.connect(relay.url, alice)

                async def online() -> bool:
                    return (await presence(admin, alice))["online"]
                await eventually(online, timeout=15)
                relay.kill()  # SIGKILL: no disconnect is ever reported
                killed = asyncio.get_running_loop().time()

                async def offline() -> bool:
                    return not (await presence(admin, alice))["online"]
                await eventually(offline, timeout=15)
                # Lease: three 1 s heartbeats, noticed by the next 0.2 s watch round.
                assert asyncio.get_running_loop().time() - killed < 6
                history = (await admin.call(
                    "GET", f"/v1/devices/{alice.public.text}"))["presence_history"]
                assert history[0]["disconnected_at_ms"] is not None
                await device.session.close()
            finally:
                await admin.close()
    finally:
        relay.kill()


async def test_an_oracle_restart_costs_one_snapshot_per_relay_not_a_replay(
        tmp_path: Path, start_relay: StartRelay) -> None:
    """While the oracle is down, devices come and go; afterwards the oracle knows exactly who
    is on, from one snapshot, and the relay backed off instead of hammering it."""
    devices = [Identity.generate() for _ in range(6)]
    oracle_port = free_port()
    oracle_key = Identity.load_or_create(tmp_path / "oracle.key").public
    relay = await start_relay(oracle_url=f"http://127.0.0.1:{oracle_port}",
                              oracle_key=oracle_key.text, **FAST)
    settings = oracle_settings(tmp_path, port=oracle_port, relays=(relay.url,))
    connections: dict[Identity, RawDevice] = {}
    try:
        async with OracleServer(settings) as oracle:
            admin = await Admin.login(oracle)
            await enroll(admin, *devices)
            await caught_up(relay, admin)
            for identity in devices[:3]:
                connections[identity] = await RawDevice.connect(relay.url, identity)

            async def three_online() -> bool:
                return len(await listed(admin, "online=true")) == 3
            await eventually(three_online, timeout=10)
            await admin.close()
        failed_before = await metric(relay.base_url, "continuum_presence_reports_total",
                                     result="failed") or 0
        # The oracle is down: two leave, three others come, one of them comes and goes twice.
        for identity in devices[:2]:
            await connections.pop(identity).close()
        for identity in devices[3:]:
            connections[identity] = await RawDevice.connect(relay.url, identity)
        for _ in range(2):
            await connections.pop(devices[5]).close()
            connections[devices[5]] = await RawDevice.connect(relay.url, devices[5])
        await asyncio.sleep(3)
        failed = (await metric(relay.base_url, "continuum_presence_reports_total",
                               result="failed") or 0) - failed_before
        assert failed <= 4, failed  # backed off (0.5-1 s, 1-2 s, …), not one try per 50 ms

        async with OracleServer(settings) as oracle:
            admin = await Admin.login(oracle, "second")
            try:
                expected = {identity.public.text for identity in connections}

                async def right() -> bool:
                    return await listed(admin, "online=true") == expected
                await eventually(right, timeout=20)
                assert await listed(admin, "online=false") == {
                    identity.public.text for identity in devices[:2]}
                # Every connection made while the oracle was down is in the history, with
                # its exact times: devices[5] connected three times.
                history = (await admin.call(
                    "GET", f"/v1/devices/{devices[5].public.text}"))["presence_history"]
                assert len(history) == 3
                assert [h["disconnected_at_ms"] is None for h in history] == [True, False, False]
            finally:
                await admin.close()
    finally:
        for device in connections.values():
            await device.close()


@pytest.mark.redis
async def test_replicas_on_one_redis_report_one_device_moving_between_them(
        tmp_path: Path, start_relay: StartRelay, redis_url: str) -> None:
    """Two replicas share a Redis and a relay key; the oracle pushes through one of them
    and so accepts both.  A device that holds a connection to each is online on the one it
    joined last; when that one ends it is still online (the other holds it), then offline."""
    alice = Identity.generate()
    relay_key = Identity.generate().secret_text()
    oracle_port = free_port()
    oracle_key = Identity.load_or_create(tmp_path / "oracle.key").public
    common = {"oracle_url": f"http://127.0.0.1:{oracle_port}", "oracle_key": oracle_key.text,
              "store": redis_url, "relay_key": relay_key, **FAST}
    first, second = await start_relay(**common), await start_relay(**common)
    async with OracleServer(oracle_settings(tmp_path, port=oracle_port,
                                            relays=(first.url,))) as oracle:
        admin = await Admin.login(oracle)
        try:
            await enroll(admin, alice)
            await caught_up(first, admin)
            await caught_up(second, admin)
            assert first.relay is not None and second.relay is not None
            instances = [r.relay.presence.tracker.instance.hex()  # type: ignore[union-attr]
                         for r in (first, second)]
            on_first = await RawDevice.connect(first.url, alice)

            async def on(instance: str | None) -> bool:
                p = await presence(admin, alice)
                return p["relay_instance"] == instance and p["online"] == (instance is not None)
            await eventually(lambda: on(instances[0]), timeout=10)
            on_second = await RawDevice.connect(second.url, alice)
            await eventually(lambda: on(instances[1]), timeout=10)
            await on_second.close()
            await eventually(lambda: on(instances[0]), timeout=10)
            await on_first.close()
            await eventually(lambda: on(None), timeout=10)
            history = (await admin.call(
                "GET", f"/v1/devices/{alice.public.text}"))["presence_history"]
            assert sorted(h["relay_instance"] for h in history) == sorted(instances)
            assert all(h["disconnected_at_ms"] is not None for h in history)
        finally:
            await admin.close()


async def test_a_relay_stopped_on_purpose_reports_its_devices_gone_at_once(
        tmp_path: Path, start_relay: StartRelay) -> None:
    """A rolling update stops relays with SIGTERM: the last report ends their connections,
    so the oracle does not wait for the lease (90 s with a 30 s heartbeat) to know."""
    alice = Identity.generate()
    async with deployment(tmp_path, start_relay, presence_interval_s=0.05) as (
            relay, oracle, admin):
        await enroll(admin, alice)
        await caught_up(relay, admin)
        device = await RawDevice.connect(relay.url, alice)

        async def online() -> bool:
            return (await presence(admin, alice))["online"]
        await eventually(online, timeout=10)
        await relay.stop()
        p = await presence(admin, alice)
        assert not p["online"] and p["last_seen_ms"] is not None
        await device.session.close()
