"""The relay beside the brokers: relay.py's saturation load through Mosquitto, NATS JetStream and
a relay, in one run, with server CPU µs per delivered message as the comparable figure.

    .venv/bin/pip install -e ".[bench]"    # paho-mqtt and nats-py
    .venv/bin/python benchmarks/peers.py [--quick] [--rounds 2] [--pairs 16] [--procs 2]

Each system gets relay.py's open-throttle plan (16 sender/receiver pairs, 64-byte
payloads, 32 sends un-answered per sender connection, every message acked by its
receiver) from the same load generator (`loadgen.run_load`, other protocols'
workers in benchmarks/peer_clients.py), on a private server started for it
(benchmarks/brokers.py) and stopped after.  The brokers don't verify a signature
per message; the relay must, so the issue's comparison is the relay's CPU per
message beyond the verify floor (measured in the same run) ÷ NATS JetStream's
whole per-message CPU.  With `--rounds N` the systems take turns N times and the
ratio uses each system's median.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import peer_clients
import verify_floor
from brokers import BrokerProcess, Mosquitto, NatsServer, find_binary
from common import UNTHROTTLED, RelayProcess, raise_nofile, table, write_results
from loadgen import DEVICES, Clients, Server, run_load
from relay import saturation_plan

TARGET_BEYOND_FLOOR_VS_NATS = 2.0
CLIENT_BOUND_CORES = 0.9  # a load process this busy sets the pace instead of the server


@dataclass(frozen=True)
class System:
    name: str
    start: Callable[[], Server]
    clients: Clients
    binary: str | None = None  # the server's executable, when it is not this checkout's relay
    module: str | None = None  # the client library (the `bench` extra)

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        if self.binary and find_binary(self.binary) is None:
            return f"{self.binary} is not installed (apt-get install {self.binary})"
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"Python module {self.module} is missing (pip install -e '.[bench]')"
        return None


MOSQUITTO = "Mosquitto (QoS 1, persistence on)"
NATS = "NATS JetStream (file storage, explicit ack)"
CONTINUUM = "Continuum relay, memory store"
SYSTEMS = (
    System(MOSQUITTO, Mosquitto, peer_clients.MQTT, "mosquitto", "paho"),
    System(NATS, NatsServer, peer_clients.NATS, "nats-server", "nats"),
    System(CONTINUUM, lambda: RelayProcess(*UNTHROTTLED, store="memory"), DEVICES),
)


def skipped() -> dict[str, str]:
    """Systems this machine cannot run, with the reason (the rest still run)."""
    return {s.name: reason for s in SYSTEMS if (reason := s.missing()) is not None}


def _figures(system: str, round_: int, run: dict, version: str) -> dict[str, object]:
    """One run's figures, its server named a server (loadgen says relay)."""
    run = dict(run)
    cpu_percent, rss_mib = run.pop("relay_cpu_percent"), run.pop("relay_peak_rss_mib")
    return {"system": system, "version": version, "round": round_,
            "server_cpu_percent": cpu_percent, "server_peak_rss_mib": rss_mib,
            "server_us_per_msg": cpu_percent / 100 / run["delivered_per_s"] * 1e6,
            "client_bound": run["busiest_client_process_cores"] >= CLIENT_BOUND_CORES,
            **run}


def benchmark(*, quick: bool, rounds: int = 1, pairs: int | None = None,
              procs: int | None = None, payload_bytes: int = 64) -> dict[str, object]:
    """Every available system `rounds` times, in turn, under the same plan; medians and the ratio."""
    raise_nofile()
    plan = saturation_plan(quick=quick, pairs=pairs, procs=procs, payload_bytes=payload_bytes)
    floor = verify_floor.measure(0.6 if quick else 3.0, payload_bytes, clock=time.process_time)
    floor_us = floor["envelope_decode_verify"]["us_per_op"]
    absent = skipped()
    if all(s.name in absent for s in SYSTEMS if s.binary):  # nothing to compare the relay with
        absent = {s.name: absent.get(s.name, "no peer broker to compare with") for s in SYSTEMS}
    runs = []
    for round_ in range(1, rounds + 1):
        for system in SYSTEMS:
            if system.name in absent:
                continue
            with system.start() as server:
                version = server.version() if isinstance(server, BrokerProcess) else "this checkout"
                run = run_load(server, plan, clients=system.clients)
            runs.append(_figures(system.name, round_, run, version))
    medians = {name: statistics.median(r["server_us_per_msg"] for r in runs if r["system"] == name)
               for name in dict.fromkeys(r["system"] for r in runs)}
    beyond = medians[CONTINUUM] - floor_us if CONTINUUM in medians else None
    return {
        "plan": plan.__dict__,
        "rounds": rounds,
        "verify_floor": floor,
        "skipped": absent,
        "runs": runs,
        "server_us_per_msg_median": medians,
        "relay_us_beyond_floor": beyond,
        # The target: the relay's own work per message, verify aside, vs NATS JetStream's.
        # (None also when a --quick run was too short for a 10 ms CPU tick to show NATS's CPU.)
        "beyond_floor_vs_nats": beyond / medians[NATS] if beyond is not None and medians.get(NATS)
        else None,
    }


def render(result: dict) -> str:
    plan, floor = result["plan"], result["verify_floor"]["envelope_decode_verify"]
    rows = []
    for run in result["runs"]:
        lat = run["latency_ms"]
        rows.append((run["system"], run["round"], run["delivered_per_s"], run["server_cpu_percent"],
                     run["server_us_per_msg"], run["server_peak_rss_mib"], lat["p50"], lat["p99"],
                     run["client_cpu_cores"], run["busiest_client_process_cores"],
                     run["other_cpu_cores"], run["lost"],
                     "CLIENT-BOUND" if run["client_bound"] else "-"))
    lines = [f"{plan['pairs']} pairs, {plan['procs']} client processes per side,"
             f" {plan['payload_bytes']}-byte payloads, {plan['window']} un-answered per sender,"
             f" {plan['pairs'] * plan['per_sender']:,} messages per run;"
             f" verify floor {floor['us_per_op']:.1f} CPU µs/msg (decode + verify)",
             *([table(["system", "round", "delivered/s", "server CPU%", "server µs/msg",
                       "server RSS MiB", "p50 ms", "p99 ms", "client cores",
                       "busiest client proc", "other cores", "lost", "pace set by"], rows)]
               if rows else [])]
    for name, reason in result["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    ratio = result["beyond_floor_vs_nats"]
    if ratio is not None:
        nats_us = result["server_us_per_msg_median"][NATS]
        lines.append(f"relay CPU per message beyond the verify floor: {result['relay_us_beyond_floor']:.1f}"
                     f" µs = {ratio:.2f}× NATS JetStream's whole {nats_us:.1f} µs"
                     f" (target <= {TARGET_BEYOND_FLOOR_VS_NATS:g}×; medians of {result['rounds']}"
                     " round(s))")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: small and fast")
    parser.add_argument("--rounds", type=int, default=1, help="turns each system takes")
    parser.add_argument("--pairs", type=int, help="sender/receiver pairs")
    parser.add_argument("--procs", type=int, help="client processes per side")
    args = parser.parse_args()
    result = benchmark(quick=args.quick, rounds=args.rounds, pairs=args.pairs, procs=args.procs)
    print(render(result))
    print(f"results: {write_results('peers', result)}")


if __name__ == "__main__":
    main()
