"""`continuum --workers 2`: two relay processes on one port behave as one relay.

A real `continuum` supervisor and its forked workers on a free loopback port,
a private redis-server, devices as raw protocol speakers (tests/wire.py).
Which worker serves a device is whichever accepted it first from the shared
listening socket: the tests read it off each worker's own /metrics
(`--worker-metrics-port`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from continuum.supervisor import RestartPolicy
from proto import Identity, decode_envelope
from proto.frames import Accepted
from redis_server import RedisServer
from relay_process import RELAY_COMMAND, RelayProcess, free_port, free_port_run
from wire import RawDevice, sealed, send_until_gone


class Workers(RelayProcess):
    """`continuum --workers 2` and where its workers are: pids from its log, ports by index."""

    def __init__(self, store: str, log_path: Path) -> None:
        self.metrics_port = free_port_run(2)
        super().__init__("--store", store, "--workers", "2", "--log-level", "info",
                         "--worker-metrics-port", str(self.metrics_port), log_path=log_path)

    def pids(self) -> dict[int, int]:
        """Worker index -> pid of the latest start of each, from the supervisor's log."""
        return {event["worker"]: event["pid"] for event in self._events("worker_started")}

    def serving(self) -> dict[str, int]:
        """Device key text -> the worker that logged it connecting (the latest line)."""
        return {event["device"]: event["worker"] for event in self._events("device_connected")}

    def _events(self, name: str) -> list[dict]:
        """The log's JSON lines for event `name`, oldest first (other lines skipped)."""
        assert self.log_path is not None
        events = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name:
                    events.append(event)
        return events

    async def connected(self, http: aiohttp.ClientSession, worker: int) -> float:
        """Devices worker `worker` serves now (its own /metrics)."""
        async with http.get(f"http://127.0.0.1:{self.metrics_port + worker}/metrics") as answer:
            for line in (await answer.text()).splitlines():
                if line.startswith("continuum_connected_devices "):
                    return float(line.split()[1])
        raise AssertionError("no continuum_connected_devices in a worker's /metrics")

    async def healthy(self, worker: int, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(
                            f"http://127.0.0.1:{self.metrics_port + worker}/healthz") as answer:
                        if answer.status == 200:
                            return
                assert time.monotonic() < deadline, f"worker {worker} not healthy"
                await asyncio.sleep(0.05)


@pytest.fixture
async def workers(private_redis: RedisServer, tmp_path: Path) -> AsyncIterator[Workers]:
    relay = Workers(f"{private_redis.url}/0", tmp_path / "relay.log")
    try:
        await relay.start()
        await relay.healthy(0)
        await relay.healthy(1)
        yield relay
    finally:
        relay.stop()


async def one_device_per_worker(workers: Workers, stack: contextlib.AsyncExitStack,
                                ) -> dict[int, tuple[Identity, RawDevice]]:
    """A device served by each worker, read off the `device_connected` lines (each carries its
    worker).  Devices connect 16 at once: one at a time, an idle worker that always wakes
    first could take them all."""
    found: dict[int, tuple[Identity, RawDevice]] = {}
    for _ in range(8):
        identities = [Identity.generate() for _ in range(16)]
        devices = await asyncio.gather(*(RawDevice.connect(workers.url, identity)
                                         for identity in identities))
        for device in devices:
            await stack.enter_async_context(device)
        deadline = time.monotonic() + 5
        while not {i.public.text for i in identities} <= (serving := workers.serving()).keys():
            assert time.monotonic() < deadline, "a connected device was never logged"
            await asyncio.sleep(0.02)
        for identity, device in zip(identities, devices, strict=True):
            found.setdefault(serving[identity.public.text], (identity, device))
        if len(found) == 2:
            return found
    raise AssertionError("8 batches of 16 connections all reached one worker")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


@pytest.mark.redis
async def test_devices_on_the_two_workers_talk_both_ways(workers: Workers) -> None:
    async with contextlib.AsyncExitStack() as stack:
        on = await one_device_per_worker(workers, stack)
        (x, dx), (y, dy) = on[0], on[1]
        async with aiohttp.ClientSession() as http:  # each worker's own /metrics counts its own
            assert [await workers.connected(http, i) for i in (0, 1)] == [
                sum(1 for w in workers.serving().values() if w == i) for i in (0, 1)]
        for i in range(5):
            to_y = sealed(x, [y.public], f"x{i}".encode())
            assert await dx.send(to_y) == Accepted(to_y.msg_id)
            assert (await dy.next_delivery(timeout=10)).envelope == to_y.raw
            to_x = sealed(y, [x.public], f"y{i}".encode())
            assert await dy.send(to_x) == Accepted(to_x.msg_id)
            assert (await dx.next_delivery(timeout=10)).envelope == to_x.raw


@pytest.mark.redis
async def test_a_killed_worker_is_restarted_and_loses_no_accepted_message(
        workers: Workers) -> None:
    accepted: list[bytes] = []
    async with contextlib.AsyncExitStack() as stack:
        on = await one_device_per_worker(workers, stack)
        (x, dx), (y, dy) = on[0], on[1]
        killed = workers.pids()[0]

        sender = asyncio.create_task(send_until_gone(dx, x, y.public, accepted))
        while len(accepted) < 30:
            await asyncio.sleep(0.01)
        os.kill(killed, 9)
        await asyncio.wait_for(sender, 10)
        deadline = time.monotonic() + 10
        while workers.pids()[0] == killed:
            assert time.monotonic() < deadline, "the supervisor did not restart the worker"
            await asyncio.sleep(0.05)
        await workers.healthy(0)
        assert alive(workers.pids()[1]), "the other worker went down with the killed one"
        received: set[bytes] = set()
        with contextlib.suppress(asyncio.TimeoutError):
            while not set(accepted) <= received:
                delivery = await dy.next_delivery(timeout=3.0)
                received.add(decode_envelope(delivery.envelope).msg_id)
    assert set(accepted) <= received, "an ACCEPTED message was lost"


@pytest.mark.redis
async def test_sigterm_to_the_supervisor_stops_every_worker(workers: Workers) -> None:
    pids = list(workers.pids().values())
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    assert workers.process is not None
    workers.process.terminate()
    assert workers.process.wait(30) == 0
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("store", ["memory", "sqlite:///relay.db"])
def test_workers_refuse_a_store_only_one_process_can_use(store: str, tmp_path: Path) -> None:
    done = subprocess.run([*RELAY_COMMAND, "--workers", "2", "--port", str(free_port()),
                           "--store", store], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert "workers > 1 needs a redis://" in done.stderr
    assert not (tmp_path / "relay.db").exists()


@pytest.mark.redis
async def test_workers_refuse_a_port_another_relay_holds(workers: Workers) -> None:
    done = subprocess.run([*RELAY_COMMAND, "--workers", "2", "--port", str(workers.port),
                           "--store", "redis://127.0.0.1:1/0"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    assert "Address already in use" in done.stderr


def test_a_worker_that_cannot_start_stops_the_relay_with_its_exit_code() -> None:
    done = subprocess.run([*RELAY_COMMAND, "--workers", "2", "--port", "0",
                           "--store", "redis://127.0.0.1:1/0?no_such_option=1"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "store URL option not understood" in done.stderr
    assert "worker_failed_to_start" in done.stdout


def test_restart_policy_backs_off_only_while_a_worker_keeps_failing() -> None:
    policy = RestartPolicy(healthy_after_s=10, first_delay_s=0.5, max_delay_s=2)
    assert [policy.delay_after_exit(0, uptime_s=1) for _ in range(4)] == [0.5, 1, 2, 2]
    assert policy.delay_after_exit(1, uptime_s=1) == 0.5  # its own count
    assert policy.delay_after_exit(0, uptime_s=60) == 0  # it had served: at once
    assert policy.delay_after_exit(0, uptime_s=1) == 0.5


@pytest.mark.redis
def test_ctrl_c_stops_every_worker_without_restarting_one(private_redis: RedisServer,
                                                          tmp_path: Path) -> None:
    """A terminal's Ctrl-C sends SIGINT to the whole process group: the workers stop by
    themselves while the supervisor stops them; their exits are no crash to restart."""
    log_path = tmp_path / "relay.log"
    with open(log_path, "wb") as log:
        relay = subprocess.Popen([*RELAY_COMMAND, "--workers", "2", "--port", "0",
                                  "--store", f"{private_redis.url}/0"],
                                 stdout=log, stderr=log, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 20
        while b"workers_serving" not in log_path.read_bytes():
            assert relay.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        os.killpg(relay.pid, signal.SIGINT)
        assert relay.wait(20) == 0
    finally:
        if relay.poll() is None:
            os.killpg(relay.pid, signal.SIGKILL)
            relay.wait(10)
    events = [json.loads(line).get("event") for line in log_path.read_text().splitlines()
              if line.startswith("{")]
    assert "workers_stopped" in events
    assert "worker_exited" not in events and events.count("worker_started") == 2
