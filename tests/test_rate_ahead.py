"""`RateTokens`: a token taken ahead serves the next SEND only if it was granted.

The bucket here is a queue of answers the test hands out, so each case can say
what the store answered and when; the relay-level behaviour (a roaming sender's
paced SENDs, the burst never exceeded) is in test_regions.py and test_rate_limit.py.
"""

from __future__ import annotations

import asyncio

import pytest

from continuum.rate_ahead import IDLE_GAP_S, RateTokens
from proto.errors import StoreUnavailableError


class Bucket:
    """Answers each take with the next of `answers` (an exception is raised), once
    `release` is set; counts the takes."""

    def __init__(self, *answers: bool | Exception) -> None:
        self.answers = list(answers)
        self.takes = 0
        self.release = asyncio.Event()
        self.release.set()

    async def take(self) -> bool:
        self.takes += 1
        answer = self.answers.pop(0)
        await self.release.wait()
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_a_token_granted_ahead_serves_the_next_send_without_another_take() -> None:
    bucket = Bucket(True)
    tokens = RateTokens()
    tokens.take_ahead(bucket.take)
    tokens.take_ahead(bucket.take)  # one at most
    assert await tokens.spend(bucket.take) is True
    assert bucket.takes == 1


@pytest.mark.parametrize("ahead", [False, StoreUnavailableError("down then")])
async def test_a_token_refused_or_failed_ahead_is_taken_again(ahead: bool | Exception) -> None:
    bucket = Bucket(ahead, True)
    tokens = RateTokens()
    tokens.take_ahead(bucket.take)
    assert await tokens.spend(bucket.take) is True
    assert bucket.takes == 2


async def test_a_send_waits_for_a_token_still_being_taken_ahead() -> None:
    bucket = Bucket(True)
    bucket.release.clear()
    tokens = RateTokens()
    tokens.take_ahead(bucket.take)
    spending = asyncio.ensure_future(tokens.spend(bucket.take))
    await asyncio.sleep(0.01)
    assert not spending.done()
    bucket.release.set()
    assert await spending is True
    assert bucket.takes == 1


async def test_closing_stops_a_take_still_under_way_and_serves_nothing_after() -> None:
    bucket = Bucket(True, False)
    bucket.release.clear()
    tokens = RateTokens()
    tokens.take_ahead(bucket.take)
    await asyncio.sleep(0)
    await tokens.close()
    bucket.release.set()
    assert await tokens.spend(bucket.take) is False  # a fresh take, not the one closed
    assert bucket.takes == 2


async def test_only_a_send_after_an_idle_gap_earns_a_token_ahead() -> None:
    tokens = RateTokens()
    assert tokens.arrived()  # the connection's first SEND
    assert not tokens.arrived()  # right behind it
    await asyncio.sleep(IDLE_GAP_S * 2)
    assert tokens.arrived()
