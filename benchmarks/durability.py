"""What `min_replicas=1` costs: one relay on a Redis primary with a replica, without and with it.

    .venv/bin/python benchmarks/durability.py [--rounds 3] [--pairs 16] [--per-sender 500]
                                               [--rate 200] [--aof]

A private primary and replica redis-server (loopback, no persistence; `--aof`:
appendonly yes, appendfsync everysec on both) serve one relay process (the
CLI, rate limits raised).  Each round runs each load twice, back to back:
store URL plain, then with `?min_replicas=1` (every accept followed by WAIT 1
on the same connection).  Two loads: saturation (senders keep 32 SENDs
unanswered per connection: msg/s) and paced at `--rate` msg/s (latency SEND →
DELIVER, where the wait's round trip shows).  Every message is delivered and
acked.  This machine's speed drifts between minutes, so the figures to quote
are the median per-round ratios.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from contextlib import ExitStack

from common import UNTHROTTLED, RelayProcess, raise_nofile, table, write_results
from loadgen import LoadPlan, per_sender_for, run_load
from replicas import RedisServerProcess

MODES = (("plain", ""), ("min_replicas=1", "?min_replicas=1&wait_timeout_ms=1000"))


def start_pair(stack: ExitStack, aof: bool) -> RedisServerProcess:
    """Primary and replica, entered on `stack`; returns the primary once the replica is online."""
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else []
    primary = RedisServerProcess()
    primary.command += [*persistence, "--repl-diskless-sync-delay", "0"]
    stack.enter_context(primary)
    replica = RedisServerProcess()
    replica.command += [*persistence, "--replicaof", "127.0.0.1", str(primary.port)]
    stack.enter_context(replica)
    deadline = time.monotonic() + 20
    with primary.client() as client:
        while True:
            client.set("bench-sync", b"")
            if client.wait(1, 100) >= 1:  # online and acknowledging: what WAIT counts
                return primary
            if time.monotonic() > deadline:
                raise TimeoutError("the replica did not come online")


def run(rounds: int, pairs: int, per_sender: int, rate: float, aof: bool) -> dict:
    raise_nofile()
    paced_s = 6.0
    plans = {"saturation": LoadPlan(pairs, 2, per_sender, None, window=32, payload_bytes=64,
                                    deadline_s=90.0),
             f"paced {rate:g}/s": LoadPlan(pairs, 2, per_sender_for(rate, paced_s, pairs), rate,
                                           window=256, payload_bytes=64,
                                           deadline_s=paced_s * 2 + 5)}
    runs: list[dict] = []
    with ExitStack() as stack:
        primary = start_pair(stack, aof)
        for index, (load, plan), (name, query) in itertools.product(
                range(rounds), plans.items(), MODES):
            store = f"redis://127.0.0.1:{primary.port}/0{query}"
            with RelayProcess(*UNTHROTTLED, store=store) as relay:
                result = run_load(relay, plan)
            runs.append({"round": index + 1, "load": load, "mode": name, "delivered_per_s":
                         result["delivered_per_s"], "accepted_per_s": result["accepted_per_s"],
                         "latency_ms": result["latency_ms"], "lost": result["lost"],
                         "errors": result["errors"],
                         "relay_cpu_percent": result["relay_cpu_percent"],
                         "cpu_us_per_msg": result["relay_cpu_percent"] / 100
                         / result["delivered_per_s"] * 1e6,
                         "other_cpu_cores": result["other_cpu_cores"]})
        redis_version = primary.version
    return {"pairs": pairs, "per_sender": per_sender, "aof": aof, "redis": redis_version,
            "runs": runs}


def render(result: dict) -> str:
    rows = [(r["round"], r["load"], r["mode"], r["delivered_per_s"],
             f"{r['latency_ms']['p50']:.2f} / {r['latency_ms']['p99']:.1f}",
             r["relay_cpu_percent"], r["cpu_us_per_msg"], r["lost"],
             f"{r['other_cpu_cores']:.2f}") for r in result["runs"]]
    pairs: dict[tuple[int, str], dict[str, dict]] = {}
    for r in result["runs"]:
        pairs.setdefault((r["round"], r["load"]), {})[r["mode"]] = r
    ratios: dict[tuple[str, str], list[float]] = {}
    for (_round, load), pair in pairs.items():
        for figure, value in (("delivered/s", lambda r: r["delivered_per_s"]),
                              ("relay µs/msg", lambda r: r["cpu_us_per_msg"]),
                              ("p50 latency", lambda r: r["latency_ms"]["p50"])):
            ratios.setdefault((load, figure), []).append(
                value(pair["min_replicas=1"]) / value(pair["plain"]))
    summary = [(load, figure, f"{statistics.median(values):.3f}",
                " ".join(f"{v:.2f}" for v in values)) for (load, figure), values in ratios.items()]
    return (table(["round", "load", "store", "delivered/s", "p50/p99 ms", "relay CPU%",
                   "relay µs/msg", "lost", "other cores"], rows)
            + "\n\nmin_replicas=1 / plain (median of rounds)\n"
            + table(["load", "figure", "median ratio", "per round"], summary)
            + f"\nRedis {result['redis']}, AOF {'everysec' if result['aof'] else 'off'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--per-sender", type=int, default=500)
    parser.add_argument("--rate", type=float, default=200.0, help="paced load, messages/s")
    parser.add_argument("--aof", action="store_true", help="appendonly yes, everysec, both nodes")
    args = parser.parse_args()
    result = run(args.rounds, args.pairs, args.per_sender, args.rate, args.aof)
    print(render(result))
    print(f"results: {write_results('durability', result)}")


if __name__ == "__main__":
    main()
