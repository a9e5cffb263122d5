"""Aggregate throughput of 1, 2 and 4 relay replicas sharing one Redis, most messages crossing.

For each N, N relay processes (the CLI, rate limits raised, one shared relay
key) run against one private `redis-server` started by this script.  Sender
devices connect to replica i and their receivers to replica (i + 1) mod N, so
for N >= 2 every message is accepted by one process and delivered by another
through Redis: the path that proves the relays are stateless.  The senders and
receivers are the load generator's worker processes (`loadgen.py`), real
WebSocket clients, open throttle: each sender connection keeps 32 SENDs
unanswered, so the figures are saturation figures.

    .venv/bin/python benchmarks/replicas.py [--quick] [--replicas 1,2,4] [--pairs 16]
    .venv/bin/python benchmarks/replicas.py --workers [--replicas 1,2]

`--workers`: instead of N relays on N ports, one `continuum --workers N` (N processes
accepting on one port); every client connects to that one URL and the worker that
accepts first serves it, so about (N - 1) / N of the messages cross workers.  Relay
CPU is the workers' and the supervisor's.

The machine this was written on has 2 cores.  Relays, Redis and the load
generator share them, so N relays on 2 cores cannot scale linearly: the table
shows the speed-up that is left and where the CPU went (relays summed, Redis,
client, other work).  Redis runs without persistence (--save "" --appendonly no).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack
from multiprocessing.connection import Connection
from pathlib import Path

import redis
from common import (
    UNTHROTTLED,
    CpuSampler,
    RelayProcess,
    free_port,
    free_port_run,
    memory_kib,
    raise_nofile,
    stop_process_group,
    table,
    write_results,
)
from loadgen import (
    _DRAIN_GRACE_S,
    _READY_TIMEOUT_S,
    _START_DELAY_NS,
    LoadPlan,
    _expect,
    _receiver_process,
    _sender_process,
    _summarise,
    reap_workers,
)

from proto import Identity

REPLICA_COUNTS = (1, 2, 4)
_WINDOW = 32
_PAYLOAD_BYTES = 64


class RedisServerProcess:
    """A private redis-server on a free loopback port, no persistence; always stop it."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (Debian: apt-get install redis-server,"
                               " or scripts/install-redis)")
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="continuum-bench-redis-"))
        self.command = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                        "--dir", str(self._dir), "--save", "", "--appendonly", "no"]
        self.process: subprocess.Popen[bytes] | None = None
        self.version = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> RedisServerProcess:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 10
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}")
                try:
                    with self.client() as client:
                        self.version = client.info("server")["redis_version"]
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"redis-server on port {self.port} did not answer")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process_group(process, signal.SIGTERM, grace_s=10)
        shutil.rmtree(self._dir, ignore_errors=True)


def _assign(pairs: int, replicas: int, procs: int) -> tuple[list[list[int]], list[list[int]]]:
    """Pair indexes per sender process and per receiver process.

    Process k (on either side) talks to replica k mod N.  Pair j's sender is in
    process j mod procs, so on replica j mod N; its receiver is on replica
    (j mod N + 1) mod N, in one of the receiver processes of that replica.
    """
    tx: list[list[int]] = [[] for _ in range(procs)]
    rx: list[list[int]] = [[] for _ in range(procs)]
    for j in range(pairs):
        tx[j % procs].append(j)
        target = (j % replicas + 1) % replicas
        serving = [k for k in range(procs) if k % replicas == target]
        rx[serving[(j // replicas) % len(serving)]].append(j)
    return tx, rx


def _worker_pids(supervisor: int, workers: int, metrics_port: int, timeout_s: float = 20.0,
                 ) -> list[int]:
    """The pids of `continuum --workers` once every worker answers on its own /healthz."""
    deadline = time.monotonic() + timeout_s
    for worker in range(workers):
        while True:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{metrics_port + worker}/healthz", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {worker} not healthy within {timeout_s}s")
                time.sleep(0.05)
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children]


def run_replicas(redis_server: RedisServerProcess, replicas: int, pairs: int, per_sender: int,
                 deadline_s: float, as_workers: bool = False) -> dict[str, object]:
    """One open-throttle load through `replicas` relays on `redis_server`; everything stopped after.

    `as_workers`: one `continuum --workers replicas` instead of `replicas` relay processes."""
    procs = max(2, replicas)  # client processes per side; N divides it for N in 1, 2, 4
    if procs % replicas or pairs < procs:
        raise ValueError(f"need pairs >= {procs} and N dividing {procs}")
    plan = LoadPlan(pairs, procs, per_sender, None, window=_WINDOW,
                    payload_bytes=_PAYLOAD_BYTES, deadline_s=deadline_s)
    with redis_server.client() as client:
        client.flushall()
    prefix = f"bench-replicas-{replicas}-{uuid.uuid4().hex[:8]}:"
    store = f"redis://127.0.0.1:{redis_server.port}/0?prefix={prefix}"
    relay_key = Identity.generate().secret_text()
    senders = [os.urandom(32) for _ in range(pairs)]
    receivers = [os.urandom(32) for _ in range(pairs)]
    receiver_keys = [Identity(seed).public.raw for seed in receivers]
    tx_pairs, rx_pairs = _assign(pairs, replicas, procs)
    context = mp.get_context("fork")
    workers: list[tuple[mp.process.BaseProcess, Connection]] = []

    def start(target: object, url: str, args: tuple) -> Connection:
        ours, theirs = context.Pipe()
        process = context.Process(target=target, args=(theirs, url, plan, *args), daemon=True)
        process.start()
        workers.append((process, ours))
        return ours

    with ExitStack() as stack:
        if as_workers:
            metrics_port = free_port_run(replicas)
            relays = [stack.enter_context(RelayProcess(
                *UNTHROTTLED, "--relay-key", relay_key, "--workers", str(replicas),
                "--worker-metrics-port", str(metrics_port), store=store))]
            urls = [relays[0].url] * replicas
            pids = [relays[0].pid] + (_worker_pids(relays[0].pid, replicas, metrics_port)
                                      if replicas > 1 else [])
        else:
            relays = [stack.enter_context(RelayProcess(*UNTHROTTLED, "--relay-key", relay_key,
                                                       store=store)) for _ in range(replicas)]
            urls = [relay.url for relay in relays]
            pids = [relay.pid for relay in relays]
        try:
            rx = [start(_receiver_process, urls[k % replicas],
                        ([receivers[j] for j in rx_pairs[k]],)) for k in range(procs)]
            for pipe in rx:
                _expect(pipe, _READY_TIMEOUT_S, "receiver ready")
            tx = [start(_sender_process, urls[k % replicas],
                        ([(j, senders[j], receiver_keys[j]) for j in tx_pairs[k]],))
                  for k in range(procs)]
            for pipe in tx:
                _expect(pipe, _READY_TIMEOUT_S, "sender ready")
            with ExitStack() as sampling:
                relay_cpu = [sampling.enter_context(CpuSampler(pid)) for pid in pids]
                redis_cpu = sampling.enter_context(CpuSampler(redis_server.pid))
                start_ns = time.monotonic_ns() + _START_DELAY_NS
                for pipe in rx + tx:
                    pipe.send(start_ns)
                limit = deadline_s + 3 * _DRAIN_GRACE_S
                sent = [_expect(pipe, limit, "sender result") for pipe in tx]
                got = [_expect(pipe, limit, "receiver result") for pipe in rx]
            memories = [memory_kib(pid) for pid in pids]
            relay_logs = [r.log_tail(5) for r in relays]
            # With workers the shared port answers for one of them: the counters of that one.
            relay_counters = [{name: r.metric(f"continuum_messages_{name}_total")
                               for name in ("accepted", "delivered", "acked")} for r in relays]
        finally:
            reap_workers(workers)
        with redis_server.client() as client:
            redis_memory_mib = client.info("memory")["used_memory"] / (1 << 20)
            # Undelivered is not lost if Redis still holds it: count what the mailboxes keep.
            left = {key: client.xlen(key) for key in client.scan_iter(match=f"{prefix}*:log")}
            left_in_mailboxes = sum(left.values())
            stalled = [(key.decode(), n, client.pubsub_numsub(key.decode()[:-4] + ":wake")[0][1])
                       for key, n in left.items() if n]

    run = _summarise(plan, sent, got, relay_cpu[0], memories[0])  # type: ignore[arg-type]
    # _summarise knows one relay: redo the CPU figures over all of them and Redis.
    first_send = min(v for s in sent for v in s["sent_ns"].values())  # type: ignore[index]
    last_receive = max(v for r in got for v in r["received_ns"].values())  # type: ignore[index]
    per_relay = [sampler.cpu_between(first_send, last_receive) for sampler in relay_cpu]
    redis_s, machine_s, wall_s = redis_cpu.cpu_between(first_send, last_receive)
    relay_percents = [100 * cpu_s / wall for cpu_s, _machine, wall in per_relay]
    run.update({
        "replicas": replicas,
        "mode": "workers" if as_workers else "replicas",
        "client_processes_per_side": procs,
        # Workers: whichever accepts first serves a connection, so (N - 1) / N on average.
        "cross_replica_fraction": (replicas - 1) / replicas if as_workers else
        0.0 if replicas == 1 else 1.0,
        "relay_cpu_percent": sum(relay_percents),
        "relay_cpu_percent_each": relay_percents,
        "relay_peak_rss_mib_each": [m.get("VmHWM", 0) / 1024 for m in memories],
        "redis_cpu_percent": 100 * redis_s / wall_s,
        "redis_used_memory_mib_after": redis_memory_mib,
        "relay_log_tails": relay_logs,
        "relay_counters": relay_counters,
        "left_in_mailboxes": left_in_mailboxes,
        "stalled_mailboxes": stalled,
        "run_wall_s": (time.monotonic_ns() - start_ns) / 1e9,
        "machine_busy_cores": machine_s / wall_s,
        "other_cpu_cores": max(0.0, machine_s / wall_s - sum(relay_percents) / 100
                               - redis_s / wall_s - float(run["client_cpu_cores"])),  # type: ignore[arg-type]
    })
    return run


def benchmark(*, quick: bool, replica_counts: tuple[int, ...] = REPLICA_COUNTS,
              pairs: int | None = None, messages: int | None = None,
              workers: bool = False) -> dict[str, object]:
    """One open-throttle run per replica count on one private Redis; returns the JSON contents."""
    raise_nofile()
    pairs = pairs or (8 if quick else 16)
    total = messages or (1_200 if quick else 16_000)
    per_sender = max(1, total // pairs)
    # Senders stop at the deadline; receivers wait 10 s more (loadgen), which bounds a run
    # whose deliveries stall (see "stalled" in render) at deadline + 10 s.
    deadline_s = 4.0 if quick else 30.0
    runs = []
    with RedisServerProcess() as redis_server:
        for replicas in replica_counts:
            runs.append(run_replicas(redis_server, replicas, pairs, per_sender, deadline_s,
                                     workers))
    base = float(runs[0]["delivered_per_s"]) if runs and runs[0]["replicas"] == 1 else None  # type: ignore[arg-type]
    for run in runs:
        run["speedup_vs_1"] = float(run["delivered_per_s"]) / base if base else None  # type: ignore[arg-type]
    return {
        "cores": os.cpu_count(),
        "store": "redis (private redis-server, no persistence)",
        "mode": "workers" if workers else "replicas",
        "redis_version": redis_server.version,
        "pairs": pairs,
        "messages_per_run": per_sender * pairs,
        "window": _WINDOW,
        "payload_bytes": _PAYLOAD_BYTES,
        "quick": quick,
        "runs": runs,
    }


def render(result: dict) -> str:
    rows = []
    for run in result["runs"]:
        lat = run["latency_ms"]
        speedup = run["speedup_vs_1"]
        rows.append((run["replicas"], f"{run['cross_replica_fraction']:.0%}",
                     run["accepted_per_s"], run["delivered_per_s"],
                     f"{speedup:.2f}x" if speedup is not None else "-", lat["p50"], lat["p99"],
                     run["relay_cpu_percent"],
                     run["delivered_per_s"] / max(run["relay_cpu_percent"] / 100, 1e-9),
                     " ".join(f"{p:.0f}" for p in run["relay_cpu_percent_each"]),
                     run["redis_cpu_percent"], run["client_cpu_cores"], run["other_cpu_cores"],
                     run["left_in_mailboxes"], run["duplicates"]))
    what = ("continuum --workers N on one port" if result.get("mode") == "workers"
            else "replicas")
    head = (f"{what} on one Redis {result['redis_version']} (no persistence)"
            f"  pairs={result['pairs']}  {result['messages_per_run']:,} msgs per run"
            f"  open throttle, window {result['window']}/sender"
            f"\nmachine: {result['cores']} cores shared by relays, Redis and clients: N > cores"
            " cannot scale linearly; 100% = one core"
            "\nper relay core = delivered/s / relay cores: what the relays deliver per core they"
            " got, the figure to compare when other work took cores during the run"
            "\nstalled = accepted but never delivered by the relays before the receivers' deadline"
            " (still in the Redis mailbox): a lost wake-up, see README")
    return head + "\n" + table(
        ["N", "cross", "accepted/s", "delivered/s", "speed-up", "p50 ms", "p99 ms",
         "relay CPU% sum", "per relay core", "relay CPU% each", "Redis CPU%", "client cores",
         "other cores",
         "stalled", "dup"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, well under a minute")
    parser.add_argument("--replicas", default=",".join(map(str, REPLICA_COUNTS)),
                        help="comma-separated replica counts; start with 1 for the speed-up (default 1,2,4)")
    parser.add_argument("--pairs", type=int, help="sender/receiver device pairs")
    parser.add_argument("--messages", type=int, help="messages per run (all pairs together)")
    parser.add_argument("--workers", action="store_true",
                        help="N workers of one `continuum --workers N` instead of N relays")
    args = parser.parse_args()
    counts = tuple(int(n) for n in args.replicas.split(","))
    result = benchmark(quick=args.quick, replica_counts=counts, pairs=args.pairs,
                       messages=args.messages, workers=args.workers)
    print(render(result))
    print(f"results: {write_results('workers' if args.workers else 'replicas', result)}")


if __name__ == "__main__":
    main()
