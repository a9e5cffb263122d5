"""Store faults (issue 13, item 9, store side): a store that cannot write is unhealthy.

A real full filesystem: a 4 MiB tmpfs mounted for the test (root only; the
test is skipped, saying why, where mounting is not permitted), holding the
relay's SQLite file.  While it is full, /healthz answers 503 and a SEND is
refused with STORE_UNAVAILABLE, never a raw sqlite3 error; once there is
room again the same relay stores, and what it stored before is still there.
The same for a Redis that refuses writes (out of memory under `noeviction`):
it still answers PING, which is all /healthz used to ask.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from continuum.health import PROBE_EVERY_S
from proto import Identity
from proto.errors import ErrorCode
from proto.frames import Accepted, Ack, Error
from redis_server import RedisServer
from tally import FAULTS_SURVIVED, TALLY
from wire import RawDevice, sealed


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem of its own, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, timeout=10)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=10)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem has no byte left; returns it (delete it to free)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        chunk = b"\0" * 65536
        while True:
            try:
                handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return filler
                chunk = chunk[:len(chunk) // 2]


async def health(url: str) -> tuple[int, dict]:
    """/healthz once the store's state changed: after PROBE_EVERY_S, since the probe before
    the change answers for that long (continuum/health.py)."""
    await asyncio.sleep(PROBE_EVERY_S)
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
        return response.status, await response.json()


@pytest.mark.timeout(60)
async def test_a_full_disk_makes_healthz_fail_and_sends_retry_later(small_disk: Path,
                                                                   start_relay) -> None:
    server = await start_relay(store=f"sqlite:///{small_disk / 'mail.db'}")
    alice, bob = Identity.generate(), Identity.generate()
    before = sealed(alice, [bob.public], b"stored before the disk filled")
    async with await RawDevice.connect(server.url, alice) as device:
        assert isinstance(await device.send(before), Accepted)
        filler = fill(small_disk)
        status, body = await health(server.base_url)
        assert status == 503 and body["status"] == "store_unavailable", body
        refused = sealed(alice, [bob.public], b"x" * 20_000)
        answer = await device.send(refused)
        assert isinstance(answer, Error) and answer.error_code is ErrorCode.STORE_UNAVAILABLE
        filler.unlink()
        assert (await health(server.base_url))[0] == 200
        assert isinstance(await device.send(refused), Accepted)  # the retry a device makes
    async with await RawDevice.connect(server.url, bob) as reader:
        assert [(await reader.next_delivery()).envelope for _ in range(2)] == \
            [before.raw, refused.raw]
    TALLY[FAULTS_SURVIVED] += 1


@pytest.mark.timeout(60)
async def test_a_full_disk_is_never_the_devices_fault_and_an_ack_it_breaks_closes_1011(
        small_disk: Path, start_relay) -> None:
    """Before: STORE_UNAVAILABLE refusals counted as the device's abuse and closed it (1008),
    and a store error during an ACK escaped the handler (the socket died, 1006)."""
    server = await start_relay(store=f"sqlite:///{small_disk / 'mail.db'}", max_invalid_frames=3)
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(server.url, alice) as sender:
        assert isinstance(await sender.send(sealed(alice, [bob.public], b"waiting")), Accepted)
    async with await RawDevice.connect(server.url, bob) as reader:
        delivery = await reader.next_delivery(ack=False)
        fill(small_disk)
        async with await RawDevice.connect(server.url, alice) as sender:
            for _ in range(5):  # more refusals than max_invalid_frames: still served
                answer = await sender.send(sealed(alice, [bob.public], b"x" * 20_000))
                assert isinstance(answer, Error)
                assert answer.error_code is ErrorCode.STORE_UNAVAILABLE
            assert not sender.ws.closed
        await reader.send_frame(Ack(delivery.tag))  # the delete cannot be written either
        with pytest.raises(ConnectionError, match="1011"):
            await reader.recv(timeout=5)
    assert await server.relay.store.depth(bob.public) == 1  # nothing lost
    TALLY[FAULTS_SURVIVED] += 1


@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_a_redis_that_refuses_writes_makes_healthz_fail(start_relay) -> None:
    server = RedisServer("--appendonly", "no", "--maxmemory-policy", "noeviction").start()
    try:
        relay = await start_relay(store=f"{server.url}/0")
        alice, bob = Identity.generate(), Identity.generate()
        with redis.Redis.from_url(server.url) as admin:
            async with await RawDevice.connect(relay.url, alice) as device:
                assert (await health(relay.base_url))[0] == 200
                admin.config_set("maxmemory", 1)  # below what it uses: every write is refused
                status, body = await health(relay.base_url)
                assert status == 503 and body["status"] == "store_unavailable", body
                answer = await device.send(sealed(alice, [bob.public]))
                assert isinstance(answer, Error)
                assert answer.error_code is ErrorCode.STORE_UNAVAILABLE
                admin.config_set("maxmemory", 0)
                assert (await health(relay.base_url))[0] == 200
                assert isinstance(await device.send(sealed(alice, [bob.public])), Accepted)
    finally:
        server.remove()
    TALLY[FAULTS_SURVIVED] += 1
