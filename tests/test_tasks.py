"""Stopping background tasks (runtime/tasks.py): a stop ends every task it stops, even one
whose first cancel was absorbed on the way, as redis-py's pipeline `execute()` was seen to do
(a `continuum --workers 2` on Redis then sat in its stop until the supervisor's SIGKILL)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from runtime.tasks import RECANCEL_AFTER_S, cancel_all_and_wait, cancel_and_wait

# Far beyond RECANCEL_AFTER_S: a stop that has not ended by then never will.
_STOP_BOUND_S = 2.0


async def _absorbs_its_first_cancel(calling: asyncio.Event) -> None:
    """A loop like the stream bus's publisher: a library call that returns normally though
    the task was cancelled during it, then the wait for the next piece of work."""
    try:
        calling.set()
        await asyncio.sleep(3600)  # the library call
    except asyncio.CancelledError:
        pass  # absorbed: the call returns its result as if nothing happened
    await asyncio.Event().wait()  # the next piece of work, which never comes


async def _started(run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
                   ) -> asyncio.Task[None]:
    """`run` as a task, once it is inside its call."""
    calling = asyncio.Event()
    task = asyncio.create_task(run(calling))
    await calling.wait()
    return task


async def _ends_in_time(stop: Coroutine[Any, Any, None]) -> bool:
    """Whether `stop` ended by itself within the bound.  It runs as a task of its own: a
    timeout around it would cancel what it awaits, and so stop the task for it."""
    stopping = asyncio.create_task(stop)
    await asyncio.wait((stopping,), timeout=_STOP_BOUND_S)
    if stopping.done():
        return True
    stopping.cancel()
    return False


async def test_a_task_that_absorbed_its_cancel_is_still_stopped() -> None:
    task = await _started(_absorbs_its_first_cancel)
    assert await _ends_in_time(cancel_and_wait(task))
    assert task.cancelled()


async def test_stopping_many_ends_each_of_them() -> None:
    absorbing = await _started(_absorbs_its_first_cancel)
    plain = asyncio.create_task(asyncio.sleep(3600))
    assert await _ends_in_time(cancel_all_and_wait([absorbing, plain]))
    assert absorbing.cancelled() and plain.cancelled()


async def test_the_stopper_s_own_cancellation_is_not_absorbed() -> None:
    """A stop that is itself cancelled (a bounded shutdown step that overran) ends cancelled:
    the helper must not take its caller's cancellation for the stopped task's."""
    release = asyncio.Event()

    async def slow_to_close(calling: asyncio.Event) -> None:
        try:
            calling.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await release.wait()
            raise

    task = await _started(slow_to_close)
    stopping = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(RECANCEL_AFTER_S / 5)
    stopping.cancel()
    await asyncio.wait((stopping,), timeout=_STOP_BOUND_S)
    assert stopping.cancelled()
    release.set()
    await asyncio.wait((task,), timeout=_STOP_BOUND_S)
    assert task.cancelled()


async def test_a_task_that_cleans_up_on_its_cancel_is_let_finish() -> None:
    """A second cancel is for a task that absorbed the first, not for one closing up."""
    cleaned_up = asyncio.Event()

    async def closes_on_cancel(calling: asyncio.Event) -> None:
        try:
            calling.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(RECANCEL_AFTER_S / 5)  # closing a connection, say
            cleaned_up.set()
            raise

    task = await _started(closes_on_cancel)
    await cancel_and_wait(task)
    assert cleaned_up.is_set() and task.cancelled()


async def test_a_task_that_failed_raises_its_error_at_the_stop() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await cancel_and_wait(task)


async def test_nothing_to_stop_is_no_error() -> None:
    await cancel_and_wait(None)
    await cancel_all_and_wait([])
