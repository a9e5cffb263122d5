"""One message at a time on an idle relay: SEND -> ACCEPTED and SEND -> DELIVER latency.

    .venv/bin/python benchmarks/one_message.py [--store memory] [--messages 300]
                                               [--gap-ms 30] [--baseline DIR] [--rounds 2]

Two devices in this process, one relay process (the CLI, rate limits raised).
Alice sends a message, waits for its ACCEPTED and for bob's DELIVER (bob ACKs
it), then idles `--gap-ms` before the next: the latency a lone device sees
from a relay with nothing else to do, which the saturation runs (relay.py,
compare.py) do not show, since there a loop turn serves many frames.  The
first 10 % of the messages warm up and are not counted.

`--baseline DIR` alternates this checkout's relay and DIR's (another
checkout, e.g. `git worktree add /tmp/base main`), `--rounds` times each;
the figures to quote are the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
from common import UNTHROTTLED, RelayProcess, percentiles, table, write_results
from wsclient import ack_frame, connect, deliver_parts, frame_type, sealed_sends

from proto import Identity
from proto.frames import FrameType


async def _one_run(store: str, messages: int, gap_s: float,
                   code_dir: str | None) -> dict[str, dict[str, float]]:
    """ACCEPTED and DELIVER latency percentiles (ms) over `messages` sent one at a time."""
    with RelayProcess(*UNTHROTTLED, store=store, code_dir=code_dir) as relay:
        async with aiohttp.ClientSession() as http:
            alice, bob = Identity.generate(), Identity.generate()
            sender = await connect(http, relay.url, alice)
            receiver = await connect(http, relay.url, bob)
            frames = sealed_sends(alice, bob.public, messages, 64)

            async def accepted() -> int:
                data = await sender.receive(timeout=10)
                if data is None or frame_type(data) != FrameType.ACCEPTED:
                    raise RuntimeError(f"expected ACCEPTED, got {data!r}")
                return time.monotonic_ns()

            async def delivered() -> int:
                data = await receiver.receive(timeout=10)
                if data is None or frame_type(data) != FrameType.DELIVER:
                    raise RuntimeError(f"expected DELIVER, got {data!r}")
                at = time.monotonic_ns()
                tag, _msg_id = deliver_parts(data)
                await receiver.send(ack_frame(tag))
                return at

            to_accepted, to_delivered = [], []
            for _msg_id, frame in frames:
                start = time.monotonic_ns()
                await sender.send(frame)
                accepted_at, delivered_at = await asyncio.gather(accepted(), delivered())
                to_accepted.append(accepted_at - start)
                to_delivered.append(delivered_at - start)
                await asyncio.sleep(gap_s)
            await sender.close()
            await receiver.close()
    warm = messages // 10
    return {"accepted_ms": percentiles(to_accepted[warm:]),
            "delivered_ms": percentiles(to_delivered[warm:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="memory", help="relay --store (default memory)")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=30.0, help="idle time between messages")
    parser.add_argument("--baseline", help="another checkout: alternate its relay with this one")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (with --baseline)")
    args = parser.parse_args()
    sides = [("baseline", args.baseline), ("candidate", None)] if args.baseline else [
        ("this", None)]
    rounds = args.rounds if args.baseline else 1
    runs: list[dict[str, object]] = []
    for number in range(1, rounds + 1):
        for side, code_dir in sides:
            figures = asyncio.run(_one_run(args.store, args.messages, args.gap_ms / 1000,
                                           code_dir))
            runs.append({"round": number, "side": side, **figures})
    rows = [[run["round"], run["side"],
             *(f"{run[kind]['p50']:.2f} / {run[kind]['p99']:.2f}"  # type: ignore[index]
               for kind in ("accepted_ms", "delivered_ms"))] for run in runs]
    print(f"store={args.store}  one message every {args.gap_ms:g} ms after its DELIVER")
    print(table(["round", "relay", "ACCEPTED p50 / p99 ms", "DELIVER p50 / p99 ms"], rows))
    if args.baseline:
        print("candidate / baseline, per round (p50):")
        for number in range(1, rounds + 1):
            base, cand = (run for run in runs if run["round"] == number)
            ratios = [cand[kind]["p50"] / base[kind]["p50"]  # type: ignore[index]
                      for kind in ("accepted_ms", "delivered_ms")]
            print(f"  round {number}: ACCEPTED x{ratios[0]:.2f}, DELIVER x{ratios[1]:.2f}")
    print(f"results: {write_results('one_message', {'store': args.store, 'runs': runs})}")


if __name__ == "__main__":
    main()
