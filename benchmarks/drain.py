"""Store-and-forward: time for a reconnecting device to drain a mailbox of 10k messages.

A device that was offline comes back to a full mailbox; how long until all of
it is delivered and acked (the relay's acked counter says so) bounds how
fast a fleet recovers after an outage.  Measured for the in-memory store and
the SQLite file store, each on its own relay; the fill rate (one sender,
window of 64 un-answered SENDs) is reported too.

    .venv/bin/python benchmarks/drain.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from proto import Identity
from proto.frames import FrameType

from common import UNTHROTTLED, RelayProcess, raise_nofile, table, write_results
from wsclient import ack_frame, connect, deliver_parts, frame_type, sealed_sends

STORES = ("memory", "sqlite:///{tmp}/mailbox.sqlite3")
_WINDOW = 64
_TIMEOUT_S = 120.0


async def _fill(url: str, sender: Identity, frames: list[tuple[bytes, bytes]]) -> float:
    """Send everything with a window of un-answered SENDs; seconds until the last ACCEPTED."""
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, url, sender)
        started = time.monotonic()
        answered = sent = 0
        while answered < len(frames):
            while sent < len(frames) and sent - answered < _WINDOW:
                await ws.send(frames[sent][1])
                sent += 1
            data = await ws.receive()
            if data is None:
                raise ConnectionError("relay closed during fill")
            if frame_type(data) != FrameType.ACCEPTED:
                raise RuntimeError(f"SEND refused during fill: {data!r}")
            answered += 1
        elapsed = time.monotonic() - started
        await ws.close()
    return elapsed


async def _drain(relay: RelayProcess, recipient: Identity, count: int) -> dict[str, float]:
    """Connect, take and ACK every delivery; stop the clock when the relay has counted every ACK."""
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        ws = await connect(http, relay.url, recipient)
        connected = time.monotonic()
        got = 0
        while got < count:
            data = await ws.receive()
            if data is None:
                raise ConnectionError("relay closed during drain")
            if frame_type(data) == FrameType.DELIVER:
                tag, _ = deliver_parts(data)
                await ws.send(ack_frame(tag))
                got += 1
        last_delivery = time.monotonic()
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, relay.metric,
                                         "continuum_messages_acked_total") < count:
            await asyncio.sleep(0.005)
        acked = time.monotonic()
        await ws.close()
    return {"handshake_s": connected - started, "last_delivery_s": last_delivery - started,
            "all_acked_s": acked - started}


async def _one_store(store: str, sender: Identity, recipient: Identity,
                     frames: list[tuple[bytes, bytes]]) -> dict[str, object]:
    with RelayProcess(*UNTHROTTLED, store=store) as relay:
        async with asyncio.timeout(_TIMEOUT_S):
            fill_s = await _fill(relay.url, sender, frames)
            drained = await _drain(relay, recipient, len(frames))
    return {"store": store, "messages": len(frames), "fill_s": fill_s,
            "fill_per_s": len(frames) / fill_s, **drained,
            "drain_per_s": len(frames) / drained["all_acked_s"]}


def benchmark(*, quick: bool) -> dict[str, object]:
    raise_nofile()
    count = 1_000 if quick else 10_000
    sender, recipient = Identity.generate(), Identity.generate()
    # Sealed once: each store runs on its own relay, so the same envelopes are fresh to both.
    frames = sealed_sends(sender, recipient.public, count, 64)
    return {"runs": [asyncio.run(_one_store(store, sender, recipient, frames))
                     for store in STORES]}


def render(result: dict) -> str:
    rows = [(r["store"].replace("{tmp}/", ""), r["messages"], r["fill_per_s"], r["all_acked_s"],
             r["drain_per_s"]) for r in result["runs"]]
    return table(["store", "messages", "fill msg/s", "drain s (to all acked)", "drain msg/s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 messages instead of 10,000")
    args = parser.parse_args()
    result = benchmark(quick=args.quick)
    print(render(result))
    print(f"results: {write_results('drain', result)}")


if __name__ == "__main__":
    main()
