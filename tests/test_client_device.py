"""The device library against real relays on 127.0.0.1: delivery, receipts, failover, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import pytest

from client import DeliveryStatus, Device, InboundMessage, PeerList
from client.backoff import Backoff
from continuum.server import RelayServer
from proto import Envelope, Identity, Kind, seal_envelope
from proto.errors import InvalidFieldError, OversizeError
from proto.limits import Limits
from proto.payloads import ExpiryNotice, PeerChange, Receipt
from relay_process import RelayProcess

StartRelay = Callable[..., Awaitable[RelayServer]]


def device(identity: Identity, urls: Iterable[str], peers: Iterable[Identity] = (),
           **options: object) -> Device:
    """A device with a fast backoff, so reconnect tests take fractions of a second."""
    peer_list = options.pop("peer_list", None)
    if peer_list is None:
        peer_list = PeerList(p.public for p in peers)
    return Device(identity, list(urls), peer_list, backoff=Backoff(0.05, 0.2),  # type: ignore[arg-type]
                  **options)  # type: ignore[arg-type]


async def next_messages(receiver: Device, count: int = 1, timeout: float = 10.0
                        ) -> list[InboundMessage]:
    received: list[InboundMessage] = []
    async with asyncio.timeout(timeout), contextlib.aclosing(receiver.messages()) as messages:
        async for message in messages:
            received.append(message)
            if len(received) == count:
                return received
    raise AssertionError("unreachable")


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"ws://127.0.0.1:{port}/v1/connect"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_round_trip_with_receipt(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, [relay.url], [bob]) as a, device(bob, [relay.url], [alice]) as b:
        async with asyncio.timeout(10):
            outgoing = await a.send([bob.public], b"hello bob")
        [message] = await next_messages(b)
        assert (message.sender, message.msg_id, message.payload, message.kind) == (
            alice.public, outgoing.msg_id, b"hello bob", Kind.DATA)
        assert await outgoing.wait_receipts(timeout=10) == {bob.public: DeliveryStatus.DELIVERED}
        assert a.stats.receipts == 1 and b.stats.surfaced == 1


async def test_one_envelope_to_two_recipients_each_decrypts_and_sends_a_receipt(
        relay: RelayServer) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    async with device(alice, [relay.url], [bob, carol]) as a, \
            device(bob, [relay.url], [alice]) as b, device(carol, [relay.url], [alice]) as c:
        async with asyncio.timeout(10):
            outgoing = await a.send([bob.public, carol.public], b"to both")
        assert set(outgoing.envelope.recipient_keys) == {bob.public, carol.public}
        for receiver in (b, c):
            [message] = await next_messages(receiver)
            assert (message.msg_id, message.payload) == (outgoing.msg_id, b"to both")
        statuses = await outgoing.wait_receipts(timeout=10)
        assert statuses == {bob.public: DeliveryStatus.DELIVERED,
                            carol.public: DeliveryStatus.DELIVERED}


async def test_offline_recipient_gets_the_message_when_it_connects(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, [relay.url], [bob]) as a:
        async with asyncio.timeout(10):
            outgoing = await a.send([bob.public], b"while you were out")
        assert (await outgoing.wait_receipts(timeout=0.3))[bob.public] is DeliveryStatus.PENDING
        async with device(bob, [relay.url], [alice]) as b:
            [message] = await next_messages(b)
            assert message.payload == b"while you were out"
            assert (await outgoing.wait_receipts(timeout=10))[bob.public] is \
                DeliveryStatus.DELIVERED


async def test_non_peer_and_forged_protocol_messages_are_dropped_counted_and_acked(
        relay: RelayServer) -> None:
    alice, bob, mallory = (Identity.generate() for _ in range(3))
    async with device(mallory, [relay.url]) as m, device(alice, [relay.url], [bob]) as a:
        async with asyncio.timeout(10):
            await m.send([bob.public], b"buy now")
            fake_notice = ExpiryNotice.single(b"\x00" * 16, alice.public).encode()
            with pytest.raises(InvalidFieldError, match="notice"):  # relays write their own
                await m.send_envelope(seal_envelope(mallory, Kind.EXPIRY, [bob.public],
                                                    fake_notice, ttl_s=60, now_ms=now_ms()))
            fake_peers = PeerChange(1, (mallory.public,)).encode()
            await m.send_envelope(seal_envelope(mallory, Kind.PEER_CHANGE, [bob.public],
                                                fake_peers, ttl_s=60, now_ms=now_ms()))
            await a.send([bob.public], b"first from a peer")
    async with device(bob, [relay.url], [alice]) as b:
        # Deliveries come in mailbox order: the peer's message surfaces only after the rest.
        [message] = await next_messages(b)
        assert message.payload == b"first from a peer"
        assert (b.stats.dropped_non_peer, b.stats.dropped_untrusted_expiry,
                b.stats.dropped_unauthorized_peer_change) == (1, 0, 1)
        assert list(b.peers) == [alice.public]
    async with device(alice, [relay.url], [bob]) as a:
        async with asyncio.timeout(10):
            await a.send([bob.public], b"second from a peer")
    async with device(bob, [relay.url], [alice]) as b:
        [message] = await next_messages(b)
        # Everything dropped earlier was ACKed: nothing comes back before the new message.
        assert message.payload == b"second from a peer"
        assert b.stats.dropped_non_peer == 0 and b.stats.duplicates == 0


async def test_fails_over_from_a_dead_url_to_the_next(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, [closed_port_url(), relay.url], [bob]) as a, \
            device(bob, [relay.url], [alice]) as b:
        async with asyncio.timeout(10):
            await a.wait_connected()
            assert a.relay_url == relay.url and a.stats.connect_failures >= 1
            await a.send([bob.public], b"via the second relay")
        [message] = await next_messages(b)
        assert message.payload == b"via the second relay"


async def test_relay_crash_and_restart_resends_the_unaccepted_outbox(tmp_path: Path) -> None:
    """A SEND written to a frozen relay that then dies is re-sent to its successor."""
    alice, bob = Identity.generate(), Identity.generate()
    relay = RelayProcess("--store", f"sqlite:///{tmp_path / 'mail.db'}")
    await relay.start()
    try:
        async with device(alice, [relay.url], [bob]) as a:
            async with asyncio.timeout(10):
                await a.send([bob.public], b"stored before the crash")
            assert relay.process is not None
            relay.process.send_signal(signal.SIGSTOP)  # alive for TCP, deaf to us
            in_flight = asyncio.create_task(a.send([bob.public], b"written to a frozen relay"))
            await asyncio.sleep(0.3)
            assert not in_flight.done() and a.connected
            relay.kill()
            async with asyncio.timeout(10):
                while a.connected:
                    await asyncio.sleep(0.01)
            while_down = asyncio.create_task(a.send([bob.public], b"sent while it was down"))
            await asyncio.sleep(0.3)
            assert not while_down.done()
            await relay.start()
            async with asyncio.timeout(15):
                await asyncio.gather(in_flight, while_down)
            assert a.stats.resent >= 1 and a.stats.connects >= 2
        async with device(bob, [relay.url], [alice]) as b:
            messages = await next_messages(b, count=3)
    finally:
        relay.kill()
    assert [m.payload for m in messages] == [
        b"stored before the crash", b"written to a frozen relay", b"sent while it was down"]


async def test_redelivery_after_a_lost_ack_reaches_the_application_once(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    relay = RelayProcess("--store", f"sqlite:///{tmp_path / 'mail.db'}")
    await relay.start()
    try:
        async with device(alice, [relay.url], [bob]) as a:
            async with asyncio.timeout(10):
                await a.send([bob.public], b"one")
                await a.send([bob.public], b"two")
        async with device(bob, [relay.url], [alice]) as b:
            async with asyncio.timeout(10):
                while b.stats.deliveries < 2:
                    await asyncio.sleep(0.01)
            assert relay.process is not None
            relay.process.send_signal(signal.SIGSTOP)
            [first] = await next_messages(b)  # its ACK goes to a relay that will never read it
            relay.kill()
            await relay.start()
            [second] = await next_messages(b)
            assert (first.payload, second.payload) == (b"one", b"two")
            assert b.stats.duplicates == 1  # "one" came again and was dropped
            async with device(alice, [relay.url], [bob]) as a:
                async with asyncio.timeout(10):
                    await a.send([bob.public], b"three")
            [third] = await next_messages(b)
            assert third.payload == b"three" and b.stats.surfaced == 3
    finally:
        relay.kill()


async def test_fails_over_to_the_next_relay_when_the_connection_drops(
        start_relay: StartRelay) -> None:
    first, second = await start_relay(), await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, [first.url, second.url], [bob]) as a, \
            device(bob, [second.url], [alice]) as b:
        async with asyncio.timeout(10):
            await a.wait_connected()
            assert a.relay_url == first.url
            await first.stop()
            while a.relay_url != second.url:
                await asyncio.sleep(0.01)
            await a.send([bob.public], b"after failover")
        [message] = await next_messages(b)
        assert message.payload == b"after failover"


async def test_unread_message_is_reported_expired(start_relay: StartRelay) -> None:
    relay = await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, [relay.url], [bob]) as a:
        async with asyncio.timeout(10):
            outgoing = await a.send([bob.public], b"too late", ttl_s=1)
        statuses = await outgoing.wait_receipts(timeout=10)
        assert statuses == {bob.public: DeliveryStatus.EXPIRED}
        assert a.stats.expiry_notices == 1


async def test_refusal_raises_the_proto_exception(start_relay: StartRelay) -> None:
    relay = await start_relay(max_ttl_s=60)
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, [relay.url], [bob]) as a:
        async with asyncio.timeout(10):
            try:
                await a.send([bob.public], b"keep it forever", ttl_s=3600)
            except InvalidFieldError as exc:
                assert "ttl" in exc.message
            else:
                raise AssertionError("the relay accepted a ttl above its limit")
        assert a.stats.refused == 1
        async with asyncio.timeout(10):  # the device is still usable afterwards
            await a.send([bob.public], b"short", ttl_s=30)


async def test_oracle_peer_change_replaces_and_persists_the_peer_list(
        relay: RelayServer, tmp_path: Path) -> None:
    oracle, alice, bob = (Identity.generate() for _ in range(3))
    peers_path = tmp_path / "peers.json"
    async with device(oracle, [relay.url]) as o:
        receipts = o.receipts()
        change = seal_envelope(oracle, Kind.PEER_CHANGE, [bob.public],
                               PeerChange(7, (alice.public,)).encode(), ttl_s=60, now_ms=now_ms())
        async with asyncio.timeout(10):
            await o.send_envelope(change)
        async with device(alice, [relay.url], [bob]) as a:
            async with asyncio.timeout(10):
                await a.send([bob.public], b"now we are peers")
        async with device(bob, [relay.url], peer_list=PeerList.load(peers_path),
                          oracle_key=oracle.public) as b:
            [message] = await next_messages(b)
            assert message.sender == alice.public and b.stats.peer_list_updates == 1
            async with asyncio.timeout(10):
                sender, receipt = await anext(receipts)
            assert (sender, receipt.msg_id) == (bob.public, change.msg_id)
        await receipts.aclose()
    stored = PeerList.load(peers_path)
    assert (stored.version, list(stored)) == (7, [alice.public])


async def test_a_restarted_device_refuses_an_older_peer_change_it_never_saw(
        relay: RelayServer, tmp_path: Path) -> None:
    """The library's default peer list, with a home, keeps its stamp across restarts.

    Before, it lived in memory only: after a restart the device held stamp (0, 0),
    so an older PEER_CHANGE it had not seen yet (still in another relay's mailbox,
    or replayed by anyone who kept a copy: it is fresh for the oracle's push TTL,
    a week) was taken as newer, and peers the oracle had removed came back.
    """
    oracle, alice, bob, carol = (Identity.generate() for _ in range(4))

    def peer_change(version: int, peers: Identity) -> Envelope:
        return seal_envelope(oracle, Kind.PEER_CHANGE, [alice.public],
                             PeerChange(version, (peers.public,), 5).encode(), ttl_s=600,
                             now_ms=now_ms())

    old, new = peer_change(1, bob), peer_change(2, carol)  # bob removed in version 2

    def alices_device() -> Device:
        return Device(alice, [relay.url], oracle_key=oracle.public, home=tmp_path,
                      backoff=Backoff(0.05, 0.2))

    async with device(oracle, [relay.url]) as o:
        async with alices_device() as a:
            async with asyncio.timeout(10):
                await o.send_envelope(new)
                while a.stats.peer_list_updates < 1:
                    await asyncio.sleep(0.02)
            assert list(a.peers) == [carol.public]
        async with alices_device() as a:  # a restart: the library's own peer list again
            async with asyncio.timeout(10):
                await o.send_envelope(old)
                while a.stats.peer_changes_older < 1:
                    await asyncio.sleep(0.02)
            assert list(a.peers) == [carol.public] and a.peers.stamp == (5, 2)
            assert a.stats.peer_list_updates == 0


async def test_a_receipt_from_a_stranger_is_dropped(relay: RelayServer) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    async with device(mallory, [relay.url]) as m:
        async with asyncio.timeout(10):
            fake = seal_envelope(mallory, Kind.RECEIPT, [alice.public],
                                 Receipt(b"\x01" * 16, bytes(32)).encode(), ttl_s=60,
                                 now_ms=now_ms())
            await m.send_envelope(fake)
    async with device(alice, [relay.url]) as a:
        async with asyncio.timeout(10):
            while a.stats.dropped_unexpected_receipt == 0:
                await asyncio.sleep(0.02)
        assert a.stats.receipts == 0


async def test_a_relay_with_a_larger_envelope_limit_delivers_to_a_default_device(
        start_relay: StartRelay) -> None:
    """Found as a new user: on a 256 KiB relay a default recipient logged a bad frame, never
    ACKed, and the 100 kB message blocked its mailbox forever.  Devices decode with the
    limit the relay announces in WELCOME (below their own cap)."""
    server = await start_relay(max_envelope_bytes=262_144)
    alice, bob = Identity.generate(), Identity.generate()
    payload = bytes(range(256)) * 400  # 102,400 bytes: above the 64 KiB protocol default
    sender_limits = Limits(max_envelope_bytes=262_144)  # a sender configured like its relay
    async with device(alice, [server.url], [bob], limits=sender_limits) as a, \
            device(bob, [server.url], [alice]) as b:
        async with asyncio.timeout(10):
            outgoing = await a.send([bob.public], payload)
        [message] = await next_messages(b)
        assert message.payload == payload
        assert await outgoing.wait_receipts(timeout=10) == {bob.public: DeliveryStatus.DELIVERED}
        assert b.stats.bad_frames == 0 and b.stats.dropped_invalid == 0
    assert server.relay is not None
    assert await server.relay.store.depth(bob.public) == 0  # ACKed, so removed


async def test_an_envelope_above_the_relays_limit_is_refused_before_it_is_sent(
        start_relay: StartRelay) -> None:
    server = await start_relay(max_envelope_bytes=4_096)
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, [server.url], [bob]) as a:
        await a.wait_connected()
        with pytest.raises(OversizeError, match="limit of 4096"):
            async with asyncio.timeout(10):
                await a.send([bob.public], b"x" * 5_000)
    assert server.relay is not None
    assert server.relay.metrics.rejected.labels("oversize")._value.get() == 0  # never sent
