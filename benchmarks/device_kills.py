"""Device durability: messages lost across SIGKILLs of a sending device, and what durability costs.

Part 1, kills.  A `continuum-client send BOB --lines` process gets a line
every 2 ms on stdin and sends each as a message through a relay (SQLite
store).  Once it has reported its first ACCEPTED, it is SIGKILLed after a
random delay (uniform in 0–300 ms), so kills land anywhere: while sealing, in
the state file's commit, between SEND and ACCEPTED, while recording
ACCEPTED, while printing.  After each kill the messages the process made
durable are read from its state file (outbox, and the messages it tracks).
After all kills one `flush` sends what is left; then the recipient's
mailbox is drained with a raw connection and compared:

  lost                 durable, but never delivered (must be 0)
  reported, lost       printed "accepted" to the caller, never delivered (must be 0)
  delivered twice      the same msg_id delivered twice by the relay (REPLAY keeps it 0)

Part 2, latency.  In one process, `Device.send` (seal, outbox, SEND, wait
for ACCEPTED) with a home (the SQLite state file, synchronous=FULL) and
without one (memory), alternating blocks of 50 sends against the same
relay, so both see the same machine; p50/p99 of each and the difference.

Run:  .venv/bin/python benchmarks/device_kills.py [--kills 100] [--sends 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import UNTHROTTLED, RelayProcess, percentiles, table, write_results  # noqa: E402

from client import Device, PeerList  # noqa: E402
from proto import Identity, decode_envelope  # noqa: E402
from wire import RawDevice  # noqa: E402

CLIENT = str(Path(sys.executable).parent / "continuum-client")
_BLOCK = 50


def cli(home: Path, *args: str) -> str:
    result = subprocess.run([CLIENT, "--home", str(home), *args], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"continuum-client {' '.join(args)}: {result.stderr}")
    return result.stdout


def durable_ids(home: Path) -> set[bytes]:
    """msg_ids the device wrote to its state file: in the outbox or tracked as sent.  Read
    with a connection that may write: after a SIGKILL mid-commit the first reader rebuilds
    the WAL index, which a read-only one cannot do."""
    db = sqlite3.connect(home / "state.db")
    try:
        queued = {decode_envelope(raw).msg_id for (raw,) in db.execute("SELECT envelope FROM outbox")}
        tracked = {msg_id for (msg_id,) in db.execute("SELECT msg_id FROM sent")}
    finally:
        db.close()
    return queued | tracked


def one_killed_run(home: Path, relay_url: str, bob: str, number: int,
                   rng: random.Random) -> set[bytes]:
    """Start `send --lines`, feed it, SIGKILL it mid-stream; the msg_ids it reported accepted."""
    process = subprocess.Popen([CLIENT, "--home", str(home), "--relay", relay_url, "send", bob,
                                "--lines", "--timeout", "30"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdin is not None and process.stdout is not None
    stop = threading.Event()
    reported: set[bytes] = set()
    first = threading.Event()

    def feed() -> None:
        line = 0
        try:
            while not stop.is_set():
                process.stdin.write(f"kill{number}-line{line}\n".encode())  # type: ignore[union-attr]
                process.stdin.flush()  # type: ignore[union-attr]
                line += 1
                time.sleep(0.002)
        except (BrokenPipeError, ValueError):
            pass

    def read() -> None:
        for raw in process.stdout:  # type: ignore[union-attr]
            words = raw.split()
            if words[:1] == [b"accepted"]:
                reported.add(bytes.fromhex(words[1].decode()))
                first.set()

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=read, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        if not first.wait(30):
            raise RuntimeError("the sender reported nothing accepted within 30 s")
        time.sleep(rng.uniform(0.0, 0.3))
    finally:
        process.kill()  # SIGKILL, by pid
        process.wait(10)
        stop.set()
        for thread in threads:
            thread.join(5)
    return reported


async def drain(relay_url: str, bob: Identity, quiet_s: float = 2.0) -> list[bytes]:
    """Every msg_id delivered to bob, in order, until the mailbox is quiet."""
    received: list[bytes] = []
    async with await RawDevice.connect(relay_url, bob) as receiver:
        while True:
            try:
                delivery = await receiver.next_delivery(timeout=quiet_s)
            except (TimeoutError, asyncio.TimeoutError):
                return received
            received.append(decode_envelope(delivery.envelope).msg_id)


def kills(relay_url: str, work: Path, count: int, seed: int) -> dict[str, int]:
    alice_home, bob_home = work / "alice", work / "bob"
    cli(alice_home, "keygen")
    bob = cli(bob_home, "keygen").strip()
    cli(alice_home, "peers", "add", bob)
    rng = random.Random(seed)
    durable: set[bytes] = set()
    reported: set[bytes] = set()
    for number in range(count):
        reported |= one_killed_run(alice_home, relay_url, bob, number, rng)
        durable |= durable_ids(alice_home)
    cli(alice_home, "--relay", relay_url, "flush", "--timeout", "60")
    received = asyncio.run(drain(relay_url, Identity.load(bob_home / "identity.key")))
    return {"kills": count, "durable": len(durable), "reported_accepted": len(reported),
            "delivered": len(set(received)), "lost": len(durable - set(received)),
            "reported_lost": len(reported - set(received)),
            "delivered_twice": len(received) - len(set(received))}


async def latency(relay_url: str, work: Path, sends: int) -> dict[str, dict[str, float]]:
    bob = Identity.generate().public
    samples: dict[str, list[int]] = {"memory": [], "home": []}
    async with Device(Identity.generate(), [relay_url], PeerList([bob])) as memory, \
            Device(Identity.generate(), [relay_url], PeerList([bob]), home=work / "home") as home:
        for device in (memory, home):
            await device.wait_connected(timeout=10)
            await device.send([bob], b"warm-up", timeout=10)
        for block in range(sends // _BLOCK):
            order = [("memory", memory), ("home", home)]
            for name, device in order if block % 2 == 0 else order[::-1]:
                for _ in range(_BLOCK):
                    started = time.perf_counter_ns()
                    await device.send([bob], b"reading=21.5C", timeout=10)
                    samples[name].append(time.perf_counter_ns() - started)
    figures = {name: percentiles(values) for name, values in samples.items()}
    figures["added"] = {point: figures["home"][point] - figures["memory"][point]
                        for point in ("p50", "p99")}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--sends", type=int, default=1000, help="per variant, for the latency")
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="continuum-device-kills-") as scratch, \
            RelayProcess(*UNTHROTTLED, store="sqlite:///{tmp}/mail.db") as relay:
        work = Path(scratch)
        lost = kills(relay.url, work, args.kills, args.seed)
        delays = asyncio.run(latency(relay.url, work, args.sends))
    print(table(["kills", "durable", "reported accepted", "delivered", "lost", "reported, lost",
                 "delivered twice"],
                [[lost["kills"], lost["durable"], lost["reported_accepted"], lost["delivered"],
                  lost["lost"], lost["reported_lost"], lost["delivered_twice"]]]))
    print()
    print(table(["send → ACCEPTED", "p50 ms", "p99 ms"],
                [[name, delays[name]["p50"], delays[name]["p99"]]
                 for name in ("memory", "home", "added")]))
    path = write_results("device_kills", {"kills": lost, "latency_ms": delays,
                                          "sends_per_variant": args.sends})
    print(f"\nresults: {path}")
    if lost["lost"] or lost["reported_lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
