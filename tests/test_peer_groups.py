"""Relays enforce the oracle's peer groups: only peers (and the oracle) fill a device's mailbox.

Real sockets on 127.0.0.1: an in-process relay that long-polls an in-process
oracle, which pushes peer changes through that relay (and so is the relay's
trusted source of the list).  SPEC §12, "Enforcement".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from oracle_support import Admin, eventually, oracle_settings
from relay_process import free_port
from wire import RawDevice, error_code, sealed

from client import Device
from continuum.server import RelayServer
from oracle import OracleServer
from proto import Identity, Kind, Origin, decode_envelope
from proto.frames import Accepted, Deliver, Error

StartRelay = Callable[..., Awaitable[RelayServer]]


@asynccontextmanager
async def deployment(tmp_path: Path, start_relay: StartRelay,
                     **relay_settings: object) -> AsyncIterator[tuple[RelayServer, OracleServer, Admin]]:
    """A relay enforcing an oracle's list; the oracle pushes peer changes through that relay."""
    oracle_port = free_port()
    oracle_key = Identity.load_or_create(tmp_path / "oracle.key").public
    relay = await start_relay(oracle_url=f"http://127.0.0.1:{oracle_port}",
                              oracle_key=oracle_key.text, **relay_settings)
    async with OracleServer(oracle_settings(tmp_path, port=oracle_port,
                                            relays=(relay.url,))) as oracle:
        admin = await Admin.login(oracle)
        try:
            yield relay, oracle, admin
        finally:
            await admin.close()


async def enroll(admin: Admin, *identities: Identity) -> None:
    for number, identity in enumerate(identities):
        await admin.call("POST", "/v1/devices", {"key": identity.public.text, "name": f"d{number}"},
                         expect=201)


async def group_of(admin: Admin, *identities: Identity) -> str:
    group = await admin.call("POST", "/v1/groups", {"name": f"g-{len(identities)}"}, expect=201)
    for identity in identities:
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{identity.public.text}")
    return group["id"]


async def caught_up(relay: RelayServer, admin: Admin) -> None:
    """Wait until the relay enforces the oracle's newest list."""
    async def check() -> bool:
        status = await admin.call("GET", "/v1/status")
        assert relay.relay is not None
        current = relay.relay.access.current
        return current is not None and current.version == status["access_list_version"]
    await eventually(check, timeout=10)


async def delivered(device: RawDevice, seconds: float) -> list[Deliver]:
    """Every delivery (acked) until the relay is quiet for `seconds`."""
    frames = []
    while True:
        try:
            frames.append(await device.next_delivery(timeout=seconds))
        except TimeoutError:
            return frames


async def test_a_non_peer_is_told_not_peer_and_nothing_reaches_the_mailbox(
        tmp_path: Path, start_relay: StartRelay) -> None:
    alice, bob, mallory, stranger = (Identity.generate() for _ in range(4))
    async with deployment(tmp_path, start_relay) as (relay, oracle, admin):
        await enroll(admin, alice, bob, mallory)
        await group_of(admin, alice, bob)
        await caught_up(relay, admin)
        async with await RawDevice.connect(relay.url, mallory) as m, \
                await RawDevice.connect(relay.url, stranger) as s, \
                await RawDevice.connect(relay.url, alice) as a:
            for sender, device in ((mallory, m), (stranger, s)):  # enrolled non-peer, unknown key
                for _ in range(20):  # a flood, as it would fill an offline mailbox
                    spam = sealed(sender, [bob.public], b"spam")
                    answer = await device.send(spam)
                    assert error_code(answer) == "NOT_PEER", answer
                    assert isinstance(answer, Error) and answer.msg_id == spam.msg_id
            # One non-peer among the recipients refuses the whole envelope.
            mixed = sealed(alice, [bob.public, mallory.public], b"to both")
            assert error_code(await a.send(mixed)) == "NOT_PEER"
            hello = sealed(alice, [bob.public], b"from alice")
            assert isinstance(await a.send(hello), Accepted)
        async with await RawDevice.connect(relay.url, bob) as b:
            envelopes = [decode_envelope(f.envelope) for f in await delivered(b, 1.0)]
    data = [(e.sender, e.msg_id) for e in envelopes if e.open(bob).kind is Kind.DATA]
    assert data == [(alice.public, hello.msg_id)]
    assert {e.sender for e in envelopes} <= {alice.public, oracle.identity.public}


async def test_peers_receipts_and_the_oracles_pushes_pass(tmp_path: Path,
                                                         start_relay: StartRelay) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with deployment(tmp_path, start_relay, require_enrollment=True) as (relay, oracle, admin):
        await enroll(admin, alice, bob)
        async with Device(alice, [relay.url], oracle_key=oracle.identity.public) as a, \
                Device(bob, [relay.url], oracle_key=oracle.identity.public) as b:
            await group_of(admin, alice, bob)
            # The oracle's PEER_CHANGE reached both, and their receipts reached the oracle.
            await eventually(lambda: _in_force(admin, alice, bob), timeout=10)
            outgoing = await a.send([bob.public], b"hello bob")
            async with asyncio.timeout(10):
                async for message in b.messages():
                    assert message.payload == b"hello bob"
                    break
            statuses = await outgoing.wait_receipts(10)  # bob's RECEIPT is a peer's SEND
        assert statuses[bob.public].value == "delivered"


async def _in_force(admin: Admin, *identities: Identity) -> bool:
    for identity in identities:
        device = await admin.call("GET", f"/v1/devices/{identity.public.text}")
        if device["peer_version"] == 0 or device["behind"]:
            return False
    return True


async def test_removal_from_a_group_takes_effect_within_a_second(tmp_path: Path,
                                                                start_relay: StartRelay) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with deployment(tmp_path, start_relay) as (relay, _oracle, admin):
        await enroll(admin, alice, bob)
        group = await group_of(admin, alice, bob)
        await caught_up(relay, admin)
        async with await RawDevice.connect(relay.url, alice) as a:
            assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await admin.call("DELETE", f"/v1/groups/{group}/members/{bob.public.text}")
            refused_after = None
            while loop.time() - started < 3.0:
                answer = await a.send(sealed(alice, [bob.public]))
                if isinstance(answer, Error):
                    assert error_code(answer) == "NOT_PEER"
                    refused_after = loop.time() - started
                    break
                await asyncio.sleep(0.01)
    assert refused_after is not None, "alice could still write to bob 3 s after the removal"
    assert refused_after < 1.0, f"removal took {refused_after:.3f}s to reach the relay"


async def test_with_enrollment_required_an_unenrolled_recipient_is_refused(
        tmp_path: Path, start_relay: StartRelay) -> None:
    alice, nobody = Identity.generate(), Identity.generate()
    async with deployment(tmp_path, start_relay, require_enrollment=True) as (relay, _, admin):
        await enroll(admin, alice)
        await caught_up(relay, admin)
        async with await RawDevice.connect(relay.url, alice) as a:
            assert error_code(await a.send(sealed(alice, [nobody.public]))) == "NOT_ENROLLED"


async def test_expiry_notices_from_the_relay_still_reach_the_sender(
        tmp_path: Path, start_relay: StartRelay) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with deployment(tmp_path, start_relay) as (relay, _oracle, admin):
        await enroll(admin, alice, bob)
        await group_of(admin, alice, bob)
        await caught_up(relay, admin)
        assert relay.relay is not None
        relay_key = relay.relay.identity.public
        async with await RawDevice.connect(relay.url, alice) as a:
            assert isinstance(await a.send(sealed(alice, [bob.public], ttl_s=1)), Accepted)
            async with asyncio.timeout(10):
                while True:  # skip the oracle's peer change; the notice follows the TTL
                    envelope = decode_envelope((await a.next_delivery(timeout=10)).envelope)
                    if envelope.origin is Origin.RELAY:
                        break
    assert envelope.sender == relay_key


async def test_a_relay_without_an_oracle_lets_any_key_write_to_any_key(relay: RelayServer) -> None:
    stranger, anyone = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, stranger) as s:
        assert isinstance(await s.send(sealed(stranger, [anyone.public])), Accepted)
