"""What an embedded store costs the relay per message, and what it adds to a garbage collection.

    .venv/bin/python benchmarks/store_cost.py [--messages 20000] [--held 200000]
                                              [--remembered 1000000] [--stores memory,sqlite://:memory:]

For each store, in this process (no relay, no sockets): CPU µs per message of the store
calls a relay makes for a message delivered to a device that keeps up (accept, fetch,
ack), 64-byte payloads, one recipient.  Then, each in a fresh process: a store holding
`--held` messages unread, and one that has delivered and acked `--remembered` (their ids
still in the replay window): the time of one full collection (`gc.collect()`), which
stops the event loop for as long, and the peak RSS it added per message (over the same
process with an empty store).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator

from common import table, write_results

from continuum.store import MailboxLimits, MailboxStore, open_store
from proto import Envelope, Identity, Kind, seal_envelope

ROOMY = MailboxLimits(max_messages=10**7, max_bytes=10**12, sender_max_bytes=10**12,
                      store_max_bytes=10**12)
MAILBOX_MESSAGES = 10_000  # held messages are spread over mailboxes of this many


def _envelopes(count: int, recipient: Identity) -> Iterator[Envelope]:
    """`count` envelopes of one sealing with fresh ids (sealing each costs more than the
    store), made one at a time so that only what the store keeps of them stays."""
    sealed = seal_envelope(Identity.generate(), Kind.DATA, [recipient.public], b"x" * 64,
                           ttl_s=3_600, now_ms=int(time.time() * 1000))
    return (dataclasses.replace(sealed, msg_id=n.to_bytes(16, "big")) for n in range(count))


async def _deliver_all(store: MailboxStore, envelopes: Iterable[Envelope],
                       reader: Identity) -> None:
    for envelope in envelopes:
        await store.accept(envelope, replay_until_ms=envelope.expires_at_ms, limits=ROOMY)
        (entry,) = await store.fetch(reader.public, None, 1)
        await store.ack(reader.public, entry.tag)


async def cost_per_message(url: str, messages: int) -> float:
    store, reader = open_store(url), Identity.generate()
    await _deliver_all(store, _envelopes(2_000, reader), reader)  # warm up
    envelopes = list(_envelopes(messages, reader))
    started = time.process_time()
    await _deliver_all(store, envelopes, reader)
    elapsed = time.process_time() - started
    await store.close()
    return elapsed / messages * 1e6


async def collection(url: str, held: int, remembered: int) -> dict[str, float]:
    """In a process of its own (see main): fill a store, time one full collection."""
    gc.collect()
    gc.freeze()  # what the process held before the store is not the store's
    store = open_store(url)
    for start in range(0, held, MAILBOX_MESSAGES):
        reader = Identity.generate()
        for envelope in _envelopes(min(MAILBOX_MESSAGES, held - start), reader):
            await store.accept(envelope, replay_until_ms=envelope.expires_at_ms, limits=ROOMY)
    reader = Identity.generate()
    await _deliver_all(store, _envelopes(remembered, reader), reader)
    started = time.perf_counter()
    gc.collect()
    return {"full_collection_ms": (time.perf_counter() - started) * 1e3,
            "tracked_objects": len(gc.get_objects()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _collection_in_child(url: str, held: int, remembered: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child", url, str(held), str(remembered)],
                          capture_output=True, text=True, check=True, timeout=900)
    return json.loads(done.stdout)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        url, held, remembered = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(asyncio.run(collection(url, held, remembered))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--held", type=int, default=200_000)
    parser.add_argument("--remembered", type=int, default=1_000_000)
    parser.add_argument("--stores", default="memory,sqlite://:memory:")
    args = parser.parse_args()
    results: dict[str, dict[str, object]] = {}
    for url in args.stores.split(","):
        results[url] = {
            "us_per_message": asyncio.run(cost_per_message(url, args.messages)),
            "empty": _collection_in_child(url, 0, 0),
            "held": _collection_in_child(url, args.held, 0),
            "remembered": _collection_in_child(url, 0, args.remembered)}

    def per_message(run: dict, empty: dict, count: int) -> str:
        return f"{(run['peak_rss_mib'] - empty['peak_rss_mib']) * 2**20 / max(count, 1):.0f}"

    rows = [(url, f"{r['us_per_message']:.1f}",
             f"{r['held']['full_collection_ms']:.1f}",
             per_message(r["held"], r["empty"], args.held),
             f"{r['remembered']['full_collection_ms']:.1f}",
             per_message(r["remembered"], r["empty"], args.remembered))
            for url, r in results.items()]
    print(table(["store", "CPU µs/msg (accept+fetch+ack)",
                 f"full GC ms, {args.held:,} held", "RSS bytes per held",
                 f"full GC ms, {args.remembered:,} remembered", "RSS bytes per remembered"],
                rows))
    print(f"results: {write_results('store_cost', {'args': vars(args), 'stores': results})}")


if __name__ == "__main__":
    main()
