"""Faults seen by real devices: a relay SIGKILLed mid-stream, a store that goes away.

The device library (client.Device) is on both ends, so "none twice to the
application" is checked where it matters: at `messages()`.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from client import Device, PeerList
from continuum.server import RelayServer, Settings
from proto import Identity
from proto.frames import Accepted
from redis_server import RedisServer
from relay_process import RelayProcess
from tally import FAULTS_SURVIVED, MESSAGES_LOST, TALLY
from wire import RawDevice, error_code, sealed

pytestmark = pytest.mark.redis


async def collect(device: Device, count: int, quiet_s: float) -> list[bytes]:
    """Payloads surfaced to the application until `count` arrived and `quiet_s` passed silently."""
    payloads: list[bytes] = []
    stream = device.messages()
    with contextlib.suppress(TimeoutError):
        while True:
            async with asyncio.timeout(quiet_s if len(payloads) >= count else 20):
                payloads.append((await anext(stream)).payload)
    return payloads


@pytest.mark.timeout(90)
async def test_sigkilled_replica_loses_nothing_and_duplicates_nothing(redis_url, tmp_path) -> None:
    relay_key = Identity.generate().secret_text()
    first, second = (RelayProcess("--store", redis_url, "--relay-key", relay_key,
                                  "--rate-per-s", "1e6", "--rate-burst", "1000000",
                                  log_path=tmp_path / f"relay{i}.log") for i in range(2))
    await asyncio.gather(first.start(), second.start())
    alice, bob = Identity.generate(), Identity.generate()
    payloads = [f"m{i}".encode() for i in range(60)]
    accepted: list[bytes] = []
    try:
        async with Device(alice, [first.url, second.url], PeerList([bob.public])) as sender, \
                Device(bob, [second.url], PeerList([alice.public])) as receiver:
            await sender.wait_connected()
            await receiver.wait_connected()
            for payload in payloads:
                if len(accepted) == 20:
                    first.kill()  # the next send is in flight while the device fails over
                await sender.send([bob.public], payload, ttl_s=600)
                accepted.append(payload)
            assert sender.relay_url == second.url
            received = await collect(receiver, len(accepted), quiet_s=1.0)
    finally:
        first.stop()
        second.stop()
    TALLY[MESSAGES_LOST] += len(set(accepted) - set(received))
    TALLY[FAULTS_SURVIVED] += 1
    assert sorted(received) == sorted(accepted), "lost or duplicated at the application"
    assert received == accepted  # and in the order the sender's relay accepted them


async def test_store_outage_refuses_sends_instead_of_losing_them(tmp_path) -> None:
    redis = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
    alice, bob = Identity.generate(), Identity.generate()
    server = RelayServer(Settings(host="127.0.0.1", port=0, store=f"{redis.url}/0",
                                  log_level="warning"))
    await server.start()
    try:
        async with await RawDevice.connect(server.url, alice) as a, aiohttp.ClientSession() as http:
            stored = sealed(alice, [bob.public], b"before the outage")
            assert isinstance(await a.send(stored), Accepted)
            redis.kill()
            try:
                refusal = error_code(await a.send(sealed(alice, [bob.public])))
            except ConnectionError as closed:
                # The relay may close first (1011): losing its wake-up channel, it re-reads
                # every mailbox, cannot, and sends its devices away to come back later.
                assert "1011" in str(closed), closed
            else:
                assert refusal == "STORE_UNAVAILABLE"
            async with http.get(server.base_url + "/healthz") as response:
                assert response.status == 503
            redis.start()  # same port and AOF: the store comes back with what it had
        async with await RawDevice.connect(server.url, alice) as a:
            retried = sealed(alice, [bob.public], b"after the outage")
            assert isinstance(await a.send(retried), Accepted)
        async with await RawDevice.connect(server.url, bob) as b:
            assert [(await b.next_delivery()).envelope for _ in range(2)] == \
                [stored.raw, retried.raw]
        TALLY[FAULTS_SURVIVED] += 1
    finally:
        await server.stop()
        redis.remove()
