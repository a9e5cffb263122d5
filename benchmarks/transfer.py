"""Large transfers (SPEC §17): MB/s of a file from one device to another through one relay,
and what the relay holds meanwhile, on the memory and SQLite stores.

    .venv/bin/python benchmarks/transfer.py [--megabytes 20 100] [--stores memory sqlite]
                                            [--modes online stored] [--default-limits]

Each run starts a fresh relay process (its store as given) and two devices in this process,
each with its own home (state.db, partial files), as the library is used:

- `online`: the receiver is connected throughout; MB/s from `send_file` to the verified file
  surfacing at the receiver (`end to end`), and until the relay accepted every chunk (`sent`);
- `stored`: the receiver is away while the whole file is sent (the relay stores every chunk,
  the store-and-forward case), then connects and drains it: `sent` and `drained` MB/s.

Relay memory: VmRSS at the end and VmHWM (peak) of the relay process; for SQLite also the
database size on disk at the end of sending.  The relay is unthrottled (its per-device
message rate and mailbox budgets raised, `common.UNTHROTTLED`) unless `--default-limits`:
then its 50 messages/s per device bounds a transfer at 50 × 65 024 bytes ≈ 3.3 MB/s, and a
stored file past the 64 MiB mailbox budget waits (the sender paces itself) for the receiver.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from common import UNTHROTTLED, RelayProcess, memory_kib, table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from client import Device, PeerList  # noqa: E402
from client.backoff import Backoff  # noqa: E402
from proto import Identity  # noqa: E402

STORES = {"memory": "memory", "sqlite": "sqlite:///{tmp}/mailbox.sqlite3"}
LIMITS = (*UNTHROTTLED, "--sender-max-stored-bytes", str(1 << 31),
          "--store-max-bytes", str(1 << 32))


def _device(identity: Identity, relay: str, peer: Identity, home: Path) -> Device:
    return Device(identity, [relay], PeerList([peer.public]), home=home,
                  backoff=Backoff(0.05, 0.5), max_transfer_bytes=1 << 31)


async def _receive(device: Device) -> Path:
    async for received in device.files():
        return received.path
    raise RuntimeError("files() ended")


async def _run(relay: RelayProcess, source: Path, work: Path, mode: str) -> dict[str, float]:
    alice, bob = Identity.generate(), Identity.generate()
    size_mb = source.stat().st_size / 1e6
    result: dict[str, float] = {}
    async with _device(alice, relay.url, bob, work / "alice") as a:
        if mode == "online":
            async with _device(bob, relay.url, alice, work / "bob") as b:
                await b.wait_connected(20)
                started = time.perf_counter()
                receiving = asyncio.create_task(_receive(b))
                await a.send_file(bob.public, source, timeout=3600)
                result["sent MB/s"] = size_mb / (time.perf_counter() - started)
                path = await receiving
                result["end to end MB/s"] = size_mb / (time.perf_counter() - started)
        else:
            started = time.perf_counter()
            await a.send_file(bob.public, source, timeout=3600)
            result["sent MB/s"] = size_mb / (time.perf_counter() - started)
            result["relay RSS after sending MiB"] = memory_kib(relay.pid)["VmRSS"] / 1024
            async with _device(bob, relay.url, alice, work / "bob") as b:
                started = time.perf_counter()
                path = await _receive(b)
                result["drained MB/s"] = size_mb / (time.perf_counter() - started)
    if path.read_bytes() != source.read_bytes():
        raise RuntimeError("the file that arrived differs from the one sent")
    memory = memory_kib(relay.pid)
    result["relay RSS MiB"] = memory["VmRSS"] / 1024
    result["relay peak MiB"] = memory["VmHWM"] / 1024
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--stores", nargs="+", choices=sorted(STORES), default=["memory", "sqlite"])
    parser.add_argument("--modes", nargs="+", choices=["online", "stored"],
                        default=["online", "stored"])
    parser.add_argument("--default-limits", action="store_true",
                        help="the relay's default rate and budgets instead of unthrottled")
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="continuum-transfer-") as tmp:
        for megabytes in args.megabytes:
            source = Path(tmp) / f"file-{megabytes}MB.bin"
            with source.open("wb") as out:
                for _ in range(megabytes):
                    out.write(os.urandom(1_000_000))
            for store in args.stores:
                for mode in args.modes:
                    work = Path(tempfile.mkdtemp(dir=tmp))
                    flags = ("--log-level", "warning") if args.default_limits else LIMITS
                    with RelayProcess(*flags, store=STORES[store]) as relay:
                        figures = asyncio.run(_run(relay, source, work, mode))
                    results.append({"megabytes": megabytes, "store": store, "mode": mode,
                                    **figures})
                    rows.append([f"{megabytes} MB", store, mode,
                                 figures["sent MB/s"],
                                 figures.get("end to end MB/s", figures.get("drained MB/s")),
                                 figures.get("relay RSS after sending MiB", float("nan")),
                                 figures["relay RSS MiB"], figures["relay peak MiB"]])
                    print(f"{megabytes} MB {store} {mode}: {figures}", file=sys.stderr, flush=True)
    print(table(["file", "store", "mode", "sent MB/s", "end-to-end / drained MB/s",
                 "relay RSS stored MiB", "relay RSS end MiB", "relay peak MiB"], rows))
    print(f"results: {write_results('transfer', {'runs': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
