"""A/B: this checkout's relay against another checkout's, in one run, on identical load.

    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/compare.py --baseline /tmp/base [--rounds 4] [--rate 1500]

The load generator and verify floor are this checkout's; only the relay
process differs (the baseline's code first on its PYTHONPATH).  Each round
runs baseline then candidate back to back: an open-throttle run (saturation)
and a paced run at `--rate` messages/s.  This machine's speed drifts by tens
of percent between minutes, so the figure to quote is the median of the
per-round ratios candidate / baseline, not either absolute value.

Relay CPU µs per delivered message = relay CPU seconds / messages delivered,
over the measured window.  The load generator speaks this checkout's
protocol, so the baseline must speak the same protocol version.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import UNTHROTTLED, RelayProcess, raise_nofile, relay_flags, table, write_results
from loadgen import LoadPlan, per_sender_for, run_load


def unthrottled_for(code_dir: str | None) -> tuple[str, ...]:
    """UNTHROTTLED without the flags an older relay does not have yet."""
    known = relay_flags(code_dir)
    kept: list[str] = []
    for flag, value in zip(UNTHROTTLED[::2], UNTHROTTLED[1::2]):
        if flag in known:
            kept += [flag, value]
    return tuple(kept)


def _us_per_message(run: dict) -> float:
    return float(run["relay_cpu_percent"]) / 100 / float(run["delivered_per_s"]) * 1e6


def _one(code_dir: str | None, plan: LoadPlan, store: str) -> dict:
    with RelayProcess(*unthrottled_for(code_dir), store=store, code_dir=code_dir) as relay:
        run = run_load(relay, plan)
    lat = run["latency_ms"]
    return {"delivered_per_s": run["delivered_per_s"], "cpu_us_per_msg": _us_per_message(run),
            "p50_ms": lat["p50"], "p99_ms": lat["p99"], "lost": run["lost"],
            "other_cpu_cores": run["other_cpu_cores"]}


def compare(baseline: str, rounds: int, rate: float, store: str, pairs: int) -> dict:
    raise_nofile()
    open_plan = LoadPlan(pairs, 2, max(1, 20_000 // pairs), None, window=32, payload_bytes=64,
                         deadline_s=60.0)
    paced_s = 6.0
    paced_plan = LoadPlan(pairs, 2, per_sender_for(rate, paced_s, pairs), rate, window=256,
                          payload_bytes=64, deadline_s=paced_s * 2 + 5)
    runs: list[dict] = []
    for index in range(rounds):
        for name, plan in (("saturation", open_plan), (f"paced {rate:g}/s", paced_plan)):
            base = _one(str(Path(baseline).resolve()), plan, store)
            cand = _one(None, plan, store)
            runs.append({"round": index + 1, "load": name, "baseline": base, "candidate": cand})
    return {"baseline": baseline, "store": store, "pairs": pairs, "rate": rate, "runs": runs}


def render(result: dict) -> str:
    rows = []
    ratios: dict[tuple[str, str], list[float]] = {}
    for run in result["runs"]:
        base, cand = run["baseline"], run["candidate"]
        for figure in ("delivered_per_s", "cpu_us_per_msg", "p99_ms"):
            ratios.setdefault((run["load"], figure), []).append(cand[figure] / base[figure])
        rows.append((run["round"], run["load"], f"{base['delivered_per_s']:,.0f}",
                     f"{cand['delivered_per_s']:,.0f}", f"{base['cpu_us_per_msg']:.0f}",
                     f"{cand['cpu_us_per_msg']:.0f}", f"{base['p50_ms']:.2f} / {base['p99_ms']:.1f}",
                     f"{cand['p50_ms']:.2f} / {cand['p99_ms']:.1f}",
                     f"{max(base['other_cpu_cores'], cand['other_cpu_cores']):.2f}"))
    summary = [(load, figure, f"{statistics.median(values):.3f}",
                " ".join(f"{v:.2f}" for v in values))
               for (load, figure), values in ratios.items()]
    return (table(["round", "load", "base msg/s", "cand msg/s", "base µs/msg", "cand µs/msg",
                   "base p50/p99 ms", "cand p50/p99 ms", "other cores"], rows)
            + "\n\ncandidate / baseline (median of rounds; < 1 is better for µs and p99)\n"
            + table(["load", "figure", "median ratio", "per round"], summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="another checkout's top directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1500.0, help="paced run, messages/s")
    parser.add_argument("--store", default="memory")
    parser.add_argument("--pairs", type=int, default=16)
    args = parser.parse_args()
    result = compare(args.baseline, args.rounds, args.rate, args.store, args.pairs)
    print(render(result))
    print(f"results: {write_results('compare', result)}")


if __name__ == "__main__":
    main()
