"""Streams across relay processes on one Redis, when a relay dies without a word or loses
its subscription."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from client import Device, PeerList
from client.streams import StreamRequest
from proto import Identity, PublicKey, canonical
from access_support import metric
from proto.errors import StreamBrokenError
from proto.frames import StreamCredit, encode_frame
from redis_server import RedisServer, kill_client, subscribers_of
from relay_process import RelayProcess
from tally import FAULTS_SURVIVED, TALLY


def accepting_into(theirs: list) -> Callable[[StreamRequest], Awaitable[None]]:
    """bob's stream handler: accept, keep the stream in `theirs`, say hello."""
    async def keep(request: StreamRequest) -> None:
        stream = await request.accept()
        theirs.append(stream)
        await stream.write(b"hello")
    return keep


@asynccontextmanager
async def two_relays(store_url: str, tmp_path: Path) -> AsyncIterator[tuple[RelayProcess,
                                                                           RelayProcess]]:
    """Two relay processes on one Redis (logs r1.log and r2.log), each stopped by its PID."""
    first = await RelayProcess("--store", store_url, log_path=tmp_path / "r1.log").start()
    try:
        second = await RelayProcess("--store", store_url, log_path=tmp_path / "r2.log").start()
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


async def test_a_stream_through_a_relay_that_is_killed_fails_at_the_other_end(
        redis_url: str, tmp_path: Path) -> None:
    """bob's relay is SIGKILLed mid-stream: it tells nobody, but alice's relay stops hearing
    it and ends the stream with a reason within seconds; bob's device, whose connection
    died, ends it too.  Neither is resumed when bob reconnects elsewhere."""
    alice, bob = Identity.generate(), Identity.generate()
    theirs: list = []
    keep = accepting_into(theirs)
    async with two_relays(redis_url, tmp_path) as (first, second):
        async with Device(alice, [first.url], PeerList([bob.public])) as a, \
                Device(bob, [second.url, first.url], PeerList([alice.public])) as b:
            b.on_stream(keep)
            await a.wait_connected(10)
            await b.wait_connected(10)
            stream = await a.open_stream(bob.public, "keep", timeout=10)
            assert await stream.read() == b"hello"
            second.kill()
            started = time.monotonic()
            with pytest.raises(StreamBrokenError, match="not been heard"):
                await asyncio.wait_for(stream.read(), 20)
            assert time.monotonic() - started < 12
            with pytest.raises(StreamBrokenError, match="never resumed"):
                await theirs[0].read()
            TALLY[FAULTS_SURVIVED] += 1
            await b.wait_connected(20)  # bob fails over to the first relay: fresh streams work
            again = await a.open_stream(bob.public, "keep", timeout=20)
            assert await again.read() == b"hello"


async def test_a_dropped_stream_bus_subscription_ends_the_streams_across_replicas(
        private_redis: RedisServer, tmp_path: Path) -> None:
    """Redis drops bob's relay's stream bus subscriber (CLIENT KILL, what it does to one over
    `client-output-buffer-limit pubsub`).  redis-py reconnects and resubscribes without
    raising, and frames published meanwhile are gone (a lost credit stalls a stream for
    good), so the relay ends the streams across replicas, at both ends, within seconds;
    it logs and counts the loss, and new streams work."""
    alice, bob = Identity.generate(), Identity.generate()
    theirs: list = []
    keep = accepting_into(theirs)
    async with two_relays(private_redis.url, tmp_path) as (first, second):
        async with Device(alice, [first.url], PeerList([bob.public])) as a, \
                Device(bob, [second.url], PeerList([alice.public])) as b:
            b.on_stream(keep)
            await a.wait_connected(10)
            await b.wait_connected(10)
            stream = await a.open_stream(bob.public, "keep", timeout=10)
            assert await stream.read() == b"hello"
            kill_client(private_redis.port, bus_subscriber(private_redis, second))
            with pytest.raises(StreamBrokenError, match="lost its connection to the store"):
                await asyncio.wait_for(theirs[0].read(), 5)
            with pytest.raises(StreamBrokenError, match="lost its connection to the store"):
                await asyncio.wait_for(stream.read(), 5)
            assert await metric(f"http://127.0.0.1:{second.port}",
                                "continuum_stream_bus_lost_total") == 1
            assert "stream_bus_lost" in (tmp_path / "r2.log").read_text()
            again = await a.open_stream(bob.public, "keep", timeout=10)
            assert await asyncio.wait_for(again.read(), 5) == b"hello"


def answering_when(offered: asyncio.Event, go: asyncio.Event,
                   theirs: list) -> Callable[[StreamRequest], Awaitable[None]]:
    """bob's stream handler: say an open arrived, accept it once `go` is set, keep the
    stream in `theirs` and say hello."""
    async def answer(request: StreamRequest) -> None:
        offered.set()
        await go.wait()
        await accepting_into(theirs)(request)
    return answer


def bus_subscriber(redis: RedisServer, relay: RelayProcess) -> str:
    """The id of `relay`'s stream bus subscriber: its relay channel, `alive` and its
    devices' channels (the wake-up subscriber has one mailbox per device)."""
    assert relay.process is not None
    bus = [client for client in subscribers_of(redis.port, relay.process.pid)
           if int(client["sub"]) >= 2]
    assert len(bus) == 1, bus
    return bus[0]["id"]


async def held_open(a: Device, b: Device, bob: PublicKey
                    ) -> tuple[asyncio.Task[object], asyncio.Event, list]:
    """alice's device `a` opens a stream to bob's `b`, which holds its answer until `go` is
    set; returns once bob's device has the offer: (the open, `go`, bob's streams)."""
    offered, go, theirs = asyncio.Event(), asyncio.Event(), []
    b.on_stream(answering_when(offered, go, theirs))
    await a.wait_connected(10)
    await b.wait_connected(10)
    opening = asyncio.create_task(a.open_stream(bob, "keep", timeout=20))
    await asyncio.wait_for(offered.wait(), 10)
    return opening, go, theirs


async def test_an_answer_published_while_the_openers_relay_resubscribes_ends_both_halves(
        private_redis: RedisServer, tmp_path: Path) -> None:
    """alice's relay has lost its stream bus subscriber and has not subscribed again (here:
    it is stopped, SIGSTOP, while Redis drops the subscriber) when bob's STREAM_ACCEPT is
    published: nobody hears it.  bob's half was left open for good (a stream slot, and a
    tunnel's TCP connection to its service), and alice's open waited its 10 s deadline.
    Now the answer that reached no subscriber ends bob's half at once, and alice's relay,
    once it resubscribes, ends the open it can no longer trust an answer for."""
    alice, bob = Identity.generate(), Identity.generate()
    async with two_relays(private_redis.url, tmp_path) as (first, second):
        assert first.process is not None
        async with Device(alice, [first.url], PeerList([bob.public])) as a, \
                Device(bob, [second.url], PeerList([alice.public])) as b:
            opening, go, theirs = await held_open(a, b, bob.public)
            first.process.send_signal(signal.SIGSTOP)
            try:
                kill_client(private_redis.port, bus_subscriber(private_redis, first))
                go.set()
                async with asyncio.timeout(3):
                    while not theirs:
                        await asyncio.sleep(0.01)
                with pytest.raises(StreamBrokenError, match="not listening"):
                    await asyncio.wait_for(theirs[0].read(), 3)
            finally:
                first.process.send_signal(signal.SIGCONT)
            started = time.monotonic()
            with pytest.raises(StreamBrokenError, match="lost its connection to the store"):
                await asyncio.wait_for(opening, 8)
            assert time.monotonic() - started < 5  # not the open's 10 s deadline
            b.on_stream(accepting_into(theirs))
            again = await a.open_stream(bob.public, "keep", timeout=10)
            assert await asyncio.wait_for(again.read(), 5) == b"hello"


async def client_memory(redis: Redis, client_id: str) -> int | None:
    """The output buffer Redis holds for one client (`omem`), None once it is gone."""
    listed = await redis.execute_command("CLIENT", "LIST", "ID", client_id)
    text = listed.decode() if isinstance(listed, bytes) else str(listed)
    fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
    return int(fields["omem"]) if fields else None


async def test_an_answer_lost_in_a_dropped_subscribers_buffer_ends_both_halves(
        private_redis: RedisServer, tmp_path: Path) -> None:
    """What `client-output-buffer-limit pubsub` does to a relay that reads too slowly: bob's
    STREAM_ACCEPT reaches Redis while alice's relay is behind (stopped here), waits in its
    subscriber's output buffer, and is dropped with it.  PUBLISH counted a receiver, so
    nothing but alice's relay knows it was lost, and only as a loss of its subscriber;
    it ended the streams across replicas but not the open waiting for that answer, and
    bob's half stayed open for good.  Now it withdraws that open, and bob's half ends."""
    alice, bob = Identity.generate(), Identity.generate()
    redis = Redis.from_url(private_redis.url)
    # Valid bus messages the relay drops without a word (a credit with no connection named),
    # each made 64 KiB long by its origin's replica id.
    filler = canonical.encode([None, alice.public.raw, "x" * 65_536, 0, bob.public.raw,
                               encode_frame(StreamCredit(bytes(16), 1))])
    try:
        async with two_relays(private_redis.url, tmp_path) as (first, second), \
                Device(alice, [first.url], PeerList([bob.public])) as a, \
                Device(bob, [second.url], PeerList([alice.public])) as b:
            assert first.process is not None
            opening, go, theirs = await held_open(a, b, bob.public)
            subscriber = bus_subscriber(private_redis, first)
            [channel] = await redis.pubsub_channels(f"*streams:device:{alice.public.raw.hex()}")
            await redis.config_set("client-output-buffer-limit", "pubsub 1mb 0 0")
            first.process.send_signal(signal.SIGSTOP)
            try:
                # Fill the socket buffers until Redis holds output for it: what is published
                # from now on waits in Redis, behind that.
                for _ in range(1024):
                    if await client_memory(redis, subscriber):
                        break
                    await redis.publish(channel, filler)
                assert await client_memory(redis, subscriber)
                go.set()
                async with asyncio.timeout(3):
                    while not theirs:
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0.5)  # bob's relay publishes the answer: 1 receiver
                for _ in range(64):
                    if await client_memory(redis, subscriber) is None:
                        break
                    await redis.publish(channel, filler)
                assert await client_memory(redis, subscriber) is None  # dropped by Redis
            finally:
                first.process.send_signal(signal.SIGCONT)
            with pytest.raises(StreamBrokenError, match="lost its connection to the store"):
                await asyncio.wait_for(theirs[0].read(), 10)
            with pytest.raises(StreamBrokenError, match="lost its connection to the store"):
                await asyncio.wait_for(opening, 5)
            assert await metric(f"http://127.0.0.1:{second.port}", "continuum_streams_open") == 0
    finally:
        await redis.aclose()
