"""Calls (SPEC §18): round trip through one relay, against a plain DATA message round trip.

    .venv/bin/python benchmarks/calls.py [--calls 1000] [--stores memory,sqlite] [--body 64]

For each store (`memory`: mailboxes in the relay's Python structures; `sqlite`: the
embedded SQLite store in a file), one relay process (the CLI, unthrottled) and two
devices of the library in this process, alice and bob, each other's peers:

- `call`: alice calls bob's "echo" method (the handler returns the body) `--calls` times,
  one after the other; a round trip is `await alice.call(...)`, from sealing the CALL to
  the matching RESPONSE opened;
- `DATA`: the baseline, in the same run: alice sends a DATA message, bob's application
  takes it from `messages()` and sends it back as DATA, alice takes that; a round trip is
  from `alice.send(...)` to alice holding the answer.  Each DATA message also costs a
  RECEIPT back (the library sends one per message taken), which a call does not.

Both devices share this process's event loop (and a core), as two devices on one small
machine would not: the figures are an upper bound on the protocol's own cost.  The first
50 round trips of each path are a warm-up, not counted.  Prints p50/p90/p99/max in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import UNTHROTTLED, RelayProcess, percentiles, table, write_results  # noqa: E402

from client import Device, IncomingCall, PeerList  # noqa: E402
from proto import Identity  # noqa: E402

WARM_UP = 50
STORES = {"memory": "memory", "sqlite": "sqlite:///{tmp}/mailboxes.db"}


async def echo(call: IncomingCall) -> bytes:
    return call.body


async def call_round_trips(alice: Device, bob: Identity, body: bytes, count: int) -> list[int]:
    samples = []
    for _ in range(WARM_UP + count):
        start = time.perf_counter_ns()
        result = await alice.call(bob.public, "echo", body, timeout=30)
        samples.append(time.perf_counter_ns() - start)
        assert result.ok and result.body == body
    return samples[WARM_UP:]


async def data_round_trips(alice: Device, bob_device: Device, bob: Identity, body: bytes,
                           count: int) -> list[int]:
    async def bounce() -> None:
        async with contextlib.aclosing(bob_device.messages()) as messages:
            async for message in messages:
                await bob_device.send([message.sender], message.payload, timeout=30)

    bouncer = asyncio.create_task(bounce())
    samples = []
    try:
        async with contextlib.aclosing(alice.messages()) as answers:
            for _ in range(WARM_UP + count):
                start = time.perf_counter_ns()
                await alice.send([bob.public], body, timeout=30)
                answer = await anext(answers)
                samples.append(time.perf_counter_ns() - start)
                assert answer.payload == body
    finally:
        bouncer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bouncer
    return samples[WARM_UP:]


async def measure(url: str, count: int, body: bytes) -> dict[str, dict[str, float]]:
    alice, bob = Identity.generate(), Identity.generate()
    async with Device(alice, [url], PeerList([bob.public])) as a, \
            Device(bob, [url], PeerList([alice.public])) as b:
        b.on_call("echo", echo)
        await a.wait_connected(20)
        await b.wait_connected(20)
        calls = await call_round_trips(a, bob, body, count)
        data = await data_round_trips(a, b, bob, body, count)
        assert a.stats.responses_late == a.stats.responses_unmatched == 0
    return {"call": percentiles(calls, (50, 90, 99)), "DATA": percentiles(data, (50, 90, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="round trips per path and store")
    parser.add_argument("--stores", default="memory,sqlite",
                        help=f"comma-separated, of {', '.join(STORES)}")
    parser.add_argument("--body", type=int, default=64, help="bytes of body each way")
    args = parser.parse_args()
    body = b"x" * args.body
    results: dict[str, dict[str, dict[str, float]]] = {}
    for store in args.stores.split(","):
        with RelayProcess(*UNTHROTTLED, store=STORES[store]) as relay:
            results[store] = asyncio.run(measure(relay.url, args.calls, body))
    rows = [(store, path, figures["p50"], figures["p90"], figures["p99"], figures["max"])
            for store, paths in results.items() for path, figures in paths.items()]
    print(f"\n{args.calls} sequential round trips per row, {args.body}-byte body, one relay:")
    print(table(["store", "path", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows))
    print(f"results: {write_results('calls', {'calls': args.calls, 'body': args.body, **results})}")


if __name__ == "__main__":
    main()
