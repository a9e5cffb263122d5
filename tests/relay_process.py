"""Relays as real OS processes, for tests that kill them (SIGKILL) and start them again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from child_process import ChildProcess

RELAY_COMMAND = [sys.executable, "-m", "continuum"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free loopback ports, below the ephemeral range
    (32768 and up on Linux), where the local ports of outgoing connections do not land."""
    for _ in range(100):
        first = random.randrange(20_000, 32_768 - count)
        with contextlib.ExitStack() as probes:
            try:
                for port in range(first, first + count):
                    probe = probes.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


class RelayProcess(ChildProcess):
    """`continuum` started with `args` on a fixed port, so a restart keeps its URL."""

    def __init__(self, *args: str, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                     *args]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/connect"

    async def start(self, timeout_s: float = 15.0) -> RelayProcess:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen([*RELAY_COMMAND, *self.args], stdout=log, stderr=log,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"relay exited with {self.process.returncode}")
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/healthz") as response:
                        if response.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        self.kill()
        raise TimeoutError(f"relay on port {self.port} not healthy within {timeout_s}s")
