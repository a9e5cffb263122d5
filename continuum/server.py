"""Run a relay: build its context, serve the app, sweep expiries; usable in-process.

`RelayServer` is what the CLI, the demo, the tests and the benchmarks all
start, so they exercise the same code path; port 0 picks a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from types import TracebackType

import structlog
from aiohttp import web

from proto import Identity

from .access import AccessControl
from .app import CONNECT_PATH, create_app
from .connection_gate import ConnectionGate
from .context import RelayContext
from .expiry import expire_forever
from .metrics import RelayMetrics
from .settings import Settings
from .store import open_store

__all__ = ["RelayServer", "Settings", "load_relay_identity"]


def load_relay_identity(settings: Settings) -> Identity:
    """The relay key from settings text, else its file (created on first use), else a fresh one."""
    if settings.relay_key:
        return Identity.from_text(settings.relay_key)
    if settings.relay_key_file:
        return Identity.load_or_create(Path(settings.relay_key_file))
    return Identity.generate()


class RelayServer:
    def __init__(self, settings: Settings) -> None:
        settings.validate()
        self.settings = settings
        self.relay: RelayContext | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port = settings.port

    @property
    def base_url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + CONNECT_PATH

    async def start(self) -> None:
        store = open_store(self.settings.store)
        identity = load_relay_identity(self.settings)
        log = structlog.get_logger("continuum").bind(relay=identity.public.text[:16])
        gate = ConnectionGate(self.settings.max_connections,
                              self.settings.max_pending_handshakes_per_address)
        metrics = RelayMetrics()
        access = AccessControl(self.settings.oracle_url, self.settings.oracle_key,
                               self.settings.require_enrollment, identity, metrics, log)
        self.relay = RelayContext(self.settings, store, identity, metrics, log, gate, access)
        self._runner = web.AppRunner(create_app(self.relay), access_log=None,
                                     handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port,
                           reuse_address=True)
        await site.start()
        sockets = [s for s in site._server.sockets if s.family in (socket.AF_INET, socket.AF_INET6)]  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(expire_forever(self.relay), name="expiry")
        await access.start()
        log.info("relay_started", url=self.url, relay_key=identity.public.text,
                 settings=self.settings.describe())

    async def stop(self) -> None:
        """Stop serving and close the store; safe to call twice."""
        sweeper, runner, relay = self._sweeper, self._runner, self.relay
        self._sweeper = self._runner = self.relay = None
        if relay is not None:
            await relay.access.stop()
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        if runner is not None:
            await runner.cleanup()
        if relay is not None:
            await relay.store.close()

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
