"""Stopping a background task: cancel it and wait until it has really finished.

The cancellation is level-triggered, as trio and anyio deliver theirs: a task still running a
moment after its cancel is cancelled again, until it ends.  A cancel is one exception thrown
into whatever the task awaits, and a library can absorb it: redis-py's pipeline `execute()`
was seen returning its replies to a task cancelled during the call (with the hiredis parser,
relays stopped beside other load: 5 stops in 135).  That task then waited on its next event
for good, and so did the relay's stop.  A second cancel finds it at that next await.

The stopper's own cancellation (a bounded shutdown step that overran) is never taken for
the task's: it is waited for with `asyncio.wait`, which a cancel leaves untouched, and only
awaited once done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

# How long a cancelled task may take to end before it is cancelled again: a task handling
# its cancel (closing a connection) is left to finish; one that absorbed it is found at
# its next await within this.
RECANCEL_AFTER_S = 0.5


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (None: nothing to do) and wait for it, so nothing it holds outlives
    its owner's stop; its CancelledError is the expected ending, not an error."""
    if task is not None:
        await cancel_all_and_wait((task,))


async def cancel_all_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """`cancel_and_wait` for many: all are cancelled before the first is awaited, so none
    runs on while another is waited for.  A task that failed raises its exception here."""
    tasks = list(tasks)
    running = {task for task in tasks if not task.done()}
    while running:
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=RECANCEL_AFTER_S)
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
