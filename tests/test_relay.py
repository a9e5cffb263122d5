"""The relay over real sockets: store-and-forward, expiry, persistence, limits, refusals."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
import redis.asyncio

from continuum.protocol import MAX_CONTROL_BEFORE_HELLO
from continuum.server import RelayServer
from proto import Identity, Kind, Origin, decode_envelope, seal_envelope
from proto.frames import Accepted, Ack, Challenge, Deliver, Send, decode_frame, encode_frame
from proto.handshake import ephemeral_keypair, sign_hello
from proto.errors import StoreUnavailableError
from proto.limits import Limits
from proto.payloads import ExpiryNotice
from access_support import store_fetches
from fake_oracle import FakeOracle
from redis_server import RedisServer
from proto.access import AccessList
from wire import RawDevice, device_handshake, error_code, now_ms, sealed


async def depth(server: RelayServer, identity: Identity) -> int:
    assert server.relay is not None
    return await server.relay.store.depth(identity.public)


async def test_online_round_trip_is_delivered_and_removed_on_ack(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as a, \
            await RawDevice.connect(relay.url, bob) as b:
        envelope = sealed(alice, [bob.public], b"ping")
        assert await a.send(envelope) == Accepted(envelope.msg_id)
        delivery = await b.next_delivery()
        assert decode_envelope(delivery.envelope).open(bob).plaintext == b"ping"
        for _ in range(50):  # the ACK is processed asynchronously by the relay
            if await depth(relay, bob) == 0:
                break
            await asyncio.sleep(0.02)
        assert await depth(relay, bob) == 0


async def test_a_device_that_keeps_up_is_served_from_wake_ups_and_a_queue_by_fetches(
        relay: RelayServer) -> None:
    """On the embedded store, mail into an empty mailbox comes with its wake-up and is
    delivered without a fetch; mail that queues behind unacked entries is fetched.  Either
    way every message arrives once, in order."""
    assert relay.relay is not None
    metrics = relay.relay.metrics
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as a, \
            await RawDevice.connect(relay.url, bob) as b:
        async with asyncio.timeout(5):  # both first fetches done: bob's found his mailbox empty
            while store_fetches(relay) < 2:
                await asyncio.sleep(0.01)
        before = metrics.delivered_from_wakeups.value
        for n in range(3):  # kept up: each acked before the next is sent
            envelope = sealed(alice, [bob.public], bytes([n]))
            assert await a.send(envelope) == Accepted(envelope.msg_id)
            assert (await b.next_delivery()).envelope == envelope.raw
            async with asyncio.timeout(5):
                while await depth(relay, bob):
                    await asyncio.sleep(0.01)
        assert metrics.delivered_from_wakeups.value - before == 3
        queued = [sealed(alice, [bob.public], bytes([n])) for n in range(5)]
        for envelope in queued:
            assert await a.send(envelope) == Accepted(envelope.msg_id)
        deliveries = [await b.next_delivery(ack=False) for _ in queued]
        assert [d.envelope for d in deliveries] == [e.raw for e in queued]
        assert metrics.delivered_from_wakeups.value - before <= 3 + 1  # the first, at most
        for delivery in deliveries:
            await b.send_frame(Ack(delivery.tag))
        await b.expect_silence(0.3)  # nothing twice
        assert await depth(relay, bob) == 0


async def test_multi_recipient_envelope_reaches_each_mailbox(relay: RelayServer) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    envelope = sealed(alice, [bob.public, carol.public], b"to both")
    async with await RawDevice.connect(relay.url, alice) as a:
        assert isinstance(await a.send(envelope), Accepted)
    for reader in (bob, carol):
        async with await RawDevice.connect(relay.url, reader) as r:
            delivery = await r.next_delivery()
            assert delivery.envelope == envelope.raw
            assert decode_envelope(delivery.envelope).open(reader).plaintext == b"to both"


async def test_offline_recipient_gets_backlog_in_order_on_connect(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    sent = [sealed(alice, [bob.public], f"m{i}".encode()) for i in range(10)]
    async with await RawDevice.connect(relay.url, alice) as a:
        for envelope in sent:
            assert isinstance(await a.send(envelope), Accepted)
    assert await depth(relay, bob) == 10
    async with await RawDevice.connect(relay.url, bob) as b:
        received = [(await b.next_delivery()).envelope for _ in sent]
    assert received == [e.raw for e in sent]


async def test_unacked_delivery_is_redelivered_on_next_connection(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    envelope = sealed(alice, [bob.public])
    async with await RawDevice.connect(relay.url, alice) as a:
        await a.send(envelope)
    async with await RawDevice.connect(relay.url, bob) as b:
        first = await b.next_delivery(ack=False)
    async with await RawDevice.connect(relay.url, bob) as b:
        second = await b.next_delivery()
    assert first.envelope == second.envelope == envelope.raw


async def test_delivery_window_bounds_unacked_frames(start_relay) -> None:
    server = await start_relay(delivery_window=4)
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(server.url, alice) as a:
        for i in range(10):
            assert isinstance(await a.send(sealed(alice, [bob.public], bytes([i]))), Accepted)
    async with await RawDevice.connect(server.url, bob) as b:
        held = [await b.next_delivery(ack=False) for _ in range(4)]
        await b.expect_silence(0.3)
        await b.send_frame(Ack(held[0].tag))
        fifth = await b.next_delivery(ack=False)
    assert fifth.tag not in {d.tag for d in held}


async def test_expired_message_notifies_sender_through_its_mailbox(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    envelope = sealed(alice, [bob.public], ttl_s=1)
    async with await RawDevice.connect(relay.url, alice) as a:
        assert isinstance(await a.send(envelope), Accepted)
        delivery = await a.next_delivery(timeout=5)
    notice = decode_envelope(delivery.envelope)
    assert notice.origin is Origin.RELAY
    assert notice.sender == relay.relay.identity.public  # type: ignore[union-attr]
    contents = notice.open(alice)
    assert contents.kind is Kind.EXPIRY
    assert ExpiryNotice.decode(contents.plaintext) == ExpiryNotice.single(envelope.msg_id,
                                                                          bob.public)
    assert await depth(relay, bob) == 0
    assert relay.relay.metrics.expired._value.get() == 1  # type: ignore[union-attr]


async def test_file_store_keeps_messages_across_relay_restart(start_relay, tmp_path) -> None:
    store = f"sqlite:///{tmp_path / 'mail.db'}"
    alice, bob = Identity.generate(), Identity.generate()
    sent = [sealed(alice, [bob.public], f"m{i}".encode()) for i in range(5)]
    first = await start_relay(store=store)
    async with await RawDevice.connect(first.url, alice) as a:
        for envelope in sent:
            assert isinstance(await a.send(envelope), Accepted)
    await first.stop()
    second = await start_relay(store=store)
    async with await RawDevice.connect(second.url, bob) as b:
        received = [(await b.next_delivery()).envelope for _ in sent]
    assert received == [e.raw for e in sent]
    async with await RawDevice.connect(second.url, alice) as a:  # replay window survived too
        assert error_code(await a.send(sent[0])) == "REPLAY"


async def test_forged_signature_is_refused_and_nothing_stored(relay: RelayServer) -> None:
    alice, bob, mallory = (Identity.generate() for _ in range(3))
    honest = sealed(alice, [bob.public])
    forged = bytearray(honest.raw)
    forged[-1] ^= 0x01
    async with await RawDevice.connect(relay.url, alice) as a:
        await a.send_raw(encode_frame(Send(bytes(forged))))
        answer = await a.recv()
        assert error_code(answer) == "BAD_SIGNATURE"
        assert answer.msg_id == honest.msg_id  # type: ignore[union-attr]
        # Signed by another key but claiming alice as sender: same refusal.
        resigned = seal_envelope(mallory, Kind.DATA, [bob.public], b"x", ttl_s=60, now_ms=now_ms())
        claim = bytearray(resigned.raw)
        start = claim.index(mallory.public.raw)
        claim[start:start + 32] = alice.public.raw
        await a.send_raw(encode_frame(Send(bytes(claim))))
        assert error_code(await a.recv()) == "BAD_SIGNATURE"
        assert await a.send(honest) == Accepted(honest.msg_id)  # connection still served
    assert await depth(relay, bob) == 1


async def test_sender_must_be_the_authenticated_key(relay: RelayServer) -> None:
    alice, bob, mallory = (Identity.generate() for _ in range(3))
    async with await RawDevice.connect(relay.url, mallory) as m:
        assert error_code(await m.send(sealed(alice, [bob.public]))) == "WRONG_SENDER"
    assert await depth(relay, bob) == 0


async def test_replay_stale_and_future_timestamps_are_refused(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    skew_ms = relay.settings.max_skew_s * 1000
    async with await RawDevice.connect(relay.url, alice) as a:
        envelope = sealed(alice, [bob.public])
        assert isinstance(await a.send(envelope), Accepted)
        assert error_code(await a.send(envelope)) == "REPLAY"
        stale = sealed(alice, [bob.public], created_at_ms=now_ms() - skew_ms - 5000)
        assert error_code(await a.send(stale)) == "STALE"
        future = sealed(alice, [bob.public], created_at_ms=now_ms() + skew_ms + 5000)
        assert error_code(await a.send(future)) == "STALE"
        too_long = sealed(alice, [bob.public], ttl_s=relay.settings.max_ttl_s + 1)
        assert error_code(await a.send(too_long)) == "INVALID_FIELD"
    assert await depth(relay, bob) == 1


async def test_a_relay_notice_sent_by_a_device_is_refused_and_not_stored(
        relay: RelayServer) -> None:
    """Before, a device could SEND an envelope of kind EXPIRY and the relay stored it: a
    would-be relay notice that, expiring in turn, escaped the expiry notice its sender is due."""
    alice, bob = Identity.generate(), Identity.generate()
    notice = sealed(alice, [bob.public], ExpiryNotice.single(b"\x01" * 16, bob.public).encode(),
                    kind=Kind.EXPIRY)
    assert notice.origin is Origin.RELAY
    async with await RawDevice.connect(relay.url, alice) as a:
        answer = await a.send(notice)
        assert error_code(answer) == "INVALID_FIELD"
        assert "notice" in answer.message  # type: ignore[union-attr]
        assert isinstance(await a.send(sealed(alice, [bob.public], kind=Kind.RECEIPT)),
                          Accepted)
    assert await depth(relay, bob) == 1


async def test_oversize_frame_is_refused_without_storing(start_relay) -> None:
    server = await start_relay(max_envelope_bytes=4096)
    alice, bob = Identity.generate(), Identity.generate()
    big = seal_envelope(alice, Kind.DATA, [bob.public], b"x" * 3000, ttl_s=60, now_ms=now_ms(),
                        limits=Limits(max_envelope_bytes=4096))  # padded only as far as fits
    async with await RawDevice.connect(server.url, alice) as a:
        assert isinstance(await a.send(big), Accepted)
        bigger = bytes(encode_frame(Send(b"\x00" * 5000)))
        await a.send_raw(bigger)
        assert error_code(await a.recv()) == "OVERSIZE"
        assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
        await a.send_raw(encode_frame(Send(b"\x00" * 20_000)))  # beyond the hard cap
        closing = await a.ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert a.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert await depth(server, bob) == 2


async def test_rate_limit_refuses_the_flooder_only(start_relay) -> None:
    server = await start_relay(rate_per_s=1.0, rate_burst=5)
    flooder, quiet, bob = (Identity.generate() for _ in range(3))
    async with await RawDevice.connect(server.url, flooder) as f, \
            await RawDevice.connect(server.url, quiet) as q:
        answers = [await f.send(sealed(flooder, [bob.public])) for _ in range(8)]
        assert [type(x) for x in answers[:5]] == [Accepted] * 5
        assert {error_code(x) for x in answers[5:]} == {"RATE_LIMITED"}
        assert isinstance(await q.send(sealed(quiet, [bob.public])), Accepted)
    assert await depth(server, bob) == 6


@contextlib.asynccontextmanager
async def relay_knowing(oracle: Identity, enrolled: list[Identity], start_relay,
                        **settings: object) -> AsyncIterator[RelayServer]:
    """A relay that knows its oracle (its signed list, every key in one peer group)."""
    async with FakeOracle(oracle) as endpoint:
        endpoint.serve(AccessList(1, 1, now_ms(), now_ms() + 600_000, oracle.public,
                                  {key.public: frozenset({1}) for key in enrolled}, frozenset()))
        server = await start_relay(oracle_url=endpoint.url, oracle_key=oracle.public.text,
                                   **settings)
        assert await server.relay.access.wait_loaded(10)
        yield server


async def test_the_oracle_is_not_held_to_the_senders_rate(start_relay) -> None:
    """A change pushed to a whole fleet is one envelope per device from the oracle's key;
    at a device's rate, 1,000 devices took 18.5 s and the relay closed the oracle as
    abusive.  The oracle's sends go unmetered; every other key keeps its bucket."""
    oracle, alice, bob = (Identity.generate() for _ in range(3))
    async with relay_knowing(oracle, [alice, bob], start_relay, rate_per_s=1.0,
                             rate_burst=3) as server:
        async with await RawDevice.connect(server.url, oracle) as o, \
                await RawDevice.connect(server.url, alice) as a:
            for _ in range(20):
                assert isinstance(await o.send(sealed(oracle, [bob.public])), Accepted)
            answers = [await a.send(sealed(alice, [bob.public])) for _ in range(5)]
            assert [type(x) for x in answers[:3]] == [Accepted] * 3
            assert {error_code(x) for x in answers[3:]} == {"RATE_LIMITED"}
    assert await depth(server, bob) == 23


async def test_the_oracle_is_not_held_to_a_senders_byte_budget(start_relay) -> None:
    """One change to a group of 1,000 is 1,000 lists of ~50 KB from the oracle's key: more
    than a sender's budget of stored bytes.  The store's own budget still bounds it."""
    oracle, alice, bob = (Identity.generate() for _ in range(3))
    async with relay_knowing(oracle, [alice, bob], start_relay, max_envelope_bytes=4096,
                             sender_max_stored_bytes=8192, store_max_bytes=40_960) as server:
        big = lambda sender: sealed(sender, [bob.public], b"x" * 2_000)  # noqa: E731
        async with await RawDevice.connect(server.url, oracle) as o, \
                await RawDevice.connect(server.url, alice) as a:
            answers = [await a.send(big(alice)) for _ in range(5)]
            kept = sum(isinstance(x, Accepted) for x in answers)
            assert 1 <= kept < 5
            assert {error_code(x) for x in answers[kept:]} == {"QUOTA_EXCEEDED"}
            oracle_answers = [await o.send(big(oracle)) for _ in range(20)]
            accepted = sum(isinstance(x, Accepted) for x in oracle_answers)
            assert accepted > kept  # past a sender's 8 KiB, ...
            assert {error_code(x) for x in oracle_answers[accepted:]} == {"QUOTA_EXCEEDED"}
            assert accepted < 20  # ... until the store's 40 KiB are full


async def test_full_mailbox_refuses_with_clear_error(start_relay) -> None:
    server = await start_relay(mailbox_max_messages=3)
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(server.url, alice) as a:
        for _ in range(3):
            assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
        refused = await a.send(sealed(alice, [bob.public]))
        assert error_code(refused) == "MAILBOX_FULL"
        assert bob.public.text in refused.message  # type: ignore[union-attr]
    assert await depth(server, bob) == 3


async def test_an_ack_takes_effect_before_the_next_frame_of_its_connection(start_relay) -> None:
    """Frames of one connection take effect in order on a store in this region: an ACK
    frees the mailbox slot that a SEND right behind it needs.  (ACKs applied as side tasks
    for every store let accepts outrun deliveries at saturation: p50 latency 0.3 s -> 3 s.)"""
    server = await start_relay(mailbox_max_messages=1)
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(server.url, alice) as a, \
            await RawDevice.connect(server.url, bob) as b:
        for _ in range(20):
            assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
            delivery = await b.next_delivery(ack=False)
            note_to_self = sealed(bob, [bob.public])
            await b.send_frame(Ack(delivery.tag))
            await b.send_frame(Send(note_to_self.raw))
            # Its DELIVER may come before its ACCEPTED: the mailbox wakes as it is stored.
            early = [frame := await b.recv()]
            while not isinstance(frame, Accepted):
                early.append(frame := await b.recv())
            assert frame == Accepted(note_to_self.msg_id)
            [own] = [f for f in early if isinstance(f, Deliver)] or [await b.next_delivery(ack=False)]
            await b.send_frame(Ack(own.tag))
            for _ in range(100):
                if await depth(server, bob) == 0:
                    break
                await asyncio.sleep(0.01)


async def test_garbage_frames_get_errors_then_abuse_closes(start_relay) -> None:
    server = await start_relay(max_invalid_frames=5)
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(server.url, alice) as a:
        await a.send_raw(b"\xff\x00garbage")
        assert error_code(await a.recv()) == "MALFORMED"
        await a.ws.send_str("text is not a frame")
        assert error_code(await a.recv()) == "MALFORMED"
        await a.send_raw(encode_frame(Accepted(b"\x00" * 16)))
        assert error_code(await a.recv()) == "UNEXPECTED_FRAME"
        assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
        for _ in range(2):
            await a.send_raw(b"\x00")
            assert error_code(await a.recv()) == "MALFORMED"
        closing = await a.ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    async with await RawDevice.connect(server.url, bob) as b:  # relay still serves
        assert (await b.next_delivery()).envelope


async def _raw_socket(url: str):
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(url)
    await ws.receive_bytes(timeout=5)  # CHALLENGE
    return session, ws


@pytest.mark.parametrize("hello", [b"\x00", encode_frame(Send(b"x")), b""])
async def test_bad_hello_is_refused_and_socket_closed(relay: RelayServer, hello: bytes) -> None:
    session, ws = await _raw_socket(relay.url)
    async with session:
        await ws.send_bytes(hello)
        answer = await ws.receive(timeout=5)
        assert answer.type == aiohttp.WSMsgType.BINARY
        assert error_code(decode_frame(answer.data, 4096)) == "UNAUTHENTICATED"
        assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                      aiohttp.WSMsgType.CLOSED)


async def test_hello_signed_by_another_key_is_refused(relay: RelayServer) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    session = aiohttp.ClientSession()
    async with session:
        ws = await session.ws_connect(relay.url)
        challenge = decode_frame(await ws.receive_bytes(timeout=5), 4096)
        assert isinstance(challenge, Challenge)
        honest = sign_hello(challenge, mallory, b"\x01" * 32, ephemeral_keypair(bytes(32))[0])
        claimed = replace(honest, device_key=alice.public)
        await ws.send_bytes(encode_frame(claimed))
        assert error_code(decode_frame(await ws.receive_bytes(timeout=5), 4096)) == "UNAUTHENTICATED"


async def test_silent_connection_times_out_in_handshake(start_relay) -> None:
    server = await start_relay(handshake_timeout_s=0.3)
    session, ws = await _raw_socket(server.url)
    async with session:
        answer = await ws.receive(timeout=5)
        assert error_code(decode_frame(answer.data, 4096)) == "UNAUTHENTICATED"
    assert server.relay.metrics.handshake_failures.labels("timeout")._value.get() == 1  # type: ignore[union-attr]


async def test_healthz_and_metrics_report_traffic(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as a:
        await a.send(sealed(alice, [bob.public]))
        await a.send_raw(b"\x00")
        await a.recv()
        async with aiohttp.ClientSession() as http:
            async with http.get(relay.base_url + "/healthz") as response:
                assert response.status == 200
                assert (await response.json())["status"] == "ok"
            async with http.get(relay.base_url + "/metrics") as response:
                text = await response.text()
    assert "continuum_messages_accepted_total 1.0" in text
    assert 'continuum_messages_rejected_total{reason="malformed"} 1.0' in text
    assert "continuum_connected_devices 1.0" in text
    assert "continuum_verify_seconds_count 1.0" in text


async def test_deliveries_are_not_sent_to_other_devices(relay: RelayServer) -> None:
    alice, bob, eve = (Identity.generate() for _ in range(3))
    async with await RawDevice.connect(relay.url, eve) as e, \
            await RawDevice.connect(relay.url, alice) as a:
        assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
        await e.expect_silence(0.3)
        # Eve cannot ack bob's message away either.
        await e.send_frame(Ack("1"))
        await e.expect_silence(0.1)
    assert await depth(relay, bob) == 1


async def test_failed_delivery_drops_the_device_instead_of_retrying_silently(
        relay: RelayServer, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as a, \
            await RawDevice.connect(relay.url, bob) as b:
        assert relay.relay is not None

        async def broken_fetch(*args: object) -> list[object]:
            raise StoreUnavailableError("mailbox store failed: test")

        monkeypatch.setattr(relay.relay.store, "fetch", broken_fetch)
        # The first comes with its wake-up (bob's mailbox was empty); the second, queued
        # behind it unacked, wakes bob plainly, and that fetch fails.
        for _ in range(2):
            assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
        first = await b.ws.receive(timeout=5)
        assert first.type == aiohttp.WSMsgType.BINARY
        closing = await b.ws.receive(timeout=5)  # bob idle: the relay closes on its own
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert b.ws.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR


@pytest.mark.parametrize("compress", [0, 15], ids=["plain", "permessage-deflate"])
async def test_frames_of_every_length_form_reach_plain_and_deflate_clients(
        start_relay, compress: int) -> None:
    """The relay writes its own frame headers: 7-bit, 16-bit and 64-bit lengths must all parse."""
    server = await start_relay(max_envelope_bytes=200_000)
    alice, bob = Identity.generate(), Identity.generate()
    sent = [seal_envelope(alice, Kind.DATA, [bob.public], os.urandom(size), ttl_s=60,
                          now_ms=now_ms(), limits=Limits(max_envelope_bytes=200_000))
            for size in (1, 1_000, 100_000)]
    async with await RawDevice.connect(server.url, alice, compress) as a, \
            await RawDevice.connect(server.url, bob, compress) as b:
        assert a.ws.compress == compress and b.ws.compress == compress
        for envelope in sent:
            assert await a.send(envelope) == Accepted(envelope.msg_id)  # a short frame
        received = [(await b.next_delivery()).envelope for _ in sent]
    assert received == [envelope.raw for envelope in sent]
    assert len(encode_frame(Deliver("1", sent[-1].raw))) > 65535


async def test_send_just_before_the_device_closes_is_still_answered(relay: RelayServer) -> None:
    """Answers queued in the loop turn that reads the device's CLOSE precede the relay's CLOSE."""
    alice, bob = Identity.generate(), Identity.generate()
    envelope = sealed(alice, [bob.public])
    async with await RawDevice.connect(relay.url, alice) as a:
        await a.send_frame(Send(envelope.raw))
        await a.ws.send_frame(b"\x03\xe8", aiohttp.WSMsgType.CLOSE)  # code 1000, same segment
        assert await a.recv() == Accepted(envelope.msg_id)
        assert (await a.ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                        aiohttp.WSMsgType.CLOSED)


@pytest.mark.redis
async def test_sends_in_flight_when_the_device_closes_are_answered_first(start_relay,
                                                                         redis_url: str) -> None:
    """On Redis a connection keeps several SENDs in flight: a CLOSE read meanwhile waits
    for their answers, in SEND order, before the relay's CLOSE."""
    server = await start_relay(store=redis_url)
    alice, bob = Identity.generate(), Identity.generate()
    envelopes = [sealed(alice, [bob.public], bytes([i])) for i in range(10)]
    async with await RawDevice.connect(server.url, alice) as a:
        for envelope in envelopes:
            await a.send_frame(Send(envelope.raw))
        await a.ws.send_frame(b"\x03\xe8", aiohttp.WSMsgType.CLOSE)
        assert [await a.recv() for _ in envelopes] == [Accepted(e.msg_id) for e in envelopes]
        assert (await a.ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                        aiohttp.WSMsgType.CLOSED)


@pytest.mark.redis
async def test_mail_sent_while_the_relays_pub_sub_is_down_is_delivered_after(start_relay) -> None:
    """Wake-ups published while a relay's pub/sub connection is down are lost, entries and
    all: once it is back, the relay wakes every device it serves, and each fetches what it
    missed.  Redis drops the connection here as it does a subscriber over its output
    buffer limit (CLIENT KILL TYPE pubsub)."""
    redis_server = RedisServer("--appendonly", "no").start()
    try:
        server = await start_relay(store=f"{redis_server.url}/0")
        alice, bob = Identity.generate(), Identity.generate()
        sent = [sealed(alice, [bob.public], bytes([i])) for i in range(4)]
        async with await RawDevice.connect(server.url, alice) as a, \
                await RawDevice.connect(server.url, bob) as b:
            assert await a.send(sent[0]) == Accepted(sent[0].msg_id)
            assert (await b.next_delivery()).envelope == sent[0].raw
            admin = redis.asyncio.Redis.from_url(redis_server.url)
            try:
                # The wake-ups' connection, and the stream bus's (SPEC §16).
                assert await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
            finally:
                await admin.aclose()
            for envelope in sent[1:]:
                assert await a.send(envelope) == Accepted(envelope.msg_id)
            assert [(await b.next_delivery(timeout=10)).envelope for _ in sent[1:]] == [
                envelope.raw for envelope in sent[1:]]
            await b.expect_silence(0.3)  # nothing twice
    finally:
        redis_server.remove()


async def test_a_flood_of_pings_before_hello_is_cut_off_after_a_few(relay) -> None:
    """A peer that never says HELLO and only PINGs (no frame rate applies before the
    handshake) is answered MAX_CONTROL_BEFORE_HELLO times, then refused UNAUTHENTICATED and
    closed 1008; before, each of its PINGs was answered until the handshake deadline."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(relay.url, autoping=False) as ws:
            await ws.receive_bytes(timeout=5)  # the CHALLENGE
            for _ in range(50):
                await ws.ping(b"x")
            answers = []
            while (message := await ws.receive(timeout=5)).type == aiohttp.WSMsgType.PONG:
                answers.append(message)
            assert len(answers) == MAX_CONTROL_BEFORE_HELLO
            assert message.type == aiohttp.WSMsgType.BINARY  # the refusal
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1008, closing


async def test_the_relay_answers_pings_before_hello_and_after_welcome(relay) -> None:
    """The session answers PINGs itself (aiohttp's autoping is off, so each one costs the
    connection's frame rate): a PONG with the PING's payload, and a PING before HELLO is
    not taken for a bad HELLO."""
    identity = Identity.generate()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(relay.url, autoping=False) as ws:
            handshake = device_handshake(identity)
            challenge = await ws.receive_bytes(timeout=5)
            await ws.ping(b"before")
            pong = await ws.receive(timeout=5)
            assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"before")
            await ws.send_bytes(handshake.receive_challenge(challenge))
            handshake.receive_welcome(await ws.receive_bytes(timeout=5))
            for payload in (b"", b"after", bytes(125)):
                await ws.ping(payload)
                pong = await ws.receive(timeout=5)
                assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, payload)
