"""Keep one authenticated relay connection open: walk the relay list, back off, fail over.

The manager knows nothing of messages.  It connects (a refused connect or a
drop moves on to the next relay after a jittered exponential backoff) and
hands each connection and each of its events to the device through three
callbacks, so `Device` is only the public API and what it does with events.
A fourth, optional, hears of each failed attempt (a CLI tells its user).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Collection

import aiohttp

from proto import Identity, PublicKey
from proto.errors import ProtocolError
from runtime.logs import library_logger

from .backoff import Backoff
from .connection import DEFAULT_KEEPALIVE_S, RelayConnection, connect
from .protocol import Event
from .stats import DeviceStats

log = library_logger("continuum.client")

CONNECT_ERRORS = (OSError, aiohttp.ClientError, TimeoutError, ProtocolError)


class ConnectionManager:
    """Runs until cancelled; `connection` is the live one, or None between connections."""

    def __init__(self, identity: Identity, relays: list[str], *, max_envelope_bytes: int,
                 handshake_timeout_s: float, pinned_relay_keys: Collection[PublicKey] | None,
                 tls: ssl.SSLContext | None, backoff: Backoff, stats: DeviceStats,
                 on_connected: Callable[[RelayConnection], Awaitable[None]],
                 on_event: Callable[[Event, RelayConnection], Awaitable[None]],
                 on_disconnected: Callable[[RelayConnection], None],
                 keepalive_s: float = DEFAULT_KEEPALIVE_S,
                 on_connect_error: Callable[[str, BaseException], None] | None = None) -> None:
        self._identity = identity
        self._relays = relays
        self._max_envelope_bytes = max_envelope_bytes
        self._handshake_timeout_s = handshake_timeout_s
        self._pinned_relay_keys = pinned_relay_keys
        self._tls = tls
        self._backoff = backoff
        self._stats = stats
        self._on_connected = on_connected
        self._on_event = on_event
        self._on_disconnected = on_disconnected
        self._keepalive_s = keepalive_s
        self._on_connect_error = on_connect_error
        self.connection: RelayConnection | None = None
        self.connected = asyncio.Event()
        self.last_error: str | None = None

    async def use_identity(self, identity: Identity) -> None:
        """Authenticate as `identity` from the next connection on; the current one is closed."""
        self._identity = identity
        if self.connection is not None:
            await self.connection.close()

    async def run_forever(self) -> None:
        """Connect, serve, and on failure or drop move to the next relay after a backoff."""
        attempt = 0
        while True:
            url = self._relays[attempt % len(self._relays)]
            attempt += 1
            served = False
            try:
                async with connect(url, self._identity, max_envelope_bytes=self._max_envelope_bytes,
                                   handshake_timeout_s=self._handshake_timeout_s,
                                   keepalive_s=self._keepalive_s,
                                   pinned_relay_keys=self._pinned_relay_keys,
                                   tls=self._tls) as connection:
                    served = True
                    self._backoff.reset()
                    await self._serve(connection)
                log.info("relay_disconnected", relay=url)
            except CONNECT_ERRORS as exc:
                self.last_error = f"{url}: {describe(exc)}"
                if not served:
                    self._stats.connect_failures += 1
                    if self._on_connect_error is not None:
                        self._on_connect_error(url, exc)
                # info, not warning: a device without its relay is routine, and a CLI tells its
                # user in words (`on_connect_error`) rather than in a JSON line.
                log.info("relay_connection_failed" if not served else "relay_connection_lost",
                         relay=url, error=describe(exc))
            except Exception as exc:  # a bug must cost one connection, never the device
                self.last_error = f"{url}: {describe(exc)}"
                log.exception("connection_crashed", relay=url)
            await asyncio.sleep(self._backoff.next_delay())

    async def _serve(self, connection: RelayConnection) -> None:
        self.connection = connection
        self.connected.set()
        self._stats.connects += 1
        try:
            await self._on_connected(connection)
            async for event in connection.events():
                await self._on_event(event, connection)
        finally:
            self.connection = None
            self.connected.clear()
            self._on_disconnected(connection)


def describe(exc: BaseException) -> str:
    """One line for a log or a CLI message: the protocol code, or the exception's type."""
    if isinstance(exc, ProtocolError):
        return f"{exc.code.name}: {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
