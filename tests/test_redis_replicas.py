"""Several relay processes on one Redis behave as one relay, even when one is SIGKILLed.

Real `continuum` processes, real sockets, a real Redis; devices are raw
protocol speakers (tests/wire.py) so nothing in between is trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import pytest

from continuum.store import open_store
from proto import Identity, decode_envelope
from proto.frames import Accepted
from redis_server import RedisServer, kill_client, subscribers_of
from relay_process import RelayProcess
from wire import RawDevice, sealed, send_until_gone

pytestmark = pytest.mark.redis


@pytest.fixture
async def replicas(redis_url: str, tmp_path) -> AsyncIterator[list[RelayProcess]]:
    """Three relays sharing one Redis and one relay key."""
    relay_key = Identity.generate().secret_text()
    processes = [RelayProcess("--store", redis_url, "--relay-key", relay_key,
                              "--sweep-interval-s", "0.2", log_path=tmp_path / f"relay{i}.log")
                 for i in range(3)]
    try:
        await asyncio.gather(*(p.start() for p in processes))
        yield processes
    finally:
        for process in processes:
            process.stop()


async def test_devices_on_different_replicas_talk_both_ways(replicas: list[RelayProcess]) -> None:
    x, y = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(replicas[0].url, x) as dx, \
            await RawDevice.connect(replicas[2].url, y) as dy:
        for i in range(5):
            to_y = sealed(x, [y.public], f"x{i}".encode())
            assert await dx.send(to_y) == Accepted(to_y.msg_id)
            assert (await dy.next_delivery(timeout=3)).envelope == to_y.raw
            to_x = sealed(y, [x.public], f"y{i}".encode())
            assert await dy.send(to_x) == Accepted(to_x.msg_id)
            assert (await dx.next_delivery(timeout=3)).envelope == to_x.raw


async def test_offline_device_gets_its_backlog_in_order_from_another_replica(
        replicas: list[RelayProcess]) -> None:
    x, y = Identity.generate(), Identity.generate()
    sent = [sealed(x, [y.public], f"m{i}".encode()) for i in range(20)]
    async with await RawDevice.connect(replicas[0].url, x) as dx:
        for envelope in sent:
            assert isinstance(await dx.send(envelope), Accepted)
    async with await RawDevice.connect(replicas[1].url, y) as dy:
        received = [(await dy.next_delivery()).envelope for _ in sent]
        await dy.expect_silence(0.3)
    assert received == [e.raw for e in sent]


async def test_every_accepted_message_survives_a_killed_replica(
        replicas: list[RelayProcess]) -> None:
    x, y = Identity.generate(), Identity.generate()
    accepted: list[bytes] = []

    async def send_until_the_relay_dies() -> None:
        async with contextlib.AsyncExitStack() as stack:
            dx = await stack.enter_async_context(await RawDevice.connect(replicas[0].url, x))
            await send_until_gone(dx, x, y.public, accepted)

    sender = asyncio.create_task(send_until_the_relay_dies())
    while len(accepted) < 30:
        await asyncio.sleep(0.01)
    replicas[0].kill()
    await asyncio.wait_for(sender, 10)
    received: dict[bytes, int] = {}
    async with await RawDevice.connect(replicas[2].url, y) as dy:
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                delivery = await dy.next_delivery(timeout=1.0)
                msg_id = decode_envelope(delivery.envelope).msg_id  # de-dup by msg_id
                received[msg_id] = received.get(msg_id, 0) + 1
    assert set(accepted) <= set(received), "an ACCEPTED message was lost"


async def test_accepted_messages_survive_a_redis_crash_with_aof(tmp_path) -> None:
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
    relay_key = Identity.generate().secret_text()
    url = f"{server.url}/0"
    relay = RelayProcess("--store", url, "--relay-key", relay_key, log_path=tmp_path / "r.log")
    x, y = Identity.generate(), Identity.generate()
    sent = [sealed(x, [y.public], f"m{i}".encode()) for i in range(10)]
    try:
        await relay.start()
        async with await RawDevice.connect(relay.url, x) as dx:
            for envelope in sent:
                assert isinstance(await dx.send(envelope), Accepted)
        server.kill()
        server.start()
        store = open_store(url)
        try:
            assert [m.raw for m in await store.fetch(y.public, None, 100)] == \
                [e.raw for e in sent]
        finally:
            await store.close()
        async with await RawDevice.connect(relay.url, y) as dy:  # the relay reconnects by itself
            assert [(await dy.next_delivery()).envelope for _ in sent] == [e.raw for e in sent]
    finally:
        relay.stop()
        server.remove()


async def test_a_dropped_wakeup_subscription_still_wakes_the_device(tmp_path) -> None:
    """Redis drops a relay's wake-up subscriber while that relay is stopped (SIGSTOP), and
    a message for its device is published meanwhile, to nobody.  redis-py reconnects and
    resubscribes without raising; the resubscribe's confirmation wakes the mailbox, so the
    device still gets the message at once, not at some later event."""
    redis = RedisServer("--appendonly", "no").start()
    x, y = Identity.generate(), Identity.generate()
    first = RelayProcess("--store", redis.url, log_path=tmp_path / "r1.log")
    second = RelayProcess("--store", redis.url, log_path=tmp_path / "r2.log")
    try:
        await asyncio.gather(first.start(), second.start())
        assert second.process is not None
        async with await RawDevice.connect(first.url, x) as dx, \
                await RawDevice.connect(second.url, y) as dy:
            # The wake-up subscriber holds y's mailbox alone; the stream bus, two or more.
            wakeups = [client for client in subscribers_of(redis.port, second.process.pid)
                       if client["sub"] == "1"]
            assert len(wakeups) == 1, wakeups
            second.process.send_signal(signal.SIGSTOP)
            try:
                kill_client(redis.port, wakeups[0]["id"])
                to_y = sealed(x, [y.public], b"while the subscriber was gone")
                assert await dx.send(to_y) == Accepted(to_y.msg_id)
            finally:
                second.process.send_signal(signal.SIGCONT)
            assert (await dy.next_delivery(timeout=3)).envelope == to_y.raw
    finally:
        first.stop()
        second.stop()
        redis.remove()
