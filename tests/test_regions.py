"""One worldwide network (issue 17, SPEC §19): any relay, in any region, reaches any device.

Three regions on this machine (tests/region_support.py): a Redis each, relays
each, 40-80 ms one way between regions.  Every mailbox lives in its device's
home region, named by the oracle's signed access list; a relay verifies once
and stores each recipient's copy in that recipient's home store, and serves
a roaming device from its home store.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from access_support import store_fetches
from client import DeliveryStatus, Device, PeerList
from proto import Envelope, ErrorCode, Identity, decode_envelope
from proto.frames import Accepted, Ack, Error, Frame, Send
from continuum.session import ACKS_IN_FLIGHT, SENDS_IN_FLIGHT
from continuum.store.redis import MoveStep
from region_support import World, three_regions
from tally import FAULTS_SURVIVED, MESSAGES_LOST, TALLY
from tcp_proxy import DelayProxy
from wire import RawDevice, error_code, sealed

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]


@pytest.fixture
async def world() -> World:
    async with three_regions() as world:
        yield world


async def _next_message(device: Device, timeout_s: float = 10.0):
    async with asyncio.timeout(timeout_s):
        async for message in device.messages():
            return message


async def _emptied(store, device: Identity, timeout_s: float = 5.0) -> bool:
    """Whether `device`'s mailbox in `store` empties (its last ACKs cross the WAN)."""
    async with asyncio.timeout(timeout_s):
        while await store.depth(device.public):
            await asyncio.sleep(0.05)
    return True


class _Tasks:
    """The tasks named `name` in this process while the block runs, looked at every loop
    turn: the most running at once (how a bound on a relay's side tasks is observed) and
    how many started."""

    def __init__(self, name: str) -> None:
        self.name, self.most = name, 0
        self._seen: set[asyncio.Task[object]] = set()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def started(self) -> int:
        return len(self._seen)

    async def __aenter__(self) -> _Tasks:
        self._watcher = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._watcher is not None
        self._watcher.cancel()

    async def _watch(self) -> None:
        while True:
            running = [task for task in asyncio.all_tasks() if task.get_name() == self.name]
            self.most = max(self.most, len(running))
            self._seen.update(running)
            await asyncio.sleep(0)


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
        store = world.relays[0].relay.regions.stores[region]  # type: ignore[union-attr]
        assert await store.depth(alice.public) == 0


async def test_a_roaming_device_gets_live_mail_from_the_wake_up_without_a_fetch(world) -> None:
    """alice (eu) on the US relay; carol sends through the AP relay.  Each message reaches
    the US relay with its wake-up from eu's Redis and is delivered from it: one WAN leg,
    not a wake-up and then a fetch across the WAN (SPEC §19).  Also the first one after a
    reconnect, whose mailbox held (acked) mail before."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "eu", carol.public: "ap"})
    us, ap = await world.relay("us"), await world.relay("ap")
    metrics = us.relay.metrics  # type: ignore[union-attr]
    home = us.relay.regions.stores["eu"]  # type: ignore[union-attr]
    sent = [sealed(carol, [alice.public], bytes([i]), ttl_s=600) for i in range(6)]
    async with await RawDevice.connect(ap.url, carol) as sender:
        for batch in (sent[:3], sent[3:]):  # two connections of alice, one after the other
            fetched = store_fetches(us)
            async with await RawDevice.connect(us.url, alice) as roaming:
                # Its fetches done (the session's first, and the one its subscription's
                # confirmation asks for): the mail that follows is live.
                async with asyncio.timeout(10):
                    while store_fetches(us) < fetched + 2:
                        await asyncio.sleep(0.02)
                before = metrics.delivered_from_wakeups.value
                for envelope in batch:
                    assert await sender.send(envelope) == Accepted(envelope.msg_id)
                    assert (await roaming.next_delivery()).envelope == envelope.raw
                    assert await _emptied(home, alice)  # its ACK reached eu
                assert metrics.delivered_from_wakeups.value - before == len(batch)
                await roaming.expect_silence(0.3)  # nothing twice


async def test_expiry_notices_go_to_the_senders_home(world) -> None:
    """carol (ap) writes to alice (eu), who never connects: the eu relays' sweep expires it
    and stores the notice in carol's home, ap, where carol hears it on the AP relay."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "eu", carol.public: "ap"})
    await world.relay("eu")  # sweeps eu's store
    ap = await world.relay("ap")
    async with Device(carol, [ap.url], PeerList([alice.public])) as sender:
        outgoing = await sender.send([alice.public], b"too late", ttl_s=1, timeout=15)
        async with asyncio.timeout(15):
            while (await outgoing.wait_receipts(timeout=1))[alice.public] is not DeliveryStatus.EXPIRED:
                pass


async def test_one_envelope_to_three_regions_is_stored_in_each_or_the_sender_is_told(
        world) -> None:
    """Stored once per recipient's region.  With us's Redis down the send is refused
    STORE_UNAVAILABLE naming bob and us; eu and ap keep their copies; once us is back the
    same bytes are taken (the regions that hold it answer REPLAY) and each recipient has
    exactly one copy."""
    alice, bob, carol, dave = (Identity.generate() for _ in range(4))
    world.place({alice.public: "eu", bob.public: "us", carol.public: "ap", dave.public: "ap"})
    ap = await world.relay("ap")
    store = ap.relay.regions  # type: ignore[union-attr]
    async with await RawDevice.connect(ap.url, carol) as raw:
        everyone = [alice.public, bob.public, dave.public]
        assert isinstance(await raw.send(sealed(carol, everyone)), Accepted)
        for key, region in ((alice.public, "eu"), (bob.public, "us"), (dave.public, "ap")):
            assert await store.stores[region].depth(key) == 1
        world.redis["us"].kill()
        envelope = sealed(carol, everyone, b"second")
        refusal = await raw.send(envelope)
        assert error_code(refusal) == "STORE_UNAVAILABLE"
        assert isinstance(refusal, Error)
        assert "us STORE_UNAVAILABLE" in refusal.message and bob.public.text in refusal.message
        assert alice.public.text not in refusal.message
        assert "stored in eu, ap" in refusal.message or "stored in ap, eu" in refusal.message
        assert await store.stores["eu"].depth(alice.public) == 2
        world.redis["us"].start()
        async with asyncio.timeout(20):
            while True:  # the same bytes, until us answers again
                answer = await raw.send(envelope)
                if not isinstance(answer, Error) or answer.code != int(ErrorCode.STORE_UNAVAILABLE):
                    break
                await asyncio.sleep(0.2)
        # Stored in us now, and REPLAY (= already stored) from eu and ap.
        assert error_code(answer) == "REPLAY"
        for key, region in ((alice.public, "eu"), (bob.public, "us"), (dave.public, "ap")):
            assert await store.stores[region].depth(key) == 2
        assert isinstance(await raw.send(envelope), Error)  # and REPLAY everywhere from now on


async def test_the_same_message_through_two_regions_is_one_message(world) -> None:
    """Sent through the AP relay and again through the US relay (a device that failed over
    mid-send): the recipient's home store answers REPLAY the second time."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "eu", carol.public: "ap"})
    ap, us = await world.relay("ap"), await world.relay("us")
    envelope = sealed(carol, [alice.public], b"once")
    async with await RawDevice.connect(ap.url, carol) as first:
        assert isinstance(await first.send(envelope), Accepted)
    async with await RawDevice.connect(us.url, carol) as second:
        assert error_code(await second.send(envelope)) == "REPLAY"
    eu = await world.relay("eu")
    async with await RawDevice.connect(eu.url, alice) as recipient:
        delivery = await recipient.next_delivery()
        assert delivery.envelope == envelope.raw
        await recipient.expect_silence(0.5)


async def test_a_dead_region_refuses_only_sends_to_its_devices(world) -> None:
    """us's Redis SIGKILLed: a send to bob (us) is STORE_UNAVAILABLE, never ACCEPTED; alice
    (eu) still sends and receives; /healthz stays 200 and names us; the metric says 0."""
    alice, bob, carol = (Identity.generate() for _ in range(3))
    world.place({alice.public: "eu", bob.public: "us", carol.public: "ap"})
    eu = await world.relay("eu")
    world.redis["us"].kill()
    async with await RawDevice.connect(eu.url, carol) as sender, \
            await RawDevice.connect(eu.url, alice) as receiver:
        assert error_code(await sender.send(sealed(carol, [bob.public]))) == "STORE_UNAVAILABLE"
        assert isinstance(await sender.send(sealed(carol, [alice.public], b"fine")), Accepted)
        assert (await receiver.next_delivery()).envelope is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{eu.base_url}/healthz") as response:
            assert response.status == 200
            health = await response.json()
        async with http.get(f"{eu.base_url}/metrics") as response:
            metrics = await response.text()
    assert health["regions"] == {"ap": "ok", "eu": "ok", "us": "unreachable"}
    assert list(health["unreachable_regions"]) == ["us"]
    assert 'continuum_region_store_up{region="us"} 0.0' in metrics
    assert 'continuum_region_store_up{region="eu"} 1.0' in metrics


async def test_moving_a_home_moves_the_waiting_mail_once(world) -> None:
    """alice's home moves from eu to us with three messages waiting in eu: whichever relay
    serves her moves them into us (adopt there, then remove from eu) and she gets each
    once; a copy a relay still on the older list writes into eu afterwards follows her
    too (the former home's wake-up); nothing is left in eu."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "eu", carol.public: "ap"})
    ap = await world.relay("ap")
    eu = await world.relay("eu")
    async with await RawDevice.connect(ap.url, carol) as sender:
        waiting = [sealed(carol, [alice.public], f"waiting {n}".encode(), ttl_s=600)
                   for n in range(3)]
        for envelope in waiting:
            assert isinstance(await sender.send(envelope), Accepted)
    world.place({alice.public: "us", carol.public: "ap"}, former={alice.public: "eu"})
    await world.wait_applied()
    stores = eu.relay.regions.stores  # type: ignore[union-attr]
    async with await RawDevice.connect(eu.url, alice) as device:
        got = [(await device.next_delivery()).envelope for _ in range(3)]
        assert sorted(got) == sorted(envelope.raw for envelope in waiting)
        # A relay that had not applied the move yet stores one more in eu: it follows.
        late = sealed(carol, [alice.public], b"late", ttl_s=600)
        await stores["eu"].accept(late, replay_until_ms=late.expires_at_ms,
                                  limits=eu.relay.mailbox_limits)  # type: ignore[union-attr]
        assert (await device.next_delivery()).envelope == late.raw
        await device.expect_silence(0.5)
    assert await _emptied(stores["eu"], alice) and await _emptied(stores["us"], alice)


async def test_a_connected_device_whose_home_moves_reconnects_to_its_new_home(world) -> None:
    """The session of a device whose home moves is closed (1011, reconnect): its next
    connection is served from the new home, and mail sent after the move lands there."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "eu", carol.public: "ap"})
    us, ap = await world.relay("us"), await world.relay("ap")
    async with Device(alice, [us.url], PeerList([carol.public])) as roaming, \
            Device(carol, [ap.url], PeerList([alice.public])) as sender:
        await roaming.wait_connected(10)
        await sender.send([alice.public], b"before", ttl_s=600, timeout=15)
        assert (await _next_message(roaming)).payload == b"before"
        world.place({alice.public: "ap", carol.public: "ap"}, former={alice.public: "eu"})
        await world.wait_applied()
        await sender.send([alice.public], b"after", ttl_s=600, timeout=15)
        assert (await _next_message(roaming)).payload == b"after"
        stores = us.relay.regions.stores  # type: ignore[union-attr]
        assert await _emptied(stores["eu"], alice) and await _emptied(stores["ap"], alice)


async def test_a_home_redis_killed_mid_stream_loses_no_accepted_message(world) -> None:
    """carol (ap) streams to alice (eu, roaming on the US relay) through the AP relay; eu's
    Redis is SIGKILLed mid-stream and started again on its AOF.  Every message carol was
    told is stored (ACCEPTED, or REPLAY for a re-send) reaches alice; none twice."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "eu", carol.public: "ap"})
    ap, us = await world.relay("ap"), await world.relay("us")
    stored: set[bytes] = set()
    refused = 0
    async with await RawDevice.connect(ap.url, carol) as sender:
        for number in range(60):
            if number == 20:
                world.redis["eu"].kill()
            if number == 30:
                world.redis["eu"].start()
            envelope = sealed(carol, [alice.public], f"m{number}".encode(), ttl_s=600)
            answer = await sender.send(envelope)
            if isinstance(answer, Accepted):
                stored.add(envelope.msg_id)
            else:
                assert error_code(answer) == "STORE_UNAVAILABLE"  # never ACCEPTED-then-lost
                refused += 1
    assert refused > 0 and len(stored) >= 30
    received: list[bytes] = []
    async with await RawDevice.connect(us.url, alice) as roaming:
        with contextlib.suppress(TimeoutError):
            while True:
                delivery = await roaming.next_delivery(timeout=3)
                received.append(decode_envelope(delivery.envelope).msg_id)
    lost = stored - set(received)
    TALLY[MESSAGES_LOST] += len(lost)
    TALLY[FAULTS_SURVIVED] += 1
    assert not lost
    assert len(received) == len(set(received))  # none twice


async def test_hostile_ack_tags_touch_no_region_and_break_nothing(world) -> None:
    """ACKs naming no region, an unknown one, another region's entry or garbage remove
    nothing anywhere; the connection goes on delivering."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "eu", carol.public: "eu"})
    eu = await world.relay("eu")
    async with await RawDevice.connect(eu.url, carol) as sender, \
            await RawDevice.connect(eu.url, alice) as device:
        first = sealed(carol, [alice.public], b"first", ttl_s=600)
        assert isinstance(await sender.send(first), Accepted)
        delivery = await device.next_delivery(ack=False)
        region, _, local_tag = delivery.tag.partition("/")
        assert region == "eu"
        for tag in ("", "eu", "eu/", "/" + local_tag, "mars/" + local_tag, "us/" + local_tag,
                    "ap/" + local_tag, "eu/not-a-stream-id", f"eu/{local_tag}/x", "a" * 64,
                    "eu/0-0", "eu/" + "9" * 20 + "-" + "9" * 20):
            await device.send_frame(Ack(tag))
        store = eu.relay.regions  # type: ignore[union-attr]
        assert await store.stores["eu"].depth(alice.public) == 1
        await device.send_frame(Ack(delivery.tag))
        assert await _emptied(store.stores["eu"], alice)
        second = sealed(carol, [alice.public], b"second", ttl_s=600)
        assert isinstance(await sender.send(second), Accepted)
        assert (await device.next_delivery()).envelope == second.raw


async def test_wakeups_during_a_mailbox_move_queue_one_more_move_not_one_each(world) -> None:
    """40 messages land in alice's former home at once while a relay watches it: their 40
    wake-ups come during one move, and one more move takes them all.  Before, each queued a
    move of its own, one after another (41 here; without end while the former home is
    written faster than a move's round trips)."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "us", carol.public: "eu"}, former={alice.public: "eu"})
    eu = await world.relay("eu")
    store = eu.relay.regions  # type: ignore[union-attr]
    limits = eu.relay.mailbox_limits  # type: ignore[union-attr]
    envelopes = [sealed(carol, [alice.public], bytes([n]), ttl_s=600) for n in range(40)]
    async with _Tasks("move-mailbox") as moves:
        subscription = await store.subscribe(alice.public, lambda _entry: None)
        try:
            await asyncio.gather(*(store.stores["eu"].accept(
                envelope, replay_until_ms=envelope.expires_at_ms, limits=limits)
                for envelope in envelopes))
            async with asyncio.timeout(10):
                while await store.stores["us"].depth(alice.public) < len(envelopes):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # any move still queued starts meanwhile
        finally:
            await subscription.close()
    assert await store.stores["eu"].depth(alice.public) == 0
    assert moves.started <= 4, moves.started


async def test_a_move_cut_short_and_run_again_neither_loses_nor_duplicates(world) -> None:
    """The mover died after adopting two messages into the new home and before removing
    them from the former one, and the device already acknowledged one of them: the next
    move removes both from the former home and adopts only the third."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "us", carol.public: "eu"}, former={alice.public: "eu"})
    eu = await world.relay("eu")
    store = eu.relay.regions  # type: ignore[union-attr]
    limits = eu.relay.mailbox_limits  # type: ignore[union-attr]
    envelopes = [sealed(carol, [alice.public], bytes([n]), ttl_s=600) for n in range(3)]
    for envelope in envelopes:
        await store.stores["eu"].accept(envelope, replay_until_ms=envelope.expires_at_ms,
                                        limits=limits)
    stamp = eu.relay.access.list_stamp()  # type: ignore[union-attr]
    for envelope in envelopes[:2]:  # what the mover did before it died
        assert await store.stores["us"].adopt(alice.public, envelope, stamp,
                                              limits=limits) is MoveStep.DONE
    first = (await store.stores["us"].fetch(alice.public, None, 1))[0]
    assert await store.stores["us"].ack(alice.public, first.tag)  # the device took it
    assert await store.move_mailbox(alice.public, "eu", "us", stamp) == 3  # all left eu
    assert await store.stores["eu"].depth(alice.public) == 0
    remaining = await store.stores["us"].fetch(alice.public, None, 10)
    assert sorted(entry.raw for entry in remaining) == sorted(e.raw for e in envelopes[1:])
    assert await store.stores["us"].adopt(alice.public, envelopes[0], stamp,
                                          limits=limits) is MoveStep.ALREADY


async def test_one_rate_limit_across_the_regions_a_sender_uses(world) -> None:
    """carol (homed in eu) sends through the US and the AP relays at once: both take from
    her one bucket in her home store, so the burst is hers worldwide, not per region."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "ap", carol.public: "eu"})
    slow = {"rate_per_s": 0.01, "rate_burst": 3}
    us, ap = await world.relay("us", **slow), await world.relay("ap", **slow)
    answers = []
    async with await RawDevice.connect(us.url, carol) as via_us, \
            await RawDevice.connect(ap.url, carol) as via_ap:
        for device in (via_us, via_ap, via_us, via_ap):
            answers.append(await device.send(sealed(carol, [alice.public], ttl_s=600)))
    assert [isinstance(answer, Accepted) for answer in answers[:3]] == [True] * 3
    assert error_code(answers[3]) == "RATE_LIMITED"


async def test_a_roaming_senders_paced_sends_do_not_wait_a_wan_round_trip_for_their_token(
        world) -> None:
    """carol (homed in us, 40 ms each way) on the EU relay sends to alice (homed in eu) one
    message at a time, 150 ms apart: her rate tokens live in her home region, but each
    SEND's token was taken ahead while she was idle (`continuum.rate_ahead`), so from the
    second on a SEND is answered without a WAN round trip (its accept is in eu).  Before,
    every SEND waited one (80 ms) for its token; the bound is half of it."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "eu", carol.public: "us"})
    eu = await world.relay("eu", rate_per_s=1000.0, rate_burst=1000)
    loop = asyncio.get_running_loop()
    took = []
    async with await RawDevice.connect(eu.url, carol) as sender:
        for index in range(5):
            await asyncio.sleep(0.150)
            started = loop.time()
            answer = await sender.send(sealed(carol, [alice.public], bytes([index]), ttl_s=600))
            took.append(loop.time() - started)
            assert isinstance(answer, Accepted), answer
    assert took[0] >= 2 * 0.040  # the first SEND's token: one WAN round trip
    assert max(took[1:]) < 0.040, took


async def test_without_an_oracle_every_key_is_local(world) -> None:
    """A relay with a region but no oracle has no list to place keys: every mailbox is in
    its own region's store, as before regions."""
    alice, carol = Identity.generate(), Identity.generate()
    us = await world.relay("us", oracle_url="", oracle_key="")
    async with await RawDevice.connect(us.url, carol) as sender:
        assert isinstance(await sender.send(sealed(carol, [alice.public], ttl_s=600)), Accepted)
    stores = us.relay.regions.stores  # type: ignore[union-attr]
    assert [await stores[region].depth(alice.public) for region in ("ap", "eu", "us")] == [0, 0, 1]


async def _send_at_once(url: str, sender: Identity,
                        envelopes: list[Envelope]) -> tuple[list[Frame], float]:
    """Write every SEND without waiting, then read the answers: (answers, seconds it took)."""
    loop = asyncio.get_running_loop()
    async with await RawDevice.connect(url, sender) as device:
        started = loop.time()
        for envelope in envelopes:
            await device.send_frame(Send(envelope.raw))
        answers = [await device.recv(timeout=20) for _ in envelopes]
        return answers, loop.time() - started


async def test_sends_across_the_wan_are_pipelined_and_keep_their_order(world) -> None:
    """carol (eu, on the EU relay) sends 64 envelopes to alice (homed in us, 40 ms each way)
    without waiting for answers: they are answered ACCEPTED in SEND order and lie in alice's
    mailbox in that order, and the relay keeps several in flight (one WAN round trip per
    SEND would take 64 x 80 ms; the bound below is half of that, some 16 times what 32 in
    flight need, so a busy machine does not fail it)."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "us", carol.public: "eu"})
    eu = await world.relay("eu", rate_per_s=1000.0, rate_burst=1000)
    sent = [sealed(carol, [alice.public], bytes([i]), ttl_s=600) for i in range(64)]
    answers, elapsed = await _send_at_once(eu.url, carol, sent)
    assert answers == [Accepted(envelope.msg_id) for envelope in sent]
    assert elapsed < 64 * 2 * 0.040 / 2
    stored = await eu.relay.regions.stores["us"].fetch(alice.public, None, 100)  # type: ignore[union-attr]
    assert [entry.raw for entry in stored] == [envelope.raw for envelope in sent]


async def test_sends_to_the_relays_own_region_are_pipelined_too(world) -> None:
    """A relay's own region's Redis also answers a round trip later (here 40 ms each way:
    another zone): carol (eu) sends 64 envelopes to bob (eu) through the EU relay without
    waiting for answers, and the relay keeps several in flight, as for another region's
    mailbox; they are answered ACCEPTED and stored in SEND order.  With the own region
    inline, each SEND waited two round trips, its rate token's and its accept's (11.8 s
    measured); the bound is half of one round trip per SEND (64 x 80 ms)."""
    bob, carol = Identity.generate(), Identity.generate()
    world.place({bob.public: "eu", carol.public: "eu"})
    sent = [sealed(carol, [bob.public], bytes([i]), ttl_s=600) for i in range(64)]
    async with DelayProxy(world.redis["eu"].port, 0.040) as zone:
        eu = await world.relay("eu", rate_per_s=1000.0, rate_burst=1000,
                               store=f"redis://127.0.0.1:{zone.port}/0?prefix={world.prefix}")
        try:
            answers, elapsed = await _send_at_once(eu.url, carol, sent)
            stored = await eu.relay.regions.stores["eu"].fetch(bob.public, None, 100)  # type: ignore[union-attr]
        finally:
            await eu.stop()  # before the proxy it reaches its store through
    assert answers == [Accepted(envelope.msg_id) for envelope in sent]
    assert elapsed < 64 * 2 * 0.040 / 2, elapsed
    assert [entry.raw for entry in stored] == [envelope.raw for envelope in sent]


async def test_a_connection_has_at_most_sends_in_flight_of_its_sends_in_the_relay(world) -> None:
    """The bound on what one connection can queue in the relay and its store: 3 x
    SENDS_IN_FLIGHT SENDs written at once across an 80 ms round trip are all answered, but
    the relay (in this process) never holds more than SENDS_IN_FLIGHT of them in flight:
    it reads the next ones only as earlier ones are answered."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "us", carol.public: "eu"})
    eu = await world.relay("eu", rate_per_s=1000.0, rate_burst=1000)
    sent = [sealed(carol, [alice.public], bytes([i]), ttl_s=600)
            for i in range(3 * SENDS_IN_FLIGHT)]
    async with _Tasks("send") as sends:  # the session's SENDs in flight are its "send" tasks
        async with await RawDevice.connect(eu.url, carol) as sender:
            for envelope in sent:
                await sender.send_frame(Send(envelope.raw))
            answers = [await sender.recv(timeout=20) for _ in sent]
    assert answers == [Accepted(envelope.msg_id) for envelope in sent]
    assert SENDS_IN_FLIGHT // 2 <= sends.most <= SENDS_IN_FLIGHT, sends.most


async def test_a_connection_has_at_most_acks_in_flight_of_its_acks_in_the_relay(world) -> None:
    """The bound on the removals one connection has running against its store: alice
    (homed in us, on the EU relay: 80 ms per round trip) holds 3 x ACKS_IN_FLIGHT DELIVERs
    and ACKs them all at once.  The relay (in this process) never runs more than
    ACKS_IN_FLIGHT removals at a time, reading the next ACKs only as earlier ones finish,
    and every one of them is applied: her mailbox empties, and she is served on after."""
    alice, carol = Identity.generate(), Identity.generate()
    world.place({alice.public: "us", carol.public: "eu"})
    count = 3 * ACKS_IN_FLIGHT
    eu = await world.relay("eu", rate_per_s=1000.0, rate_burst=1000, delivery_window=count)
    sent = [sealed(carol, [alice.public], bytes([i]), ttl_s=600) for i in range(count)]
    async with await RawDevice.connect(eu.url, carol) as sender, \
            await RawDevice.connect(eu.url, alice) as device:
        for envelope in sent:
            await sender.send_frame(Send(envelope.raw))
        assert [await sender.recv(timeout=20) for _ in sent] == [
            Accepted(envelope.msg_id) for envelope in sent]
        deliveries = [await device.next_delivery(timeout=10, ack=False) for _ in sent]
        assert sorted(decode_envelope(d.envelope).msg_id for d in deliveries) == sorted(
            envelope.msg_id for envelope in sent)
        async with _Tasks("ack") as removals:  # the session's removals are its "ack" tasks
            for delivery in deliveries:
                await device.send_frame(Ack(delivery.tag))
            store = eu.relay.regions.stores["us"]  # type: ignore[union-attr]
            assert await _emptied(store, alice, timeout_s=20)
        after = sealed(carol, [alice.public], b"after", ttl_s=600)
        assert isinstance(await sender.send(after), Accepted)
        assert (await device.next_delivery(timeout=10)).envelope == after.raw
    assert ACKS_IN_FLIGHT // 2 <= removals.most <= ACKS_IN_FLIGHT, removals.most
