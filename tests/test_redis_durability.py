"""ACCEPTED survives a Redis failover (issue 14) when the store URL asks for `min_replicas`.

Real processes the tests start: a primary and a replica redis-server, the
replica fed through a link the test can pause, so replication lag is made on
purpose rather than hoped for.  Then the primary is SIGKILLed, the replica
promoted (`REPLICAOF NO ONE`) and a fresh relay pointed at it, as Sentinel or
a managed failover would.  With `min_replicas=1` no message a device was
told is stored (ACCEPTED, or REPLAY for a re-send) is lost; without it, every
message accepted during the lag is.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import redis
import redis.asyncio

from continuum.health import PROBE_EVERY_S
from continuum.store import MailboxLimits, open_store
from proto import Envelope, Identity, decode_envelope
from proto.errors import ErrorCode, StoreUnavailableError
from proto.frames import Accepted, Error, Frame
from redis_server import RedisServer
from relay_process import free_port
from tally import FAULTS_SURVIVED, MESSAGES_LOST, TALLY
from wire import RawDevice, sealed

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

DURABLE = "min_replicas=1&wait_timeout_ms=100"


class PausableLink:
    """A TCP relay from a replica to its primary whose primary-to-replica direction can be held:
    the primary thinks it sent, the replica never receives.

    It runs on an event loop in a thread of its own, so nothing the test or an
    in-process relay does on theirs can delay replication by accident.
    """

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._flowing = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def start(self) -> PausableLink:
        self._thread.start()
        self._call(self._listen())
        self.resume()
        return self

    def pause(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def close(self) -> None:
        """Drop the link and whatever it was holding."""
        if self._thread.is_alive():
            self._call(self._drop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def _call(self, work: Awaitable[None]) -> None:
        asyncio.run_coroutine_threadsafe(work, self._loop).result(5)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _drop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, replica_r: asyncio.StreamReader,
                     replica_w: asyncio.StreamWriter) -> None:
        primary_r, primary_w = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers += [replica_w, primary_w]
        await asyncio.gather(self._pump(replica_r, primary_w, None),
                             self._pump(primary_r, replica_w, self._flowing),
                             return_exceptions=True)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    gate: asyncio.Event | None) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if gate is not None:
                    await gate.wait()
                sink.write(data)
                await sink.drain()


class PrimaryAndReplica:
    def __init__(self) -> None:
        # No delay before the replica's first sync (Redis waits 5 s by default).
        self.primary = RedisServer("--appendonly", "no", "--repl-diskless-sync-delay", "0")
        self.replica: RedisServer | None = None
        self.link: PausableLink | None = None

    async def start(self) -> PrimaryAndReplica:
        self.primary.start()
        self.link = PausableLink(self.primary.port).start()
        self.replica = RedisServer("--appendonly", "no", "--replicaof", "127.0.0.1",
                                   str(self.link.port)).start()
        await until(self._replica_acknowledges)
        return self

    async def _replica_acknowledges(self) -> bool:
        """The primary counts the replica for WAIT only once it is online and acks."""
        async with redis.asyncio.Redis.from_url(self.primary.url) as client:
            await client.set("continuum-test-sync", b"")
            return await client.wait(1, 100) == 1

    async def caught_up(self) -> None:
        """Until the replica has everything the primary wrote so far."""
        assert self.replica is not None
        async with redis.asyncio.Redis.from_url(self.primary.url) as primary, \
                redis.asyncio.Redis.from_url(self.replica.url) as replica:
            target = (await primary.info("replication"))["master_repl_offset"]

            async def has_it() -> bool:
                return (await replica.info("replication")).get("slave_repl_offset", -1) >= target

            await until(has_it)

    async def fail_over(self) -> str:
        """SIGKILL the primary, drop the link, promote the replica: its URL."""
        assert self.replica is not None and self.link is not None
        self.primary.kill()
        self.link.close()
        async with redis.asyncio.Redis.from_url(self.replica.url) as client:
            await client.execute_command("REPLICAOF", "NO", "ONE")
        return f"{self.replica.url}/0"

    async def stop(self) -> None:
        if self.link is not None:
            self.link.close()
        for server in (self.primary, self.replica):
            if server is not None:
                server.kill()  # SIGTERM would wait for a lagging replica
                server.remove()


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def redis_pair() -> AsyncIterator[PrimaryAndReplica]:
    pair = PrimaryAndReplica()
    try:
        yield await pair.start()
    finally:
        await pair.stop()


def code(frame: Frame) -> ErrorCode | None:
    return frame.error_code if isinstance(frame, Error) else None


async def delivered(url: str, identity: Identity) -> set[bytes]:
    """msg_ids of everything waiting for `identity`, read until 1 s of silence."""
    ids: set[bytes] = set()
    async with await RawDevice.connect(url, identity) as device:
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                ids.add(decode_envelope((await device.next_delivery(timeout=1.0)).envelope).msg_id)
    return ids


async def send_each(device: RawDevice, envelopes: list[Envelope]) -> list[Frame]:
    return [await device.send(envelope) for envelope in envelopes]


async def test_with_min_replicas_nothing_accepted_is_lost_in_a_failover(
        redis_pair: PrimaryAndReplica, start_relay) -> None:
    assert redis_pair.link is not None
    relay = await start_relay(store=f"{redis_pair.primary.url}/0?{DURABLE}")
    alice, bob = Identity.generate(), Identity.generate()
    stored: set[bytes] = set()  # what alice was told is stored: ACCEPTED, or REPLAY
    async with await RawDevice.connect(relay.url, alice) as device:
        before = [sealed(alice, [bob.public], f"m{i}".encode()) for i in range(10)]
        answers = await send_each(device, before)
        assert all(isinstance(a, Accepted) for a in answers), answers
        stored |= {e.msg_id for e in before}

        redis_pair.link.pause()  # the replica lags from here on
        retried = sealed(alice, [bob.public], b"sent during the lag")
        assert code(await device.send(retried)) is ErrorCode.STORE_UNAVAILABLE
        # The device re-sends the same bytes.  REPLAY would mean "stored": not while
        # the replica still lacks it.
        assert code(await device.send(retried)) is ErrorCode.STORE_UNAVAILABLE
        redis_pair.link.resume()
        assert code(await device.send(retried)) is ErrorCode.REPLAY  # now it is durable
        stored.add(retried.msg_id)

        redis_pair.link.pause()
        during = [sealed(alice, [bob.public], f"lag{i}".encode()) for i in range(5)]
        assert [code(a) for a in await send_each(device, during)] == \
            [ErrorCode.STORE_UNAVAILABLE] * 5

    promoted = await redis_pair.fail_over()
    survivor = await start_relay(store=promoted)
    lost = stored - await delivered(survivor.url, bob)
    TALLY[MESSAGES_LOST] += len(lost)
    TALLY[FAULTS_SURVIVED] += 1
    assert not lost, f"{len(lost)} of {len(stored)} messages told stored were lost"


async def test_without_min_replicas_what_was_accepted_during_the_lag_is_lost(
        redis_pair: PrimaryAndReplica, start_relay) -> None:
    """The hole the option closes, made deterministic by the paused link."""
    assert redis_pair.link is not None
    relay = await start_relay(store=f"{redis_pair.primary.url}/0")
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as device:
        before = [sealed(alice, [bob.public], f"m{i}".encode()) for i in range(10)]
        assert all(isinstance(a, Accepted) for a in await send_each(device, before))
        await redis_pair.caught_up()
        redis_pair.link.pause()
        during = [sealed(alice, [bob.public], f"lag{i}".encode()) for i in range(10)]
        assert all(isinstance(a, Accepted) for a in await send_each(device, during))
    promoted = await redis_pair.fail_over()
    survivor = await start_relay(store=promoted)
    received = await delivered(survivor.url, bob)
    assert {e.msg_id for e in before} <= received
    assert not {e.msg_id for e in during} & received  # all 10 ACCEPTED, all 10 gone


async def test_healthz_fails_while_the_replica_does_not_acknowledge(
        redis_pair: PrimaryAndReplica, start_relay) -> None:
    assert redis_pair.link is not None
    relay = await start_relay(store=f"{redis_pair.primary.url}/0?{DURABLE}")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{relay.base_url}/healthz") as response:
            assert response.status == 200, await response.text()
        redis_pair.link.pause()
        await asyncio.sleep(PROBE_EVERY_S)  # the probe before answers for a second
        async with http.get(f"{relay.base_url}/healthz") as response:
            assert response.status == 503
            assert "0 of 1 replicas" in (await response.json())["detail"]


async def test_a_relay_pointed_at_a_read_only_replica_is_unhealthy(
        redis_pair: PrimaryAndReplica, start_relay) -> None:
    """A failover that left the relay on the demoted side: PING answers, writes do not."""
    assert redis_pair.replica is not None
    relay = await start_relay(store=f"{redis_pair.replica.url}/0")
    async with aiohttp.ClientSession() as http, http.get(f"{relay.base_url}/healthz") as response:
        assert response.status == 503
        assert "read only replica" in (await response.json())["detail"]


async def test_wait_aof_on_a_server_without_waitaof_fails_closed(redis_base_url: str) -> None:
    probe = redis.Redis.from_url(redis_base_url)
    try:
        version = tuple(int(part) for part in probe.info("server")["redis_version"].split(".")[:2])
    finally:
        probe.close()
    if version >= (7, 2):
        pytest.skip(f"this Redis ({version}) has WAITAOF")
    store = open_store(f"{redis_base_url}/0?wait_aof=true&prefix=continuum-test-waitaof:")
    alice, bob = Identity.generate(), Identity.generate()
    envelope = sealed(alice, [bob.public])
    try:
        with pytest.raises(StoreUnavailableError, match="WAITAOF"):
            await store.ping()
        with pytest.raises(StoreUnavailableError, match="WAITAOF"):
            await store.accept(envelope, replay_until_ms=envelope.created_at_ms + 60_000,
                               limits=MailboxLimits(10, 10**6))
    finally:
        await store.close()
        with redis.Redis.from_url(redis_base_url) as client:
            for key in client.scan_iter(match="continuum-test-waitaof:*"):
                client.delete(key)


@pytest.mark.parametrize("query, problem", [
    ("min_replicas=one", "integers"), ("min_replicas=-1", ">= 0"),
    ("wait_timeout_ms=0", "wait forever"), ("min_replicas=1&cluster=true", "standalone"),
    ("min_replica=1", "not understood"),  # a typo used to fail every store call with TypeError
])
def test_bad_store_options_are_refused_at_open(query: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        open_store(f"redis://127.0.0.1:{free_port()}/0?{query}")
