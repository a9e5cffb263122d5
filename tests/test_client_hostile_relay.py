"""A device against a relay (or peer) that lies: its clock, its own notices, a peer's payload.

A scripted relay (tests/fake_relay.py, real WebSocket on 127.0.0.1) plays the hostile side;
the device is the library's own `Device` with a home, as deployed.  Each case once made a
device surface a message twice or stop taking its mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from fake_relay import FakeRelay, accept
from tally import ATTACKS_REJECTED, TALLY

from client import Device, IncomingCall, PeerList
from client.backoff import Backoff
from client.config import AppliedConfig, ConfigUpdate
from client.tracking import DeliveryStatus
from proto import Identity, Kind, canonical, decode_envelope, seal_envelope
from proto.calls import Call, CallStatus, Response
from proto.config import ConfigPush, ConfigReport
from proto.payloads import ExpiryNotice
from proto.transfers import Manifest, file_hasher
from runtime.clock import now_ms

TEN_YEARS_MS = 10 * 365 * 86_400_000


def device_on(relay: FakeRelay, identity: Identity, peers: list[Identity], home: Path,
              **options: int) -> Device:
    """The library's device with a home, reconnecting quickly, its relay the scripted one."""
    return Device(identity, [relay.url], PeerList([peer.public for peer in peers]), home=home,
                  backoff=Backoff(0.05, 0.1), **options)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def reading(device: Device) -> AsyncIterator[list[bytes]]:
    """The payloads the application takes, as they come."""
    got: list[bytes] = []

    async def read() -> None:
        async with contextlib.aclosing(device.messages()) as messages:
            async for message in messages:
                got.append(message.payload)

    task = asyncio.create_task(read())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def reconnect(device: Device, relay: FakeRelay) -> None:
    """Have the device connect again (the relay dropped it), and wait until it has."""
    before = relay.connections
    await device._manager.connection.close()  # type: ignore[union-attr]
    await relay.wait_for(lambda: relay.connections > before and device.connected, 10)


async def test_a_relay_clock_years_ahead_does_not_make_the_device_forget_what_it_took(
        tmp_path: Path) -> None:
    """A relay announced a clock ten years ahead: the device pruned its memory of taken
    messages by that clock (all of it), and the next connection, with an honest clock,
    replayed one that surfaced again.  The device now forgets by its own clock only."""
    alice, bob = Identity.generate(), Identity.generate()
    once = seal_envelope(alice, Kind.DATA, [bob.public], b"pay me once", ttl_s=3600,
                         now_ms=now_ms())
    async with FakeRelay(deliver=[once.raw]) as relay:
        device = device_on(relay, bob, [alice], tmp_path)
        async with device, reading(device) as got:
            await relay.wait_for(lambda: got == [b"pay me once"] and bool(relay.acks), 10)
            relay.deliver, relay.clock_offset_ms = [], TEN_YEARS_MS
            await reconnect(device, relay)
            relay.deliver, relay.clock_offset_ms = [once.raw], 0
            await reconnect(device, relay)
            await relay.wait_for(lambda: len(relay.acks) >= 2, 10)  # the replay, ACKed
            await asyncio.sleep(0.2)
        assert got == [b"pay me once"]
        assert device.stats.duplicates == 1
    TALLY[ATTACKS_REJECTED] += 1


async def test_a_relays_own_notice_from_the_future_is_dropped_not_a_crash(
        tmp_path: Path) -> None:
    """A notice the relay signed with created_at_ms 2^63 - 1 passed the freshness rule and
    overflowed the state database when remembered: the connection failed before its ACK,
    on every connection.  An envelope created beyond any honest relay's clock is dropped."""
    alice, bob = Identity.generate(), Identity.generate()
    async with FakeRelay() as relay:
        notice = seal_envelope(relay.identity, Kind.EXPIRY, [bob.public],
                               ExpiryNotice.single(os.urandom(16), alice.public).encode(),
                               ttl_s=60, now_ms=2**63 - 1)
        relay.deliver = [notice.raw]
        device = device_on(relay, bob, [alice], tmp_path)
        async with device:
            await relay.wait_for(lambda: bool(relay.acks), 10)
            assert relay.connections == 1 and device.last_error is None
    TALLY[ATTACKS_REJECTED] += 1


async def test_a_relays_notices_are_not_remembered_among_taken_messages(tmp_path: Path) -> None:
    """A relay signs its own notices with any ttl; remembered as seen, each stayed longer
    than any peer's message, and enough of them pushed those out of the bounded set (to be
    replayed as new).  A notice is handled again harmlessly instead: it changes nothing."""
    alice, bob = Identity.generate(), Identity.generate()
    async with FakeRelay() as relay:
        notice = seal_envelope(relay.identity, Kind.EXPIRY, [bob.public],
                               ExpiryNotice.single(os.urandom(16), alice.public).encode(),
                               ttl_s=2**32 - 1, now_ms=now_ms())
        relay.deliver = [notice.raw]
        device = device_on(relay, bob, [alice], tmp_path)
        async with device:
            await relay.wait_for(lambda: bool(relay.acks), 10)
            assert (relay.identity.public, notice.msg_id) not in device._seen
            assert device._state is not None and device._state.count_seen() == 0


async def test_a_peers_report_with_a_number_beyond_a_double_is_dropped_and_the_mail_flows(
        tmp_path: Path) -> None:
    """A peer's CONFIG_REPORT holding 1e400 raised a ValueError where a refusal was expected:
    never ACKed, re-delivered on every connection, it held up everything behind it (the
    oracle, whose peers are every enrolled device, could be stopped by any one of them)."""
    alice, bob = Identity.generate(), Identity.generate()
    poison = seal_envelope(alice, Kind.CONFIG_REPORT, [bob.public],
                           canonical.encode([0, 1, '{"a":1e400}']), ttl_s=3600, now_ms=now_ms())
    behind = seal_envelope(alice, Kind.DATA, [bob.public], b"behind it", ttl_s=3600,
                           now_ms=now_ms())
    async with FakeRelay(deliver=[poison.raw, behind.raw]) as relay:
        device = device_on(relay, bob, [alice], tmp_path)
        async with device, reading(device) as got:
            await relay.wait_for(lambda: got == [b"behind it"] and len(relay.acks) >= 2, 10)
        assert relay.connections == 1
    TALLY[ATTACKS_REJECTED] += 1


async def test_a_relay_redelivering_one_message_does_not_grow_what_waits_to_be_taken(
        tmp_path: Path) -> None:
    """The relay delivers one genuine message 50 times on one connection, under 50 tags,
    while the application takes nothing: each copy was held until taken (50 x the envelope,
    up to 16 MiB each, without end).  Copies of a message already waiting are ACKed at once;
    the application gets it once."""
    alice, bob = Identity.generate(), Identity.generate()
    once = seal_envelope(alice, Kind.DATA, [bob.public], b"only once", ttl_s=3600,
                         now_ms=now_ms())
    async with FakeRelay(deliver=[once.raw] * 50) as relay:
        device = device_on(relay, bob, [alice], tmp_path)
        async with device:
            await relay.wait_for(lambda: len(relay.acks) == 49, 10)
            assert device.stats.duplicates == 49
            async with reading(device) as got:
                await relay.wait_for(lambda: len(relay.acks) == 50, 10)
            assert got == [b"only once"]
    TALLY[ATTACKS_REJECTED] += 1


async def test_files_a_peer_sends_and_nobody_takes_count_against_the_incoming_bound(
        tmp_path: Path) -> None:
    """Only files still arriving counted against `max_incoming_transfers`: a peer's empty
    files complete on their manifest, so 20 of them left 20 rows, directories and files in
    memory (any number, and real files the same way, 8 at a time).  Now a file waiting to be
    taken counts too: the fourth manifest is refused while three wait."""
    alice, bob = Identity.generate(), Identity.generate()
    empty = file_hasher().digest()
    manifests = [seal_envelope(alice, Kind.TRANSFER_MANIFEST, [bob.public],
                               Manifest.for_file(os.urandom(16), 0, empty, 1, f"f{n}").encode(),
                               ttl_s=60, now_ms=now_ms()).raw for n in range(20)]
    async with FakeRelay(deliver=manifests) as relay:
        device = device_on(relay, bob, [alice], tmp_path, max_incoming_transfers=3,
                           max_incoming_transfers_per_peer=3)
        async with device:
            await relay.wait_for(lambda: len(relay.acks) == 20, 10)
            assert device.stats.dropped_refused_transfer == 17
    assert len(list((tmp_path / "transfers" / "received").iterdir())) == 3
    TALLY[ATTACKS_REJECTED] += 1


async def test_one_peers_files_that_never_finish_do_not_refuse_another_peers(
        tmp_path: Path) -> None:
    """The places for files arriving were shared by all peers: one peer's 8 manifests whose
    chunks never come (held until they expire, whatever TTL it signs) refused every other
    peer's file.  Now a peer holds at most half of them, and another peer's file arrives."""
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    stalled = [seal_envelope(alice, Kind.TRANSFER_MANIFEST, [bob.public],
                             Manifest.for_file(os.urandom(16), 1024**3, bytes(32), 65_536,
                                               f"never{n}").encode(),
                             ttl_s=2**32 - 1, now_ms=now_ms()).raw for n in range(8)]
    wanted = seal_envelope(carol, Kind.TRANSFER_MANIFEST, [bob.public],
                           Manifest.for_file(os.urandom(16), 0, file_hasher().digest(), 1,
                                             "report.pdf").encode(),
                           ttl_s=60, now_ms=now_ms()).raw
    async with FakeRelay(deliver=[*stalled, wanted]) as relay:
        device = device_on(relay, bob, [alice, carol], tmp_path)
        async with device:
            await relay.wait_for(lambda: len(relay.acks) == 9, 10)
            assert device.stats.dropped_refused_transfer == 4  # alice's beyond her half
            async with asyncio.timeout(5):
                received = await anext(device.files())
    assert (received.sender, received.name) == (carol.public, "report.pdf")
    TALLY[ATTACKS_REJECTED] += 1


async def test_a_relays_notice_that_a_message_expired_before_it_could_is_not_believed(
        tmp_path: Path) -> None:
    """A relay (any relay key the device ever saw) said a message sent a moment ago with a
    day's ttl had expired unread, and the device believed it: `wait_receipts` settled at
    once with EXPIRED.  A notice is believed once the device's own clock says the message
    could have expired; a real one (ttl 1 s, after it) still is."""
    alice, bob = Identity.generate(), Identity.generate()
    async with FakeRelay(answer=accept) as relay:
        device = device_on(relay, alice, [bob], tmp_path)
        async with device:
            fresh = await device.send([bob.public], b"a day to live", ttl_s=86_400, timeout=10)
            short = await device.send([bob.public], b"a second to live", ttl_s=1, timeout=10)
            await asyncio.sleep(1.2)  # the short one's ttl has passed (and the skew allowed)
            relay.deliver = [seal_envelope(relay.identity, Kind.EXPIRY, [alice.public],
                                           ExpiryNotice.single(outgoing.msg_id, bob.public)
                                           .encode(), ttl_s=60, now_ms=now_ms()).raw
                             for outgoing in (fresh, short)]
            await reconnect(device, relay)
            await relay.wait_for(lambda: len(relay.acks) >= 2, 10)
            assert fresh.statuses == {bob.public: DeliveryStatus.PENDING}
            assert (await short.wait_receipts(timeout=5)) == {bob.public: DeliveryStatus.EXPIRED}
    TALLY[ATTACKS_REJECTED] += 1


async def test_an_older_configuration_handled_beside_a_newer_one_does_not_roll_it_back(
        tmp_path: Path) -> None:
    """A rotated key's mailbox drains beside its successor's, so two configurations can be in
    hand at once: v3 in the old key's mailbox, v4 in the new one's, v2 held.  Each was ranked
    NEWER than v2 when it arrived; the relay delivered v3 while v4's handler ran, and the
    application was given v3 after v4, which was then kept and reported."""
    oracle, old_key, new_key = Identity.generate(), Identity.generate(), Identity.generate()

    def config(version: int, key: Identity) -> bytes:
        push = ConfigPush(1, version, {"version": version})
        return seal_envelope(oracle, Kind.CONFIG, [key.public], push.encode(), ttl_s=3600,
                             now_ms=now_ms()).raw

    given: list[int] = []

    async def slow_handler(update: ConfigUpdate) -> dict[str, int]:
        given.append(update.version)
        await asyncio.sleep(0.6)  # an application restarting a service
        return {"running": update.version}

    home = tmp_path / "device"
    async with FakeRelay(deliver=[config(4, new_key), config(3, old_key)], answer=accept,
                         pace_s=0.3) as relay:
        device = Device(new_key, [relay.url], PeerList(), oracle.public, home=home,
                        backoff=Backoff(0.05, 0.2))
        device.config.apply(ConfigUpdate(1, 2, {"version": 2}), oracle.public, {})
        async with device:
            device.on_config(slow_handler)
            device.drain(old_key)
            # Each connection is handed both (and decides only what is sealed to its key).
            await relay.wait_for(lambda: len(relay.acks) >= 4, 10)
            await asyncio.sleep(0.7)  # any handler still running ends
        assert given == [4]
        assert device.config.stamp.version == 4
    reports = [ConfigReport.decode(decode_envelope(raw).open(oracle).plaintext)
               for raw in relay.sends]
    assert {report.version for report in reports} == {4}
    assert AppliedConfig.in_home(home).stamp.version == 4


async def test_a_relay_clock_behind_does_not_make_a_late_call_run(tmp_path: Path) -> None:
    """A relay holds a caller's call past its deadline (still within the freshness
    allowance), then announces a clock an hour behind: the callee held the deadline against
    the relay's clock alone, ran the handler, and the caller, which had given up, may have
    called again.  Against the device's own clock the call is late: answered TIMEOUT."""
    caller, callee = Identity.generate(), Identity.generate()
    created = now_ms() - 60_000  # sealed a minute ago, with a 10 s deadline
    call = Call(os.urandom(16), "open.valve", created + 10_000, b"")
    envelope = seal_envelope(caller, Kind.CALL, [callee.public], call.encode(), ttl_s=10,
                             now_ms=created)
    ran: list[str] = []

    async def handler(incoming: IncomingCall) -> bytes:
        ran.append(incoming.method)
        return b"opened"

    async with FakeRelay(deliver=[envelope.raw], answer=accept,
                         clock_offset_ms=-3_600_000) as relay:
        async with device_on(relay, callee, [caller], tmp_path / "callee") as device:
            device.on_call("open.valve", handler)
            await relay.wait_for(lambda: len(relay.sends) == 1, 10)
    [answer] = [decode_envelope(raw).open(caller) for raw in relay.sends]
    assert answer.kind is Kind.RESPONSE
    assert Response.decode(answer.plaintext).status == CallStatus.TIMEOUT
    assert ran == []


async def test_a_relay_cannot_keep_an_old_keys_drain_going_past_its_deadline(
        tmp_path: Path) -> None:
    """A drain ended when the old key's mailbox went quiet, or when a relay refused the key:
    a relay delivering junk every fraction of a second kept it going without end (and the
    old secret on disk, which stops the next rotation).  It ends at its deadline, by the
    device's own clock, whatever the relay does."""
    old, new, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    junk = [seal_envelope(stranger, Kind.DATA, [old.public], b"junk", ttl_s=600,
                          now_ms=now_ms()).raw for _ in range(200)]
    async with FakeRelay(deliver=junk, answer=accept, pace_s=0.2) as relay:
        async with device_on(relay, new, [], tmp_path / "device") as device:
            device.drain(old, quiet_s=0.5, deadline_s=2.0)
            await asyncio.sleep(1.5)
            assert device.draining == (old.public,)  # the junk keeps it from going quiet
            async with asyncio.timeout(3):
                await device.wait_drained()
            assert device.draining == ()
