"""Every store call timed and its outages counted, whichever store is behind: for /metrics.

Wraps a `MailboxStore` and forwards each call unchanged, observing how long
it took in `continuum_store_operation_seconds{operation}` (every outcome: a
refusal such as REPLAY or MAILBOX_FULL is an answer like any other) and
counting `StoreUnavailableError` in `continuum_store_errors_total{operation}`,
the signal that the store itself is failing, as distinct from what devices
do.

The times are kept by `OperationTimings`, plain integers turned into a
Prometheus histogram only when scraped: a relay runs one event loop, so it
needs none of prometheus_client's locks, and a locked observe (about 2-5 µs)
on each of the four store calls of every message was 7 % of a message's CPU
(compare.py, saturation, median of 4 rounds).  Here an observe is a bisect
and two additions.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import Counter
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from proto import Envelope, PublicKey
from proto.access import Stamp
from proto.errors import StoreUnavailableError

from .base import (ExpiredMessage, MailboxLimits, MailboxStore, StoredMessage, Subscription,
                   Wake)

if TYPE_CHECKING:
    from ..streams.router import RemoteStreams

T = TypeVar("T")
OPERATIONS = ("accept", "fetch", "ack", "take_expired", "allow", "depth", "subscribe",
              "access_list_floor", "raise_access_list_floor", "ping")


class OperationTimings(Collector):
    """A histogram of seconds by operation, for one thread: observed into plain lists,
    exposed as a Prometheus histogram (cumulative `le` buckets, `_count`, `_sum`) on scrape."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 operations: Sequence[str]) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = list(buckets)
        self._counts = {op: [0] * (len(self._bounds) + 1) for op in operations}
        self._sums = dict.fromkeys(operations, 0.0)

    def observe(self, operation: str, seconds: float) -> None:
        # The first bucket whose bound is >= seconds: Prometheus buckets are "less or equal".
        self._counts[operation][bisect_left(self._bounds, seconds)] += 1
        self._sums[operation] += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["operation"])
        for operation, counts in self._counts.items():
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, self._bounds), "+Inf"], counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([operation], buckets, self._sums[operation])
        yield family


class TimedStore(MailboxStore):
    def __init__(self, inner: MailboxStore, timings: OperationTimings, errors: Counter) -> None:
        self.inner = inner
        self._timings = timings
        self._errors = {op: errors.labels(op) for op in OPERATIONS}

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        try:
            return await call()
        except StoreUnavailableError:
            self._errors[operation].inc()
            raise
        finally:
            self._timings.observe(operation, time.perf_counter() - started)

    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits,
                     recipients: Sequence[PublicKey] | None = None) -> None:
        await self._call("accept", lambda: self.inner.accept(
            envelope, replay_until_ms=replay_until_ms, limits=limits, recipients=recipients))

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

    async def subscribe(self, recipient: PublicKey, wake: Wake) -> Subscription:
        return await self._call("subscribe", lambda: self.inner.subscribe(recipient, wake))

    async def access_list_floor(self) -> Stamp:
        return await self._call("access_list_floor", self.inner.access_list_floor)

    async def raise_access_list_floor(self, stamp: Stamp) -> Stamp:
        return await self._call("raise_access_list_floor",
                                lambda: self.inner.raise_access_list_floor(stamp))

    async def ping(self) -> None:
        await self._call("ping", self.inner.ping)

    def stream_bus(self) -> RemoteStreams | None:
        """The wrapped store's path between relays, untimed: it carries stream frames (SPEC
        §16), not store calls."""
        return self.inner.stream_bus()

    def answers_later(self, recipient: PublicKey) -> bool:
        return self.inner.answers_later(recipient)

    async def close(self) -> None:
        await self.inner.close()
