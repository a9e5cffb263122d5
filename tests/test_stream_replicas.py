"""Streams across relay processes on one Redis, when a relay dies without a word."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from client import Device, PeerList
from client.streams import StreamRequest
from proto import Identity
from proto.errors import StreamBrokenError
from relay_process import RelayProcess
from tally import FAULTS_SURVIVED, TALLY


async def test_a_stream_through_a_relay_that_is_killed_fails_at_the_other_end(
        redis_url: str, tmp_path: Path) -> None:
    """bob's relay is SIGKILLed mid-stream: it tells nobody, but alice's relay stops hearing
    it and ends the stream with a reason within seconds; bob's device, whose connection
    died, ends it too.  Neither is resumed when bob reconnects elsewhere."""
    first = await RelayProcess("--store", redis_url, log_path=tmp_path / "r1.log").start()
    second = await RelayProcess("--store", redis_url, log_path=tmp_path / "r2.log").start()
    alice, bob = Identity.generate(), Identity.generate()
    theirs: list = []

    async def keep(request: StreamRequest) -> None:
        stream = await request.accept()
        theirs.append(stream)
        await stream.write(b"hello")

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
