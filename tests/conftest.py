"""Shared fixtures: real relays on 127.0.0.1 with free ports, nothing faked."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from continuum.server import RelayServer, Settings
from runtime.logs import configure_logging

sys.path.insert(0, str(Path(__file__).parent))
configure_logging("warning")

# Real Redis servers for the store contract, multi-replica and durability tests.
pytest_plugins = ("redis_server",)

T = TypeVar("T")

# Fast sweeps so expiry tests take a second, not a minute.
TEST_SETTINGS = Settings(host="127.0.0.1", port=0, sweep_interval_s=0.1, log_level="warning")


@pytest.fixture
async def relay() -> AsyncIterator[RelayServer]:
    async with RelayServer(TEST_SETTINGS) as server:
        yield server


@pytest.fixture
async def start_relay() -> AsyncIterator[Callable[..., Awaitable[RelayServer]]]:
    """Start relays with custom settings; all are stopped at the end of the test."""
    started: list[RelayServer] = []

    async def start(**overrides: object) -> RelayServer:
        server = RelayServer(replace(TEST_SETTINGS, **overrides))
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


class LoopThread:
    """An event loop in a background thread, for hypothesis tests (which are synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tally import TALLY, summary_lines
    if TALLY:
        terminalreporter.section("adversarial suite")
        for line in summary_lines():
            terminalreporter.write_line(line)
