"""Two regions, a WAN between them: cross-region delivery latency and one relay's msg/s.

    .venv/bin/python benchmarks/regions.py [--delay-ms 40] [--pairs 16] [--rate 100]
                                           [--seconds 8] [--per-sender 400]

Region eu and region us each have a private redis-server (loopback, no
persistence) and a relay process (the CLI, rate limits raised, one shared
relay key); each relay reaches the other region's Redis through a proxy that
delays every chunk by `--delay-ms` in each direction (the injected one-way
WAN latency), in a process of its own, which also serves the signed access
list placing every device in its home region (SPEC §19).  Senders connect to
the EU relay.  Four ways, same load each, in one run:

- local:          senders and receivers homed in eu, on the EU relay (the baseline:
                  one region);
- cross-home:     receivers homed in us, on the US relay (the EU relay stores into
                  the US Redis; the US relay is woken by the US Redis);
- roaming:        receivers homed in us, on the EU relay (fetch, ACK and wake-ups
                  cross the WAN too);
- roaming sender: senders homed in us, on the EU relay, to receivers homed in eu
                  (their rate tokens are in the US Redis).

Paced at `--rate` msg/s: latency SEND -> DELIVER per message (p50/p99), against the
target of one WAN round trip plus 5 ms: the injected one, and the one a Redis PING
through the proxy takes when paced as the load (the processes at each end of a crossing
wake from idle then, as for a paced message).  Saturation (each sender keeps 32
SENDs unanswered): the EU relay's delivered msg/s, and how many messages were
in flight across the WAN on average (msg/s x round trip): far above one per
connection means the relay does not wait one WAN round trip per message.
Figures are ratios to the local run of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import redis
from common import UNTHROTTLED, RelayProcess, raise_nofile, table, write_results
from loadgen import LoadPlan, per_sender_for, run_load
from replicas import RedisServerProcess

from proto import Identity, PublicKey
from proto.access import AccessList
from runtime.clock import now_ms

TESTS = Path(__file__).resolve().parent.parent / "tests"
PREFIX = "bench-regions:"
WAYS = ("local", "cross-home", "roaming", "roaming sender")


def _wan_main(eu_port: int, us_port: int, delay_s: float, oracle_secret: str) -> None:
    """The WAN (a delay proxy each way) and the oracle's list, in this process until stdin
    closes; prints {"eu_to_us", "us_to_eu", "oracle"} once listening."""
    sys.path.insert(0, str(TESTS))
    from fake_oracle import FakeOracle
    from tcp_proxy import DelayProxy

    async def serve() -> None:
        async with DelayProxy(us_port, delay_s) as to_us, DelayProxy(eu_port, delay_s) as to_eu, \
                FakeOracle(Identity.from_text(oracle_secret), longpoll_s=20) as oracle:
            oracle.document = bytes.fromhex(sys.stdin.readline().strip())
            print(json.dumps({"eu_to_us": to_us.port, "us_to_eu": to_eu.port,
                              "oracle": oracle.url}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(serve())


class Wan:
    """The `_wan_main` process: started with the signed list, stopped by closing its stdin."""

    def __init__(self, eu: RedisServerProcess, us: RedisServerProcess, delay_s: float,
                 oracle: Identity, document: bytes) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--wan", str(eu.port), str(us.port), str(delay_s),
             oracle.secret_text()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(document.hex() + "\n")
        self.process.stdin.flush()
        self.ports = json.loads(self.process.stdout.readline())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def placement(oracle: Identity, homes: dict[PublicKey, str]) -> bytes:
    """The signed list: every key in one group, each in its home, the rest in eu."""
    issued = now_ms()
    return AccessList(1, 1, issued, issued + 3_600_000, oracle.public,
                      {key: frozenset({1}) for key in homes}, frozenset(),
                      regions=("eu", "us"), homes=homes, default_home="eu").sign(oracle)


def run(delay_ms: float, pairs: int, rate: float, seconds: float, per_sender: int) -> dict:
    raise_nofile()
    oracle, relay_key = Identity.generate(), Identity.generate()
    seeds = {way: ([os.urandom(32) for _ in range(pairs)], [os.urandom(32) for _ in range(pairs)])
             for way in WAYS}
    homes = {}
    for way, (senders, receivers) in seeds.items():
        roams = way == "roaming sender"
        homes.update({Identity(seed).public: "us" if roams else "eu" for seed in senders})
        homes.update({Identity(seed).public: "eu" if way in ("local", "roaming sender") else "us"
                      for seed in receivers})
    # First a few messages each way, not reported: each relay's connections to the other
    # region's Redis are opened, and its scripts loaded there, before anything is measured.
    plans = {"warm-up": LoadPlan(pairs, 2, 2, None, window=2, payload_bytes=64, deadline_s=30.0),
             "paced": LoadPlan(pairs, 2, per_sender_for(rate, seconds, pairs), rate, window=256,
                               payload_bytes=64, deadline_s=seconds * 2 + 10),
             "saturation": LoadPlan(pairs, 2, per_sender, None, window=32, payload_bytes=64,
                                    deadline_s=120.0)}
    results: dict[str, dict[str, dict]] = {name: {} for name in plans}
    with ExitStack() as stack:
        eu, us = (stack.enter_context(RedisServerProcess()) for _ in range(2))
        wan = Wan(eu, us, delay_ms / 1000, oracle, placement(oracle, homes))
        stack.callback(wan.close)
        wan_ms = _round_trips_ms(wan.ports["eu_to_us"])
        paced_wan_ms = _round_trips_ms(wan.ports["eu_to_us"], gap_s=1 / rate)
        common = [*UNTHROTTLED, "--relay-key", relay_key.secret_text(),
                  "--oracle-url", wan.ports["oracle"], "--oracle-key", oracle.public.text]
        relays = {
            "eu": stack.enter_context(RelayProcess(
                *common, "--region", "eu", "--region-store",
                f"us=redis://127.0.0.1:{wan.ports['eu_to_us']}/0?prefix={PREFIX}",
                store=f"redis://127.0.0.1:{eu.port}/0?prefix={PREFIX}")),
            "us": stack.enter_context(RelayProcess(
                *common, "--region", "us", "--region-store",
                f"eu=redis://127.0.0.1:{wan.ports['us_to_eu']}/0?prefix={PREFIX}",
                store=f"redis://127.0.0.1:{us.port}/0?prefix={PREFIX}")),
        }
        for name, plan in plans.items():
            for way in WAYS:
                receiver_relay = relays["us"] if way == "cross-home" else relays["eu"]
                before = _delivered(receiver_relay)
                with WanProbe(wan.ports["eu_to_us"], 1 / rate) as probe:
                    results[name][way] = run_load(relays["eu"], plan,
                                                  receiver_url=receiver_relay.url,
                                                  seeds=seeds[way])
                results[name][way]["wan_during_ms"] = probe.round_trips_ms()
                after = _delivered(receiver_relay)
                results[name][way]["delivered_from_wakeups"] = (
                    (after[1] - before[1]) / max(1.0, after[0] - before[0]))
    return {"delay_ms": delay_ms, "pairs": pairs, "rate": rate, "wan_round_trip_ms": wan_ms,
            "paced_wan_round_trip_ms": paced_wan_ms,
            "results": results}


def _round_trips_ms(port: int, count: int = 50, gap_s: float = 0.0) -> dict[str, float]:
    """p50/p99 of a Redis PING through the delay proxy: the round trip this harness's WAN
    really takes (the injected delay both ways, plus the proxy's own forwarding).  With
    `gap_s`, one PING every so often, as the paced load's messages: the processes at
    either end of a crossing then wake from idle, as they do for a paced message."""
    client = redis.Redis(port=port)
    client.ping()  # connected
    took = []
    for _ in range(count):
        time.sleep(gap_s)
        started = time.perf_counter()
        client.ping()
        took.append((time.perf_counter() - started) * 1000)
    client.close()
    took.sort()
    return {"p50": took[len(took) // 2], "p99": took[int(0.99 * (len(took) - 1))]}


class WanProbe:
    """A Redis PING through the delay proxy every `gap_s` while a way's load runs: the round
    trip the WAN gives at that moment, the proxy busy with the load's own crossings as well
    (the PINGs before the load see an idle proxy)."""

    def __init__(self, port: int, gap_s: float) -> None:
        self._client = redis.Redis(port=port)
        self._gap_s = gap_s
        self._stop = threading.Event()
        self._took: list[float] = []
        self._thread = threading.Thread(target=self._run, name="wan-probe")

    def __enter__(self) -> WanProbe:
        self._client.ping()  # connected
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self._gap_s):
            started = time.perf_counter()
            self._client.ping()
            self._took.append((time.perf_counter() - started) * 1000)

    def round_trips_ms(self) -> dict[str, float]:
        took = sorted(self._took) or [float("nan")]
        return {"p50": took[len(took) // 2], "p99": took[int(0.99 * (len(took) - 1))],
                "count": len(self._took)}


def _delivered(relay: RelayProcess) -> tuple[float, float]:
    """(delivered, of them taken from a wake-up without a fetch) so far."""
    return (relay.metric("continuum_messages_delivered_total"),
            relay.metric("continuum_messages_delivered_from_wakeups_total"))


def report(data: dict) -> None:
    rtt_ms = 2 * data["delay_ms"]
    target_ms = rtt_ms + 5
    paced, saturated = data["results"]["paced"], data["results"]["saturation"]
    base = paced["local"]["latency_ms"]
    print(f"injected one-way latency {data['delay_ms']:g} ms (round trip {rtt_ms:g} ms);"
          f" target SEND->DELIVER <= {target_ms:g} ms; paced at {data['rate']:g} msg/s,"
          f" {data['pairs']} pairs")
    wan, paced_wan = data["wan_round_trip_ms"], data["paced_wan_round_trip_ms"]
    print(f"a Redis PING through the proxy (the harness's WAN round trip): p50 {wan['p50']:.1f}"
          f" ms, p99 {wan['p99']:.1f} ms back to back; p50 {paced_wan['p50']:.1f} ms, p99"
          f" {paced_wan['p99']:.1f} ms one every {1000 / data['rate']:.0f} ms (as paced)")
    print(table(["way", "p50 ms", "p90 ms", "p99 ms", "p50 - local", "p99 <= target",
                 "from wake-ups", "lost", "dups"], [
        [way, f"{r['latency_ms']['p50']:.1f}", f"{r['latency_ms']['p90']:.1f}",
         f"{r['latency_ms']['p99']:.1f}", f"{r['latency_ms']['p50'] - base['p50']:+.1f}",
         "yes" if r["latency_ms"]["p99"] <= target_ms else "no",
         f"{r['delivered_from_wakeups']:.0%}", r["lost"], r["duplicates"]]
        for way, r in paced.items()]))
    roaming = paced["roaming"]["latency_ms"]
    print(f"roaming beyond the round trip of a PING paced as the load (both cross the WAN twice):"
          f" p50 {roaming['p50'] - paced_wan['p50']:+.1f} ms, p99"
          f" {roaming['p99'] - paced_wan['p99']:+.1f} ms (target: at most +5)")
    during = paced["roaming"]["wan_during_ms"]
    print(f"a PING through the proxy during the roaming load: p50 {during['p50']:.1f} ms, p99"
          f" {during['p99']:.1f} ms ({during['count']} PINGs); roaming beyond it: p50"
          f" {roaming['p50'] - during['p50']:+.1f} ms, p99 {roaming['p99'] - during['p99']:+.1f} ms")
    local = saturated["local"]["delivered_per_s"]
    print("saturation (each sender keeps 32 SENDs unanswered), the EU relay:")
    print(table(["way", "delivered/s", "x local", "in flight over the WAN", "relay CPU%",
                 "other cores", "lost"], [
        [way, f"{r['delivered_per_s']:,.0f}", f"{r['delivered_per_s'] / local:.2f}",
         f"{r['delivered_per_s'] * rtt_ms / 1000:.1f}" if way != "local" else "-",
         f"{r['relay_cpu_percent']:.0f}", f"{r['other_cpu_cores']:.2f}", r["lost"]]
        for way, r in saturated.items()]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--wan":
        _wan_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=40.0)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--per-sender", type=int, default=400)
    args = parser.parse_args()
    if not 30 <= args.delay_ms <= 80:
        print(f"note: --delay-ms {args.delay_ms:g} is outside the issue's 30-80 ms",
              file=sys.stderr)
    data = run(args.delay_ms, args.pairs, args.rate, args.seconds, args.per_sender)
    report(data)
    print(f"results: {write_results('regions', {'command': sys.argv, **data})}")


if __name__ == "__main__":
    main()
