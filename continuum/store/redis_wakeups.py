"""Cross-replica wake-ups: one Redis pub/sub connection per store, fanned out locally.

A replica subscribes to a mailbox's channel while at least one of its
devices waits on it, and every `accept` publishes to each recipient's
channel, so a device connected anywhere hears of new mail at once.  The
listener blocks on the socket (no polling).  A publication carries the entry
appended when it is small (`wake_entry`), so a relay can deliver it without a
fetch.  Each subscribe confirmation also wakes its mailbox: a message
appended between the session's first fetch and the moment Redis registered
the subscription is then fetched, not missed.
After a lost connection every local waiter is woken, since publications sent
meanwhile are gone.  redis-py also re-makes the connection without raising
(its retries, or a read that finds the socket closed) and subscribes the
channels again: those confirmations wake every mailbox just the same, so a
silent reconnect needs no hook here (unlike the stream bus, `redis_pubsub`).

SUBSCRIBE and UNSUBSCRIBE are serialised by a lock: redis-py's PubSub opens
its connection lazily inside the first command, so concurrent first calls
each opened a connection of their own and all but the last were orphaned —
subscribed in Redis, but never read (devices then got no wake-ups at all).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from runtime.tasks import cancel_and_wait

from .base import NewEntry, Wake
from .redis_keys import KeySpace
from .wakeups import WakeupHub

_RECONNECT_DELAY_S = 0.5

_log = structlog.get_logger("continuum.store.redis")


class PubSubWakeups:
    def __init__(self, client: Redis, keys: KeySpace) -> None:
        self._client = client
        self._keys = keys
        self._hub = WakeupHub()
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._commands = asyncio.Lock()

    async def add(self, recipient: bytes, wake: Wake) -> None:
        """Start waking `wake`; a failed SUBSCRIBE is redone by the listener's recovery."""
        first = not self._hub.has(recipient)
        self._hub.add(recipient, wake)
        if first:
            try:
                async with self._commands:
                    await self._pubsub_connection().subscribe(self._channel(recipient))
            # redis-py can raise more than RedisError on a half-closed socket.
            except Exception as exc:  # noqa: BLE001
                _log.warning("wakeup_subscribe_failed", error=repr(exc))
            if self._listener is None:
                self._listener = asyncio.create_task(self._listen(), name="redis-wakeups")

    async def remove(self, recipient: bytes, wake: Wake) -> None:
        self._hub.remove(recipient, wake)
        if not self._hub.has(recipient) and self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError, AttributeError):
                async with self._commands:
                    await self._pubsub.unsubscribe(self._channel(recipient))

    async def close(self) -> None:
        listener, pubsub = self._listener, self._pubsub
        self._listener = self._pubsub = None
        await cancel_and_wait(listener)
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError, AttributeError):
                await pubsub.aclose()

    def _channel(self, recipient: bytes) -> str:
        return self._keys.mailbox(recipient.hex()).channel

    def _pubsub_connection(self) -> PubSub:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        return self._pubsub

    async def _listen(self) -> None:
        pubsub = self._pubsub_connection()
        while True:
            try:
                message = await pubsub.get_message(timeout=None)
            except Exception as exc:  # noqa: BLE001 - see add()
                _log.warning("wakeup_channel_lost", error=repr(exc))
                await asyncio.sleep(_RECONNECT_DELAY_S)
                await self._resubscribe_all(pubsub)
                continue
            if message is None or message["type"] not in ("message", "subscribe"):
                continue
            recipient = self._keys.recipient_of_channel(message["channel"])
            if recipient is not None:
                self._hub.wake(recipient, wake_entry(message["data"])
                               if message["type"] == "message" else None)

    async def _resubscribe_all(self, pubsub: PubSub) -> None:
        """After a lost connection: a fresh socket, every local channel again, everyone woken."""
        try:
            async with self._commands:
                await pubsub.aclose()
                channels = [self._channel(recipient) for recipient in self._hub.keys()]
                if channels:
                    await pubsub.subscribe(*channels)
        except Exception as exc:  # noqa: BLE001 - still down: the next read fails and retries
            _log.warning("wakeup_resubscribe_failed", error=repr(exc))
        self._wake_all()

    def _wake_all(self) -> None:
        for recipient in self._hub.keys():
            self._hub.wake(recipient)


def wake_entry(data: bytes) -> NewEntry | None:
    """What a wake-up carries: nothing (b''), or `<tag> <previous> <envelope>` with an empty
    previous for none (`redis_scripts.ACCEPT_ALL`).  Anything else is a plain wake-up."""
    parts = data.split(b" ", 2) if data else ()
    if len(parts) != 3 or not parts[0]:
        return None
    tag, previous, raw = parts
    return NewEntry(tag.decode("ascii", "replace"), previous.decode("ascii", "replace") or None,
                    raw)
