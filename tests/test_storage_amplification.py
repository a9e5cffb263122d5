"""Storage amplification (issue 13, item 5), over real sockets: what a sender can make the store hold.

One 64 KiB envelope to 64 recipients used to be stored 64 times, so 40 sends
grew the relay by ~70x the bytes sent.  Now a body is stored once and
referenced per recipient, and byte budgets per sender and per store refuse
the rest with QUOTA_EXCEEDED (recipients that are not keys at all:
test_recipient_points.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from proto import Envelope, Identity, PublicKey
from proto.frames import Accepted
from redis_server import RedisServer
from relay_process import RelayProcess
from wire import RawDevice, error_code, sealed

ENVELOPE_LIMIT = 65_536
SENDS = 40
RECIPIENTS = 64


def largest_envelope(sender: Identity, recipients: list[PublicKey]) -> Envelope:
    """An envelope to `recipients` as close to the 64 KiB limit as sealing allows."""
    overhead = len(sealed(sender, recipients, b"").raw)
    envelope = sealed(sender, recipients, b"x" * (ENVELOPE_LIMIT - overhead - 8))
    assert ENVELOPE_LIMIT - 16 < len(envelope.raw) <= ENVELOPE_LIMIT
    return envelope


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def send_all(url: str, sender: Identity, envelopes: list[Envelope]) -> list[object]:
    async with await RawDevice.connect(url, sender) as device:
        return [await device.send(envelope) for envelope in envelopes]


@pytest.mark.timeout(120)
async def test_one_envelope_to_64_recipients_is_stored_once_in_memory(tmp_path) -> None:
    """Relay RSS after 40 sends of a 64 KiB envelope to 64 recipients: ~40 bodies, not 2,560."""
    relay = await RelayProcess("--store", "memory", log_path=tmp_path / "relay.log").start()
    alice = Identity.generate()
    recipients = [Identity.generate().public for _ in range(RECIPIENTS)]
    envelopes = [largest_envelope(alice, recipients) for _ in range(SENDS)]
    try:
        await send_all(relay.url, alice, envelopes[:1])  # warm up: buffers, caches, tables
        assert relay.process is not None
        before = rss_bytes(relay.process.pid)
        answers = await send_all(relay.url, alice, envelopes[1:])
        grown = rss_bytes(relay.process.pid) - before
    finally:
        relay.stop()
    assert all(isinstance(answer, Accepted) for answer in answers)
    sent = sum(len(e.raw) for e in envelopes[1:])
    assert grown < 5 * sent, f"relay grew {grown / sent:.1f}x the bytes sent"  # f8f8e50: 69x


@pytest.mark.redis
async def test_one_envelope_to_64_recipients_is_stored_once_in_redis() -> None:
    """Redis used_memory after 40 such sends, on a private Redis so nothing else moves it."""
    server = RedisServer("--appendonly", "no").start()
    relay = RelayProcess("--store", f"{server.url}/0")
    alice = Identity.generate()
    recipients = [Identity.generate().public for _ in range(RECIPIENTS)]
    envelopes = [largest_envelope(alice, recipients) for _ in range(SENDS)]
    try:
        await relay.start()
        with redis.Redis.from_url(server.url) as client:
            await send_all(relay.url, alice, envelopes[:1])
            before = client.info("memory")["used_memory"]
            answers = await send_all(relay.url, alice, envelopes[1:])
            grown = client.info("memory")["used_memory"] - before
    finally:
        relay.stop()
        server.remove()
    assert all(isinstance(answer, Accepted) for answer in answers)
    sent = sum(len(e.raw) for e in envelopes[1:])
    assert grown < 4 * sent, f"Redis grew {grown / sent:.1f}x the bytes sent"  # f8f8e50: 81x


async def test_a_sender_over_its_byte_budget_hears_quota_exceeded(start_relay) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    recipients = [Identity.generate().public for _ in range(RECIPIENTS)]
    size = len(largest_envelope(mallory, recipients).raw)
    server = await start_relay(sender_max_stored_bytes=3 * size + size // 2,
                               store_max_bytes=5 * size + size // 2)
    answers = await send_all(server.url, mallory,
                             [largest_envelope(mallory, recipients) for _ in range(5)])
    assert [isinstance(a, Accepted) for a in answers] == [True, True, True, False, False]
    assert [error_code(a) for a in answers[3:]] == ["QUOTA_EXCEEDED"] * 2  # counted once each
    assert await server.relay.store.depth(recipients[0]) == 3
    # Another sender still has room in the store: the budget is the flooder's own.
    answers = await send_all(server.url, alice, [largest_envelope(alice, recipients[:1])
                                                 for _ in range(3)])
    assert [isinstance(a, Accepted) for a in answers] == [True, True, False]
    assert error_code(answers[2]) == "QUOTA_EXCEEDED"  # the store's budget: 5 bodies held


async def test_budget_comes_back_when_the_last_recipient_acks(start_relay) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    first = sealed(alice, [bob.public, carol.public], b"x" * 40_000)
    server = await start_relay(sender_max_stored_bytes=ENVELOPE_LIMIT)  # one body of 40 KB, not two
    assert (await send_all(server.url, alice, [first]))[0] == Accepted(first.msg_id)
    async with await RawDevice.connect(server.url, bob) as b:
        await b.next_delivery()
        second = sealed(alice, [bob.public], b"y" * 40_000)
        assert error_code((await send_all(server.url, alice, [second]))[0]) == "QUOTA_EXCEEDED"
    async with await RawDevice.connect(server.url, carol) as c:
        await c.next_delivery()
        for _ in range(100):  # the ACK is processed asynchronously
            if await server.relay.store.depth(carol.public) == 0:
                break
            await asyncio.sleep(0.02)
    third = sealed(alice, [bob.public], b"z" * 40_000)
    assert (await send_all(server.url, alice, [third]))[0] == Accepted(third.msg_id)
