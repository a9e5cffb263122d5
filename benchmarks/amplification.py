"""Storage amplification: what 40 sends of one 64 KiB envelope to 64 recipients make a relay hold.

    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/amplification.py [--baseline /tmp/base] [--sends 40]

For each checkout (the baseline's relay code first on its PYTHONPATH, then
this one) and each store, one relay process (the CLI, defaults otherwise)
gets one warm-up send and then `--sends` SENDs of a fresh ~64 KiB envelope
to the same 64 random, valid recipients (the attack of issue 13, item 5), all
from one connection, every one answered before the next.  Measured: growth
of the relay's RSS (`--store memory`: the mailboxes live in the process) and
of a private redis-server's `used_memory` (`--store redis://…`), each divided
by the bytes sent.  Stored once, the ratio is about 1; stored per recipient,
about 64.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from common import RelayProcess, memory_kib, table, write_results
from proto import Identity, Kind, PublicKey, seal_envelope
from proto.frames import FrameType, Send, encode_frame
from replicas import RedisServerProcess
from wsclient import connect, frame_type

ENVELOPE_LIMIT = 65_536
RECIPIENTS = 64


def envelopes(sender: Identity, recipients: list[PublicKey], count: int) -> list[bytes]:
    """`count` SEND frames, each an envelope to `recipients` just under the 64 KiB limit."""
    now = time.time_ns() // 1_000_000

    def seal(size: int) -> bytes:
        return seal_envelope(sender, Kind.DATA, recipients, b"x" * size, ttl_s=3600,
                             now_ms=now).raw

    overhead = len(seal(0))
    return [encode_frame(Send(seal(ENVELOPE_LIMIT - overhead - 8))) for _ in range(count)]


async def send_all(url: str, sender: Identity, frames: list[bytes]) -> int:
    """Send each frame and wait for its answer; returns how many were ACCEPTED."""
    accepted = 0
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, url, sender)
        for frame in frames:
            await ws.send(frame)
            answer = await ws.receive(timeout=30)
            accepted += answer is not None and frame_type(answer) == FrameType.ACCEPTED
        await ws.close()
    return accepted


def measure(code_dir: str | None, store: str, sends: int) -> dict[str, object]:
    sender = Identity.generate()
    recipients = [Identity.generate().public for _ in range(RECIPIENTS)]
    warm_up, *frames = envelopes(sender, recipients, sends + 1)
    sent = sum(len(frame) for frame in frames)
    if store == "memory":
        with RelayProcess(store="memory", code_dir=code_dir) as relay:
            asyncio.run(send_all(relay.url, sender, [warm_up]))
            before = memory_kib(relay.pid)["VmRSS"] * 1024
            accepted = asyncio.run(send_all(relay.url, sender, frames))
            grown = memory_kib(relay.pid)["VmRSS"] * 1024 - before
    else:
        with RedisServerProcess() as redis_server, redis_server.client() as client, \
                RelayProcess(store=f"redis://127.0.0.1:{redis_server.port}/0",
                             code_dir=code_dir) as relay:
            asyncio.run(send_all(relay.url, sender, [warm_up]))
            before = client.info("memory")["used_memory"]
            accepted = asyncio.run(send_all(relay.url, sender, frames))
            grown = client.info("memory")["used_memory"] - before
    return {"store": store, "accepted": accepted, "sent_bytes": sent, "grown_bytes": grown,
            "ratio": grown / sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another checkout's top directory, measured first")
    parser.add_argument("--sends", type=int, default=40)
    args = parser.parse_args()
    checkouts = ([("baseline", args.baseline)] if args.baseline else []) + [("this", None)]
    runs = [{"code": name, **measure(code_dir, store, args.sends)}
            for name, code_dir in checkouts for store in ("memory", "redis")]
    what = {"memory": "relay RSS", "redis": "Redis used_memory"}
    print(table(["code", "measured", "accepted", "sent MiB", "grown MiB", "grown / sent"],
                [(r["code"], what[str(r["store"])], r["accepted"],
                  f"{int(r['sent_bytes']) / 2**20:.2f}", f"{int(r['grown_bytes']) / 2**20:.1f}",
                  f"{float(r['ratio']):.2f}") for r in runs]))
    print(f"results: {write_results('amplification', {'sends': args.sends, 'runs': runs})}")


if __name__ == "__main__":
    main()
