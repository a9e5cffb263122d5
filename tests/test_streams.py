"""Streams over real relays and sockets (SPEC §16), with the device library at both ends.

Every test runs twice: both devices on one relay with the embedded store, and
each device on its own replica of two relays sharing a real Redis (the
cross-replica path).  Hostile traffic is sent with `RawDevice` (hand-made,
sealed frames) and hypothesis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from dataclasses import dataclass

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import Device, PeerList
from client.connection import connect
from client.streams import StreamRequest
from conftest import TEST_SETTINGS
from continuum.server import RelayServer
from fake_oracle import FakeOracle
from oracle_support import eventually
from proto import Identity, decode_envelope
from proto.access import AccessList
from proto.errors import (ErrorCode, NotPeerError, PeerUnreachableError, StreamBrokenError,
                          StreamRefusedError)
from proto.channel import LENGTH_BYTES, Layout
from proto.frames import (Accepted, Send, StreamAbort, StreamAccept, StreamCredit, StreamData,
                          StreamFin, StreamOpen, encode_frame)
from proto.streams import accept_open, begin_open, read_open
from runtime.clock import now_ms
from tally import ATTACKS_REJECTED, INPUTS_TRIED, TALLY
from wire import RawDevice, error_code, sealed


@dataclass
class Relays:
    """Where alice and bob connect: one relay, or two replicas on one Redis."""

    alice: str
    bob: str
    servers: list[RelayServer]


@pytest.fixture(params=["embedded", "redis"])
async def relays(request: pytest.FixtureRequest, start_relay) -> Relays:
    if request.param == "embedded":
        server = await start_relay()
        return Relays(server.url, server.url, [server])
    url = request.getfixturevalue("redis_url")
    first, second = await start_relay(store=url), await start_relay(store=url)
    return Relays(first.url, second.url, [first, second])


async def echo(request: StreamRequest) -> None:
    async with await request.accept() as stream:
        while data := await stream.read():
            await stream.write(data)


def devices(relays: Relays, alice: Identity, bob: Identity, **kwargs) -> tuple[Device, Device]:
    return (Device(alice, [relays.alice], PeerList([bob.public]), **kwargs),
            Device(bob, [relays.bob], PeerList([alice.public]), **kwargs))


async def connected(*devices: Device) -> None:
    for device in devices:
        await device.wait_connected(10)


async def test_a_stream_carries_bytes_both_ways_intact_and_half_closes(relays: Relays) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    payload = os.urandom(3 * 1024 * 1024 + 123)
    async with devices(relays, alice, bob)[0] as a, devices(relays, alice, bob)[1] as b:
        b.on_stream(echo)
        await connected(a, b)
        stream = await a.open_stream(bob.public, "echo", timeout=10)
        assert stream.peer == bob.public and stream.service == "echo"

        async def send() -> None:
            for offset in range(0, len(payload), 100_000):
                await stream.write(payload[offset:offset + 100_000])
            await stream.close()  # half-close: the echo still answers all of it

        sender = asyncio.create_task(send())
        received = bytearray()
        while data := await stream.read():
            received += data
        await sender
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        assert stream.at_end and stream.error is None


async def test_an_open_to_a_device_connected_nowhere_fails_at_once(relays: Relays) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with devices(relays, alice, bob)[0] as a:
        await connected(a)
        started = time.monotonic()
        with pytest.raises(PeerUnreachableError):
            await a.open_stream(bob.public, "echo", timeout=10)
        assert time.monotonic() - started < 2  # not the 10 s deadline


async def test_a_device_refuses_a_stream_from_a_non_peer_and_without_a_handler(
        relays: Relays) -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    async with Device(mallory, [relays.alice], PeerList([bob.public])) as m, \
            Device(bob, [relays.bob], PeerList([alice.public])) as b, \
            Device(alice, [relays.alice], PeerList([bob.public])) as a:
        b.on_stream(echo)
        await connected(m, b, a)
        with pytest.raises(StreamRefusedError, match="not a peer"):
            await m.open_stream(bob.public, "echo", timeout=10)
        b.on_stream(None)
        with pytest.raises(StreamRefusedError, match="takes no streams"):
            await a.open_stream(bob.public, "echo", timeout=10)
        TALLY[ATTACKS_REJECTED] += 1


async def test_a_peer_that_disconnects_mid_stream_fails_it_with_a_reason(
        relays: Relays) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    accepted = asyncio.Event()

    async def hold(request: StreamRequest) -> None:
        stream = await request.accept()
        await stream.write(b"first part")
        accepted.set()
        await asyncio.sleep(3600)

    a, b = devices(relays, alice, bob)
    async with a:
        async with b:
            b.on_stream(hold)
            await connected(a, b)
            stream = await a.open_stream(bob.public, "hold", timeout=10)
            await accepted.wait()
            assert await stream.read() == b"first part"
        # bob's device is gone (its connection closed): never a clean end of data
        with pytest.raises(StreamBrokenError, match="connection"):
            await asyncio.wait_for(stream.read(), 10)


async def test_a_reconnect_does_not_resume_a_stream_at_either_end(relays: Relays) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    theirs: list = []

    async def keep(request: StreamRequest) -> None:
        theirs.append(await request.accept())

    a, b = devices(relays, alice, bob)
    async with a, b:
        b.on_stream(keep)
        await connected(a, b)
        stream = await a.open_stream(bob.public, "keep", timeout=10)
        await eventually(lambda: _true(theirs), timeout=5)
        connection = b._manager.connection
        assert connection is not None
        await connection.close()  # bob's link drops; the device reconnects on its own
        with pytest.raises(StreamBrokenError):
            await asyncio.wait_for(stream.read(), 10)
        with pytest.raises(StreamBrokenError, match="never resumed"):
            await theirs[0].read()
        await b.wait_connected(10)
        again = await a.open_stream(bob.public, "keep", timeout=10)  # a fresh stream works
        await again.write(b"x")


async def _true(items: list) -> bool:
    return bool(items)


async def test_a_slow_reader_slows_the_writer_and_the_relay_holds_at_most_a_window(
        relays: Relays) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    window = 128 * 1024
    streams: list = []

    async def accept_and_stall(request: StreamRequest) -> None:
        streams.append(await request.accept(window=window))

    a, b = devices(relays, alice, bob)
    async with a, b:
        b.on_stream(accept_and_stall)
        await connected(a, b)
        stream = await a.open_stream(bob.public, "stall", timeout=10)
        written = 0

        async def write_forever() -> None:
            nonlocal written
            block = b"z" * 16384
            while True:
                await stream.write(block)
                written += len(block)

        writer = asyncio.create_task(write_forever())
        await asyncio.sleep(1.0)
        assert window - 16384 <= written <= window + 16384  # stopped at the window
        buffered = sum(session._ws.buffered_bytes() for server in relays.servers
                       for _, session in server.relay.streams._endpoints.values())
        assert buffered <= window
        # Reading lets it go on: the credit comes back as bob reads.
        got = 0
        while got < 4 * window:
            got += len(await streams[0].read())
        await asyncio.sleep(0.2)
        assert written >= 4 * window
        writer.cancel()


async def test_the_relays_peer_groups_refuse_a_stream_to_a_non_peer(start_relay) -> None:
    oracle, alice, bob, carol = (Identity.generate() for _ in range(4))
    async with FakeOracle(oracle) as endpoint:
        endpoint.serve(AccessList(1, 1, now_ms(), now_ms() + 600_000, oracle.public,
                                  {alice.public: frozenset({1}), bob.public: frozenset({1}),
                                   carol.public: frozenset({2})}, frozenset()))
        relay = await start_relay(oracle_url=endpoint.url, oracle_key=oracle.public.text,
                                  require_enrollment=True)
        assert await relay.relay.access.wait_loaded(10)
        async with Device(carol, [relay.url], PeerList([bob.public])) as c, \
                Device(bob, [relay.url], PeerList([alice.public, carol.public])) as b, \
                Device(alice, [relay.url], PeerList([bob.public])) as a:
            b.on_stream(echo)
            await connected(c, b, a)
            with pytest.raises(NotPeerError):
                await c.open_stream(bob.public, "echo", timeout=10)
            stream = await a.open_stream(bob.public, "echo", timeout=10)
            await stream.write(b"peers may")
            assert await stream.read() == b"peers may"
            TALLY[ATTACKS_REJECTED] += 1


# -- hostile traffic, by hand ---------------------------------------------------------------

async def raw_offer(opener: RawDevice, peer: Identity, window: int = 65536):
    opening = begin_open(opener.identity, peer.public, "echo", now_ms=now_ms())
    await opener.send_frame(StreamOpen(window, opening.envelope.raw))
    return opening


async def stream_frame(raw: RawDevice, timeout: float = 10.0):
    while True:
        frame = await raw.recv(timeout)
        if isinstance(frame, (StreamAccept, StreamData, StreamFin, StreamAbort, StreamOpen)):
            return frame


async def _echoed(raw: RawDevice, opening, alice: Identity, payload: bytes) -> bytes:
    """Open a stream to bob's echo from `raw`, send `payload` and FIN, read the echo."""
    accepted = await stream_frame(raw)
    assert isinstance(accepted, StreamAccept), accepted
    keys = opening.complete(accepted.envelope, alice)
    await raw.send_frame(StreamData(opening.stream_id, keys.sealer.seal(payload)))
    await raw.send_frame(StreamFin(opening.stream_id, keys.sealer.seal(b"", final=True)))
    echoed = b""
    while not isinstance(frame := await stream_frame(raw), StreamFin):
        assert isinstance(frame, StreamData), frame
        echoed += keys.opener.open(frame.chunk, final=False)
    return echoed + keys.opener.open(frame.chunk, final=True)


async def test_the_library_offers_the_detached_layout_and_the_relay_selects_it(
        relays: Relays) -> None:
    async with connect(relays.alice, Identity.generate(), max_envelope_bytes=65_536) as relay:
        assert relay.layout is Layout.DETACHED


@pytest.mark.parametrize("layout", [Layout.SEALED, Layout.DETACHED], ids=["sealed", "detached"])
async def test_chunks_cross_between_connections_of_either_channel_layout(
        relays: Relays, layout: Layout) -> None:
    """The library offers the detached layout (SPEC §8) and the relay selects it; a device
    that offers nothing (one that predates it) keeps whole sealed frames.  The relay passes
    chunks between the two, each connection in its own layout."""
    alice, bob = Identity.generate(), Identity.generate()
    payload = os.urandom(50_000)
    async with devices(relays, alice, bob)[1] as b, \
            await RawDevice.connect(relays.alice, alice, layout=layout) as raw:
        b.on_stream(echo)
        await connected(b)
        assert Layout.negotiated(raw.ws.protocol) is layout
        assert await _echoed(raw, await raw_offer(raw, bob), alice, payload) == payload


async def test_a_chunk_altered_on_the_path_ends_the_connection_at_the_relay(
        relays: Relays) -> None:
    """In the detached layout a chunk is not sealed again on the hop, but it is still
    authenticated by it: a path that flips one of its bits is caught by the relay, which
    passes nothing of it on and closes the connection, as for any altered message."""
    alice, bob = Identity.generate(), Identity.generate()
    got: list = []

    async def read_all(request: StreamRequest) -> None:
        stream = await request.accept()
        try:
            while data := await stream.read():
                got.append(data)
        except StreamBrokenError as exc:
            got.append(exc)

    async with devices(relays, alice, bob)[1] as b, \
            await RawDevice.connect(relays.alice, alice, layout=Layout.DETACHED) as raw:
        b.on_stream(read_all)
        await connected(b)
        opening = await raw_offer(raw, bob)
        accepted = await stream_frame(raw)
        keys = opening.complete(accepted.envelope, alice)
        message = bytearray(raw.sealer.seal(StreamData(opening.stream_id,
                                                       keys.sealer.seal(b"x" * 4000))))
        message[-100] ^= 0x10  # a byte of the chunk, which travels unencrypted
        TALLY[INPUTS_TRIED] += 1
        await raw.ws.send_bytes(bytes(message))
        assert error_code(await raw.recv()) == "UNAUTHENTICATED"
        closing = await raw.ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closing
        await eventually(lambda: _settled(got), timeout=10)
        assert len(got) == 1 and isinstance(got[0], StreamBrokenError), got


async def test_a_detached_part_on_any_frame_but_a_chunk_is_refused(relays: Relays) -> None:
    """A keyed device that seals part of a SEND apart is answered MALFORMED, as for any
    bad frame, and its connection goes on."""
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relays.alice, alice, layout=Layout.DETACHED) as raw:
        frame = encode_frame(Send(sealed(alice, [bob.public]).raw))
        head, detached = frame[:40], frame[40:]
        TALLY[INPUTS_TRIED] += 1
        await raw.ws.send_bytes(len(detached).to_bytes(LENGTH_BYTES, "big")
                                + raw.cipher.seal(head, detached) + detached)
        assert error_code(await raw.recv()) == "MALFORMED"
        assert isinstance(await raw.send(sealed(alice, [bob.public])), Accepted)


async def test_a_forged_open_is_refused_by_the_relay(relays: Relays) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with devices(relays, alice, bob)[1] as b, \
            await RawDevice.connect(relays.alice, alice) as raw:
        b.on_stream(echo)
        await connected(b)
        opening = begin_open(alice, bob.public, "echo", now_ms=now_ms())
        forged = bytearray(opening.envelope.raw)
        forged[-1] ^= 1
        await raw.send_frame(StreamOpen(65536, bytes(forged)))
        frame = await stream_frame(raw)
        assert isinstance(frame, StreamAbort) and frame.code == ErrorCode.BAD_SIGNATURE
        # bob's own open (to someone else), sent over alice's connection
        theirs = begin_open(bob, Identity.generate().public, "echo", now_ms=now_ms())
        await raw.send_frame(StreamOpen(65536, theirs.envelope.raw))
        frame = await stream_frame(raw)
        assert isinstance(frame, StreamAbort) and frame.code == ErrorCode.WRONG_SENDER
        TALLY[INPUTS_TRIED] += 2
        TALLY[ATTACKS_REJECTED] += 2


async def test_a_replayed_open_is_refused_by_the_device(relays: Relays) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with devices(relays, alice, bob)[1] as b, \
            await RawDevice.connect(relays.alice, alice) as raw:
        b.on_stream(echo)
        await connected(b)
        opening = await raw_offer(raw, bob)
        accepted = await stream_frame(raw)
        assert isinstance(accepted, StreamAccept)
        await raw.send_frame(StreamAbort(opening.stream_id, 27, "done"))
        await raw.send_frame(StreamOpen(65536, opening.envelope.raw))  # the same open again
        frame = await stream_frame(raw)
        assert isinstance(frame, StreamAbort) and frame.code == ErrorCode.STREAM_REFUSED
        assert "taken already" in frame.message
        TALLY[ATTACKS_REJECTED] += 1


async def test_data_beyond_the_credit_and_a_cut_never_look_like_an_end(relays: Relays) -> None:
    """An opener that sends more than granted is cut off by the relay; one that goes away
    after some data leaves the reader an error, never a clean end of data."""
    alice, bob = Identity.generate(), Identity.generate()
    got: list = []

    async def read_all(request: StreamRequest) -> None:
        stream = await request.accept(window=4096)
        try:
            while data := await stream.read():
                got.append(data)
            got.append("eof")
        except StreamBrokenError as exc:
            got.append(exc)

    async with devices(relays, alice, bob)[1] as b:
        b.on_stream(read_all)
        await connected(b)
        for attack in ("over credit", "cut"):
            async with await RawDevice.connect(relays.alice, alice) as raw:
                got.clear()
                opening = await raw_offer(raw, bob)
                accepted = await stream_frame(raw)
                keys = opening.complete(accepted.envelope, alice)
                await raw.send_frame(StreamData(opening.stream_id, keys.sealer.seal(b"ok")))
                if attack == "over credit":
                    await raw.send_frame(StreamData(opening.stream_id,
                                                    keys.sealer.seal(b"x" * 8000)))
                    frame = await stream_frame(raw)
                    assert isinstance(frame, StreamAbort) and frame.code == ErrorCode.STREAM_BROKEN
            await eventually(lambda: _settled(got), timeout=10)
            assert got[0] == b"ok" and isinstance(got[-1], StreamBrokenError), got
            TALLY[ATTACKS_REJECTED] += 1


async def _settled(got: list) -> bool:
    return bool(got) and not isinstance(got[-1], bytes)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.tuples(st.integers(9, 14), st.binary(max_size=40),
                                 st.integers(0, 2**32)), min_size=1, max_size=8))
def test_garbage_stream_frames_never_hurt_the_relay(loop_thread, frames) -> None:
    """Arbitrary stream frames (wrong ids, bad fields, chunks for streams that do not
    exist) over a real socket: the relay answers or drops each, and a peer's stream through
    it keeps working."""
    loop_thread.run(_garbage(frames))


async def _garbage(frames: list) -> None:
    import cbor2
    alice, bob = Identity.generate(), Identity.generate()
    server = RelayServer(TEST_SETTINGS)
    await server.start()
    try:
        async with await RawDevice.connect(server.url, alice) as raw, \
                Device(bob, [server.url], PeerList([alice.public])) as b:
            b.on_stream(echo)
            await b.wait_connected(10)
            for kind, blob, number in frames:
                TALLY[INPUTS_TRIED] += 1
                fields = {9: [number, blob], 10: [blob, number, blob], 11: [blob, blob],
                          12: [blob, number], 13: [blob, blob], 14: [blob, number, "x"]}[kind]
                await raw.send_raw(cbor2.dumps([kind, *fields]))
            opening = await raw_offer(raw, bob)
            frame = await stream_frame(raw)
            assert isinstance(frame, StreamAccept)
            keys = opening.complete(frame.envelope, alice)
            await raw.send_frame(StreamData(opening.stream_id, keys.sealer.seal(b"still")))
            echoed = await stream_frame(raw)
            assert keys.opener.open(echoed.chunk, final=False) == b"still"
    finally:
        await server.stop()





async def test_a_device_that_reads_nothing_is_closed_and_its_streams_end(start_relay) -> None:
    """Bob accepts 48 streams with 1 MiB windows and then reads nothing at all: once more
    than the kernel's socket buffers take waits in the relay, and has not moved for the
    write timeout, the relay closes bob's connection, and alice's writes fail with the
    reason.  (What the kernel takes costs the relay nothing.)"""
    relay = await start_relay(write_timeout_s=1.0, stream_connection_window_bytes=64 << 20,
                              stream_open_burst=100)
    alice, bob = Identity.generate(), Identity.generate()
    count = 48
    async with Device(alice, [relay.url], PeerList([bob.public])) as a, \
            await RawDevice.connect(relay.url, bob) as raw:
        await connected(a)
        openings = []
        for _ in range(count):
            openings.append(asyncio.create_task(a.open_stream(bob.public, "x", timeout=10)))
            offer = await stream_frame(raw)
            envelope = decode_envelope(offer.envelope)
            sealed, _ = accept_open(bob, envelope, read_open(envelope, bob), now_ms=now_ms())
            await raw.send_frame(StreamAccept(envelope.msg_id, 1 << 20, sealed.raw))
        streams = [await opening for opening in openings]

        async def flood(stream) -> BaseException | None:
            try:
                while True:
                    await stream.write(b"z" * 65536)
            except StreamBrokenError as exc:
                return exc

        started = time.monotonic()
        errors = await asyncio.wait_for(asyncio.gather(*(flood(s) for s in streams)), 60)
        assert all("connection to its relay closed" in str(e) for e in errors), errors
        assert time.monotonic() - started < 30
        with pytest.raises((ConnectionError, asyncio.TimeoutError)):
            while True:
                await raw.recv(timeout=5)


async def test_a_device_that_grants_credit_without_reading_gains_nothing(start_relay) -> None:
    """Credit says "I read this much"; a device that keeps granting it while reading
    nothing does not make the relay hold more: the relay reads nothing more from a
    device whose frames wait (not even its credit), and closes it at the write timeout."""
    relay = await start_relay(stream_connection_window_bytes=1 << 20, write_timeout_s=2.0)
    alice, bob = Identity.generate(), Identity.generate()
    async with Device(alice, [relay.url], PeerList([bob.public])) as a, \
            await RawDevice.connect(relay.url, bob) as raw:
        await connected(a)
        opening = asyncio.create_task(a.open_stream(bob.public, "x", timeout=10))
        offer = await stream_frame(raw)
        envelope = decode_envelope(offer.envelope)
        sealed, _ = accept_open(bob, envelope, read_open(envelope, bob), now_ms=now_ms())
        await raw.send_frame(StreamAccept(envelope.msg_id, 65536, sealed.raw))
        stream = await opening
        [(_, session)] = [entry for entry in relay.relay.streams._endpoints.values()
                          if entry[0] == bob.public]
        most = 0

        async def flood() -> BaseException:
            nonlocal most
            try:
                while True:
                    await stream.write(b"z" * 65536)
                    most = max(most, session._ws.buffered_bytes())
            except StreamBrokenError as exc:
                return exc

        async def lie() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while True:  # never reads its socket, keeps saying it did
                    await raw.send_frame(StreamCredit(envelope.msg_id, 65536))
                    await asyncio.sleep(0.002)

        liar = asyncio.create_task(lie())
        error = await asyncio.wait_for(flood(), 60)
        liar.cancel()
        assert "connection to its relay closed" in str(error)
        assert most <= (1 << 20) + (1 << 20)  # its pool and one credit frame's worth, at most
        TALLY[ATTACKS_REJECTED] += 1


async def test_what_waits_between_replicas_is_bounded_by_the_receivers_pool(
        start_relay, redis_url: str) -> None:
    """bob, on the second of two replicas sharing a Redis, accepts 32 streams with 1 MiB
    windows and reads nothing: the credit his relay passes on is bounded by his connection's
    pool (4 MiB here), so that is all that can wait for him anywhere, in his relay and in
    Redis's buffers for the replicas' subscriptions; nothing is stored in Redis."""
    import redis.asyncio as aioredis

    pool = 4 << 20
    first = await start_relay(store=redis_url)
    second = await start_relay(store=redis_url, stream_connection_window_bytes=pool,
                               stream_open_burst=100, write_timeout_s=60.0)
    alice, bob = Identity.generate(), Identity.generate()
    async with Device(alice, [first.url], PeerList([bob.public])) as a, \
            await RawDevice.connect(second.url, bob) as raw:
        await connected(a)
        streams = []
        for _ in range(32):
            opening = asyncio.create_task(a.open_stream(bob.public, "x", timeout=10))
            offer = await stream_frame(raw)
            envelope = decode_envelope(offer.envelope)
            sealed, _ = accept_open(bob, envelope, read_open(envelope, bob), now_ms=now_ms())
            await raw.send_frame(StreamAccept(envelope.msg_id, 1 << 20, sealed.raw))
            streams.append(await opening)

        written = 0

        async def flood(stream) -> None:
            nonlocal written
            with contextlib.suppress(StreamBrokenError):
                while True:
                    await stream.write(b"z" * 16384)
                    written += 16384

        writers = [asyncio.create_task(flood(s)) for s in streams]
        await asyncio.sleep(3.0)  # long enough to pass on every credit bob's pool allows
        [(_, session)] = [entry for entry in second.relay.streams._endpoints.values()
                          if entry[0] == bob.public]
        base = redis_url.split("/0?")[0]
        async with aioredis.Redis.from_url(base) as client:
            buffers = [c for c in await client.client_list(_type="pubsub")]
            waiting_in_redis = sum(int(c["omem"]) for c in buffers)
            keys = [k async for k in client.scan_iter(match=redis_url.split("prefix=")[1] + "*")]
        for writer in writers:
            writer.cancel()
        assert 0 < written <= pool  # all the credit alice ever got, and she used it
        assert session._ws.buffered_bytes() <= pool
        assert waiting_in_redis <= pool
        assert not [k for k in keys if b"stream" in k]  # pub/sub only: nothing stored


async def test_a_stream_across_replicas_on_a_redis_cluster(start_relay,
                                                           redis_cluster_url: str) -> None:
    """With `cluster=true` the replicas publish one frame at a time (no pipeline across
    nodes); the stream is the same."""
    first, second = (await start_relay(store=redis_cluster_url),
                     await start_relay(store=redis_cluster_url))
    alice, bob = Identity.generate(), Identity.generate()
    payload = os.urandom(512 * 1024)
    async with Device(alice, [first.url], PeerList([bob.public])) as a, \
            Device(bob, [second.url], PeerList([alice.public])) as b:
        b.on_stream(echo)
        await connected(a, b)
        stream = await a.open_stream(bob.public, "echo", timeout=10)
        await stream.write(payload)
        await stream.close()
        received = b""
        while data := await stream.read():
            received += data
        assert received == payload


async def test_an_open_through_a_relay_that_carries_no_streams_fails_in_bounded_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay that predates streams never answers a STREAM_OPEN (this fake one ignores it):
    the open fails with a reason once the device's own deadline passes, even without a
    timeout from the application, and the stream is aborted towards the relay."""
    import client.streams
    from fake_relay import FakeRelay
    monkeypatch.setattr(client.streams, "ANSWER_TIMEOUT_S", 1.0)
    alice, bob = Identity.generate(), Identity.generate()
    async with FakeRelay() as relay, \
            Device(alice, [relay.url], PeerList([bob.public])) as a:
        await connected(a)
        started = time.monotonic()
        with pytest.raises(PeerUnreachableError, match="may not"):
            await a.open_stream(bob.public, "echo")
        assert time.monotonic() - started < 5
