"""Figures for the relay under hostile load: each attack against this checkout's relay and,
with --baseline, against another checkout's, in one run (the note's before/after table).
The attacking clients are this checkout's, so the baseline must speak the same protocol
version (before protocol 2, use that checkout's own copy of this script).

    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/hostile.py --baseline /tmp/base [--only nat,slowloris,...]

Attacks (issue "The relay holds under hostile load"), each on a fresh relay
started with the CLI on 127.0.0.1 and the settings named in its row.  For the
timed attacks (storm, verify, newcomers) the relay runs alone on core 0 and
this process on core 1, both real-time FIFO tasks, so that other work on a
small shared machine does not show in the figures:

  nat        64 idle upgrades per address held by a flooder at 127.0.0.1 while a device
             at the same address retries its handshake for 5 s: handshakes it completed
  slowloris  a half-sent upgrade request: seconds until the relay drops it (stops at 30)
  one-key    connections one key holds at once when it connects 50 times
  stuck      200 devices that never read, each sent 64 x 60 kB (more than the kernel's socket
             buffers take, so the rest waits in the relay's memory): relay RSS at the peak
             and 45 s later (heartbeat 5 s, write timeout 5 s), and sockets still open
  storm      102,000 (message, recipient) expiries at one instant (1,700 envelopes to 60
             recipients): the worst gap between two answered /healthz probes
  verify     a flood of handshakes with fresh keys from one address (a second process):
             a known device's send round trip p99, idle and during the flood, medians of
             3 alternating rounds of 600 (the flood on core 1 at a lower priority), and
             the slowest round trip during the flood
  logs       the same flood for 5 s against a relay logging at the default level (info):
             bytes of log it writes per second and per refused handshake
  newcomers  what the handshake budgets cost honest devices: handshakes/s that 16 new
             devices at a time complete while 8 established pairs saturate the relay
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import aiohttp

from common import RelayProcess, memory_kib, raise_nofile, relay_flags, table, write_results
from proto import Identity, Kind, seal_envelope
from proto.frames import Ack, Deliver, Error, Send, decode_frame, encode_frame
from runtime.clock import now_ms
from loadgen import LoadPlan, run_load
from wsclient import Link, connect

MAX_FRAME = 1 << 20
STORM_SENDS = 1_700
LOG_SECONDS = 5.0
RELAXED = ("--rate-per-s", "1e6", "--rate-burst", "1000000", "--mailbox-max-messages", "1000000",
           "--mailbox-max-bytes", str(1 << 31), "--log-level", "warning")


async def _handshake(http: aiohttp.ClientSession, url: str, identity: Identity) -> Link:
    return await connect(http, url, identity)


# -- the attacks --------------------------------------------------------------------------------

async def nat(url: str) -> str:
    stop = asyncio.Event()
    held: list[aiohttp.ClientWebSocketResponse] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as flood, \
            aiohttp.ClientSession() as http:
        async def flooder() -> None:
            while not stop.is_set():
                try:
                    ws = await flood.ws_connect(url)
                    held.append(ws)
                except aiohttp.ClientError:
                    await asyncio.sleep(0.01)
        task = asyncio.create_task(flooder())
        await asyncio.sleep(1.0)
        served, deadline = 0, time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                ws = await _handshake(http, url, Identity.generate())
                served += 1
                await ws.close()
            except Exception:
                await asyncio.sleep(0.1)  # a device's backoff
        stop.set()
        await task
        for ws in held:
            await ws.close()
    return f"{served} handshakes in 5 s"


async def slowloris(url: str) -> str:
    port = int(url.split(":")[2].split("/")[0])
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setblocking(False)
        await loop.sock_sendall(sock, b"GET /v1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: webs")
        started = time.monotonic()
        try:
            async with asyncio.timeout(30):
                while await loop.sock_recv(sock, 1024):
                    pass
        except TimeoutError:
            return "still open at 30 s"
        except ConnectionError:
            pass
    return f"dropped after {time.monotonic() - started:.1f} s"


async def one_key(url: str) -> str:
    key = Identity.generate()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        sockets = [await _handshake(http, url, key) for _ in range(50)]
        await asyncio.sleep(1.0)
        alive = 0
        for link in sockets:
            try:
                data = await link.receive(timeout=0.05)
                # Superseded: an ERROR, then the close; anything else leaves it open.
                alive += data is not None and not isinstance(_decoded(data), Error)
            except asyncio.TimeoutError:
                alive += 1
        for ws in sockets:
            await ws.close()
    return f"{alive} of 50 connections open"


def _decoded(data: bytes | None) -> object:
    return None if data is None else decode_frame(data, MAX_FRAME)


def _small_window(addr_info: tuple) -> socket.socket:
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def stuck(url: str, relay: RelayProcess) -> str:
    devices = [Identity.generate() for _ in range(200)]
    sender = Identity.generate()
    before = memory_kib(relay.pid)["VmRSS"]
    connector = aiohttp.TCPConnector(limit=0, socket_factory=_small_window)
    async with aiohttp.ClientSession(connector=connector) as http:
        readers = [await _handshake(http, url, device) for device in devices]  # never read again
        sender_ws = await _handshake(http, url, sender)
        payload = b"x" * 60_000
        for device in devices:
            for _ in range(64):
                envelope = seal_envelope(sender, Kind.DATA, [device.public], payload, ttl_s=3600,
                                         now_ms=now_ms())
                await sender_ws.send(encode_frame(Send(envelope.raw)))
            while True:  # wait for this device's answers, so the sender is never the stuck one
                frame = _decoded(await sender_ws.receive(timeout=30))
                if isinstance(frame, Deliver):
                    await sender_ws.send(encode_frame(Ack(frame.tag)))
                elif frame is not None and getattr(frame, "msg_id", None) == envelope.msg_id:
                    break
        peak = memory_kib(relay.pid)["VmRSS"]
        await asyncio.sleep(45)
        after = memory_kib(relay.pid)["VmRSS"]
        lingering = _established_to(relay.port) - (0 if sender_ws.ws.closed else 1)
        del readers  # closed with the session
        await sender_ws.close()
    return (f"RSS +{(peak - before) / 1024:.0f} MiB at peak, +{(after - before) / 1024:.0f} MiB"
            f" 45 s later, {lingering} of {len(devices)} sockets still open")


def _established_to(port: int) -> int:
    """Established TCP connections whose local port is `port` (the relay's side), from /proc."""
    count = 0
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table_path).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


async def storm(url: str, relay: RelayProcess) -> str:
    sender = Identity.generate()
    recipients = [Identity.generate().public for _ in range(60)]
    async with aiohttp.ClientSession() as http:
        ws = await _handshake(http, url, sender)
        stamp = now_ms()
        for _ in range(STORM_SENDS):
            envelope = seal_envelope(sender, Kind.DATA, recipients, b"x", ttl_s=40, now_ms=stamp)
            await ws.send(encode_frame(Send(envelope.raw)))
            await ws.receive(timeout=30)
        await ws.close()
        base = url.replace("ws://", "http://").rsplit("/v1/", 1)[0]
        worst, last = 0.0, time.monotonic()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = time.monotonic()
            worst, last = max(worst, now - last), now
            async with http.get(base + "/metrics") as response:
                metrics = await response.text()
            if _metric(metrics, "continuum_messages_expired_total") >= STORM_SENDS * 60:
                break
            async with http.get(base + "/healthz") as response:
                await response.read()
            await asyncio.sleep(0.02)
        worst = max(worst, time.monotonic() - last)  # the request that ended the loop
    return f"worst /healthz gap {worst * 1000:.0f} ms"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


VERIFY_ROUNDS = 3
VERIFY_SAMPLES = 600


def _pin(pid: int, core: int, priority: int) -> bool:
    """Run `pid` on one core under the real-time FIFO policy at `priority`, so the relay,
    the measuring device and the flood each get a predictable share of this small machine
    whatever else runs on it; False if not allowed (then the figures are noisier)."""
    try:
        if (os.cpu_count() or 1) > core:
            os.sched_setaffinity(pid, {core})
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (OSError, AttributeError):
        return False


def _flood_handshakes(url: str, stop: EventType) -> None:
    """A second process: fresh keys as fast as it can, from 127.0.0.1, until `stop` is set."""
    _pin(0, 1, 10)  # beside the measuring device, which preempts it

    async def run() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async def one() -> None:
                while not stop.is_set():
                    try:
                        ws = await _handshake(http, url, Identity.generate())
                        await ws.close()
                    except Exception:
                        pass
            await asyncio.gather(*(one() for _ in range(32)))
    asyncio.run(run())


async def verify(url: str, relay: RelayProcess) -> str:
    """A known device's send → deliver round trip, idle and under a flood of fresh-key
    handshakes (on the measuring device's core, at a lower priority), in alternating rounds."""
    device, peer = Identity.generate(), Identity.generate()
    refused = lambda: relay.metric_sum("continuum_handshake_failures_total")  # noqa: E731
    idle_p99s, flood_p99s, flood_rates, flood_worst = [], [], [], []
    async with aiohttp.ClientSession() as http:
        sender = await _handshake(http, url, device)
        receiver = await _handshake(http, url, peer)

        async def round_trips(count: int) -> tuple[float, float]:
            times = []
            for _ in range(count):
                envelope = seal_envelope(device, Kind.DATA, [peer.public], b"p", ttl_s=60,
                                         now_ms=now_ms())
                started = time.perf_counter()
                await sender.send(encode_frame(Send(envelope.raw)))
                while True:
                    frame = _decoded(await receiver.receive(timeout=30))
                    if isinstance(frame, Deliver):
                        await receiver.send(encode_frame(Ack(frame.tag)))
                        break
                times.append(time.perf_counter() - started)
                await sender.receive(timeout=30)  # its ACCEPTED
                await asyncio.sleep(0.005)
            return statistics.quantiles(times, n=100)[98] * 1000, max(times) * 1000

        for _ in range(VERIFY_ROUNDS):
            idle_p99s.append((await round_trips(VERIFY_SAMPLES))[0])
            stop = mp.get_context("spawn").Event()
            flood = mp.get_context("spawn").Process(target=_flood_handshakes, args=(url, stop))
            flood.start()
            try:
                await asyncio.sleep(2.0)  # the flood at full speed before measuring
                before, started = refused(), time.monotonic()
                p99, worst = await round_trips(VERIFY_SAMPLES)
                flood_p99s.append(p99)
                flood_worst.append(worst)
                flood_rates.append((refused() - before) / (time.monotonic() - started))
            finally:
                stop.set()
                flood.join(20)
                if flood.is_alive():
                    flood.kill()
            await asyncio.sleep(1.0)  # the flood's last sockets close
        await sender.close()
        await receiver.close()
    idle, loaded = statistics.median(idle_p99s), statistics.median(flood_p99s)
    return (f"p99 {idle:.1f} ms idle, {loaded:.1f} ms under a flood of "
            f"{statistics.median(flood_rates):,.0f} refused handshakes/s (x{loaded / idle:.1f}); "
            f"slowest {max(flood_worst):.1f} ms")


async def logs(url: str, relay: RelayProcess) -> str:
    """What the relay writes to its log, at the default level (info), while a flood of fresh
    keys has its handshakes refused: every refusal is something an attacker buys cheaply."""
    refused = lambda: relay.metric_sum("continuum_handshake_failures_total")  # noqa: E731
    stop = mp.get_context("spawn").Event()
    flood = mp.get_context("spawn").Process(target=_flood_handshakes, args=(url, stop))
    flood.start()
    try:
        await asyncio.sleep(2.0)  # past the address's burst of unknown keys, at full speed
        size, count, started = relay.log_path.stat().st_size, refused(), time.monotonic()
        await asyncio.sleep(LOG_SECONDS)
        seconds = time.monotonic() - started
        grown, count = relay.log_path.stat().st_size - size, refused() - count
    finally:
        stop.set()
        flood.join(20)
        if flood.is_alive():
            flood.kill()
    return (f"{grown / seconds / 1024:,.1f} KiB/s of log at {count / seconds:,.0f} "
            f"refused handshakes/s ({grown / max(count, 1):,.1f} bytes per refusal)")


def _newcomers(url: str, seconds: float, result: Connection) -> None:
    """A process of honest new devices (fresh keys, 16 at a time): handshakes completed."""
    _pin(0, 1, 60)  # never starved by the load generators beside it

    async def run() -> int:
        done, deadline = 0, time.monotonic() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async def one() -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    ws = await _handshake(http, url, Identity.generate())
                    done += 1
                    await ws.close()
            await asyncio.gather(*(one() for _ in range(16)))
        return done
    result.send(asyncio.run(run()))


async def newcomers(url: str, relay: RelayProcess) -> str:
    """What the budgets cost honest devices: handshakes/s that new devices complete while
    established ones keep the relay busy (reading from them without pause, so newcomers get
    only the turns the budget guarantees them), and the established devices' delivery rate
    meanwhile.  The load generators share core 1 with the newcomers, who preempt them."""
    plan = LoadPlan(pairs=8, procs=1, per_sender=8_000, rate_per_s=None, window=32,
                    payload_bytes=64, deadline_s=60.0)
    load = asyncio.create_task(asyncio.to_thread(run_load, relay, plan))
    await asyncio.sleep(6.0)  # sealing, connecting, then the load at full speed
    ours, theirs = mp.get_context("spawn").Pipe()
    process = mp.get_context("spawn").Process(target=_newcomers, args=(url, 5.0, theirs))
    process.start()
    try:
        completed = await asyncio.to_thread(ours.recv)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    summary = await load
    return (f"{completed / 5.0:,.0f} handshakes/s while established devices deliver "
            f"{summary['delivered_per_s']:,.0f} msg/s")


ATTACKS: dict[str, tuple[tuple[str, ...], Callable[..., Awaitable[str]]]] = {
    "nat": (("--max-pending-handshakes-per-address", "64"), nat),
    "slowloris": ((), slowloris),
    "one-key": ((), one_key),
    "stuck": (("--heartbeat-s", "5", "--write-timeout-s", "5", "--close-timeout-s", "2",
               "--max-connections-per-address", "100000", "--unknown-key-burst", "100000"),
              stuck),
    "storm": (("--sweep-interval-s", "1"), storm),
    "verify": ((), verify),
    "logs": (("--log-level", "info"), logs),
    "newcomers": (("--unknown-key-rate-per-s", "1e6", "--unknown-key-burst", "1000000"),
                  newcomers),
}


# Attacks whose figure is a time: the relay and this process run as real-time tasks, each on a
# core of its own.  The others (counts, memory) run as ordinary processes: the stuck attack
# seals 750 MB, minutes of CPU that must not starve everything else on the machine.
TIMED = {"storm", "verify", "newcomers"}


def run(code_dir: str | None, name: str) -> str:
    flags, attack = ATTACKS[name]
    known = relay_flags(code_dir)
    args = [a for pair in zip(flags[::2], flags[1::2]) if pair[0] in known for a in pair]
    relaxed = [a for pair in zip(RELAXED[::2], RELAXED[1::2]) if pair[0] in known for a in pair]
    with RelayProcess(*relaxed, *args, code_dir=code_dir) as relay:
        timed = name in TIMED
        if timed and not (_pin(relay.pid, 0, 50) and _pin(0, 1, 50)):
            print("(could not pin the relay and this process to cores as real-time tasks: "
                  "other work on the machine shows in the figures)", flush=True)
        needs_relay = attack.__code__.co_argcount == 2
        coro = attack(relay.url, relay) if needs_relay else attack(relay.url)
        try:
            return asyncio.run(coro)
        finally:
            if timed:  # an ordinary process again for whatever runs next
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another checkout's top directory (the 'before')")
    parser.add_argument("--only", default=",".join(ATTACKS), help="comma-separated attacks")
    args = parser.parse_args()
    raise_nofile()
    rows, results = [], {}
    for name in args.only.split(","):
        before = run(str(Path(args.baseline).resolve()), name) if args.baseline else "-"
        after = run(None, name)
        rows.append((name, before, after))
        results[name] = {"before": before, "after": after}
        print(f"{name}: before {before} | after {after}", flush=True)
    print(table(["attack", "before (baseline)", "after (this checkout)"], rows))
    print(f"results: {write_results('hostile', results)}")


if __name__ == "__main__":
    main()
