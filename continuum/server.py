"""Run a relay: build its context, serve the app, sweep expiries; usable in-process.

`RelayServer` is what the CLI, the demo, the tests and the benchmarks all
start, so they exercise the same code path; port 0 picks a free port.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable
from pathlib import Path
from types import TracebackType

import structlog
from aiohttp import web

from proto import Identity
from runtime.listener import Listener, SocketCap, TurnBudget, listen
from runtime.tasks import cancel_and_wait

from .access import AccessControl
from .access_fetch import AccessListFetcher
from .app import CONNECT_PATH, create_app, create_worker_app
from .connection_gate import ConnectionGate
from .context import RelayContext
from .expiry import expire_forever
from .metrics import RelayMetrics
from .presence_report import PresenceReporter
from .settings import Settings
from .store import open_store
from .store.regional import open_regional_store
from .store.timed import TimedStore
from .streams.router import StreamRouter
from .streams.table import StreamBudget

__all__ = ["RelayServer", "Settings", "load_relay_identity"]

_STOP_STEP_S = 5.0
_log = structlog.get_logger("continuum")


def load_relay_identity(settings: Settings) -> Identity:
    """The relay key from settings text, else its file (created on first use), else a fresh one."""
    if settings.relay_key:
        return Identity.from_text(settings.relay_key)
    if settings.relay_key_file:
        return Identity.load_or_create(Path(settings.relay_key_file))
    return Identity.generate()


class RelayServer:
    def __init__(self, settings: Settings, worker: int = 0,
                 sockets: list[socket.socket] | None = None) -> None:
        """`worker`: this process's index among `settings.workers`, and `sockets` the listening
        sockets it shares with the others (continuum/supervisor.py); None: bind its own."""
        settings.validate()
        self.settings = settings
        self.worker = worker
        self._shared_sockets = sockets
        self._worker_runner: web.AppRunner | None = None
        self.relay: RelayContext | None = None
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        self.sockets: SocketCap | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._fetcher: AccessListFetcher | None = None
        self.port = settings.port

    @property
    def base_url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.settings.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        return "ws" + self.base_url[len("http"):] + CONNECT_PATH

    async def start(self) -> None:
        settings = self.settings
        identity = load_relay_identity(settings)
        log = structlog.get_logger("continuum").bind(relay=identity.public.text[:16])
        metrics = RelayMetrics()
        access = AccessControl(settings, metrics, log)
        regions = open_regional_store(settings, access, metrics)
        store = TimedStore(regions or open_store(settings.store), metrics.store_seconds,
                           metrics.store_errors)
        self._fetcher = AccessListFetcher(access, settings, identity, store, log)
        gate = ConnectionGate(
            max_pending_per_address=settings.max_pending_handshakes_per_address,
            max_per_address=settings.max_connections_per_address,
            max_per_key=settings.max_connections_per_key,
            unknown_key_rate_per_s=settings.unknown_key_rate_per_s,
            unknown_key_burst=settings.unknown_key_burst, known_keys=settings.known_keys,
            enrolled=lambda key: access.current is not None and key in access.current.enrolled)
        budget = StreamBudget(settings.max_streams, settings.stream_relay_window_bytes)
        metrics.streams_open.set_function(lambda: budget.open)
        streams = StreamRouter(os.urandom(8).hex(), settings.limits, log,
                               tick_s=min(0.5, settings.stream_open_timeout_s / 4),
                               remote=store.stream_bus(), bus_lost=metrics.stream_bus_lost.inc)
        access.on_applied(streams.access_changed)
        presence = (PresenceReporter(settings, identity, access, metrics, log)
                    if access.enabled and settings.presence_interval_s > 0 else None)
        self.relay = RelayContext(settings, store, identity, metrics, log, gate, access,
                                  streams, budget, presence, regions)
        await streams.start()
        # keepalive_timeout also bounds the time from accept() to a complete request:
        # aiohttp arms it when the socket is accepted (slowloris).
        self._runner = web.AppRunner(create_app(self.relay), access_log=None,
                                     handle_signals=False, shutdown_timeout=1.0,
                                     keepalive_timeout=settings.request_timeout_s)
        await self._runner.setup()
        refused = metrics.handshake_failures.labels("connection_limit")
        assert self._runner.server is not None
        self.sockets = SocketCap(self._runner.server, settings.max_connections,
                                 on_refused=lambda first, address: refused.inc(),
                                 budget=TurnBudget(settings.unauthenticated_steps_per_turn,
                                                   settings.unauthenticated_yield_ms / 1000))
        metrics.open_sockets.set_function(lambda: self.sockets.open if self.sockets else 0)
        self._count_connections(metrics, gate)
        if self._shared_sockets is None:
            self._listener = await listen(self.sockets, settings.host, settings.port,
                                          settings.tls_context(), settings.request_timeout_s)
        else:
            self._listener = Listener(self.sockets, self._shared_sockets, settings.tls_context(),
                                      settings.request_timeout_s)
        self.port = self._listener.sockets[0].getsockname()[1]
        if self._shared_sockets is not None and settings.worker_metrics_port:
            self._worker_runner = web.AppRunner(create_worker_app(self.relay), access_log=None,
                                                handle_signals=False, shutdown_timeout=1.0)
            await self._worker_runner.setup()
            await web.TCPSite(self._worker_runner, settings.host,
                              settings.worker_metrics_port + self.worker,
                              ssl_context=settings.tls_context()).start()
        self._sweeper = asyncio.create_task(expire_forever(self.relay), name="expiry")
        if regions is not None:
            self._prober = asyncio.create_task(regions.probe_forever(), name="region-probe")
        await access.start()
        await self._fetcher.start()
        if presence is not None:
            await presence.start()
        log.info("relay_started", url=self.url, relay_key=identity.public.text,
                 settings=settings.describe())

    def _count_connections(self, metrics: RelayMetrics, gate: ConnectionGate) -> None:
        """`continuum_connections{state}`, read from the gate and the sockets when scraped."""
        # Sessions being served: the gauge the sessions keep (prometheus_client has no
        # public read of one value short of collecting the registry).
        open_now = metrics.connected._value.get
        states = metrics.connections
        states.labels("handshake").set_function(lambda: gate.pending_handshakes)
        states.labels("open").set_function(open_now)
        states.labels("closing").set_function(lambda: max(0, gate.authenticated - open_now()))
        states.labels("upgrading").set_function(lambda: max(0, (
            self.sockets.open if self.sockets else 0)
            - gate.pending_handshakes - gate.authenticated))

    async def stop(self) -> None:
        """Stop serving and close the store; safe to call twice.

        Every step is bounded by `_STOP_STEP_S`: a relay told to stop must stop, even when
        a store client sits on a dead connection or a library absorbed a cancellation.  A
        step that overruns or fails is logged by name; the next one runs."""
        sweeper, runner, relay, listener = self._sweeper, self._runner, self.relay, self._listener
        fetcher, self._fetcher = self._fetcher, None
        prober, self._prober = self._prober, None
        worker_runner, self._worker_runner = self._worker_runner, None
        if worker_runner is not None:
            await _bounded("worker_metrics", worker_runner.cleanup())
        await _bounded("region_probe", cancel_and_wait(prober))
        self._sweeper = self._runner = self.relay = self._listener = None
        if listener is not None:
            listener.close()  # accept nothing more; open sockets are shut down by the runner
        if fetcher is not None:
            await _bounded("access_list_fetch", fetcher.stop())
        if relay is not None:
            await _bounded("access", relay.access.stop())
        await _bounded("expiry", cancel_and_wait(sweeper))
        if runner is not None:
            await _bounded("sessions", runner.cleanup())
        if listener is not None:
            await _bounded("listener", listener.wait_closed())
        if relay is not None and relay.presence is not None:
            # After the sessions: their ends go in its last report.
            await _bounded("presence", relay.presence.stop())
        if relay is not None:
            # After the sessions: their last aborts go out first.
            await _bounded("streams", relay.streams.stop())
            await _bounded("store", relay.store.close())

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


async def _bounded(step: str, work: Awaitable[None]) -> None:
    """One step of `RelayServer.stop`, given at most `_STOP_STEP_S`; one that overruns or
    fails is logged, and the stop goes on (a task that crashed earlier raises here)."""
    try:
        async with asyncio.timeout(_STOP_STEP_S):
            await work
    except TimeoutError:
        _log.warning("relay_stop_step_overran", step=step, after_s=_STOP_STEP_S)
    except Exception as exc:  # noqa: BLE001 - the steps after it still run
        _log.error("relay_stop_step_failed", step=step, error=repr(exc))
