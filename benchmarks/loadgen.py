"""Sender and receiver device processes for the relay load test, and the run that drives them.

Each worker process runs one asyncio loop holding several raw device
connections.  Senders pre-seal their envelopes, then on a common start time
send them (paced on a schedule, or as fast as a per-connection window of
un-answered SENDs allows) and note `time.monotonic_ns()` per msg_id just
before each SEND; receivers note the same system-wide clock when each
DELIVER arrives and ACK it.  Latency is the difference, matched by msg_id
after the run, so no clock ever travels inside the sealed plaintext.
"""

from __future__ import annotations

import asyncio
import collections
import math
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import NamedTuple, Protocol

import aiohttp

from proto import Identity, PublicKey
from proto.frames import Error, FrameType, decode_frame

from common import CpuSampler, memory_kib, percentiles
from wsclient import MAX_FRAME, Link, ack_frame, connect, deliver_parts, frame_type, sealed_sends

_READY_TIMEOUT_S = 300.0  # sealing tens of thousands of envelopes takes a while
_START_DELAY_NS = 300_000_000
_DRAIN_GRACE_S = 10.0


@dataclass(frozen=True)
class LoadPlan:
    """One load level: `rate_per_s` None means open throttle (window-limited)."""

    pairs: int
    procs: int
    per_sender: int
    rate_per_s: float | None
    window: int
    payload_bytes: int
    deadline_s: float


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _wait_start(pipe: Connection) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, pipe.recv)


async def _sleep_until(due_ns: int) -> None:
    delay = due_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)


# --- senders -----------------------------------------------------------------

async def _read_answers(ws: Link, room: asyncio.Semaphore, stats: dict) -> None:
    """Count ACCEPTED / ERROR answers, each freeing one slot of the window (runs until cancelled)."""
    while True:
        data = await ws.receive()
        if data is None:
            return
        if frame_type(data) == FrameType.ACCEPTED:
            stats["accepted"] += 1
            stats["last_accept_ns"] = time.monotonic_ns()
        else:
            frame = decode_frame(data, MAX_FRAME)
            code = frame.error_code if isinstance(frame, Error) else None
            stats["errors"][code.name if code else type(frame).__name__] += 1
        room.release()


async def _send_all(ws: Link, frames: list[tuple[bytes, bytes]],
                    plan: LoadPlan, first_due_ns: int, interval_ns: int, deadline_ns: int,
                    sent_ns: dict[bytes, int], stats: dict) -> None:
    """Send on schedule (or as the window allows) until done or the deadline, then await answers."""
    room = asyncio.Semaphore(plan.window)
    reader = asyncio.create_task(_read_answers(ws, room, stats))
    try:
        for index, (msg_id, frame) in enumerate(frames):
            if interval_ns:
                await _sleep_until(first_due_ns + index * interval_ns)
            await room.acquire()
            now = time.monotonic_ns()
            if now > deadline_ns:
                room.release()
                break
            sent_ns[msg_id] = now
            await ws.send(frame)
        async with asyncio.timeout(_DRAIN_GRACE_S):
            for _ in range(plan.window):  # the whole window back: every SEND answered
                await room.acquire()
    except TimeoutError:
        stats["unanswered_connections"] += 1
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _senders(pipe: Connection, url: str, plan: LoadPlan,
                   devices: list[tuple[int, bytes, bytes]]) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        sockets = [await connect(http, url, Identity(seed)) for _, seed, _ in devices]
        frames = [sealed_sends(Identity(seed), PublicKey(recipient), plan.per_sender,
                               plan.payload_bytes) for _, seed, recipient in devices]
        pipe.send("ready")
        start_ns = await _wait_start(pipe)
        cpu_start = _cpu_now()
        deadline_ns = start_ns + int(plan.deadline_s * 1e9)
        sent_ns: dict[bytes, int] = {}
        stats: dict = {"accepted": 0, "last_accept_ns": 0, "unanswered_connections": 0,
                       "errors": collections.Counter()}
        # Paced: each connection sends every pairs/rate seconds, staggered by its global index.
        interval_ns = int(plan.pairs / plan.rate_per_s * 1e9) if plan.rate_per_s else 0
        stagger_ns = int(1e9 / plan.rate_per_s) if plan.rate_per_s else 0
        await _sleep_until(start_ns)
        await asyncio.gather(*(
            _send_all(ws, f, plan, start_ns + index * stagger_ns, interval_ns, deadline_ns,
                      sent_ns, stats)
            for ws, f, (index, _, _) in zip(sockets, frames, devices)))
        cpu = _cpu_now() - cpu_start
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    pipe.send({"sent_ns": sent_ns, "accepted": stats["accepted"],
               "last_accept_ns": stats["last_accept_ns"], "errors": dict(stats["errors"]),
               "unanswered_connections": stats["unanswered_connections"], "cpu_s": cpu})


# --- receivers ---------------------------------------------------------------

async def _receive_all(ws: Link, expected: int, deadline_ns: int,
                       received_ns: dict[bytes, int]) -> int:
    """Take and ACK `expected` deliveries (or stop at the deadline); returns duplicates seen."""
    got = duplicates = 0
    try:
        async with asyncio.timeout(max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9)):
            while got < expected:
                data = await ws.receive()
                now = time.monotonic_ns()
                if data is None:
                    break
                if frame_type(data) != FrameType.DELIVER:
                    continue
                tag, msg_id = deliver_parts(data)
                if msg_id in received_ns:
                    duplicates += 1
                else:
                    received_ns[msg_id] = now
                    got += 1
                await ws.send(ack_frame(tag))
    except TimeoutError:
        pass
    return duplicates


async def _receivers(pipe: Connection, url: str, plan: LoadPlan, seeds: list[bytes]) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        sockets = [await connect(http, url, Identity(seed)) for seed in seeds]
        pipe.send("ready")
        start_ns = await _wait_start(pipe)
        cpu_start = _cpu_now()
        deadline_ns = start_ns + int((plan.deadline_s + _DRAIN_GRACE_S) * 1e9)
        received_ns: dict[bytes, int] = {}
        duplicates = await asyncio.gather(*(
            _receive_all(ws, plan.per_sender, deadline_ns, received_ns) for ws in sockets))
        cpu = _cpu_now() - cpu_start
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    pipe.send({"received_ns": received_ns, "duplicates": sum(duplicates), "cpu_s": cpu})


def _sender_process(pipe: Connection, url: str, plan: LoadPlan,
                    devices: list[tuple[int, bytes, bytes]]) -> None:
    asyncio.run(_senders(pipe, url, plan, devices))


def _receiver_process(pipe: Connection, url: str, plan: LoadPlan, seeds: list[bytes]) -> None:
    asyncio.run(_receivers(pipe, url, plan, seeds))


# --- the run -----------------------------------------------------------------

class Server(Protocol):
    """What a run needs of the server it loads: where clients connect, whose CPU to sample."""

    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int: ...


class Clients(NamedTuple):
    """The worker entry points of one protocol: `sender(pipe, url, plan, devices)` with
    (global index, key seed, recipient's public key) per device, `receiver(pipe, url, plan,
    seeds)`.  Each answers "ready", waits for the start time, then sends its result dict."""

    sender: Callable[..., None]
    receiver: Callable[..., None]


DEVICES = Clients(_sender_process, _receiver_process)


def _expect(pipe: Connection, timeout_s: float, what: str) -> object:
    if not pipe.poll(timeout_s):
        raise TimeoutError(f"no {what} from a load worker within {timeout_s:.0f}s")
    return pipe.recv()


def run_load(relay: Server, plan: LoadPlan, *, receiver_url: str | None = None,
             seeds: tuple[list[bytes], list[bytes]] | None = None,
             clients: Clients = DEVICES) -> dict[str, object]:
    """Drive one load level through `relay`; every worker is stopped before returning.

    Receivers connect to `receiver_url` (another relay) when given; `seeds` are the
    senders' and receivers' key seeds when the caller must know the keys beforehand
    (benchmarks/regions.py homes them in regions).  `clients` are Continuum devices
    unless another protocol's workers load another server (benchmarks/peers.py)."""
    context = mp.get_context("fork")  # before any event loop or thread exists in this process
    senders, receivers = seeds or ([os.urandom(32) for _ in range(plan.pairs)],
                                   [os.urandom(32) for _ in range(plan.pairs)])
    receiver_keys = [Identity(seed).public.raw for seed in receivers]
    workers: list[tuple[mp.process.BaseProcess, Connection]] = []

    def start(target: object, args: tuple) -> Connection:
        ours, theirs = context.Pipe()
        url = receiver_url if receiver_url and target is clients.receiver else relay.url
        process = context.Process(target=target, args=(theirs, url, plan, *args), daemon=True)
        process.start()
        workers.append((process, ours))
        return ours

    try:
        rx = [start(clients.receiver, (receivers[p::plan.procs],)) for p in range(plan.procs)]
        for pipe in rx:
            _expect(pipe, _READY_TIMEOUT_S, "receiver ready")
        devices = list(zip(range(plan.pairs), senders, receiver_keys))
        tx = [start(clients.sender, (devices[p::plan.procs],)) for p in range(plan.procs)]
        for pipe in tx:
            _expect(pipe, _READY_TIMEOUT_S, "sender ready")
        with CpuSampler(relay.pid) as cpu:
            start_ns = time.monotonic_ns() + _START_DELAY_NS
            for pipe in rx + tx:
                pipe.send(start_ns)
            limit = plan.deadline_s + 3 * _DRAIN_GRACE_S
            sent = [_expect(pipe, limit, "sender result") for pipe in tx]
            got = [_expect(pipe, limit, "receiver result") for pipe in rx]
        memory = memory_kib(relay.pid)
    finally:
        reap_workers(workers)
    return _summarise(plan, sent, got, cpu, memory)  # type: ignore[arg-type]


def reap_workers(workers: list[tuple[mp.process.BaseProcess, Connection]]) -> None:
    """Join every worker process, killing any still alive after 5 s, so none outlives a run."""
    for process, _pipe in workers:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


def _summarise(plan: LoadPlan, senders: list[dict], receivers: list[dict], cpu: CpuSampler,
               memory: dict[str, int]) -> dict[str, object]:
    sent_ns = {k: v for s in senders for k, v in s["sent_ns"].items()}
    received_ns = {k: v for r in receivers for k, v in r["received_ns"].items()}
    accepted = sum(s["accepted"] for s in senders)
    if not sent_ns or not received_ns:
        raise RuntimeError(f"nothing went through: sent {len(sent_ns)}, received {len(received_ns)},"
                           f" errors {[s['errors'] for s in senders]}")
    first_send, last_send = min(sent_ns.values()), max(sent_ns.values())
    last_accept = max(s["last_accept_ns"] for s in senders)
    last_receive = max(received_ns.values())
    latencies = [at - sent_ns[m] for m, at in received_ns.items() if m in sent_ns]
    relay_cpu_s, machine_cpu_s, wall_s = cpu.cpu_between(first_send, last_receive)
    window_s = max((last_receive - first_send) / 1e9, 1e-9)
    client_cores = sum(w["cpu_s"] for w in senders + receivers) / window_s
    errors: collections.Counter = collections.Counter()
    for s in senders:
        errors.update(s["errors"])
    return {
        "offered_per_s": plan.rate_per_s,
        "sent_per_s": len(sent_ns) / max(last_send - first_send, 1) * 1e9,
        "accepted_per_s": accepted / max(last_accept - first_send, 1) * 1e9,
        "delivered_per_s": len(received_ns) / max(last_receive - first_send, 1) * 1e9,
        "messages_sent": len(sent_ns),
        "messages_accepted": accepted,
        "messages_delivered": len(received_ns),
        "lost": len(sent_ns) - len(received_ns),
        "duplicates": sum(r["duplicates"] for r in receivers),
        "errors": dict(errors),
        "unanswered_connections": sum(s["unanswered_connections"] for s in senders),
        "latency_ms": percentiles(latencies),
        "relay_cpu_percent": 100 * relay_cpu_s / wall_s,
        "relay_peak_rss_mib": memory.get("VmHWM", 0) / 1024,
        "client_cpu_cores": client_cores,
        # Near 1.0: one load process was CPU-bound, so the clients, not the server, set the pace.
        "busiest_client_process_cores": max(w["cpu_s"] for w in senders + receivers) / window_s,
        # Busy cores not explained by the relay and the load generator: other work on the machine.
        "other_cpu_cores": max(0.0, (machine_cpu_s - relay_cpu_s) / wall_s - client_cores),
        "plan": plan.__dict__,
    }


def per_sender_for(rate_per_s: float, duration_s: float, pairs: int) -> int:
    return max(1, math.ceil(rate_per_s * duration_s / pairs))
