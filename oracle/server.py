"""Run an oracle in-process: database, identity, pusher and HTTP app, as one async context.

`OracleServer` is what the CLI, the demo, the tests and the benchmark start,
so they all exercise the same code path; port 0 picks a free port.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from types import TracebackType

import structlog
from aiohttp import web

from proto import PublicKey
from runtime.listener import Listener, SocketCap, listen

from .auth import Auth
from .context import OracleContext
from .db import open_database
from .identity import load_identity, running
from .publisher import AccessListPublisher
from .pusher import Pusher
from .registry import Registry
from .relay_auth import RelayAuth
from .settings import OracleSettings
from .web import create_app

__all__ = ["OracleServer", "OracleSettings"]


class OracleServer:
    def __init__(self, settings: OracleSettings) -> None:
        settings.validate()
        self.settings = settings
        self.identity, self.chain = load_identity(Path(settings.identity_file))
        self.oracle: OracleContext | None = None
        self._running: contextlib.ExitStack | None = None
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        self.connections: SocketCap | None = None
        self.port = settings.port

    @property
    def url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.settings.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"

    async def create_admin(self, username: str, password: str | None = None) -> str:
        """Create an administrator; returns the (generated unless given) password."""
        assert self.oracle is not None, "start the oracle first"
        return await self.oracle.auth.create_admin(username, password)

    async def create_api_token(self, name: str, scope: str) -> str:
        """A bearer token with its scope (`read` or `write`), with no creator (as the CLI's)."""
        assert self.oracle is not None, "start the oracle first"
        return await self.oracle.auth.create_api_token(name, scope)

    async def start(self) -> None:
        log = structlog.get_logger("oracle").bind(oracle=self.identity.public.text[:16])
        self._running = contextlib.ExitStack()  # no key rotation while this oracle serves
        self._running.enter_context(running(Path(self.settings.identity_file)))
        db = await open_database(self.settings.database)
        try:
            publisher: AccessListPublisher | None = None
            pusher: Pusher | None = None

            def changed() -> None:
                if publisher is not None and pusher is not None:  # else: read when built
                    publisher.notify()
                    pusher.notify()

            registry = Registry(db, changed, self.settings.regions())
            await registry.assign_homes()
            epoch = await registry.begin_epoch()
            log = log.bind(epoch=epoch)
            publisher = AccessListPublisher(registry, self.identity, log, self.chain,
                                            validity_ms=int(self.settings.access_list_validity_s
                                                            * 1000),
                                            regions=registry.regions)
            await publisher.current()  # the first list is signed before anyone may ask for it
            pusher = Pusher(registry, publisher, self.identity, self.settings, log, self.chain)
            relay_auth = RelayAuth(self.identity.public,
                                   [PublicKey.from_text(k) for k in self.settings.relay_keys],
                                   lambda: pusher.relay_keys, self.chain.former)
            self.oracle = OracleContext(self.settings, self.identity, registry,
                                        Auth(db, self.settings.session_ttl_s), publisher,
                                        pusher, relay_auth, log, self.chain)
            # aiohttp arms keepalive_timeout when a connection is made and again after each
            # response, and closes the connection if no complete request has arrived by then
            # (web_protocol.RequestHandler); lingering_time bounds discarding an unread body.
            timeout = self.settings.request_timeout_s
            self._runner = web.AppRunner(create_app(self.oracle), access_log=None,
                                         handle_signals=False, shutdown_timeout=1.0,
                                         keepalive_timeout=timeout, lingering_time=timeout)
            await self._runner.setup()
            assert self._runner.server is not None
            limit, share = self.settings.max_connections, self.settings.max_connections_per_address

            def refused(first: bool, address: str | None) -> None:  # once per episode
                if first and address is None:
                    log.warning("connections_over_cap", limit=limit)
                elif first:
                    log.warning("connections_over_address_share", address=address, limit=share)

            # Relays' access-list polls, the dashboard and the API share this one port, so no
            # client address may hold more than its share of it (runtime/listener.SocketCap);
            # the trusted proxies have none: they hold slow clients themselves.
            self.connections = SocketCap(self._runner.server, limit, refused, per_address=share,
                                         unbounded=self.settings.proxy_trust.networks)
            self._listener = await listen(self.connections, self.settings.host,
                                          self.settings.port, self.settings.tls_context(),
                                          self.settings.request_timeout_s)
        except BaseException:
            if self.oracle is None:
                await db.close()
            await self.stop()
            raise
        sockets = [s for s in self._listener.sockets
                   if s.family in (socket.AF_INET, socket.AF_INET6)]
        self.port = sockets[0].getsockname()[1]
        await pusher.start()
        if not self.settings.relays and not self.settings.relay_keys:
            log.warning("no_relay_may_fetch_the_access_list",
                        detail="set --relay (relays this oracle pushes through) or --relay-key")
        log.info("oracle_started", url=self.url, oracle_key=self.identity.public.text,
                 settings=self.settings.describe())

    async def stop(self) -> None:
        """Stop pushing and serving, close the database; safe to call twice."""
        runner, oracle, listener = self._runner, self.oracle, self._listener
        self._runner = self.oracle = self._listener = None
        if listener is not None:
            listener.close()  # accept no more; runner.cleanup() closes the open connections
        if oracle is not None:
            await oracle.pusher.stop()
        if runner is not None:
            await runner.cleanup()
        if listener is not None:
            await listener.wait_closed()
        if oracle is not None:
            await oracle.registry.db.close()
        running_lock, self._running = self._running, None
        if running_lock is not None:
            running_lock.close()

    async def __aenter__(self) -> OracleServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
