"""`TurnBudget`, the rule that unauthenticated work yields to authenticated work, on a real
event loop (no sockets): steps per turn, arrival order, the yield after an authenticated
read, the floor newcomers keep under constant authenticated load, and what a long turn banks.
"""

from __future__ import annotations

import asyncio
import time

from runtime.listener import TurnBudget


class TurnCounter:
    """Counts event-loop turns: a callback that schedules itself runs once per turn."""

    def __init__(self) -> None:
        self.turns = 0
        self._handle: asyncio.Handle | None = None

    def __enter__(self) -> TurnCounter:
        self._tick()
        return self

    def _tick(self) -> None:
        self.turns += 1
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def __exit__(self, *exc: object) -> None:
        assert self._handle is not None
        self._handle.cancel()


def recorder(log: list[tuple[int, int]], counter: TurnCounter, name: int):  # noqa: ANN201
    def resume() -> bool:
        log.append((name, counter.turns))
        return True
    return resume


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_steps_beyond_a_turn_wait_for_later_turns_in_arrival_order() -> None:
    budget = TurnBudget(per_turn=2, yield_s=0.01)
    await settle()  # a fresh budget banks nothing beyond one turn's steps after a pause
    log: list[tuple[int, int]] = []
    with TurnCounter() as counter:
        assert budget.take() and budget.take()
        assert not budget.take()  # a third step in the same turn waits
        for name in range(6):
            budget.wait(recorder(log, counter, name))
        assert budget.waiting == 6
        await settle()
    assert [name for name, _ in log] == list(range(6))  # arrival order, none skipped
    turns = [turn for _, turn in log]
    assert all(turns.count(turn) <= 2 for turn in turns), turns  # never more than 2 a turn
    assert len(set(turns)) == 3


async def test_after_an_authenticated_read_newcomers_wait_for_the_yield() -> None:
    budget = TurnBudget(per_turn=1, yield_s=0.05)
    resumed_at: list[float] = []
    budget.trusted_read()
    read_at = time.monotonic()
    assert not budget.take()  # the rest of this turn belongs to the device's work
    budget.wait(lambda: resumed_at.append(time.monotonic()) or True)
    await settle(50)
    assert resumed_at == []  # many turns later, still yielding
    async with asyncio.timeout(2):
        while not resumed_at:
            await asyncio.sleep(0.005)
    assert resumed_at[0] - read_at >= 0.05


async def test_newcomers_keep_their_floor_under_constant_authenticated_reads() -> None:
    """An authenticated read every turn for 0.3 s: newcomers still get about one step per
    yield (0.01 s), so about 30, not none."""
    budget = TurnBudget(per_turn=1, yield_s=0.01)
    served = 0
    stop = time.monotonic() + 0.3

    def resume() -> bool:
        nonlocal served
        served += 1
        budget.wait(resume)  # always another newcomer waiting
        return True

    budget.wait(resume)
    while time.monotonic() < stop:
        budget.trusted_read()
        await asyncio.sleep(0)
    assert 10 <= served <= 40, served


async def test_a_long_turn_banks_the_steps_of_the_time_it_took_up_to_a_cap() -> None:
    budget = TurnBudget(per_turn=1, yield_s=0.001)
    log: list[tuple[int, int]] = []
    with TurnCounter() as counter:
        budget.trusted_read()
        for name in range(40):
            budget.wait(recorder(log, counter, name))
        time.sleep(0.05)  # one turn of 50 ms: 50 yields' worth, banked up to the cap
        await settle(5)
    per_turn = {turn: sum(1 for _, t in log if t == turn) for _, turn in log}
    assert max(per_turn.values()) == TurnBudget._MAX_BANKED, per_turn


async def test_a_waiter_that_went_away_uses_no_step() -> None:
    budget = TurnBudget(per_turn=1, yield_s=0.01)
    await settle()
    assert budget.take()
    served: list[str] = []
    budget.wait(lambda: False)  # its socket closed while it waited
    budget.wait(lambda: served.append("next") or True)
    await settle()
    assert served == ["next"] and budget.waiting == 0


async def test_the_accept_loop_step_waits_its_turn() -> None:
    budget = TurnBudget(per_turn=1, yield_s=0.01)
    await settle()
    with TurnCounter() as counter:
        assert budget.take()
        spent_at = counter.turns
        async with asyncio.timeout(1):
            await budget.step()  # this turn's step is spent: the next turn's is ours
        assert counter.turns > spent_at
