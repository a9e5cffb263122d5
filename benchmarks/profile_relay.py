"""Where the relay's time goes under saturating load: py-spy samples the relay subprocess.

The relay is started through its CLI under `py-spy record` (which launches it
as its child, so no ptrace permission beyond our own children is needed) and
driven by the same open-throttle load as benchmarks/relay.py.  The collapsed
stacks are summarised as inclusive time of the relay's own steps and the
hottest leaf functions, as shares of the samples in which the relay was busy.

`--idle-memory N` instead runs the relay in this process under tracemalloc,
holds N idle devices connected from worker processes, and lists which source
lines own the memory each connection adds.

    .venv/bin/pip install py-spy      # benchmark-only dependency
    .venv/bin/python benchmarks/profile_relay.py [--quick] [--store ...] [--out stacks.txt]
    .venv/bin/python benchmarks/profile_relay.py --rate 3000 --messages 24000   # paced, 8 s
    .venv/bin/python benchmarks/profile_relay.py --idle-memory 2000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing as mp
import re
import shutil
import os
import signal
import sys
import tempfile
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path

from continuum.server import RelayServer, Settings
from runtime.logs import configure_logging

from common import UNTHROTTLED, RelayProcess, free_port, memory_kib, raise_nofile, table, write_results
from idle import _hold_process
from loadgen import LoadPlan, per_sender_for, run_load

SAMPLE_RATE_HZ = 250
# Steps of one message's life in the relay: a stack counts toward a step if any frame contains it.
STEPS = {
    "session _admit: SEND → ACCEPTED, total": "DeviceSession._admit (",
    "  decode_envelope (CBOR + canonical check)": "decode_envelope (proto/envelope.py)",
    "  Envelope.verify (Ed25519, libsodium)": "Envelope.verify (proto/envelope.py)",
    "  store.accept": "TimedStore.accept (",
    "session _remove: ACK → store.ack": "DeviceSession._remove (",
    "session _deliver: fetch + DELIVER": "DeviceSession._deliver (",
    "all SQLite store calls": "(continuum/store/sqlite.py)",
    "sealed channel: open (SEND, ACK) and seal (ACCEPTED, DELIVER)": "CipherState.",
    "decode_frame (every inbound frame)": "decode_frame (proto/frames.py)",
    "encode_frame (every outbound frame)": "encode_frame (proto/frames.py)",
    "canonical re-encode check (decode side)": "encode (proto/canonical.py)",
    "socket write syscalls (one per session per loop turn)": "_SelectorSocketTransport.write (",
    "aiohttp (HTTP/WebSocket layer, all)": "(aiohttp/",
    "prometheus metric updates": "(prometheus_client/",
    "structlog calls": "(structlog/",
    "epoll wait (loop idle, counted when sampled busy)": "EpollSelector.select (",
}


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def _normalise(frame: str) -> str:
    """'name (/abs/path/site-packages/pkg/mod.py)' → 'name (pkg/mod.py)'."""
    return re.sub(r"\((?:[^()]*/)?(site-packages/|lib/python3\.\d+/)?"
                  r"((?:continuum|proto|aiohttp|asyncio|prometheus_client|structlog|nacl|cbor2)"
                  r"/[^()]*)\)", r"(\2)", frame)


# Only the event loop's turns are the relay serving: py-spy also samples the start-up imports
# (about 4 % of a 40k-message run) and reports the loop's idle executor thread as busy
# (about 15 %), which would otherwise dilute every share.
SERVING = "BaseEventLoop._run_once ("


def summarise(stacks_path: Path) -> dict[str, object]:
    """Inclusive share of each step and the top leaf (self) functions, in % of the samples
    in which the event loop was busy."""
    steps: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or SERVING not in stack:
            continue
        count = int(count_text)
        frames = [_normalise(f) for f in stack.split(";")]
        total += count
        leaves[frames[-1]] += count
        for label, needle in STEPS.items():
            if any(needle in frame for frame in frames):
                steps[label] += count
    top = [(frame, 100 * count / total) for frame, count in leaves.most_common(25)]
    return {"busy_samples": total,
            "steps_percent": {label: 100 * steps[label] / max(total, 1) for label in STEPS},
            "top_self_percent": top}


async def _traced_relay(port: int, pipes: list[Connection], count: int) -> dict[str, object]:
    configure_logging("warning")
    settings = Settings(host="127.0.0.1", port=port, log_level="warning",
                        max_pending_handshakes_per_address=4096)
    loop = asyncio.get_running_loop()
    async with RelayServer(settings):
        await asyncio.sleep(0.5)
        rss_before = memory_kib(os.getpid())["VmRSS"]
        before = tracemalloc.take_snapshot()
        for index, pipe in enumerate(pipes):
            pipe.send(("connect", count // len(pipes) + (index < count % len(pipes))))
        for pipe in pipes:
            if not await loop.run_in_executor(None, pipe.poll, 300):
                raise TimeoutError("idle devices did not connect within 300 s")
            pipe.recv()
        await asyncio.sleep(1.0)
        after = tracemalloc.take_snapshot()
        rss_after = memory_kib(os.getpid())["VmRSS"]
        for pipe in pipes:
            pipe.send(("close",))
        await asyncio.sleep(0.5)
    diff = after.compare_to(before, "lineno")
    traced = sum(d.size_diff for d in diff)
    top = [(f"{d.traceback[0].filename.split('site-packages/')[-1].split('/work/main/')[-1]}"
            f":{d.traceback[0].lineno}", d.size_diff / count, d.count_diff / count)
           for d in diff[:20]]
    return {"connections": count, "rss_bytes_per_connection": (rss_after - rss_before) * 1024 / count,
            "traced_bytes_per_connection": traced / count, "top_lines": top}


def idle_memory(count: int, procs: int = 4) -> dict[str, object]:
    """Python allocations per idle connection, by source line (tracemalloc, relay in-process)."""
    raise_nofile()
    port = free_port()
    url = f"ws://127.0.0.1:{port}/v1/connect"
    context = mp.get_context("fork")  # workers first: no event loop or thread exists yet
    workers = []
    for _ in range(procs):
        ours, theirs = context.Pipe()
        process = context.Process(target=_hold_process, args=(theirs, url), daemon=True)
        process.start()
        workers.append((process, ours))
    try:
        tracemalloc.start(1)
        return asyncio.run(_traced_relay(port, [pipe for _, pipe in workers], count))
    finally:
        tracemalloc.stop()
        for process, pipe in workers:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short load")
    parser.add_argument("--store", default="memory")
    parser.add_argument("--messages", type=int, help="messages in the open-throttle load")
    parser.add_argument("--rate", type=float,
                        help="pace the load at this many messages/s (default: open throttle)")
    parser.add_argument("--out", type=Path, help="also keep py-spy's collapsed stacks here")
    parser.add_argument("--idle-memory", type=int, metavar="N",
                        help="instead: memory per idle connection by source line, N devices")
    args = parser.parse_args()
    if args.idle_memory:
        memory = idle_memory(args.idle_memory)
        print(f"{memory['connections']} idle devices: RSS {memory['rss_bytes_per_connection']:,.0f}"
              f" B/connection under tracemalloc, Python-traced {memory['traced_bytes_per_connection']:,.0f}")
        print(table(["source line", "bytes/connection", "objects/connection"], memory["top_lines"]))
        print(f"results: {write_results('profile-idle-memory', memory)}")
        return
    raise_nofile()
    messages = args.messages or (2_000 if args.quick else 40_000)
    pairs, procs = (4, 1) if args.quick else (16, 2)
    if args.rate:  # as relay.py's paced levels: each sender on a fixed, staggered schedule
        seconds = messages / args.rate
        plan = LoadPlan(pairs, procs, per_sender_for(args.rate, seconds, pairs), args.rate,
                        window=256, payload_bytes=64, deadline_s=seconds * 2 + 5)
    else:
        plan = LoadPlan(pairs, procs, messages // pairs, None, window=32, payload_bytes=64,
                        deadline_s=60.0)
    with tempfile.TemporaryDirectory(prefix="continuum-profile-") as scratch:
        stacks = Path(scratch) / "stacks.txt"
        wrapper = [_py_spy(), "record", "--rate", str(SAMPLE_RATE_HZ), "--format", "raw",
                   "--nolineno", "--output", str(stacks), "--"]
        # SIGINT makes py-spy write its file; the relay in the same group shuts down cleanly.
        with RelayProcess(*UNTHROTTLED, store=args.store, wrapper=wrapper,
                          stop_signal=signal.SIGINT) as relay:
            load = run_load(relay, plan)
        summary = summarise(stacks)
        if args.out:
            shutil.copy(stacks, args.out)
    print(f"load: {load['delivered_per_s']:,.0f} delivered/s, relay CPU {load['relay_cpu_percent']:.0f}%"
          f" (sampling overhead included), {summary['busy_samples']} busy samples")
    print(table(["relay step (inclusive)", "% of busy"], list(summary["steps_percent"].items())))
    print()
    print(table(["hottest functions (self)", "% of busy"], summary["top_self_percent"]))
    print(f"results: {write_results('profile', {'load': load, 'profile': summary})}")


if __name__ == "__main__":
    main()
