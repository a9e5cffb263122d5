"""Presence (SPEC §20): what the oracle absorbs, and what a connect/disconnect costs a relay.

    .venv/bin/python benchmarks/presence_ingest.py [--devices 10000] [--postgres]

Oracle side: an oracle subprocess (its CLI, like oracle_dashboard.py) with
`--devices` devices filled directly, and one relay key it accepts.  The client
signs reports as a relay does and POSTs them one at a time:

- a snapshot of every device (parts of 10,000 connections), as after an oracle
  restart: seconds per part and connections/s;
- 200 changes reports of 100 connections each (50 new connections, 50 of them
  ended), as a relay with heavy churn sends every 2 s: reports/s and
  connections/s, server time (`Server-Timing`) p50/p99;
- the same from 4 relay processes at once (4 reports applied concurrently, the
  oracle's limit): reports/s in all.

Relay side, in-process, best of 5 slices: µs of `PresenceTracker` per connect +
disconnect, and µs per connection entry to build, encode and sign a 1,000-entry
report; against the relay's share of a handshake from `protocol_cost.py` in the
same run, as a ratio.  Printed, never asserted; the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import oracle_process
import protocol_cost
from common import best_us, table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from continuum.presence import ConnectionCounts, PresenceTracker  # noqa: E402
from proto import Identity, PublicKey  # noqa: E402
from proto.presence import (MAX_PRESENCE_CONNECTIONS, PRESENCE_CONTENT_TYPE,  # noqa: E402
                            PRESENCE_PATH, ConnectionState, PresenceReport)
from runtime.clock import now_ms  # noqa: E402

CHANGES_REPORTS = 200
CHANGES_SIZE = 100
CONCURRENT_RELAYS = 4
_SERVER_TIMING = re.compile(r"app;dur=([0-9.]+)")


class BenchRelay:
    """One relay process's reports: its instance, its sequence, signed with the relay key."""

    def __init__(self, identity: Identity, oracle: PublicKey) -> None:
        self.identity, self.oracle = identity, oracle
        self.instance, self.sequence = os.urandom(16), 0

    def report(self, connections: list[ConnectionState], snapshot_from: int = 0,
               last: bool = False) -> bytes:
        self.sequence += 1
        return PresenceReport(self.identity.public, self.oracle, now_ms(), os.urandom(16),
                              self.instance, self.sequence, 90_000, snapshot_from, last,
                              tuple(connections)).sign(self.identity)


async def _post(http: aiohttp.ClientSession, url: str, body: bytes) -> float:
    async with http.post(url, data=body, headers={"Content-Type": PRESENCE_CONTENT_TYPE}) as r:
        text = await r.text()
        assert r.status == 200, (r.status, text[:200])
        timing = _SERVER_TIMING.search(r.headers.get("Server-Timing", ""))
        assert timing is not None
        return float(timing.group(1))


async def _oracle_side(base: str, keys: list[str], identity: Identity,
                       oracle_key: PublicKey) -> dict[str, object]:
    url = base + PRESENCE_PATH
    devices = [PublicKey.from_text(k) for k in keys]
    results: dict[str, object] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        relay = BenchRelay(identity, oracle_key)
        start = now_ms() - 3_600_000
        connected = {d: start for d in devices}
        parts = [devices[i:i + MAX_PRESENCE_CONNECTIONS]
                 for i in range(0, len(devices), MAX_PRESENCE_CONNECTIONS)]
        first = relay.sequence + 1
        began = time.perf_counter()
        server = []
        for n, part in enumerate(parts):
            body = relay.report([ConnectionState(d, start, None, 1, 1, 0) for d in part],
                                first, n == len(parts) - 1)
            server.append(await _post(http, url, body))
        wall = time.perf_counter() - began
        results["snapshot"] = {"connections": len(devices), "reports": len(parts),
                               "wall_s": wall, "server_ms_per_report": statistics.mean(server),
                               "connections_per_s": len(devices) / wall}

        async def churn(relay: BenchRelay, offset: int) -> list[float]:
            times = []
            for n in range(CHANGES_REPORTS):
                now = now_ms()
                entries = []
                for i in range(CHANGES_SIZE // 2):
                    device = devices[(offset + n * CHANGES_SIZE + i) % len(devices)]
                    began_at = connected[device]
                    entries.append(ConnectionState(device, began_at, now, 3, 2, 0))
                    connected[device] = now + 1
                    entries.append(ConnectionState(device, now + 1, None, 0, 0, 0))
                times.append(await _post(http, url, relay.report(entries)))
            return times

        began = time.perf_counter()
        server = await churn(relay, 0)
        wall = time.perf_counter() - began
        results["changes, one relay"] = {
            "reports_per_s": CHANGES_REPORTS / wall,
            "connections_per_s": CHANGES_REPORTS * CHANGES_SIZE / wall,
            "server_p50_ms": statistics.median(server),
            "server_p99_ms": statistics.quantiles(server, n=100)[-1]}

        relays = [BenchRelay(identity, oracle_key) for _ in range(CONCURRENT_RELAYS)]
        for r in relays:  # each announces itself with an empty snapshot first
            await _post(http, url, r.report([], r.sequence + 1, True))
        share = len(devices) // CONCURRENT_RELAYS
        began = time.perf_counter()
        timings = await asyncio.gather(*(churn(r, i * share) for i, r in enumerate(relays)))
        wall = time.perf_counter() - began
        flat = [t for ts in timings for t in ts]
        results[f"changes, {CONCURRENT_RELAYS} relays at once"] = {
            "reports_per_s": len(flat) / wall,
            "connections_per_s": len(flat) * CHANGES_SIZE / wall,
            "server_p50_ms": statistics.median(flat),
            "server_p99_ms": statistics.quantiles(flat, n=100)[-1]}
    return results


def oracle_side(devices: int, postgres: bool) -> dict[str, object]:
    identity = Identity.generate()
    with tempfile.TemporaryDirectory(prefix="continuum-bench-presence-") as tmp, \
            oracle_process.database(tmp, postgres) as database:
        keys = asyncio.run(oracle_process.fill_fleet(database, devices))
        oracle = oracle_process.configure(tmp, database, relay_keys=identity.public.text)
        oracle_key = PublicKey.from_text(oracle.cli("show-key").split()[-1])
        with oracle_process.serving(oracle, f"{tmp}/oracle.log"):
            return asyncio.run(_oracle_side(oracle.base, keys, identity, oracle_key))


def relay_side() -> dict[str, float]:
    """µs a relay spends on presence per connect + disconnect and per report entry."""
    keys = [Identity.generate().public for _ in range(1000)]
    tracker = PresenceTracker(bytes(16))
    counts = ConnectionCounts()
    position = iter(range(10**9))

    def connect_disconnect() -> None:
        tracker.disconnected(tracker.connected(keys[next(position) % 1000], 1, counts), 2)

    per_connection = best_us(connect_disconnect)
    relay, oracle = Identity.generate(), Identity.generate().public
    entries = tuple(ConnectionState(k, 1000 + n, 2000 + n, 3, 2, 1) for n, k in enumerate(keys))

    def build_and_sign() -> bytes:
        return PresenceReport(relay.public, oracle, now_ms(), os.urandom(16), bytes(16), 1,
                              90_000, 0, False, entries).sign(relay)

    per_entry = best_us(build_and_sign) / len(entries)
    handshake = protocol_cost.measure()["handshake_both_sides_us"]
    return {"tracker_us_per_connect_disconnect": per_connection,
            "report_us_per_entry": per_entry,
            "presence_us_per_connect_disconnect": per_connection + per_entry,
            "handshake_both_sides_us": handshake,
            "ratio_to_handshake": (per_connection + per_entry) / handshake}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--postgres", action="store_true",
                        help="a fresh database on PostgreSQL at 127.0.0.1:5432 instead of SQLite")
    args = parser.parse_args()
    relay = relay_side()
    print(f"oracle with {args.devices:,} devices…", file=sys.stderr, flush=True)
    oracle = oracle_side(args.devices, args.postgres)
    database = "postgresql" if args.postgres else "sqlite"
    rows = []
    for name, figures in oracle.items():
        rows.append([database, name, f"{figures.get('reports_per_s', 0):.1f}",
                     f"{figures['connections_per_s']:,.0f}",
                     f"{figures.get('server_p50_ms', figures.get('server_ms_per_report', 0)):.1f}",
                     f"{figures.get('server_p99_ms', 0):.1f}"])
    print(table(["db", "oracle absorbs", "reports/s", "connections/s", "server p50 ms",
                 "p99 ms"], rows))
    print(table(["relay, per connect + disconnect", "µs"], [
        ["PresenceTracker (connect, disconnect)", f"{relay['tracker_us_per_connect_disconnect']:.2f}"],
        ["report entry (build, encode, sign; 1,000 per report)", f"{relay['report_us_per_entry']:.2f}"],
        ["presence in all", f"{relay['presence_us_per_connect_disconnect']:.2f}"],
        ["handshake, both sides (protocol_cost.py)", f"{relay['handshake_both_sides_us']:.1f}"],
        ["presence / handshake", f"{relay['ratio_to_handshake']:.3f}"]]))
    print(f"results: {write_results('presence_ingest', {'devices': args.devices, 'database': database, 'oracle': oracle, 'relay': relay})}")


if __name__ == "__main__":
    main()
