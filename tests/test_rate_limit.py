"""A device's rate on Redis: its bucket, shared by every relay, is never overspent.

Real relays on a real Redis: one connection's SENDs in flight at once, and a device's
connections to two relays one after another, never get past its burst.  An idle
connection takes its next SEND's token ahead (`continuum.rate_ahead`); one it closes
holding is lost, never given to a SEND.
"""

from __future__ import annotations

import asyncio

from wire import RawDevice, sealed

from proto import Identity
from proto.errors import ErrorCode
from proto.frames import Accepted, Error, Send


async def test_a_devices_connections_to_two_relays_never_get_past_its_burst(
        start_relay, redis_url: str) -> None:
    """Burst 4, no refill to speak of: one connection sends two, then a second connection
    to the same relay and a third to another relay on the same store send three each.  The
    first connection's two are accepted; after them at most two more, each connection
    closing with one token it took ahead (lost, possibly, if it was taken before the close:
    three in all at least), and every later SEND is refused RATE_LIMITED."""
    first = await start_relay(store=redis_url, rate_per_s=0.01, rate_burst=4)
    second = await start_relay(store=redis_url, rate_per_s=0.01, rate_burst=4)
    alice, bob = Identity.generate(), Identity.generate()
    answers = []
    async with await RawDevice.connect(first.url, alice) as device:
        answers += [await device.send(sealed(alice, [bob.public])) for _ in range(2)]
    for relay in (first, second):
        async with await RawDevice.connect(relay.url, alice) as device:
            answers += [await device.send(sealed(alice, [bob.public])) for _ in range(3)]
    accepted = sum(isinstance(answer, Accepted) for answer in answers)
    assert 3 <= accepted <= 4
    assert [type(answer) for answer in answers] == [Accepted] * accepted + [Error] * (8 - accepted)
    assert {answer.code for answer in answers[accepted:]} == {ErrorCode.RATE_LIMITED}  # type: ignore[union-attr]


async def test_sends_written_at_once_get_no_more_than_the_burst(
        start_relay, redis_url: str) -> None:
    """Twelve SENDs, the last eleven written without waiting (several in flight), burst 4:
    exactly four are accepted, the first four (a refusal is answered as soon as it is
    known, so answers are matched by msg_id)."""
    relay = await start_relay(store=redis_url, rate_per_s=0.01, rate_burst=4)
    alice, bob = Identity.generate(), Identity.generate()
    sent = [sealed(alice, [bob.public], bytes([i])) for i in range(12)]
    async with await RawDevice.connect(relay.url, alice) as device:
        assert isinstance(await device.send(sent[0]), Accepted)
        for envelope in sent[1:]:
            await device.send_frame(Send(envelope.raw))
        answers = {answer.msg_id: answer for answer in [await device.recv() for _ in sent[1:]]}
    assert [type(answers[envelope.msg_id]) for envelope in sent[1:]] == [Accepted] * 3 + [Error] * 8
    assert {answers[envelope.msg_id].code for envelope in sent[4:]} == {ErrorCode.RATE_LIMITED}


async def test_a_token_refused_ahead_does_not_refuse_a_send_after_the_bucket_refilled(
        start_relay, redis_url: str) -> None:
    """Burst 1, a token every 200 ms: the first SEND spends the only token, and the token
    its connection then takes ahead is refused (the bucket is empty).  A SEND made after
    the bucket refilled takes a token of its own and is accepted: a refusal taken ahead is
    not the answer for a later SEND."""
    relay = await start_relay(store=redis_url, rate_per_s=5.0, rate_burst=1)
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as device:
        assert isinstance(await device.send(sealed(alice, [bob.public], b"1")), Accepted)
        await asyncio.sleep(0.5)
        assert isinstance(await device.send(sealed(alice, [bob.public], b"2")), Accepted)
