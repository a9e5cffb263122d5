"""A relay's stop is bounded step by step (continuum/server.py): a step that never ends, or
fails, costs at most its bound and the steps after it still run."""

from __future__ import annotations

import asyncio
import time

import pytest

from continuum import server

# Short for the test; the relay's own bound is 5 s.
_BOUND_S = 0.2


@pytest.fixture(autouse=True)
def short_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "_STOP_STEP_S", _BOUND_S)


async def test_a_step_that_never_ends_is_left_after_its_bound() -> None:
    started = time.monotonic()
    await server._bounded("stuck", asyncio.Event().wait())
    assert _BOUND_S <= time.monotonic() - started < _BOUND_S + 1.0


async def test_a_step_that_fails_does_not_end_the_stop() -> None:
    async def fails() -> None:
        raise ConnectionResetError("the store went away")

    await server._bounded("failing", fails())  # logged, not raised
