"""An oracle restored from a backup of its database is obeyed again; old lists stay refused.

The restore takes the oracle's version counters back (here from the backup's
to what the lost changes had reached), so without epochs every relay and
device would ignore the restored oracle's lists forever, in silence.  Real
sockets: an in-process relay long-polls the oracle, which pushes peer changes
through it to two real devices; the oracle is stopped, its SQLite file
copied, and later copied back, as an operator restores a backup.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from oracle_support import Admin, eventually, handshake_refusal, oracle_settings
from relay_process import free_port

from client import Device
from oracle import OracleServer
from proto import Identity, Kind, seal_envelope
from proto.payloads import PeerChange
from runtime.clock import now_ms


async def test_restored_oracle_revokes_and_repushes_and_old_lists_are_refused(
        tmp_path: Path, start_relay) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    database, backup = tmp_path / "oracle.db", tmp_path / "backup.db"
    oracle_identity = Identity.load_or_create(tmp_path / "oracle.key")
    oracle_port = free_port()
    relay = await start_relay(oracle_url=f"http://127.0.0.1:{oracle_port}",
                              oracle_key=oracle_identity.public.text)
    access = relay.relay.access
    settings = oracle_settings(tmp_path, port=oracle_port, relays=(relay.url,))

    async def caught_up(admin: Admin) -> bool:
        status = await admin.call("GET", "/v1/status")
        return access.current is not None and access.current.version == status[
            "access_list_version"]

    def device(identity: Identity) -> Device:
        return Device(identity, [relay.url], oracle_key=oracle_identity.public)

    async with device(alice) as a, device(carol) as c:
        # 1. Devices enrolled, alice and bob peers; then the operator takes a backup.
        async with OracleServer(settings) as oracle:
            admin = await Admin.login(oracle, "first")
            for identity, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
                await admin.call("POST", "/v1/devices", {"key": identity.public.text,
                                                         "name": name}, expect=201)
            group = (await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201))["id"]
            for identity in (alice, bob):
                await admin.call("PUT", f"/v1/groups/{group}/members/{identity.public.text}")
            await eventually(lambda: _peers_are(a, {bob}), timeout=10)
            await admin.close()
        shutil.copy(database, backup)

        # 2. Changes after the backup: dave is enrolled and carol joins the group; the
        # versions of the access list and of alice's peer list move on past the backup's.
        async with OracleServer(settings) as oracle:
            admin = await Admin.login(oracle, "second")
            await admin.call("POST", "/v1/devices", {"key": Identity.generate().public.text,
                                                     "name": "dave"}, expect=201)
            await admin.call("PUT", f"/v1/groups/{group}/members/{carol.public.text}")
            await eventually(lambda: _peers_are(c, {alice, bob}), timeout=10)
            await eventually(lambda: caught_up(admin), timeout=10)
            await admin.close()
        # What an attacker could replay after the restore: the lists in force now.
        old_list = access.current.sign(oracle_identity)
        alices_old_list = copy.copy(a.peers)  # its stamp and keys (a replace makes a new set)

        # 3. The database is restored from the backup: carol's joining is lost.
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        shutil.copy(backup, database)
        async with OracleServer(settings) as oracle:
            admin = await Admin.login(oracle, "third")
            await admin.call("POST", f"/v1/devices/{bob.public.text}/revoke")

            async def bob_refused() -> bool:
                try:
                    return await handshake_refusal(relay.url, bob) == "REVOKED"
                except AssertionError:  # WELCOME: the relay still runs an old list
                    return False
            await eventually(bob_refused, timeout=10)
            await eventually(lambda: _peers_are(a, set()), timeout=10)  # the push reached alice
            # carol still holds the lost change's list; re-issuing every list fixes that.
            assert set(c.peers) == {alice.public, bob.public}
            issued = await admin.call("POST", "/v1/peer-lists/reissue")
            assert issued == {"issued": 2}  # alice and carol; bob is revoked
            await eventually(lambda: _peers_are(c, set()), timeout=10)
            await admin.close()

        # 4. Replays from before the restore are refused, loudly, at the relay and the device.
        before = access.current.stamp
        assert not access.apply(old_list)
        assert access.current.stamp == before
        assert relay.relay.metrics.registry.get_sample_value(
            "continuum_access_list_backwards_total") == 1
        old_peer_change = PeerChange(alices_old_list.version, tuple(alices_old_list),
                                     alices_old_list.epoch)
        assert set(old_peer_change.peers) == {bob.public, carol.public}
        async with Device(oracle_identity, [relay.url]) as impostor:  # the oracle's own key
            replay = seal_envelope(oracle_identity, Kind.PEER_CHANGE, [alice.public],
                                   old_peer_change.encode(), ttl_s=600, now_ms=now_ms())
            outgoing = await impostor.send_envelope(replay)
            await eventually(lambda: _counted_older(a), timeout=10)
            statuses = await outgoing.wait_receipts(1.0)
        assert statuses[alice.public].value == "pending"  # no receipt: nothing was applied
        assert set(a.peers) == set()


async def _peers_are(device: Device, expected: set[Identity]) -> bool:
    return set(device.peers) == {identity.public for identity in expected}


async def _counted_older(device: Device) -> bool:
    return device.stats.peer_changes_older == 1
