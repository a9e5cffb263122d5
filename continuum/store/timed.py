"""Every store call timed and its outages counted, whichever store is behind: for /metrics.

Wraps a `MailboxStore` and forwards each call unchanged, observing how long
it took in `continuum_store_operation_seconds{operation}` (every outcome: a
refusal such as REPLAY or MAILBOX_FULL is an answer like any other) and
counting `StoreUnavailableError` in `continuum_store_errors_total{operation}`,
the signal that the store itself is failing, as distinct from what devices
do.  A histogram child per operation is bound once: the hot path pays a
clock read and one observe per call.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import Counter, Histogram

from proto import Envelope, PublicKey
from proto.access import Stamp
from proto.errors import StoreUnavailableError

from .base import ExpiredMessage, MailboxLimits, MailboxStore, StoredMessage, Subscription

T = TypeVar("T")
OPERATIONS = ("accept", "fetch", "ack", "take_expired", "allow", "depth", "subscribe",
              "access_list_floor", "raise_access_list_floor", "ping")


class TimedStore(MailboxStore):
    def __init__(self, inner: MailboxStore, seconds: Histogram, errors: Counter) -> None:
        self.inner = inner
        self._timed = {op: (seconds.labels(op), errors.labels(op)) for op in OPERATIONS}

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        seconds, errors = self._timed[operation]
        started = time.perf_counter()
        try:
            return await call()
        except StoreUnavailableError:
            errors.inc()
            raise
        finally:
            seconds.observe(time.perf_counter() - started)

    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits) -> None:
        await self._call("accept", lambda: self.inner.accept(
            envelope, replay_until_ms=replay_until_ms, limits=limits))

    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        return await self._call("fetch", lambda: self.inner.fetch(recipient, after, limit))

    async def ack(self, recipient: PublicKey, tag: str) -> bool:
        return await self._call("ack", lambda: self.inner.ack(recipient, tag))

    async def take_expired(self, now_ms: int, limit: int) -> list[ExpiredMessage]:
        return await self._call("take_expired", lambda: self.inner.take_expired(now_ms, limit))

    async def allow(self, sender: PublicKey, now_ms: int, rate_per_s: float, burst: int) -> bool:
        return await self._call("allow", lambda: self.inner.allow(sender, now_ms, rate_per_s,
                                                                  burst))

    async def depth(self, recipient: PublicKey) -> int:
        return await self._call("depth", lambda: self.inner.depth(recipient))

    async def subscribe(self, recipient: PublicKey, wake: Callable[[], None]) -> Subscription:
        return await self._call("subscribe", lambda: self.inner.subscribe(recipient, wake))

    async def access_list_floor(self) -> Stamp:
        return await self._call("access_list_floor", self.inner.access_list_floor)

    async def raise_access_list_floor(self, stamp: Stamp) -> Stamp:
        return await self._call("raise_access_list_floor",
                                lambda: self.inner.raise_access_list_floor(stamp))

    async def ping(self) -> None:
        await self._call("ping", self.inner.ping)

    async def close(self) -> None:
        await self.inner.close()
