"""Device key rotation through a real relay and oracle (SPEC §15): the old key vouches for the
new one, the oracle re-points the device, peers follow, the old mailbox is drained, and the
old key is refused afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from oracle_support import (TRUSTED_RELAY, Admin, eventually, handshake_refusal, oracle_database,
                            oracle_settings)
from relay_process import free_port
from wire import RawDevice, error_code, sealed

from client import Device
from client.streams import Stream, StreamRequest
from continuum.server import RelayServer
from oracle import OracleServer
from proto import Identity, Kind, PublicKey, canonical, seal_envelope
from proto.errors import RevokedError
from proto.frames import Accepted, Deliver, Error
from proto.rotation import KeyRotation
from runtime.clock import now_ms


@dataclass
class Deployment:
    relay: RelayServer
    oracle: OracleServer
    admin: Admin
    group: str

    def device(self, identity: Identity) -> Device:
        return Device(identity, [self.relay.url], oracle_key=self.oracle.identity.public)

    async def enroll(self, *identities: Identity) -> None:
        for identity in identities:
            await self.admin.call("POST", "/v1/devices", {"key": identity.public.text,
                                                          "name": identity.public.text[4:12]},
                                  expect=201)
            await self.admin.call("PUT", f"/v1/groups/{self.group}/members/{identity.public.text}")


@contextlib.asynccontextmanager
async def _deployed(start_relay, tmp_path: Path, database: str | None = None,
                    drain_s: float = 4) -> AsyncIterator[Deployment]:
    port = free_port()
    identity = Identity.load_or_create(tmp_path / "oracle.key")
    relay = await start_relay(oracle_url=f"http://127.0.0.1:{port}", require_enrollment=True,
                              oracle_key=identity.public.text,
                              relay_key=TRUSTED_RELAY.secret_text())
    async with OracleServer(oracle_settings(tmp_path, database, port=port, relays=(relay.url,),
                                            rotation_drain_s=drain_s)) as oracle:
        admin = await Admin.login(oracle)
        group = (await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201))["id"]
        try:
            yield Deployment(relay, oracle, admin, group)
        finally:
            await admin.close()


@pytest.fixture
async def deployment(start_relay, tmp_path: Path) -> AsyncIterator[Deployment]:
    """A relay enforcing the oracle's list (enrollment required), the oracle pushing through it."""
    async with _deployed(start_relay, tmp_path) as deployed:
        yield deployed


@pytest.fixture(params=["sqlite", "postgres"])
async def long_drain(request, start_relay, tmp_path: Path) -> AsyncIterator[Deployment]:
    """As `deployment`, on both databases, with a drain time (an hour) no test outlasts: an
    old key refused during it is refused because of a revocation, not its deadline."""
    async with oracle_database(request.param, tmp_path) as url, \
            _deployed(start_relay, tmp_path, url, drain_s=3600) as deployed:
        yield deployed


async def _has(device: Device, key: PublicKey) -> bool:
    return key in device.peers


async def test_device_rotates_peers_follow_old_mail_is_drained_and_old_key_refused(
        deployment: Deployment) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    await deployment.enroll(alice, bob)
    async with deployment.device(alice) as a, deployment.device(bob) as b:
        await eventually(lambda: _has(a, bob.public))
        await eventually(lambda: _has(b, alice.public))
        # Waiting for alice's old key when she rotates (her application has not read it yet).
        waiting = await b.send([alice.public], b"sent to the old key")
        persisted: list[tuple[PublicKey, PublicKey]] = []
        new = Identity.generate()  # the caller's, kept before the call (KeyFiles.begin())
        async with asyncio.timeout(20):
            assert await a.rotate_key(
                new, on_confirmed=lambda old, new: persisted.append((old.public, new.public))
            ) is new
        assert persisted == [(alice.public, new.public)] and a.identity is new
        assert a.pending_rotation is None
        detail = await deployment.admin.call("GET", f"/v1/devices/{new.public.text}")
        assert detail["rotated_from"] == alice.public.text and detail["groups"] == ["g"]
        old = await deployment.admin.call("GET", f"/v1/devices/{alice.public.text}")
        assert old["revoked"] and old["rotated_to"] == new.public.text

        messages = a.messages()
        async with asyncio.timeout(10):
            first = await anext(messages)
        assert (first.sender, first.payload) == (bob.public, b"sent to the old key")
        assert (await waiting.wait_receipts(0.1))[alice.public].value == "pending"  # see SPEC
        await eventually(lambda: _has(b, new.public), timeout=10)
        assert alice.public not in b.peers
        reply = await b.send([new.public], b"to the new key")
        async with asyncio.timeout(10):
            second = await anext(messages)
        assert second.payload == b"to the new key"
        statuses = await reply.wait_receipts(10)
        assert statuses[new.public].value == "delivered"
        async with asyncio.timeout(10):
            await a.wait_drained()
        assert a.draining == ()

        # The old key: peers writing to it are told; it sends nothing; after its drain
        # deadline it may not even connect.
        async with await RawDevice.connect(deployment.relay.url, bob) as raw_bob:
            assert error_code(await raw_bob.send(sealed(bob, [alice.public]))) == "REVOKED"
        async with await RawDevice.connect(deployment.relay.url, alice) as raw_alice:
            assert error_code(await raw_alice.send(sealed(alice, [bob.public]))) == "REVOKED"

        async def refused() -> bool:
            try:
                return await handshake_refusal(deployment.relay.url, alice) == "REVOKED"
            except AssertionError:  # WELCOME: its drain deadline has not passed yet
                return False
        await eventually(refused, timeout=10, interval=0.5)


async def test_forged_and_replayed_rotation_statements_are_refused(
        deployment: Deployment) -> None:
    alice, mallory, spare, elsewhere = (Identity.generate() for _ in range(4))
    await deployment.enroll(alice, mallory, spare)  # mallory holds two enrolled keys
    oracle_key = deployment.oracle.identity.public
    genuine = KeyRotation.sign(alice, Identity.generate(), now_ms())  # alice's, captured
    statement = KeyRotation.sign(mallory, elsewhere, now_ms())
    forged_old = statement.to_value()  # the old key's signature made by another key
    forged_old[3] = elsewhere.sign(statement.signed_bytes())
    unproven = statement.to_value()  # the new key's proof of possession made by another key
    unproven[4] = mallory.sign(statement.signed_bytes())
    attempts = [
        genuine.encode(),  # someone else's statement, sent by mallory
        canonical.encode(forged_old),
        canonical.encode(unproven),
        KeyRotation.sign(mallory, spare, now_ms()).encode(),  # onto a key already enrolled
        KeyRotation.sign(mallory, Identity.generate(), now_ms() + 3_600_000).encode(),
    ]
    marker = Identity.generate()
    async with deployment.device(mallory) as m:
        await m.wait_connected()
        for payload in [*attempts, KeyRotation.sign(mallory, marker, now_ms()).encode()]:
            await m.send([oracle_key], payload)

        async def marker_applied() -> bool:  # processed in order: every attempt before it is
            devices = (await deployment.admin.call("GET", "/v1/devices"))["devices"]
            return any(d["key"] == marker.public.text for d in devices)
        await eventually(marker_applied, timeout=15)
    devices = {d["key"]: d for d in
               (await deployment.admin.call("GET", "/v1/devices"))["devices"]}
    assert not devices[alice.public.text]["revoked"] and genuine.new.text not in devices
    assert not devices[spare.public.text]["revoked"]
    assert devices[mallory.public.text]["rotated_to"] == marker.public.text
    assert set(devices) == {alice.public.text, mallory.public.text, spare.public.text,
                            marker.public.text}
    # A replay from the rotated key itself cannot even reach the oracle.
    async with await RawDevice.connect(deployment.relay.url, mallory) as raw:
        replay = seal_envelope(mallory, Kind.DATA, [oracle_key],
                               KeyRotation.sign(mallory, marker, now_ms()).encode(), ttl_s=60,
                               now_ms=now_ms())
        answer = await raw.send(replay)
        assert not isinstance(answer, Accepted) and error_code(answer) == "REVOKED"


async def test_an_unconfirmed_rotation_times_out_back_to_the_old_key(
        deployment: Deployment) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    await deployment.enroll(alice, bob)
    async with deployment.device(alice) as a, deployment.device(bob) as b:
        await eventually(lambda: _has(a, bob.public))
        await eventually(lambda: _has(b, alice.public))
        assert deployment.oracle.oracle is not None
        await deployment.oracle.oracle.pusher.stop()  # the oracle reads nothing any more
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3):
                await a.rotate_key(Identity.generate())
        assert a.identity is alice and a.draining == ()
        sent = await asyncio.wait_for(a.send([bob.public], b"still alice"), 10)
        messages = b.messages()
        received = await asyncio.wait_for(anext(messages), 10)
        assert (received.sender, received.payload) == (alice.public, b"still alice")
        assert (await sent.wait_receipts(10))[bob.public].value == "delivered"
        old = await deployment.admin.call("GET", f"/v1/devices/{alice.public.text}")
        assert not old["revoked"] and old["rotated_to"] is None


async def test_a_rotation_needs_a_key_the_caller_kept_and_sends_nothing_without_one(
        deployment: Deployment) -> None:
    """A key drawn inside `rotate_key` would be lost with an interrupted call while the oracle
    may still apply the statement naming it: no key, no statement."""
    alice = Identity.generate()
    await deployment.enroll(alice)
    async with deployment.device(alice) as a:
        await a.wait_connected(timeout=10)
        with pytest.raises(TypeError, match="new_identity"):
            async with asyncio.timeout(10):
                await a.rotate_key()  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="kept by the caller"):
            async with asyncio.timeout(10):
                await a.rotate_key(None)  # type: ignore[arg-type]
        assert a.identity is alice and a.pending_rotation is None and not a.rotating
        # Nothing went out: a rotation sent now is the only one the oracle ever sees.
        marker = Identity.generate()
        await a.send([deployment.oracle.identity.public],
                     KeyRotation.sign(alice, marker, now_ms()).encode())

        async def rotated() -> str | None:
            detail = await deployment.admin.call("GET", f"/v1/devices/{alice.public.text}")
            return detail["rotated_to"]
        assert await eventually(rotated, timeout=15) == marker.public.text


async def test_a_rotation_statement_issued_over_a_day_ago_is_refused(
        deployment: Deployment) -> None:
    """An abandoned statement is dead once its envelope's life (a day) passed: the oracle does
    not apply it later, when the key it names may be gone."""
    mallory = Identity.generate()
    await deployment.enroll(mallory)
    stale_key, marker = Identity.generate(), Identity.generate()
    issued = now_ms() - 24 * 3600 * 1000 - 600_000  # KEY_ROTATION_TTL_S and the skew, past
    async with deployment.device(mallory) as m:
        await m.wait_connected(timeout=10)
        for payload in (KeyRotation.sign(mallory, stale_key, issued).encode(),
                        KeyRotation.sign(mallory, marker, now_ms()).encode()):
            await m.send([deployment.oracle.identity.public], payload)

        async def rotated() -> str | None:  # processed in order: the stale one came first
            detail = await deployment.admin.call("GET", f"/v1/devices/{mallory.public.text}")
            return detail["rotated_to"]
        assert await eventually(rotated, timeout=15) == marker.public.text
    devices = (await deployment.admin.call("GET", "/v1/devices"))["devices"]
    assert stale_key.public.text not in {d["key"] for d in devices}


async def test_an_interrupted_rotation_the_oracle_applies_later_is_finished_with_the_pending_key(
        start_relay, tmp_path: Path) -> None:
    """The audit's F2: the oracle is down while the device rotates, the call times out, the
    oracle comes back on the same database and applies the statement from its mailbox.  The
    device still holds the new key (`pending_rotation`) and finishes the rotation with it:
    it sends as the new key, never locked out on a draining old one."""
    alice, bob = Identity.generate(), Identity.generate()
    async with _deployed(start_relay, tmp_path, drain_s=60) as deployment:
        await deployment.enroll(alice, bob)
        async with deployment.device(alice) as a, deployment.device(bob) as b:
            await eventually(lambda: _has(a, bob.public), timeout=10)
            await eventually(lambda: _has(b, alice.public), timeout=10)
            await deployment.oracle.stop()  # an outage, or a restart
            new = Identity.generate()  # kept by the caller before the call (KeyFiles.begin())
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(3):
                    await a.rotate_key(new)
            assert a.identity is alice and a.pending_rotation is new
            with pytest.raises(ValueError, match="pending"):  # the oracle may still apply it
                await a.rotate_key(Identity.generate())

            # Back, on the same database (and port).
            async with OracleServer(deployment.oracle.settings) as restarted:
                admin = await Admin.login(restarted, "second")
                try:
                    async def applied() -> bool:
                        old = await admin.call("GET", f"/v1/devices/{alice.public.text}")
                        return old["rotated_to"] == new.public.text and old["revoked"]
                    await eventually(applied, timeout=15)  # from the statement in its mailbox
                finally:
                    await admin.close()

                pending = a.pending_rotation
                assert pending is not None
                async with asyncio.timeout(20):
                    assert await a.rotate_key(pending) is new
                assert a.identity is new and a.pending_rotation is None
                await eventually(lambda: _has(b, new.public), timeout=10)
                sent = await asyncio.wait_for(a.send([bob.public], b"from the new key"), 10)
                received = await asyncio.wait_for(anext(b.messages()), 10)
                assert (received.sender, received.payload) == (new.public, b"from the new key")
                assert (await sent.wait_receipts(10))[bob.public].value == "delivered"
        async with await RawDevice.connect(deployment.relay.url, alice) as raw_alice:
            assert error_code(await raw_alice.send(sealed(alice, [bob.public]))) == "REVOKED"


async def _rotate_by_statement(deployment: Deployment, old: Identity, new: Identity) -> None:
    """Rotate `old` to `new` as a device does (its statement, sent from the old key), and
    wait until the oracle applied it: the old key drains from then on."""
    await eventually(lambda: _welcomed(deployment.relay.url, old), timeout=10)  # list applied
    async with await RawDevice.connect(deployment.relay.url, old) as raw:
        statement = KeyRotation.sign(old, new, now_ms()).encode()
        envelope = seal_envelope(old, Kind.DATA, [deployment.oracle.identity.public], statement,
                                 ttl_s=600, now_ms=now_ms())
        assert isinstance(await raw.send(envelope), Accepted)

    async def applied() -> bool:
        device = await deployment.admin.call("GET", f"/v1/devices/{old.public.text}")
        return device["rotated_to"] == new.public.text
    await eventually(applied, timeout=15)


async def _refusal(url: str, identity: Identity) -> str | None:
    """The relay's refusal of a handshake as `identity`, or None if it WELCOMEs it."""
    try:
        return await handshake_refusal(url, identity)
    except AssertionError:  # WELCOME
        return None


async def _closed_with(raw: RawDevice, timeout: float = 5) -> str | None:
    """The code of the ERROR a live connection is closed with (deliveries skipped, not
    acknowledged), or None if none comes within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                frame = await raw.recv(timeout)
                if isinstance(frame, Error):
                    return error_code(frame)
    except (TimeoutError, ConnectionError):
        return None


async def test_revoking_a_rotated_device_ends_its_old_keys_drain(long_drain: Deployment) -> None:
    """The device is stolen after a rotation: the thief holds the old key too
    (`identity.key.old`), so revoking the device must refuse the old key at once, not
    leave it its mailbox at every relay until its drain deadline."""
    deployment, url = long_drain, long_drain.relay.url
    alice, bob, new = Identity.generate(), Identity.generate(), Identity.generate()
    await deployment.enroll(alice, bob)
    async with deployment.device(bob) as b:
        await eventually(lambda: _has(b, alice.public), timeout=10)
        await b.send([alice.public], b"waits for alice's old key")
    await _rotate_by_statement(deployment, alice, new)
    async with await RawDevice.connect(url, alice) as thief:  # draining: WELCOMEd
        assert isinstance(await thief.recv(5), Deliver)  # (not acknowledged: it stays)
        revocation = await deployment.admin.call("POST", f"/v1/devices/{new.public.text}/revoke")
        # The list revoking the device closes the old key's live connection...
        assert await _closed_with(thief) == "REVOKED"
    # ...and refuses its handshake from then on, as the new key's.
    assert await _refusal(url, alice) == "REVOKED"
    assert await _refusal(url, new) == "REVOKED"
    assert revocation["revoked"] and revocation["drains_ended"] == [alice.public.text]
    old = await deployment.admin.call("GET", f"/v1/devices/{alice.public.text}")
    assert old["drain_until_ms"] <= now_ms()
    await deployment.admin.call("DELETE", f"/v1/devices/{alice.public.text}", expect=204)

    # Restoring the device gives the new key back, not the old key's drain.
    restored = await deployment.admin.call("POST", f"/v1/devices/{new.public.text}/restore")
    assert not restored["revoked"]
    await eventually(lambda: _welcomed(url, new), timeout=10)
    assert await _refusal(url, alice) == "NOT_ENROLLED"  # deleted: unknown


async def test_revoking_a_draining_key_ends_its_drain_and_leaves_the_device(
        long_drain: Deployment) -> None:
    deployment, url = long_drain, long_drain.relay.url
    alice, bob, new = Identity.generate(), Identity.generate(), Identity.generate()
    await deployment.enroll(alice, bob)
    await _rotate_by_statement(deployment, alice, new)
    assert await _refusal(url, alice) is None  # draining: WELCOMEd
    status = await deployment.admin.call("GET", "/v1/status")

    revocation = await deployment.admin.call("POST", f"/v1/devices/{alice.public.text}/revoke")
    assert await _eventually_refused(url, alice) == "REVOKED"
    assert revocation["drains_ended"] == [alice.public.text]
    assert revocation["revoked"] and revocation["drain_until_ms"] <= now_ms()
    after = await deployment.admin.call("GET", "/v1/status")
    assert after["access_list_version"] == status["access_list_version"] + 1
    # The device is its new key, untouched.
    assert await _refusal(url, new) is None
    assert not (await deployment.admin.call("GET", f"/v1/devices/{new.public.text}"))["revoked"]
    # Again: nothing left to end, nothing changes; the old key may be deleted now.
    again = await deployment.admin.call("POST", f"/v1/devices/{alice.public.text}/revoke")
    assert again["drains_ended"] == []
    assert (await deployment.admin.call("GET", "/v1/status"))["access_list_version"] == \
        after["access_list_version"]
    await deployment.admin.call("POST", f"/v1/devices/{alice.public.text}/restore", expect=409)
    await deployment.admin.call("DELETE", f"/v1/devices/{alice.public.text}", expect=204)


async def _welcomed(url: str, identity: Identity) -> bool:
    return await _refusal(url, identity) is None


async def _eventually_refused(url: str, identity: Identity) -> str | None:
    """The refusal once the relay applied the list that refuses `identity` (None if it
    still WELCOMEs it after 10 s)."""
    async def refused() -> str | None:
        return await _refusal(url, identity)
    try:
        return await eventually(refused, timeout=10, interval=0.2)
    except AssertionError:
        return None


async def test_streams_of_a_key_that_starts_draining_end_at_both_ends(
        start_relay, tmp_path: Path) -> None:
    """A draining key may only fetch its mailbox (SPEC §15), yet its streams ran on: the
    oracle applies alice's rotation while her device is still connected as the old key
    (an interrupted `rotate_key` the oracle applied later), and her stream with bob,
    tunnel or not, carried data in both directions for as long as that connection lived.
    Now the list that makes her key draining ends it at both ends (REVOKED), and her
    connection stays, to drain."""
    async with _deployed(start_relay, tmp_path, drain_s=3600) as deployment:
        alice, bob, new = Identity.generate(), Identity.generate(), Identity.generate()
        await deployment.enroll(alice, bob)
        theirs: list[Stream] = []

        async def keep(request: StreamRequest) -> None:
            theirs.append(await request.accept())

        async with deployment.device(alice) as a, deployment.device(bob) as b:
            b.on_stream(keep)
            await eventually(lambda: _has(a, bob.public), timeout=10)
            await eventually(lambda: _has(b, alice.public), timeout=10)
            stream = await a.open_stream(bob.public, "tcp/22", timeout=10)
            await stream.write(b"before")
            assert await asyncio.wait_for(theirs[0].read(), 5) == b"before"

            statement = KeyRotation.sign(alice, new, now_ms()).encode()
            await a.send_envelope(seal_envelope(alice, Kind.DATA,
                                                [deployment.oracle.identity.public], statement,
                                                ttl_s=600, now_ms=now_ms()))
            access = deployment.relay.relay.access

            async def draining() -> bool:
                return access.current is not None and alice.public in access.current.draining
            await eventually(draining, timeout=15)
            with pytest.raises(RevokedError, match="rotated to a new key"):
                await asyncio.wait_for(stream.read(), 5)
            with pytest.raises(RevokedError, match="rotated to a new key"):
                await asyncio.wait_for(theirs[0].read(), 5)
            assert deployment.relay.relay.stream_budget.open == 0
            assert a.connected  # the old key keeps its connection: it may still drain
