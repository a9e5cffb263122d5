"""`continuum` command: run one relay until SIGINT/SIGTERM, or `--workers N` of them on one port."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import sys
from collections.abc import Callable

from proto.errors import ProtocolError
from runtime.logs import EventSampler, configure_logging

from .server import RelayServer
from .settings import Settings
from .supervisor import supervise

# A peer that never authenticates can have a handshake refused hundreds of times a second
# (fresh keys, garbage): its lines are sampled, a few a second per reason, each carrying the
# number dropped before it.  continuum_handshake_failures_total still counts every refusal.
# A key that reconnects in a loop (a verify and a signed WELCOME each) wrote two lines a
# time: its connects and disconnects are sampled per key, so other devices' are all kept.
SAMPLED_EVENTS = {"handshake_refused": ("reason",), "device_connected": ("device",),
                  "device_disconnected": ("device",)}
SAMPLED_LINES_PER_S = 5


async def _serve(settings: Settings, worker: int, sockets: list[socket.socket] | None,
                 serving: Callable[[], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with RelayServer(settings, worker, sockets) as server:
        # What exists now (modules, the app, the store) lives as long as the process: out of
        # the collector's sight, each full collection scans only the connections' objects.
        # Under a flood of refused handshakes a known device's p99 fell from 34-47 ms to
        # 13-20 ms (benchmarks/hostile.py --only verify, A/B on a quiet machine).
        gc.freeze()
        print(f"continuum relay listening on {server.url}", file=sys.stderr, flush=True)
        serving()
        await stop.wait()


def _run(settings: Settings, worker: int = 0, sockets: list[socket.socket] | None = None,
         serving: Callable[[], None] = lambda: None) -> None:
    """One relay process (the only one, or worker `worker` on the supervisor's `sockets`)
    until SIGINT/SIGTERM."""
    try:
        asyncio.run(_serve(settings, worker, sockets, serving))
    except OSError as exc:
        sys.exit(f"continuum: cannot start: {exc}")
    except (ValueError, ProtocolError) as exc:  # a store URL or key the settings named
        print(f"continuum: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_sources(argv)
    # Before the fork: each worker samples its own lines (N times the rate with N workers).
    configure_logging(settings.log_level,
                      sampler=EventSampler(SAMPLED_EVENTS, per_s=SAMPLED_LINES_PER_S))
    if settings.workers == 1:
        _run(settings)
        return
    try:
        sys.exit(supervise(settings, _run))
    except OSError as exc:
        sys.exit(f"continuum: cannot start: {exc}")


if __name__ == "__main__":
    main()
