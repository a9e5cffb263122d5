"""Relay throughput and end-to-end latency against the verify floor measured in the same run.

N sender devices → ONE relay process (the CLI, rate limits raised) → N
receiver devices, all on 127.0.0.1, clients in separate processes.  First an
open-throttle run finds saturation (messages delivered end to end per
second); then paced runs offer 25/50/75/100 % of it, each on a fresh relay.

    .venv/bin/python benchmarks/relay.py [--quick] [--store sqlite:///{tmp}/relay.sqlite3]
    .venv/bin/python benchmarks/relay.py --store redis://127.0.0.1:PORT/0 --baseline /tmp/base \
        [--rounds 2] [--messages 12000]

`{tmp}` in --store is replaced by the relay's scratch directory (deleted after).
`--baseline DIR` runs only the open-throttle run, alternating this checkout's relay and
DIR's (another checkout, e.g. `git worktree add /tmp/base main`), `--rounds` times each,
with the same load generator: on a shared, noisy machine a change is judged by the ratio
of the two in one run, not by figures from different runs.
"""

from __future__ import annotations

import argparse

import verify_floor
from common import UNTHROTTLED, RelayProcess, raise_nofile, table, write_results
from loadgen import LoadPlan, per_sender_for, run_load

LOAD_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def saturation_plan(*, quick: bool, pairs: int | None = None, procs: int | None = None,
                    payload_bytes: int = 64) -> LoadPlan:
    """The open-throttle run: 32 SENDs un-answered per sender connection, 30k messages in
    all (1.5k quick).  benchmarks/peers.py drives the brokers with this same plan."""
    pairs = pairs or (4 if quick else 16)
    open_total = 1_500 if quick else 30_000
    return LoadPlan(pairs, procs or (1 if quick else 2), max(1, open_total // pairs), None,
                    window=32, payload_bytes=payload_bytes, deadline_s=20.0 if quick else 60.0)


def benchmark(*, quick: bool, store: str = "memory", pairs: int | None = None,
              procs: int | None = None, payload_bytes: int = 64) -> dict[str, object]:
    """Floor, saturation, then the paced levels; returns everything the JSON file holds."""
    raise_nofile()
    open_plan = saturation_plan(quick=quick, pairs=pairs, procs=procs, payload_bytes=payload_bytes)
    pairs, procs = open_plan.pairs, open_plan.procs
    paced_s = 1.5 if quick else 8.0
    floor = verify_floor.measure(0.6 if quick else 3.0, payload_bytes)
    floor_per_s = floor["envelope_decode_verify"]["ops_per_s"]

    with RelayProcess(*UNTHROTTLED, store=store) as relay:
        saturation = run_load(relay, open_plan)
    saturated_per_s = float(saturation["delivered_per_s"])  # type: ignore[arg-type]

    levels = []
    for fraction in LOAD_FRACTIONS:
        rate = fraction * saturated_per_s
        plan = LoadPlan(pairs, procs, per_sender_for(rate, paced_s, pairs), rate, window=256,
                        payload_bytes=payload_bytes, deadline_s=paced_s * 2 + 5)
        with RelayProcess(*UNTHROTTLED, store=store) as relay:
            levels.append({"load_fraction": fraction, **run_load(relay, plan)})
    return {
        "store": store,
        "pairs": pairs,
        "client_processes_per_side": procs,
        "payload_bytes": payload_bytes,
        "verify_floor": floor,
        "saturation": saturation,
        "throughput_vs_floor": saturated_per_s / floor_per_s,
        "levels": levels,
    }


def compare(*, baseline: str, store: str, rounds: int, pairs: int, procs: int,
            messages: int, payload_bytes: int = 64) -> dict[str, object]:
    """Saturation of this checkout's relay and `baseline`'s, alternated `rounds` times."""
    raise_nofile()
    plan = LoadPlan(pairs, procs, max(1, messages // pairs), None, window=32,
                    payload_bytes=payload_bytes, deadline_s=60.0)
    runs: list[dict[str, object]] = []
    for round_no in range(rounds):
        for name, code_dir in (("this", None), ("baseline", baseline)):
            with RelayProcess(*UNTHROTTLED, store=store, code_dir=code_dir) as relay:
                runs.append({"round": round_no, "relay": name, **run_load(relay, plan)})
    return {"store": store, "baseline": baseline, "pairs": pairs, "messages": messages,
            "runs": runs}


def render_compare(result: dict) -> str:
    rows = [(run["round"], run["relay"], run["delivered_per_s"], run["latency_ms"]["p50"],
             run["latency_ms"]["p99"], run["relay_cpu_percent"],
             round(run["relay_cpu_percent"] * 1e4 / max(1e-9, run["delivered_per_s"])),
             run["other_cpu_cores"], run["lost"]) for run in result["runs"]]
    mine = [run["delivered_per_s"] for run in result["runs"] if run["relay"] == "this"]
    base = [run["delivered_per_s"] for run in result["runs"] if run["relay"] == "baseline"]
    ratio = sum(mine) / max(1e-9, sum(base))
    return (f"store={result['store']}  baseline={result['baseline']}  this/baseline"
            f" delivered/s = {ratio:.2f}\n") + table(
        ["round", "relay", "delivered/s", "p50 ms", "p99 ms", "relay CPU%",
         "relay CPU µs/msg", "other cores", "lost"], rows)


def render(result: dict) -> str:
    floor = result["verify_floor"]["envelope_decode_verify"]["ops_per_s"]
    rows = []
    for name, run in [("open", result["saturation"]),
                      *((f"{lvl['load_fraction']:.0%}", lvl) for lvl in result["levels"])]:
        lat = run["latency_ms"]
        rows.append((name, run["offered_per_s"] or "max", run["accepted_per_s"],
                     run["delivered_per_s"], lat["p50"], lat["p90"], lat["p99"], lat["max"],
                     run["relay_cpu_percent"], run["relay_peak_rss_mib"], run["client_cpu_cores"],
                     run["other_cpu_cores"], run["lost"]))
    head = (f"store={result['store']}  pairs={result['pairs']}  verify floor {floor:,.0f}/s"
            f"  saturation {result['saturation']['delivered_per_s']:,.0f}/s"
            f" = {result['throughput_vs_floor']:.1%} of floor")
    return head + "\n" + table(
        ["load", "offered/s", "accepted/s", "delivered/s", "p50 ms", "p90 ms", "p99 ms",
         "max ms", "relay CPU%", "relay RSS MiB", "client cores", "other cores", "lost"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: small and fast")
    parser.add_argument("--store", default="memory", help="relay --store (default memory)")
    parser.add_argument("--pairs", type=int, help="sender/receiver device pairs")
    parser.add_argument("--procs", type=int, help="client processes per side")
    parser.add_argument("--baseline", help="another checkout: A/B of the open-throttle run only")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds (with --baseline)")
    parser.add_argument("--messages", type=int, default=12_000,
                        help="messages per A/B run (with --baseline)")
    args = parser.parse_args()
    if args.baseline:
        compared = compare(baseline=args.baseline, store=args.store, rounds=args.rounds,
                           pairs=args.pairs or 16, procs=args.procs or 2,
                           messages=args.messages)
        print(render_compare(compared))
        print(f"results: {write_results('relay_ab', compared)}")
        return
    result = benchmark(quick=args.quick, store=args.store, pairs=args.pairs, procs=args.procs)
    print(render(result))
    print(f"results: {write_results('relay', result)}")


if __name__ == "__main__":
    main()
