"""A redis-py PubSub that reports the reconnects redis-py otherwise makes in silence.

redis-py re-makes a PubSub's connection by itself: a read or command that fails
with ConnectionError or TimeoutError is retried on a new socket (the store's
clients retry those, `RedisStore.from_url`), and a read that finds its socket
closed reconnects first.  Either way `PubSub.on_connect` subscribes the old
channels again and nothing is raised, so the owner never learns that Redis
dropped the connection (CLIENT KILL, a restart, or the `client-output-buffer-limit
pubsub` of a subscriber that read too slowly) and that every message published
meanwhile is gone.

Hooking the reconnect itself, rather than turning redis-py's retries off, covers
every path that reconnects (including the read that finds its socket closed,
which no retry setting governs) and keeps the quick resubscribe.
"""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection


class ReportingPubSub(PubSub):
    """Calls `on_reconnect` after each reconnect, once SUBSCRIBE for the old channels is sent
    (their confirmations come later, as messages).

    A connection's first connect happens in the pool, before PubSub registers its
    connect callback, so `on_connect` (and `on_reconnect`) runs only for a connection
    that was lost and made again.  After `aclose()` the next command takes a fresh
    connection: an owner that closes on purpose is not told of that one either.
    """

    def __init__(self, client: Redis, on_reconnect: Callable[[], None]) -> None:
        super().__init__(client.connection_pool)
        self._on_reconnect = on_reconnect

    async def on_connect(self, connection: Connection) -> None:  # type: ignore[override]
        await super().on_connect(connection)
        self._on_reconnect()
