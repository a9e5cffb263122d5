"""A device's home region moving while mail waits for it (SPEC §19, "Moving mail").

Found by an audit (F1, F1b, F2), each reproduced here on the three-region harness
(tests/region_support.py: a private Redis per region, 40-80 ms between them):
- a message moved back and forth with its home, unacknowledged, must reach the device
  however often it moved (its former copy was removed while no home held it);
- two relays on different access lists must not move one device's mail against each
  other until it is in no mailbox;
- a sender's retry after the recipient's mail moved must not store a second copy.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from fake_oracle import FakeOracle
from region_support import World, three_regions
from wire import RawDevice, error_code, sealed

from proto import Envelope, Identity, PublicKey, decode_envelope
from proto.frames import Accepted, Error

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


@pytest.fixture
async def world() -> World:
    async with three_regions() as world:
        yield world


async def _delivered(url: str, device: Identity, *, ack: bool, quiet_s: float = 2.0,
                     also: RawDevice | None = None) -> list[bytes]:
    """The msg_ids delivered to `device` on one connection to `url` until it stays quiet
    for `quiet_s`; unacknowledged (the connection then drops) unless `ack`."""
    got: list[bytes] = []
    async with await RawDevice.connect(url, device) as connection:
        with contextlib.suppress(TimeoutError):
            while True:
                delivery = await connection.next_delivery(timeout=quiet_s, ack=ack)
                got.append(decode_envelope(delivery.envelope).msg_id)
    return got


async def _depths(world: World, key: PublicKey, regions: tuple[str, ...]) -> list[int]:
    stores = world.relays[0].relay.regions.stores  # type: ignore[union-attr]
    return [await stores[region].depth(key) for region in regions]


async def _settled(world: World, key: PublicKey, expected: list[int],
                   regions: tuple[str, ...] = ("eu", "us"), timeout_s: float = 5.0) -> None:
    """Until `key`'s mailboxes in `regions` hold `expected` (a move's last step crossed the
    WAN); the last depths seen if they never do."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while await _depths(world, key, regions) != expected:
                await asyncio.sleep(0.05)
    assert await _depths(world, key, regions) == expected


async def test_a_message_moved_three_times_unacknowledged_is_delivered(world) -> None:
    """F1: carol's message M waits for alice (eu); her home moves eu -> us -> eu -> us, and
    each time she is delivered M and drops before her ACK.  Before, the third move found
    the marker the first had left in us, took it for "already adopted" and removed M
    from eu: M was in no mailbox, never delivered again, and no EXPIRY told carol."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "eu", carol.public: "ap"})
    ap, eu = await world.relay("ap"), await world.relay("eu")
    message = sealed(carol, [alice.public], b"important", ttl_s=3600)
    async with await RawDevice.connect(ap.url, carol) as sender:
        assert isinstance(await sender.send(message), Accepted)
    for move, (home, former) in enumerate((("us", "eu"), ("eu", "us"), ("us", "eu")), 1):
        world.place({alice.public: home, carol.public: "ap"}, former={alice.public: former})
        await world.wait_applied()
        got = await _delivered(eu.url, alice, ack=False)
        assert got == [message.msg_id], f"move {move}: delivered {len(got)} copies"
        await _settled(world, alice.public, [1, 0] if home == "eu" else [0, 1])
    assert await _delivered(eu.url, alice, ack=True) == [message.msg_id]
    await _settled(world, alice.public, [0, 0])


async def test_relays_on_different_lists_moving_one_mailbox_lose_nothing(world) -> None:
    """F1b: alice's home moved eu -> us, then back to eu.  Relay Q (eu) holds the newest
    list (home eu, former us); relay P (us) still the one before (home us, former eu),
    its oracle behind.  alice is connected to both: Q moves M from us to eu, and P,
    woken by M arriving in what it takes for alice's former home, would move it back.
    Before, P's adopt into us found the first move's marker and M was removed from eu:
    lost.  Now P's move is refused (a move under a newer list touched the mailbox)."""
    alice, carol = Identity.generate(), Identity.generate()
    async with FakeOracle(world.oracle.identity, 0.3) as lagging:
        def serve_both() -> None:
            lagging.document = world.oracle.document

        world.place({alice.public: "eu", carol.public: "ap"})
        serve_both()
        q = await world.relay("eu")
        p = await world.relay("us", oracle_url=lagging.url)
        message = sealed(carol, [alice.public], b"important", ttl_s=3600)
        async with await RawDevice.connect(q.url, carol) as sender:
            assert isinstance(await sender.send(message), Accepted)
        world.place({alice.public: "us", carol.public: "ap"}, former={alice.public: "eu"})
        serve_both()
        await world.wait_applied()
        assert await _delivered(q.url, alice, ack=False) == [message.msg_id]
        await _settled(world, alice.public, [0, 1])
        world.place({alice.public: "eu", carol.public: "ap"}, former={alice.public: "us"})
        async with asyncio.timeout(10):  # only Q gets it
            while q.relay.access.current.version != world.version:  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
        assert p.relay.access.current.version == world.version - 1  # type: ignore[union-attr]
        await asyncio.gather(_delivered(p.url, alice, ack=False),
                             _delivered(q.url, alice, ack=False))
        serve_both()
        await world.wait_applied()
        assert await _delivered(q.url, alice, ack=True) == [message.msg_id]
        await _settled(world, alice.public, [0, 0])


async def _send_until_stored(url: str, sender: Identity, envelope: Envelope) -> object:
    """SEND `envelope` again while a region's store is still coming back; the answer."""
    async with await RawDevice.connect(url, sender) as device:
        async with asyncio.timeout(30):
            while True:
                answer = await device.send(envelope)
                if not (isinstance(answer, Error) and error_code(answer) == "STORE_UNAVAILABLE"):
                    return answer
                await asyncio.sleep(0.2)


async def test_a_retry_after_the_recipients_mail_moved_is_not_stored_again(world) -> None:
    """F2: carol sends E to alice (eu) and bob (ap) while ap's Redis is down: stored for
    alice, refused for bob, "send the same envelope again".  Before the retry alice's
    home moves to us, E moves with her and she acknowledges it.  The retry must store E
    for bob only: for alice her new home holds E's replay key (it moved with the copy)
    and answers REPLAY.  Before, the replay key stayed in eu and us stored E again:
    alice got it twice."""
    alice, bob, carol = (Identity.generate() for _ in range(3))
    world.place({alice.public: "eu", bob.public: "ap", carol.public: "eu"})
    eu, us = await world.relay("eu"), await world.relay("us")
    message = sealed(carol, [alice.public, bob.public], b"once please", ttl_s=3600)
    world.redis["ap"].kill()
    async with await RawDevice.connect(eu.url, carol) as sender:
        assert error_code(await sender.send(message)) == "STORE_UNAVAILABLE"
    world.place({alice.public: "us", bob.public: "ap", carol.public: "eu"},
                former={alice.public: "eu"})
    await world.wait_applied()
    assert await _delivered(us.url, alice, ack=True) == [message.msg_id]
    await _settled(world, alice.public, [0, 0])
    world.redis["ap"].start()
    assert error_code(await _send_until_stored(eu.url, carol, message)) == "REPLAY"
    assert await _depths(world, alice.public, ("eu", "us")) == [0, 0]
    assert await _delivered(us.url, alice, ack=True) == []
    assert await _delivered(eu.url, bob, ack=True) == [message.msg_id]
