"""The Redis call batcher (continuum/store/redis_batch.py) against a real Redis: calls take
effect in the order they were issued, each caller gets its own reply or its own error, a
batch that cannot be sent fails every caller in it as an outage, and what it asks of Redis
ahead of the answers is bounded (MAX_CALLS_PER_BATCH, MAX_BATCHES_IN_FLIGHT)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlsplit

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from continuum.store.redis_batch import MAX_BATCHES_IN_FLIGHT, MAX_CALLS_PER_BATCH, CommandBatcher
from proto.errors import StoreUnavailableError
from redis_server import RedisServer
from relay_process import free_port
from tcp_proxy import DelayProxy

pytestmark = pytest.mark.redis

# A script Redis must load before EVALSHA can name it.
APPEND = "return redis.call('RPUSH', KEYS[1], ARGV[1])"

# More calls than the bounds let out at once: twice what MAX_BATCHES_IN_FLIGHT batches of
# MAX_CALLS_PER_BATCH hold, and a part batch.
FLOOD = 2 * MAX_BATCHES_IN_FLIGHT * MAX_CALLS_PER_BATCH + 100
# One way, between the batcher and Redis: batches stay unanswered long enough for the
# writer to reach its bound, and for a watcher to see every batch.
ONE_WAY_DELAY_S = 0.1


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[tuple[Redis, str]]:
    """A client and the test's own key prefix."""
    prefix = dict(parse_qsl(urlsplit(redis_url).query))["prefix"]
    redis = Redis.from_url(redis_url.split("?")[0])
    yield redis, prefix
    await redis.aclose()


@pytest.fixture
async def slow_client(redis_url: str) -> AsyncIterator[tuple[Redis, str]]:
    """A client of the shared Redis through a delay proxy (a WAN's round trip), and the
    test's own key prefix."""
    prefix = dict(parse_qsl(urlsplit(redis_url).query))["prefix"]
    port = urlsplit(redis_url).port
    assert port is not None
    async with DelayProxy(port, ONE_WAY_DELAY_S) as proxy:
        redis = Redis(host="127.0.0.1", port=proxy.port)
        yield redis, prefix
        await redis.aclose()


async def _flood(redis: Redis, key: str) -> set[tuple[int, ...]]:
    """FLOOD calls issued in one turn, each an INCR of `key`: every one is answered with
    its own reply, in the order issued.  Returns each `in_flight` the batcher showed
    meanwhile (looked at every loop turn)."""
    batcher = CommandBatcher(redis, [])
    seen: set[tuple[int, ...]] = set()

    async def watch() -> None:
        while True:
            seen.add(batcher.in_flight)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        calls = [batcher.call(("INCR", key)) for _ in range(FLOOD)]
        replies = [(await call)[0] for call in calls]
    finally:
        watcher.cancel()
        await batcher.close()
    assert replies == list(range(1, FLOOD + 1))
    assert int(await redis.get(key)) == FLOOD  # each ran once
    return seen


async def test_no_batch_holds_more_than_max_calls_per_batch(
        slow_client: tuple[Redis, str]) -> None:
    """The calls of one turn beyond MAX_CALLS_PER_BATCH wait for the next batch: one
    pipeline stays a write and a read of a few hundred KB, well under the socket timeout."""
    redis, prefix = slow_client
    seen = await _flood(redis, f"{prefix}n")
    assert max(size for batches in seen for size in batches) == MAX_CALLS_PER_BATCH


async def test_no_more_than_max_batches_in_flight_are_unanswered_at_once(
        slow_client: tuple[Redis, str]) -> None:
    """Across a round trip the writer goes on writing batches without waiting for their
    replies, but once MAX_BATCHES_IN_FLIGHT are unanswered it waits: what a relay asks of
    its Redis ahead of the answers stays bounded."""
    redis, prefix = slow_client
    seen = await _flood(redis, f"{prefix}n")
    most = max(len(batches) for batches in seen)
    # At least half: it does pipeline (a busy machine may answer the first batch before the
    # writer has written all it may).
    assert MAX_BATCHES_IN_FLIGHT // 2 <= most <= MAX_BATCHES_IN_FLIGHT, most


async def test_calls_take_effect_in_the_order_they_were_issued(
        client: tuple[Redis, str]) -> None:
    """Calls issued in one turn, and while a batch is in flight, from several tasks."""
    redis, prefix = client
    batcher = CommandBatcher(redis, [])
    key = f"{prefix}order"
    issued: list[asyncio.Future[list[object]]] = []

    async def issue(start: int) -> None:
        for number in range(start, start + 50):
            issued.append(batcher.call(("RPUSH", key, number)))
            if number % 7 == 0:
                await asyncio.sleep(0)  # the next turn: a batch is on its way meanwhile

    await asyncio.gather(*(issue(start) for start in (0, 50, 100)))
    await asyncio.gather(*issued)
    # Reconstruct the issue order from the replies: RPUSH answers the length it made.
    lengths = [(await future)[0] for future in issued]
    assert lengths == list(range(1, 151))
    await batcher.close()


async def test_a_refused_command_fails_its_own_call_only(client: tuple[Redis, str]) -> None:
    redis, prefix = client
    batcher = CommandBatcher(redis, [])
    text, counter = f"{prefix}text", f"{prefix}counter"
    await redis.set(text, b"not a number")
    before = batcher.call(("INCR", counter))
    refused = batcher.call(("INCR", text), ("INCR", counter))  # one call, two commands
    after = batcher.call(("INCR", counter))
    assert await before == [1]
    first, second = await refused
    assert isinstance(first, ResponseError) and second == 2  # its other command still ran
    assert await after == [3]
    await batcher.close()


async def test_scripts_flushed_from_redis_are_loaded_again_and_keep_their_order() -> None:
    server = RedisServer("--appendonly", "no").start()  # its own: the flush is server-wide
    redis = Redis.from_url(server.url)
    batcher = CommandBatcher(redis, [APPEND])
    try:
        sha = await redis.script_load(APPEND)
        await redis.script_flush()
        calls = [batcher.call(("EVALSHA", sha, 1, "scripted", number)) for number in range(20)]
        assert [(await call)[0] for call in calls] == list(range(1, 21))
        assert [int(v) for v in await redis.lrange("scripted", 0, -1)] == list(range(20))
    finally:
        await batcher.close()
        await redis.aclose()
        server.remove()


async def test_an_unreachable_redis_fails_every_call_of_the_batch_then_recovers() -> None:
    port = free_port()
    redis = Redis(host="127.0.0.1", port=port, socket_connect_timeout=1.0, socket_timeout=1.0)
    batcher = CommandBatcher(redis, [])
    calls = [batcher.call(("INCR", "n")) for _ in range(5)]
    for call in calls:
        with pytest.raises(StoreUnavailableError):
            await call
    server = RedisServer("--appendonly", "no", port=port).start()
    try:
        assert await batcher.call(("INCR", "n")) == [1]  # nothing left stuck by the failure
    finally:
        await batcher.close()
        await redis.aclose()
        server.remove()


# Every kind of argument the store passes (keys and script arguments: bytes, str, int, and
# the rate, a float), at their edges.
ARGUMENTS: list[bytes | str | int | float] = [
    b"", b"\x00\xff\r\n", bytes(range(256)) * 256, "", "é\x00\r\n", "cpk_" + "a" * 56,
    0, -1, 2**63, 2**70, -(2**64), 0.1, 1 / 3, 50.0, -0.0, 1e300, 2.5e-300, float("inf")]


async def test_every_argument_reaches_redis_as_redis_py_writes_it(
        client: tuple[Redis, str]) -> None:
    """The batcher packs its pipelines itself (hiredis): a value it sets reads back as the
    same value set by redis-py's own client."""
    redis, prefix = client
    batcher = CommandBatcher(redis, [])
    for number, argument in enumerate(ARGUMENTS):
        ours, theirs = f"{prefix}ours:{number}", f"{prefix}theirs:{number}"
        assert await batcher.call(("SET", ours, argument)) == [True]
        await redis.set(theirs, argument)
        assert await redis.get(ours) == await redis.get(theirs), argument
    await batcher.close()


async def test_close_fails_what_was_not_sent(client: tuple[Redis, str]) -> None:
    redis, prefix = client
    batcher = CommandBatcher(redis, [])
    pending = batcher.call(("INCR", f"{prefix}n"))
    await batcher.close()  # before the loop's next turn: never sent
    with pytest.raises(StoreUnavailableError):
        await pending


async def test_calls_written_on_a_connection_that_broke_go_again_on_a_new_one() -> None:
    """A Redis restarted under an idle batcher: the next calls are written on the dead
    connection, then again, in order, on a new one; no caller sees the outage."""
    server = RedisServer("--appendonly", "no").start()
    redis = Redis.from_url(server.url)
    batcher = CommandBatcher(redis, [])
    try:
        assert await batcher.call(("RPUSH", "order", "before")) == [1]
        server.kill()
        server.start()
        calls = [batcher.call(("RPUSH", "order", number)) for number in range(10)]
        assert [(await call)[0] for call in calls] == list(range(1, 11))
    finally:
        await batcher.close()
        await redis.aclose()
        server.remove()
