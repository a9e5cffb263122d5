"""Admin API latency while relays long-poll the oracle's access list: 0 pollers, then N, one run.

    .venv/bin/python benchmarks/access_list_pollers.py [--devices 10000] [--pollers 100]
    .venv/bin/python benchmarks/access_list_pollers.py --baseline /tmp/base   # another checkout's oracle

The oracle is a subprocess started with its CLI on SQLite (or, with
`--postgres`, a fresh database on the PostgreSQL at 127.0.0.1:5432), pre-filled with
`--devices` devices in groups of 10 (one 10,000-device list is about 400 KB).
Pollers behave like relays: each holds one long-poll with the stamp it has,
re-polls at once when answered, and signs every request with one relay key
the oracle is configured to allow; they run in a process of their own.  The
admin client makes `--calls` calls, one every `--interval-ms`, alternating a
read (GET /v1/devices/{key}) and a change (POST …/revoke, then …/restore),
and each change answers every waiting poller with a new list.  The figure is
the median admin call latency with 0 pollers and with N, and their ratio.

Rounds alternate the two phases after a warm-up, and the medians are over
every call of a phase.  `--baseline DIR` runs the oracle code of another checkout instead (first on
its PYTHONPATH), with the same pollers (its oracle ignores their signatures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import cbor2
from common import CpuSampler, table, write_results
import oracle_process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proto import Identity  # noqa: E402
from proto.access import AccessRequest  # noqa: E402
from runtime.clock import now_ms  # noqa: E402

def _poll_stamp(body: bytes, etag: str | None) -> tuple[int, int, int]:
    """(epoch, version, valid_until_ms) of a list, as a relay names the one it holds."""
    fields = cbor2.loads(body)
    valid_until = fields[3] if len(fields) in (8, 10) else 0  # 0: a baseline without it
    if etag:
        epoch, version = etag.strip('"').split(".")
        return int(epoch), int(version), valid_until
    return 0, int(fields[0]), 0  # a baseline without epochs


async def _poller(url: str, oracle_key: str, relay: Identity, answered: list[int],
                  ready: asyncio.Event, stop: multiprocessing.synchronize.Event) -> None:
    from proto import PublicKey
    oracle = PublicKey.from_text(oracle_key)
    stamp = (0, 0, 0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while not stop.is_set():
            request = AccessRequest(relay.public, oracle, now_ms(), os.urandom(16))
            headers = {"Authorization": request.authorization(relay)}
            params = {"epoch": str(stamp[0]), "after": str(stamp[1]),
                      "valid_until": str(stamp[2])}
            async with http.get(url, params=params, headers=headers) as response:
                body = await response.read()
                if response.status == 200:
                    stamp = _poll_stamp(body, response.headers.get("ETag"))
                    answered[0] += 1
                    ready.set()
                elif response.status != 204:
                    raise RuntimeError(f"poll answered {response.status}: {body[:200]!r}")


def _pollers_main(url: str, oracle_key: str, relay_secret: str, count: int,
                  ready: multiprocessing.synchronize.Event,
                  stop: multiprocessing.synchronize.Event, result: multiprocessing.Queue) -> None:
    async def run() -> int:
        relay = Identity.from_text(relay_secret)
        answered = [0]
        firsts = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(_poller(url, oracle_key, relay, answered, first, stop))
                 for first in firsts]
        await asyncio.gather(*(first.wait() for first in firsts))
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return answered[0]
    result.put(asyncio.run(run()))


async def _admin_calls(base: str, token: str, keys: list[str], calls: int,
                       interval_s: float) -> dict[str, list[float]]:
    headers = {"Authorization": f"Bearer {token}"}
    timings: dict[str, list[float]] = {"read": [], "change": []}
    target = keys[len(keys) // 2]
    async with aiohttp.ClientSession(headers=headers) as http:
        for number in range(calls):
            if number % 2 == 0:
                kind, method, path = "read", "GET", f"/v1/devices/{keys[number % len(keys)]}"
            else:
                action = "revoke" if number % 4 == 1 else "restore"
                kind, method, path = "change", "POST", f"/v1/devices/{target}/{action}"
            started = time.perf_counter()
            async with http.request(method, base + path) as response:
                await response.read()
                assert response.status == 200, (path, response.status)
            timings[kind].append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(interval_s)
    return timings


def _phase(base: str, token: str, keys: list[str], calls: int, interval_s: float,
           oracle_pid: int) -> dict[str, object]:
    with CpuSampler(oracle_pid) as cpu:
        started = time.monotonic_ns()
        timings = asyncio.run(_admin_calls(base, token, keys, calls, interval_s))
        ended = time.monotonic_ns()
    oracle_cpu, _, wall = cpu.cpu_between(started, ended)
    return {**timings, "oracle_cpu_percent": 100 * oracle_cpu / wall}


def _summary(phases: list[dict]) -> dict[str, float]:
    """Medians over every call of every round of one kind of phase."""
    reads = [t for phase in phases for t in phase["read"]]
    changes = [t for phase in phases for t in phase["change"]]
    every = reads + changes
    return {"median_ms": statistics.median(every), "read_median_ms": statistics.median(reads),
            "change_median_ms": statistics.median(changes),
            "p90_ms": statistics.quantiles(every, n=10)[-1],
            "oracle_cpu_percent": statistics.median(p["oracle_cpu_percent"] for p in phases)}


class _Pollers:
    """`count` pollers in a process of their own, until the context ends."""

    def __init__(self, url: str, oracle_key: str, relay: Identity, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready, self._stop, self._result = context.Event(), context.Event(), context.Queue()
        self._process = context.Process(target=_pollers_main, args=(
            url, oracle_key, relay.secret_text(), count, self._ready, self._stop, self._result),
            daemon=True)
        self.count = count
        self.answered = 0

    def __enter__(self) -> _Pollers:
        self._process.start()
        if not self._ready.wait(120):
            self.__exit__()
            raise TimeoutError(f"{self.count} pollers did not all get a first list in 120 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._process.is_alive():
            with contextlib.suppress(Exception):
                self.answered = self._result.get(timeout=60)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)


def run(devices: int, pollers: int, calls: int, interval_ms: float, rounds: int,
        baseline: str | None, postgres: bool) -> dict[str, object]:
    relay = Identity.generate()
    with tempfile.TemporaryDirectory(prefix="continuum-bench-oracle-") as tmp, \
            oracle_process.database(tmp, postgres) as database:
        keys = asyncio.run(oracle_process.fill_fleet(database, devices))
        oracle = oracle_process.configure(tmp, database, baseline,
                                          relay_keys=relay.public.text)
        token = oracle.write_token("bench")
        oracle_key = oracle.cli("show-key")
        idle: list[dict] = []
        polled: list[dict] = []
        answered = 0
        with oracle_process.serving(oracle, f"{tmp}/oracle.log") as process:
            base = oracle.base
            interval_s = interval_ms / 1000
            _phase(base, token, keys, max(4, calls // 4), interval_s, process.pid)  # warm-up
            # Rounds alternate, so drift in the machine's speed hits both phases alike.
            for _ in range(rounds):
                idle.append(_phase(base, token, keys, calls, interval_s, process.pid))
                with _Pollers(f"{base}/v1/access-list", oracle_key, relay, pollers) as running:
                    polled.append(_phase(base, token, keys, calls, interval_s, process.pid))
                answered += running.answered
    idle_summary, polled_summary = _summary(idle), _summary(polled)
    return {"devices": devices, "pollers": pollers, "calls": calls, "rounds": rounds,
            "interval_ms": interval_ms, "baseline": baseline,
            "database": "postgresql" if postgres else "sqlite",
            "idle": idle_summary, "polled": polled_summary, "polls_answered": answered,
            "ratio": polled_summary["median_ms"] / idle_summary["median_ms"]}


def render(result: dict) -> str:
    rows = [(name, result[key]["median_ms"], result[key]["read_median_ms"],
             result[key]["change_median_ms"], result[key]["p90_ms"],
             result[key]["oracle_cpu_percent"])
            for name, key in (("0 pollers", "idle"), (f"{result['pollers']} pollers", "polled"))]
    return (table(["phase", "admin median ms", "read ms", "change ms", "p90 ms", "oracle CPU %"],
                  rows)
            + f"\n\n{result['devices']:,} devices on {result['database']}, {result['rounds']}"
              f" rounds of {result['calls']} admin calls per phase, one every"
              f" {result['interval_ms']:g} ms; polls answered with a list:"
              f" {result['polls_answered']}\nadmin median with {result['pollers']} pollers /"
              f" with none: {result['ratio']:.2f}x (target ≤ 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds of each phase (0 pollers, then N)")
    parser.add_argument("--baseline", help="another checkout's top directory (its oracle code)")
    parser.add_argument("--postgres", action="store_true",
                        help="a fresh database on PostgreSQL at 127.0.0.1:5432 instead of SQLite")
    args = parser.parse_args()
    result = run(args.devices, args.pollers, args.calls, args.interval_ms, args.rounds,
                 args.baseline, args.postgres)
    print(render(result))
    print(f"results: {write_results('access_list_pollers', result)}")


if __name__ == "__main__":
    main()
