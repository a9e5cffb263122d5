"""One connection flooding the relay with cheap frames: how many it handles a second, its CPU,
and another device's round trip meanwhile (README, "Security model": the frame rate).

    .venv/bin/python benchmarks/frame_flood.py [--kind credit|ack|ping] [--seconds 3]
                                               [--baseline <older checkout>]

A relay (memory store, default limits) is started with the CLI.  A pair of devices in this
process measures send → DELIVER round trips, first idle for 1 s, then while a second process
floods one authenticated connection for `--seconds` with frames that no SEND rate token or
abuse count bounds: STREAM_CREDIT for a stream that does not exist (`credit`), ACKs of a tag
never delivered (`ack`), or WebSocket PINGs (`ping`), written as fast as the relay takes
them.  The flooder then sends one SEND: its ACCEPTED comes once every frame before it was
handled, so frames/s is exact.  With `--baseline`, the same against that checkout's relay.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import struct
import time
from pathlib import Path

import aiohttp

from common import RelayProcess, cpu_seconds
from proto import Identity
from proto.frames import Ack, FrameType, StreamCredit, decode_frame, encode_frame
from wsclient import Link, connect, frame_type, sealed_sends

MAX_FRAME = 1 << 20


def _masked(payload: bytes, opcode: int) -> bytes:
    """A client frame with a zero mask (the payload unchanged), built without aiohttp."""
    size = len(payload)
    head = (struct.pack("!BB", opcode, 0x80 | size) if size < 126
            else struct.pack("!BBH", opcode, 0xFE, size))
    return head + bytes(4) + payload


async def _flood(url: str, kind: str, seconds: float) -> tuple[int, float]:
    async with aiohttp.ClientSession() as http:
        me = Identity.generate()
        link = await connect(http, url, me)
        frame = encode_frame(StreamCredit(os.urandom(16), 1) if kind == "credit"
                             else Ack("never-delivered"))
        transport = link.ws._response.connection.transport  # type: ignore[union-attr]
        sent, started = 0, time.monotonic()
        while time.monotonic() - started < seconds:
            if kind == "ping":
                batch = _masked(b"", 0x89) * 2000
            else:
                batch = b"".join(_masked(link._sealer.seal(frame), 0x82) for _ in range(2000))
            transport.write(batch)
            sent += 2000
            while transport.get_write_buffer_size() > 1 << 20:
                await asyncio.sleep(0.001)
        await link.send(sealed_sends(me, me.public, 1, 16)[0][1])
        while frame_type(await link.receive(timeout=600) or b"\0\0") != FrameType.ACCEPTED:
            pass
        return sent, time.monotonic() - started


def _flood_process(url: str, kind: str, seconds: float, out: mp.Queue) -> None:
    out.put(asyncio.run(_flood(url, kind, seconds)))


async def _round_trips(url: str, seconds: float) -> list[float]:
    """Send → DELIVER (acked) between two fresh devices, 40 a second (below the send rate)."""
    async with aiohttp.ClientSession() as http:
        a_id, b_id = Identity.generate(), Identity.generate()
        a, b = await connect(http, url, a_id), await connect(http, url, b_id)
        sends = iter(sealed_sends(a_id, b_id.public, 1000, 16))
        rtts: list[float] = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            sent = time.perf_counter()
            await a.send(next(sends)[1])
            await _deliver_and_ack(b)
            rtts.append(time.perf_counter() - sent)
            while frame_type(await a.receive(timeout=60) or b"\0\0") != FrameType.ACCEPTED:
                pass
            await asyncio.sleep(0.025)
        return rtts


async def _deliver_and_ack(link: Link) -> None:
    while True:
        data = await link.receive(timeout=60)
        if data is not None and frame_type(data) == FrameType.DELIVER:
            await link.send(encode_frame(Ack(decode_frame(data, MAX_FRAME).tag)))
            return


def _ms(values: list[float]) -> str:
    return (f"p50 {statistics.median(values) * 1e3:.1f} ms, max {max(values) * 1e3:.0f} ms"
            f" (n={len(values)})")


def measure(kind: str, seconds: float, code_dir: str | None) -> str:
    with RelayProcess("--log-level", "warning", code_dir=code_dir) as relay:
        idle = asyncio.run(_round_trips(relay.url, 1.0))
        out: mp.Queue = mp.Queue()
        flooder = mp.Process(target=_flood_process, args=(relay.url, kind, seconds, out))
        cpu, started = cpu_seconds(relay.pid), time.monotonic()
        flooder.start()
        during = asyncio.run(_round_trips(relay.url, seconds * 0.9))
        frames, elapsed = out.get(timeout=900)
        cpu, wall = cpu_seconds(relay.pid) - cpu, time.monotonic() - started
        flooder.join()
    return (f"{frames:,} {kind} frames in {elapsed:.1f} s = {frames / elapsed:,.0f}/s, relay CPU"
            f" {cpu / wall:.0%} of a core; another device's round trip: idle {_ms(idle)},"
            f" during the flood {_ms(during)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("credit", "ack", "ping"), default="credit")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--baseline", help="another checkout, measured the same way first")
    args = parser.parse_args()
    if args.baseline:
        print("baseline:", measure(args.kind, args.seconds, args.baseline))
    print("this checkout:", measure(args.kind, args.seconds,
                                    str(Path(__file__).resolve().parent.parent)))


if __name__ == "__main__":
    main()
