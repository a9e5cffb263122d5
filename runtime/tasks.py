"""Stopping a background task: cancel it and wait until it has really finished."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` (None: nothing to do) and wait for it, so nothing it holds outlives
    its owner's stop; its CancelledError is the expected ending, not an error."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
