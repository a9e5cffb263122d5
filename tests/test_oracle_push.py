"""Peer changes from the oracle to real devices through a real relay."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from oracle_support import Admin, eventually, handshake_refusal, oracle_settings
from wire import RawDevice, now_ms

from client.device import Device
from continuum.server import RelayServer
from oracle import OracleServer
from proto import Identity, Kind, PublicKey, seal_envelope
from proto.frames import Accepted
from proto.payloads import PeerChange


@pytest.fixture
async def relay_and_oracle(start_relay, tmp_path) -> AsyncIterator[tuple[RelayServer, OracleServer]]:
    relay = await start_relay()
    async with OracleServer(oracle_settings(tmp_path, relays=(relay.url,))) as oracle:
        yield relay, oracle


@pytest.fixture
async def admin(relay_and_oracle) -> AsyncIterator[Admin]:
    client = await Admin.login(relay_and_oracle[1])
    yield client
    await client.close()


def device(identity: Identity, relay, oracle: OracleServer) -> Device:
    return Device(identity, relays=[relay.url], oracle_key=oracle.identity.public)


async def enroll(admin: Admin, *identities: Identity) -> None:
    for number, identity in enumerate(identities):
        await admin.call("POST", "/v1/devices", {"key": identity.public.text, "name": f"d{number}"},
                         expect=201)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_group_change_reaches_online_and_later_offline_device(relay_and_oracle, admin) -> None:
    relay, oracle = relay_and_oracle
    online, offline = Identity.generate(), Identity.generate()
    await enroll(admin, online, offline)
    group = await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201)
    async with device(online, relay, oracle) as a:
        await a.wait_connected()
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{online.public.text}")
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{offline.public.text}")
        await eventually(lambda: _has(a, offline.public))
        assert a.peers.version == 1
        await eventually(lambda: _acked(admin, online, 1))
    detail = await admin.call("GET", f"/v1/devices/{offline.public.text}")
    assert detail["behind"] and detail["pushes"][0]["sent_at_ms"] is not None  # in its mailbox
    async with device(offline, relay, oracle) as b:
        await eventually(lambda: _has(b, online.public))
        assert b.peers.version == 1
        await eventually(lambda: _acked(admin, offline, 1))
    status = await admin.call("GET", "/v1/status")
    assert status["behind"] == [] and status["pending_pushes"] == 0


async def _has(dev: Device, key: PublicKey) -> bool:
    return key in dev.peers


async def _lacks(dev: Device, key: PublicKey) -> bool:
    return key not in dev.peers


async def _acked(admin: Admin, identity: Identity, version: int) -> bool:
    detail = await admin.call("GET", f"/v1/devices/{identity.public.text}")
    return detail["acked_version"] == version and not detail["behind"]


def peer_change(oracle: Identity, to: Identity, version: int, peers: list[PublicKey]):
    return seal_envelope(oracle, Kind.PEER_CHANGE, [to.public],
                         PeerChange(version, tuple(peers)).encode(), ttl_s=60, now_ms=now_ms())


async def test_older_version_never_overrides_and_forgery_is_counted(relay_and_oracle) -> None:
    relay, oracle = relay_and_oracle
    target, newer_peer, older_peer = (Identity.generate() for _ in range(3))
    forger = Identity.generate()
    async with device(target, relay, oracle) as dev:
        await dev.wait_connected()
        async with await RawDevice.connect(relay.url, oracle.identity) as as_oracle:
            v2 = peer_change(oracle.identity, target, 2, [newer_peer.public])
            assert isinstance(await as_oracle.send(v2), Accepted)
            await eventually(lambda: _has(dev, newer_peer.public))
            stale = peer_change(oracle.identity, target, 1, [older_peer.public])
            assert isinstance(await as_oracle.send(stale), Accepted)
        async with await RawDevice.connect(relay.url, forger) as f:
            forged = peer_change(forger, target, 99, [forger.public])
            assert isinstance(await f.send(forged), Accepted)
        await eventually(lambda: _counted_forgery(dev))
        assert dev.peers.version == 2 and list(dev.peers) == [newer_peer.public]


async def _counted_forgery(dev: Device) -> bool:
    return dev.stats.dropped_unauthorized_peer_change == 1


async def test_revoked_device_is_refused_closed_and_dropped_by_peers(start_relay, tmp_path) -> None:
    oracle_port = free_port()  # the relay polls the oracle, the oracle pushes through the relay
    Identity.generate().save(tmp_path / "oracle.key")
    oracle_key = Identity.load_or_create(tmp_path / "oracle.key").public.text
    relay = await start_relay(oracle_key=oracle_key, oracle_url=f"http://127.0.0.1:{oracle_port}")
    async with OracleServer(oracle_settings(tmp_path, relays=(relay.url,),
                                            port=oracle_port)) as oracle:
        admin = await Admin.login(oracle)
        try:
            victim, peer = Identity.generate(), Identity.generate()
            await enroll(admin, victim, peer)
            group = await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201)
            # Until its first list the relay admits only the oracle (fail closed).
            assert await relay.relay.access.wait_loaded(10)
            async with device(peer, relay, oracle) as p, await RawDevice.connect(relay.url, victim) as v:
                await p.wait_connected()
                for who in (victim, peer):
                    await admin.call("PUT", f"/v1/groups/{group['id']}/members/{who.public.text}")
                await eventually(lambda: _has(p, victim.public))
                await admin.call("POST", f"/v1/devices/{victim.public.text}/revoke")
                await eventually(lambda: _lacks(p, victim.public), timeout=2)
                frame = await v.recv_not_deliver(timeout=2)  # the live session is closed
                assert getattr(frame, "code", None) == 10  # REVOKED
            assert await handshake_refusal(relay.url, victim) == "REVOKED"
        finally:
            await admin.close()


async def test_oracle_restart_loses_no_pending_peer_change(start_relay, tmp_path) -> None:
    a, b = Identity.generate(), Identity.generate()
    down = oracle_settings(tmp_path, relays=(f"ws://127.0.0.1:{free_port()}/v1/connect",),
                           send_timeout_s=0.3)
    async with OracleServer(down) as oracle:
        admin = await Admin.login(oracle)
        await enroll(admin, a, b)
        group = await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201)
        for who in (a, b):
            await admin.call("PUT", f"/v1/groups/{group['id']}/members/{who.public.text}")
        await eventually(lambda: _attempted(admin, a))
        await admin.close()
    relay = await start_relay()
    async with OracleServer(replace(down, relays=(relay.url,))) as oracle:
        async with device(a, relay, oracle) as dev:
            await eventually(lambda: _has(dev, b.public), timeout=10)
            assert dev.peers.version == 1


async def _attempted(admin: Admin, identity: Identity) -> bool:
    detail = await admin.call("GET", f"/v1/devices/{identity.public.text}")
    return bool(detail["pushes"]) and detail["pushes"][0]["attempts"] >= 1 \
        and detail["pushes"][0]["sent_at_ms"] is None
