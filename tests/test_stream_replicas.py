"""Streams across relay processes on one Redis, when a relay dies without a word or loses
its subscription."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from client import Device, PeerList
from client.streams import StreamRequest
from proto import Identity
from access_support import metric
from proto.errors import StreamBrokenError
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


async def test_a_stream_through_a_relay_that_is_killed_fails_at_the_other_end(
        redis_url: str, tmp_path: Path) -> None:
    """bob's relay is SIGKILLed mid-stream: it tells nobody, but alice's relay stops hearing
    it and ends the stream with a reason within seconds; bob's device, whose connection
    died, ends it too.  Neither is resumed when bob reconnects elsewhere."""
    first = await RelayProcess("--store", redis_url, log_path=tmp_path / "r1.log").start()
    second = await RelayProcess("--store", redis_url, log_path=tmp_path / "r2.log").start()
    alice, bob = Identity.generate(), Identity.generate()
    theirs: list = []
    keep = accepting_into(theirs)
    try:
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
    finally:
        first.stop()
        second.stop()


async def test_a_dropped_stream_bus_subscription_ends_the_streams_across_replicas(
        private_redis: RedisServer, tmp_path: Path) -> None:
    """Redis drops bob's relay's stream bus subscriber (CLIENT KILL, what it does to one over
    `client-output-buffer-limit pubsub`).  redis-py reconnects and resubscribes without
    raising, and frames published meanwhile are gone (a lost credit stalls a stream for
    good), so the relay ends the streams across replicas, at both ends, within seconds;
    it logs and counts the loss, and new streams work."""
    first = await RelayProcess("--store", private_redis.url,
                               log_path=tmp_path / "r1.log").start()
    second = await RelayProcess("--store", private_redis.url,
                                log_path=tmp_path / "r2.log").start()
    alice, bob = Identity.generate(), Identity.generate()
    theirs: list = []
    keep = accepting_into(theirs)
    try:
        async with Device(alice, [first.url], PeerList([bob.public])) as a, \
                Device(bob, [second.url], PeerList([alice.public])) as b:
            b.on_stream(keep)
            await a.wait_connected(10)
            await b.wait_connected(10)
            stream = await a.open_stream(bob.public, "keep", timeout=10)
            assert await stream.read() == b"hello"
            assert second.process is not None
            # The bus subscribes its relay channel, `alive` and bob's device channel; the
            # wake-up subscriber, bob's mailbox alone.
            bus = [client for client in subscribers_of(private_redis.port, second.process.pid)
                   if int(client["sub"]) >= 2]
            assert len(bus) == 1, bus
            kill_client(private_redis.port, bus[0]["id"])
            with pytest.raises(StreamBrokenError, match="lost its connection to the store"):
                await asyncio.wait_for(theirs[0].read(), 5)
            with pytest.raises(StreamBrokenError, match="lost its connection to the store"):
                await asyncio.wait_for(stream.read(), 5)
            assert await metric(f"http://127.0.0.1:{second.port}",
                                "continuum_stream_bus_lost_total") == 1
            assert "stream_bus_lost" in (tmp_path / "r2.log").read_text()
            again = await a.open_stream(bob.public, "keep", timeout=10)
            assert await asyncio.wait_for(again.read(), 5) == b"hello"
    finally:
        first.stop()
        second.stop()
