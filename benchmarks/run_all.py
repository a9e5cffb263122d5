"""Run every relay benchmark and print one summary with the targets beside the figures.

    .venv/bin/python benchmarks/run_all.py           # full: about 3.5 minutes
    .venv/bin/python benchmarks/run_all.py --quick   # CI smoke: under a minute, checks the scripts run

Writes benchmarks/results/all-<timestamp>.json with every figure of every part.
`--quick` figures are too small to mean anything; only the full run is quoted.
"""

from __future__ import annotations

import argparse
import statistics

import drain
import idle
import peers
import relay
import replicas
from common import table, write_results

TARGET_FLOOR_FRACTION = 0.70
TARGET_P99_MS_AT_HALF_LOAD = 5.0
TARGET_KIB_PER_IDLE_CONNECTION = 20.0
# `continuum --workers 2` over one process on Redis (issue #18; needs 2 free cores for the relay).
TARGET_WORKERS_SPEEDUP = 1.7


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def summary_rows(results: dict) -> list[tuple[object, ...]]:
    load, idle_result, drain_result = results["relay"], results["idle"], results["drain"]
    floor = load["verify_floor"]["envelope_decode_verify"]
    half = next(lvl for lvl in load["levels"] if lvl["load_fraction"] == 0.5)
    largest = idle_result["levels"][-1]
    kib = largest["bytes_per_connection"] / 1024
    busiest_other = max(run["other_cpu_cores"]
                        for run in [load["saturation"], *load["levels"], *results["peers"]["runs"]])
    rows: list[tuple[object, ...]] = [
        ("verify floor: decode + verify, 1 core", f"{floor['ops_per_s']:,.0f}/s"
         f" ({floor['us_per_op']:.1f} µs)", "-", "-"),
        ("relay saturation, delivered end to end", f"{load['saturation']['delivered_per_s']:,.0f}/s"
         f" (relay CPU {load['saturation']['relay_cpu_percent']:.0f}%)", "-", "-"),
        ("relay throughput / verify floor", f"{load['throughput_vs_floor']:.1%}",
         f">= {TARGET_FLOOR_FRACTION:.0%}", _verdict(load["throughput_vs_floor"] >= TARGET_FLOOR_FRACTION)),
    ]
    for lvl in load["levels"]:
        lat = lvl["latency_ms"]
        target = f"< {TARGET_P99_MS_AT_HALF_LOAD:g} ms" if lvl is half else "-"
        rows.append((f"p50/p90/p99/max at {lvl['load_fraction']:.0%} load"
                     f" ({lvl['delivered_per_s']:,.0f}/s)",
                     f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} / {lat['max']:.1f} ms",
                     target, _verdict(lat["p99"] < TARGET_P99_MS_AT_HALF_LOAD) if lvl is half else "-"))
    for lvl in idle_result["levels"]:
        is_largest = lvl is largest
        rows.append((f"relay memory per idle connection, {lvl['connections']:,} devices",
                     f"{lvl['bytes_per_connection'] / 1024:.1f} KiB ({lvl['rss_mib']:.0f} MiB RSS)",
                     f"<= {TARGET_KIB_PER_IDLE_CONNECTION:g} KiB" if is_largest else "-",
                     _verdict(kib <= TARGET_KIB_PER_IDLE_CONNECTION) if is_largest else "-"))
    for run in drain_result["runs"]:
        rows.append((f"drain {run['messages']:,}-message mailbox, {run['store'].split(':')[0]} store",
                     f"{run['all_acked_s']:.2f} s ({run['drain_per_s']:,.0f}/s;"
                     f" fill {run['fill_per_s']:,.0f}/s)", "-", "-"))
    for run in results.get("replicas", {}).get("runs", []):
        rows.append((f"{run['replicas']} replica(s) on one Redis, delivered (sender i -> receiver i+1)",
                     f"{run['delivered_per_s']:,.0f}/s ({run['speedup_vs_1'] or 0:.2f}x;"
                     f" relays {run['relay_cpu_percent']:.0f}% Redis {run['redis_cpu_percent']:.0f}%"
                     f" CPU; p99 {run['latency_ms']['p99']:.0f} ms; stalled"
                     f" {run['left_in_mailboxes']})", "- (2 cores)", "-"))
    for run in results.get("workers", {}).get("runs", []):
        is_two = run["replicas"] == 2
        speedup = run["speedup_vs_1"] or 0
        per_core = run["delivered_per_s"] / max(run["relay_cpu_percent"] / 100, 1e-9)
        rows.append((f"continuum --workers {run['replicas']} on one Redis, delivered",
                     f"{run['delivered_per_s']:,.0f}/s ({speedup:.2f}x; relays"
                     f" {run['relay_cpu_percent']:.0f}% CPU, {per_core:,.0f}/s per relay core)", f">= {TARGET_WORKERS_SPEEDUP:g}x" if is_two else "-",
                     _verdict(speedup >= TARGET_WORKERS_SPEEDUP) if is_two else "-"))
    rows += peer_rows(results["peers"])
    rows.append(("other load on the machine (max, cores)", f"{busiest_other:.2f}",
                 "~0 for clean figures", "-" if busiest_other < 0.2 else "CONTENDED"))
    return rows


def peer_rows(result: dict) -> list[tuple[object, ...]]:
    """Each server's CPU per delivered message in the peer run, and the relay-vs-NATS ratio."""
    rows: list[tuple[object, ...]] = [
        (f"peer run: {name}", f"skipped: {reason}", "-", "-")
        for name, reason in result["skipped"].items()]
    for name, us in result["server_us_per_msg_median"].items():
        runs = [r for r in result["runs"] if r["system"] == name]
        bound = " CLIENT-BOUND" if any(r["client_bound"] for r in runs) else ""
        rows.append((f"peer run: {name}, server CPU per delivered message",
                     f"{us:.1f} µs ({statistics.median(r['delivered_per_s'] for r in runs):,.0f}/s"
                     f"{bound})", "-", "-"))
    ratio = result["beyond_floor_vs_nats"]
    if ratio is not None:
        rows.append(("relay CPU per message beyond the verify floor / NATS JetStream's",
                     f"{ratio:.2f}x ({result['relay_us_beyond_floor']:.1f} µs)",
                     f"<= {peers.TARGET_BEYOND_FLOOR_VS_NATS:g}x",
                     _verdict(ratio <= peers.TARGET_BEYOND_FLOOR_VS_NATS)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: small and fast")
    parser.add_argument("--store", default="memory", help="relay --store for the load runs")
    args = parser.parse_args()
    results = {"quick": args.quick,
               "relay": relay.benchmark(quick=args.quick, store=args.store),
               "idle": idle.benchmark(quick=args.quick),
               "drain": drain.benchmark(quick=args.quick),
               "replicas": replicas.benchmark(quick=args.quick),
               "workers": replicas.benchmark(quick=args.quick, replica_counts=(1, 2),
                                             workers=True),
               "peers": peers.benchmark(quick=args.quick)}
    print(relay.render(results["relay"]), end="\n\n")
    print(idle.render(results["idle"]), end="\n\n")
    print(drain.render(results["drain"]), end="\n\n")
    print(replicas.render(results["replicas"]), end="\n\n")
    print(replicas.render(results["workers"]), end="\n\n")
    print(peers.render(results["peers"]), end="\n\n")
    print(table(["figure", "measured", "target", "verdict"], summary_rows(results)))
    print(f"results: {write_results('all', results)}")


if __name__ == "__main__":
    main()
