"""Stopping a background task: cancel it and wait until it has really finished."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` (None: nothing to do) and wait for it, so nothing it holds outlives
    its owner's stop; its CancelledError is the expected ending, not an error."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def cancel_all_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """`cancel_and_wait` for many: all are cancelled before the first is awaited, so none
    runs on while another is waited for."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
