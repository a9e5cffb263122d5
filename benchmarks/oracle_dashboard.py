"""Dashboard and device-list API at fleet scale: server time and page size, 10k and 100k devices.

    .venv/bin/python benchmarks/oracle_dashboard.py [--devices 10000,100000] [--requests 60]
    .venv/bin/python benchmarks/oracle_dashboard.py --postgres        # PostgreSQL at 127.0.0.1:5432
    .venv/bin/python benchmarks/oracle_dashboard.py --devices 10000 --baseline /tmp/base

The oracle is a subprocess started with its CLI, its database pre-filled
directly (the API would take minutes): devices `device-000000`… tagged
`site-0`…`site-9` (one in a hundred also `camera`), in groups of 10.  An
admin logs in, then each request kind is sent `--requests` times, one at a
time, after 3 warm-ups.  Presence is filled too: every other device online
(reported by one relay process, 0..3 messages each), every group of ten
with an expected check-in of an hour, so the offline devices enrolled
"two hours ago" are silent; the silence watch's first pass over the fleet
(the query that finds them, and writing them down) is timed in-process.
The figure is the server's own time for each
request, from its `Server-Timing: app;dur=…` header (the metrics middleware
measures from the request reaching the application to the response being
ready, so loopback transfer and the client are left out), as p50/p99, and
the size of the answer's body.  Searches vary their term on every request.

`--baseline DIR` runs another checkout's oracle (first on its PYTHONPATH);
one without Server-Timing is timed by the client instead (marked `client`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import oracle_process
from common import table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oracle.pagination import encode_cursor  # noqa: E402

WARM_UP = 3


def _kinds(devices: int, keys: list[str]) -> dict[str, object]:
    """Request kind → a function of the request's number giving its path."""
    middle = devices // 2
    middle_cursor = encode_cursor("devices:name", (f"device-{middle:06d}", keys[middle]))

    def term(n: int) -> str:
        return f"{random.Random(n).randrange(devices):06d}"[:5]  # matches 10 names
    return {
        "dashboard first page": lambda n: "/",
        "dashboard page in the middle (cursor)": lambda n: f"/?cursor={middle_cursor}",
        "dashboard search (name substring)": lambda n: f"/?q=device-{term(n)}",
        "dashboard filter (tag + state)": lambda n: f"/?tag=site-{n % 10}&state=active",
        "dashboard group page + member search": lambda n: (
            f"/groups/g{(n * 7919) % (devices // oracle_process.GROUP_SIZE):06d}"
            f"?find=device-{term(n)}"),
        "device page": lambda n: f"/devices/{keys[(n * 7919) % devices]}",
        "API first page (limit=50)": lambda n: "/v1/devices?limit=50",
        "API search (limit=50)": lambda n: f"/v1/devices?limit=50&q=device-{term(n)}",
        "API filter (tag camera, -enrolled)": lambda n: (
            "/v1/devices?limit=50&tag=camera&sort=-enrolled"),
        "dashboard filter (online)": lambda n: "/?online=true",
        "dashboard filter (offline + tag)": lambda n: f"/?online=false&tag=site-{n % 10}",
        "dashboard silent list": lambda n: "/?silent=true",
        "dashboard search (name substring, online)": lambda n: (
            f"/?q=device-{term(n)}&online=true"),
        "API filter (online=true, limit=50)": lambda n: "/v1/devices?limit=50&online=true",
    }


_SERVER_TIMING = re.compile(r"app;dur=([0-9.]+)")


async def _measure(base: str, username: str, password: str, kinds: dict[str, object],
                   requests: int, only: set[str] | None) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    jar = aiohttp.CookieJar(unsafe=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as http:
        async with http.post(f"{base}/login", data={"username": username, "password": password},
                             allow_redirects=False) as response:
            assert response.status == 303, await response.text()
        for name, path_of in kinds.items():
            if only is not None and name not in only:
                continue
            times, sizes, source = [], [], "server"
            for n in range(WARM_UP + requests):
                path = path_of(n)  # type: ignore[operator]
                started = time.perf_counter()
                async with http.get(base + path) as response:
                    body = await response.read()
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    assert response.status == 200, (path, response.status, body[:300])
                    timing = _SERVER_TIMING.search(response.headers.get("Server-Timing", ""))
                if n < WARM_UP:
                    continue
                if timing is None:
                    source = "client"
                times.append(float(timing.group(1)) if timing else elapsed_ms)
                sizes.append(len(body))
            results[name] = {"p50_ms": statistics.median(times),
                             "p99_ms": statistics.quantiles(times, n=100)[-1],
                             "bytes": int(statistics.median(sizes)), "timed_by": source,
                             "requests": requests}
            print(f"  {name}: p50 {results[name]['p50_ms']:.1f} ms", file=sys.stderr, flush=True)
    return results


def run(devices: int, requests: int, postgres: bool, baseline: str | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="continuum-bench-dashboard-") as tmp, \
            oracle_process.database(tmp, postgres) as database:
        started = time.monotonic()
        keys = asyncio.run(oracle_process.fill_fleet(database, devices))
        fill_s = time.monotonic() - started
        silence_s = asyncio.run(oracle_process.fill_presence(database, keys)) \
            if baseline is None else None
        oracle = oracle_process.configure(tmp, database, baseline)
        password = oracle.cli("create-admin", "bench").rsplit(": ", 1)[1]
        with oracle_process.serving(oracle, f"{tmp}/oracle.log"):
            kinds = _kinds(devices, keys)
            only = {"dashboard first page", "dashboard search (name substring)"} if baseline \
                else None
            results = asyncio.run(_measure(oracle.base, "bench", password, kinds, requests,
                                           only))
    return {"devices": devices, "database": "postgresql" if postgres else "sqlite",
            "baseline": baseline, "fill_s": fill_s, "silence_check_s": silence_s,
            "requests": results}


def render(runs: list[dict]) -> str:
    rows = [(f"{r['devices']:,}", r["database"], name, m["p50_ms"], m["p99_ms"], m["bytes"],
             m["timed_by"])
            for r in runs for name, m in r["requests"].items()]
    rows += [(f"{r['devices']:,}", r["database"], "silence watch, first pass (in-process)",
              r["silence_check_s"] * 1000, "", "", "wall") for r in runs
             if r.get("silence_check_s") is not None]
    return table(["devices", "db", "request", "p50 ms", "p99 ms", "bytes", "timed by"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="10000,100000",
                        help="comma-separated fleet sizes, one oracle each")
    parser.add_argument("--requests", type=int, default=60, help="measured requests per kind")
    parser.add_argument("--postgres", action="store_true",
                        help="a fresh database on PostgreSQL at 127.0.0.1:5432 instead of SQLite")
    parser.add_argument("--baseline", help="another checkout's top directory (its oracle code);"
                        " measures the first page and a search only")
    args = parser.parse_args()
    runs = []
    for devices in (int(n) for n in args.devices.split(",")):
        print(f"{devices:,} devices…", file=sys.stderr, flush=True)
        runs.append(run(devices, args.requests, args.postgres, args.baseline))
    print(render(runs))
    print(f"results: {write_results('oracle_dashboard', {'runs': runs})}")


if __name__ == "__main__":
    main()
