"""One member added to a large peer group: how long the oracle takes, and how long it stops answering.

    .venv/bin/python benchmarks/oracle_group_change.py [--devices 10000] [--group-size 1000]
    .venv/bin/python benchmarks/oracle_group_change.py --group-size 2500 --fresh-lists
    .venv/bin/python benchmarks/oracle_group_change.py --baseline /tmp/oraclefix-base

A SQLite oracle subprocess (this checkout's code, or `--baseline DIR`'s) over
a fleet filled directly (`oracle_process.fill_fleet`): `--devices` devices in
groups of `--group-size`, each already holding its peer list (issued, sent and
acknowledged, as an oracle that built the groups would have left them; with
`--fresh-lists` none was ever issued, as `fill_fleet` alone leaves it, so the
first change issues every device's), and one more device in no group.  A relay
process (unthrottled) takes the oracle's pushes.  With a bearer token, the
script PUTs that device into the first group and measures:

  answered   the PUT's answer (the lists are issued, in one transaction)
  sent       every new list is stored by the relay (`/v1/status` has no pending push),
             given up after SEND_TIMEOUT_S
  /healthz   the slowest of the `/healthz` requests sent every 20 ms on another
             connection from the PUT until `sent`: how long the oracle stopped answering
  stop       SIGTERM to exit, sent right after `sent`

A group of more than 1,025 members gives lists of more than the 1,024 peers a
PEER_CHANGE carries (SPEC §6): this code refuses such an add (409).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import oracle_process
from common import UNTHROTTLED, RelayProcess, table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oracle.db import open_database  # noqa: E402
from oracle.registry import Registry  # noqa: E402
from proto import Identity  # noqa: E402

SEND_TIMEOUT_S = 180.0  # then "all lists sent" is reported as not reached, with what is left


async def _fill(database: str, devices: int, issue_lists: bool) -> str:
    """The fleet, and one device in no group: its key."""
    await oracle_process.fill_fleet(database, devices)
    outsider = Identity.generate().public.text
    db = await open_database(database)
    try:
        await db.execute("INSERT INTO devices (key, name, tags, enrolled_at_ms)"
                         " VALUES ($1, 'outsider', '', 1)", outsider)
        if issue_lists:
            await Registry(db, lambda: None).reissue_peer_lists()
            async with db.transaction() as conn:
                await conn.execute("UPDATE peer_changes SET sent_at_ms = 1, acked_at_ms = 1")
                await conn.execute("UPDATE devices SET acked_version = peer_version")
    finally:
        await db.close()
    return outsider


async def _probe(base: str, slowest: list[float], stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        while not stop.is_set():
            started = time.monotonic()
            async with http.get(base + "/healthz") as response:
                await response.read()
            slowest[0] = max(slowest[0], time.monotonic() - started)
            await asyncio.sleep(0.02)


async def _measure(base: str, token: str, outsider: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {token}"}
    slowest, stop = [0.0], asyncio.Event()
    async with aiohttp.ClientSession(headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=900)) as http:
        probe = asyncio.create_task(_probe(base, slowest, stop))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        async with http.put(f"{base}/v1/groups/g000000/members/{outsider}") as response:
            status, body = response.status, await response.text()
        answered = time.monotonic() - started
        sent, pending = None, None
        while status == 200 and time.monotonic() - started < SEND_TIMEOUT_S:
            async with http.get(base + "/v1/status") as response:
                pending = (await response.json())["pending_pushes"]
            if pending == 0:
                sent = time.monotonic() - started
                break
            await asyncio.sleep(0.1)
        stop.set()
        await probe
    return {"status": status, "answer": body[:300] if status != 200 else "",
            "answered_s": answered, "sent_s": sent, "pending_at_end": pending,
            "slowest_healthz_s": slowest[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--group-size", type=int, default=1000)
    parser.add_argument("--fresh-lists", action="store_true",
                        help="no list issued yet: the first change issues every device's")
    parser.add_argument("--baseline", help="another checkout's oracle code")
    args = parser.parse_args()
    oracle_process.GROUP_SIZE = args.group_size
    with tempfile.TemporaryDirectory() as tmp, RelayProcess(*UNTHROTTLED) as relay:
        database = f"sqlite:///{tmp}/oracle.db"
        outsider = asyncio.run(_fill(database, args.devices, not args.fresh_lists))
        oracle = oracle_process.configure(tmp, database, args.baseline, relays=relay.url)
        token = oracle.write_token("bench")
        with oracle_process.serving(oracle, f"{tmp}/oracle.log") as process:
            result = asyncio.run(_measure(oracle.base, token, outsider))
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
                result["stop_s"] = time.monotonic() - started
            except subprocess.TimeoutExpired:
                result["stop_s"] = None
    code = args.baseline or "this checkout"
    print(f"one member added to a group of {args.group_size} ({args.devices} devices,"
          f" {'no list issued yet' if args.fresh_lists else 'lists already issued'}),"
          f" SQLite oracle ({code}), one relay process:")
    print(table(["answer", "answered", "all lists sent", "slowest /healthz", "SIGTERM→exit"],
                [[result["status"], f"{result['answered_s']:.2f} s",
                  ("-" if result["status"] != 200 else
                   f"not in {SEND_TIMEOUT_S:.0f} s ({result['pending_at_end']} left)")
                  if result["sent_s"] is None else f"{result['sent_s']:.1f} s",
                  f"{result['slowest_healthz_s'] * 1000:.0f} ms",
                  "-" if result["stop_s"] is None else f"{result['stop_s']:.1f} s"]]))
    if result["answer"]:
        print("answer:", result["answer"])
    print("results:", write_results("oracle_group_change", {**vars(args), **result}))


if __name__ == "__main__":
    main()
