"""The next SEND's rate token, taken ahead on a store a round trip away (continuum/rate_tokens.py).

Real relays on a real Redis, reached through a delay proxy where a round trip must show:
the token taken ahead saves the SEND one store round trip, and never lets a device past
its rate, within one connection or across several.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from tcp_proxy import DelayProxy
from wire import RawDevice, sealed

from proto import Identity
from proto.errors import ErrorCode
from proto.frames import Accepted, Error, Send

ONE_WAY_S = 0.1


async def test_a_send_waits_one_store_round_trip_its_token_was_taken_ahead(
        start_relay, redis_url: str) -> None:
    """Redis 100 ms away each way: after a first SEND, the next is ACCEPTED one round trip
    (200 ms) after it is sent, not two (its token, then its accept: 400 ms)."""
    url = urlsplit(redis_url)
    async with DelayProxy(url.port or 6379, ONE_WAY_S) as far:
        relay = await start_relay(store=url._replace(netloc=f"127.0.0.1:{far.port}").geturl(),
                                  rate_per_s=1000.0, rate_burst=1000)
        alice, bob = Identity.generate(), Identity.generate()
        try:
            async with await RawDevice.connect(relay.url, alice) as device:
                assert isinstance(await device.send(sealed(alice, [bob.public])), Accepted)
                await asyncio.sleep(3 * ONE_WAY_S)  # the token ahead has arrived
                started = time.perf_counter()
                assert isinstance(await device.send(sealed(alice, [bob.public])), Accepted)
                elapsed = time.perf_counter() - started
        finally:
            await relay.stop()  # before the proxy it reaches its store through
    assert 2 * ONE_WAY_S <= elapsed < 3 * ONE_WAY_S, elapsed


async def test_tokens_taken_ahead_never_let_a_device_past_its_burst(
        start_relay, redis_url: str) -> None:
    """Burst 4, no refill to speak of: one connection sends two, a second connection (the
    first's token ahead lost with it) and a third (to another relay on the same store) send
    until refused.  At most 4 are accepted in all, and every refusal is RATE_LIMITED."""
    first = await start_relay(store=redis_url, rate_per_s=0.01, rate_burst=4)
    second = await start_relay(store=redis_url, rate_per_s=0.01, rate_burst=4)
    alice, bob = Identity.generate(), Identity.generate()
    answers = []
    async with await RawDevice.connect(first.url, alice) as device:
        answers += [await device.send(sealed(alice, [bob.public])) for _ in range(2)]
    for relay in (first, second):
        async with await RawDevice.connect(relay.url, alice) as device:
            answers += [await device.send(sealed(alice, [bob.public])) for _ in range(3)]
    accepted = [answer for answer in answers if isinstance(answer, Accepted)]
    refused = [answer for answer in answers if isinstance(answer, Error)]
    assert answers[:2] == accepted[:2]
    assert 2 <= len(accepted) <= 4
    assert {answer.code for answer in refused} == {ErrorCode.RATE_LIMITED}
    assert len(accepted) + len(refused) == len(answers)


async def test_sends_written_at_once_get_no_more_than_the_burst(start_relay, redis_url: str) -> None:
    """Twelve SENDs written without waiting (several in flight, some finding a token taken
    ahead, some taking their own), burst 4: exactly four are accepted, the first four (a
    refusal is answered as soon as it is known, so answers are matched by msg_id)."""
    relay = await start_relay(store=redis_url, rate_per_s=0.01, rate_burst=4)
    alice, bob = Identity.generate(), Identity.generate()
    sent = [sealed(alice, [bob.public], bytes([i])) for i in range(12)]
    async with await RawDevice.connect(relay.url, alice) as device:
        assert isinstance(await device.send(sent[0]), Accepted)  # a token ahead is now held
        for envelope in sent[1:]:
            await device.send_frame(Send(envelope.raw))
        answers = {answer.msg_id: answer for answer in [await device.recv() for _ in sent[1:]]}
    assert [type(answers[envelope.msg_id]) for envelope in sent[1:]] == [Accepted] * 3 + [Error] * 8
    assert {answers[envelope.msg_id].code for envelope in sent[4:]} == {ErrorCode.RATE_LIMITED}
