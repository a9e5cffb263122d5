"""Relay memory per idle connected device, at 1k and 10k authenticated connections.

A gateway's cost is dominated by devices that are connected but quiet, so the
figure is (RSS with N connected − RSS before any) / N.  Clients are spread
over several processes (each holding its share of sockets open), and the
open-files limit is raised to the hard limit; the relay inherits it.

    .venv/bin/python benchmarks/idle.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection

import aiohttp

from proto import Identity

from common import UNTHROTTLED, RelayProcess, memory_kib, raise_nofile, table, write_results
from wsclient import connect

_CONCURRENT_HANDSHAKES = 16  # per process; the relay caps pending handshakes per address
_SETTLE_S = 1.0
_STEP_TIMEOUT_S = 300.0


async def _hold(pipe: Connection, url: str) -> None:
    """Open connections when told to ("connect", n), hold them, close all on ("close",)."""
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    gate = asyncio.Semaphore(_CONCURRENT_HANDSHAKES)

    async def one() -> None:
        async with gate:
            sockets.append(await connect(http, url, Identity(os.urandom(32))))

    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            while True:
                command = await loop.run_in_executor(None, pipe.recv)
                if command[0] != "connect":
                    break
                started = time.monotonic()
                await asyncio.gather(*(one() for _ in range(command[1] - len(sockets))))
                pipe.send(("connected", len(sockets), time.monotonic() - started))
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


def _hold_process(pipe: Connection, url: str) -> None:
    asyncio.run(_hold(pipe, url))


def benchmark(*, quick: bool, procs: int = 4) -> dict[str, object]:
    """RSS before, then at each connection count; bytes per connection against the baseline."""
    raise_nofile()
    counts = (200, 1_000) if quick else (1_000, 10_000)
    context = mp.get_context("fork")
    workers: list[tuple[mp.process.BaseProcess, Connection]] = []
    levels = []
    with RelayProcess(*UNTHROTTLED) as relay:
        try:
            for _ in range(procs):
                ours, theirs = context.Pipe()
                process = context.Process(target=_hold_process, args=(theirs, relay.url),
                                          daemon=True)
                process.start()
                workers.append((process, ours))
            time.sleep(_SETTLE_S)
            baseline_kib = memory_kib(relay.pid)["VmRSS"]
            for count in counts:
                started = time.monotonic()
                for index, (_, pipe) in enumerate(workers):
                    pipe.send(("connect", count // procs + (index < count % procs)))
                for _, pipe in workers:
                    if not pipe.poll(_STEP_TIMEOUT_S):
                        raise TimeoutError(f"{count} connections not open within {_STEP_TIMEOUT_S}s")
                    pipe.recv()
                elapsed = time.monotonic() - started
                time.sleep(_SETTLE_S)
                rss_kib = memory_kib(relay.pid)["VmRSS"]
                connected = relay.metric("continuum_connected_devices")
                levels.append({
                    "connections": count,
                    "relay_reports_connected": connected,
                    "rss_mib": rss_kib / 1024,
                    "bytes_per_connection": (rss_kib - baseline_kib) * 1024 / count,
                    "handshakes_per_s": (count - (levels[-1]["connections"] if levels else 0))
                    / elapsed,
                })
        finally:
            for process, pipe in workers:
                try:
                    pipe.send(("close",))
                except OSError:
                    pass
            for process, _ in workers:
                process.join(30)
                if process.is_alive():
                    process.kill()
                    process.join(5)
    return {"baseline_rss_mib": baseline_kib / 1024, "client_processes": procs, "levels": levels}


def render(result: dict) -> str:
    rows = [(lvl["connections"], lvl["relay_reports_connected"], lvl["rss_mib"],
             lvl["bytes_per_connection"] / 1024, lvl["handshakes_per_s"])
            for lvl in result["levels"]]
    return (f"relay RSS with no devices: {result['baseline_rss_mib']:.1f} MiB\n"
            + table(["idle devices", "relay says", "RSS MiB", "KiB/connection",
                     "handshakes/s"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 and 1,000 connections")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    args = parser.parse_args()
    result = benchmark(quick=args.quick, procs=args.procs)
    print(render(result))
    print(f"results: {write_results('idle', result)}")


if __name__ == "__main__":
    main()
