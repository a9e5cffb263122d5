"""Prometheus metrics of one relay, in a registry of its own.

A registry per relay (not the global default) lets tests and benchmarks run
several relays in one process without their counters mixing.  It also carries
the process's own metrics (CPU, memory, open files; Python's collector), as
prometheus_client's default registry would.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from .store.timed import OPERATIONS, OperationTimings

# Store calls take tens of microseconds embedded, a millisecond or so on Redis in the same
# zone; WAIT for replicas and outages take longer.
STORE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.5)


class LoopCounter(Collector):
    """A counter the event loop's thread alone increments: a plain integer, exposed as a
    Prometheus counter (`_total`, `_created`) when scraped.

    prometheus_client's `Counter.inc` takes a lock and checks its labels on every call,
    about 0.6 µs; the accepted, delivered and acked counts take three per message.  The
    same reason, and the same answer, as `store.timed.OperationTimings`.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self._created = time.time()
        self.value = 0
        registry.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, self.value,
                                  created=self._created)


class LoopHistogram(Collector):
    """An unlabelled histogram observed from the event loop's thread alone, as `LoopCounter`:
    a bisect and two additions per observation, cumulative buckets made when scraped."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf's own
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, value: float) -> None:
        # The first bucket whose bound is >= value: Prometheus buckets are "less or equal".
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, self._bounds), "+Inf"], self._counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family = HistogramMetricFamily(self._name, self._documentation, buckets, self._sum)
        family.samples.append(Sample(f"{self._name}_created", {}, self._created))
        yield family


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, fds
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.store_seconds = OperationTimings(
            "continuum_store_operation_seconds",
            "Time of each mailbox store call, whatever its answer", STORE_BUCKETS, OPERATIONS)
        self.registry.register(self.store_seconds)
        self.store_errors = Counter(
            "continuum_store_errors",
            "Store calls that failed because the store could not be reached or could not"
            " write (STORE_UNAVAILABLE)", ["operation"], registry=self.registry)
        self.connections = Gauge(
            "continuum_connections",
            "Sockets by state: upgrading (accepted, no complete WebSocket upgrade yet, or a"
            " /healthz or /metrics request), handshake (upgraded, not authenticated), open"
            " (authenticated and served), closing (served, socket not yet released)",
            ["state"], registry=self.registry)
        self.accepted = LoopCounter("continuum_messages_accepted",
                                    "Envelopes stored for delivery", self.registry)
        self.rejected = Counter("continuum_messages_rejected", "Envelopes or frames refused",
                                ["reason"], registry=self.registry)
        self.delivered = LoopCounter("continuum_messages_delivered",
                                     "Envelopes pushed to a connected device", self.registry)
        self.delivered_from_wakeups = LoopCounter(
            "continuum_messages_delivered_from_wakeups",
            "Of the envelopes delivered, those taken from the store's wake-up itself, without"
            " a fetch (one round trip to the store fewer)", self.registry)
        self.acked = LoopCounter("continuum_messages_acked",
                                 "Deliveries acknowledged by the device and removed",
                                 self.registry)
        self.frames_over_rate = LoopCounter(
            "continuum_frames_over_rate",
            "Messages read from a device beyond its connection's frame rate (--frames-per-s):"
            " each made the relay wait before reading that connection again", self.registry)
        self.expired = Counter("continuum_messages_expired",
                               "Envelopes whose TTL passed in a mailbox", registry=self.registry)
        self.expiry_notices_dropped = Counter(
            "continuum_expiry_notices_dropped",
            "Expiries (message, recipient) whose notice could not be stored (sender mailbox full)",
            registry=self.registry)
        self.handshake_failures = Counter("continuum_handshake_failures",
                                          "Connections refused before authentication",
                                          ["reason"], registry=self.registry)
        self.access_list_backwards = Counter(
            "continuum_access_list_backwards",
            "Signed access lists refused because their (epoch, version) is older than the one"
            " in force or the store's floor, or is the one in force with other content: a"
            " replay, or an oracle restored with its clock behind",
            registry=self.registry)
        self.access_list_untimely = Counter(
            "continuum_access_list_untimely",
            "Signed access lists refused because they had lapsed (valid_until_ms passed) or were"
            " issued ahead of this relay's clock", ["reason"], registry=self.registry)
        self.access_list_age = Gauge(
            "continuum_access_list_age_seconds",
            "Seconds since the oracle signed the access list in force (NaN: none yet); the"
            " oracle signs it again every half validity, so more means it is not heard from",
            registry=self.registry)
        self.access_list_expired = Gauge(
            "continuum_access_list_expired",
            "1 while the relay holds no valid access list (none yet, or the one held lapsed):"
            " under fail-closed it then admits only the oracle", registry=self.registry)
        self.connected = Gauge("continuum_connected_devices",
                               "Authenticated device connections", registry=self.registry)
        self.open_sockets = Gauge("continuum_open_sockets",
                                  "TCP sockets from accept() until really closed",
                                  registry=self.registry)
        self.mailbox_depth = Histogram(
            "continuum_mailbox_depth_on_connect",
            "Messages waiting in a device's mailbox when it connects",
            buckets=(0, 1, 10, 100, 1000, 10_000, 100_000), registry=self.registry)
        self.verify_seconds = LoopHistogram(
            "continuum_verify_seconds", "Ed25519 envelope signature verify time",
            (2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3), self.registry)
        # Streams (SPEC §16): relayed live, never stored.
        self.streams_open = Gauge(
            "continuum_streams_open",
            "Stream halves open or waiting for an answer on this relay process",
            registry=self.registry)
        self.stream_bytes = Counter(
            "continuum_stream_bytes", "Stream chunk bytes relayed from the devices connected here",
            registry=self.registry)
        self.stream_bus_lost = LoopCounter(
            "continuum_stream_bus_lost",
            "Times this relay's subscription to the stream bus (Redis pub/sub) was lost or"
            " silently re-made; each ended every stream with a half on another replica",
            self.registry)
        self.stream_frames_dropped = Counter(
            "continuum_stream_frames_dropped",
            "Stream frames dropped because their stream had ended (they crossed its end)",
            ["reason"], registry=self.registry)
        # Presence reports to the oracle (continuum/presence_report.py).
        self.presence_reports = Counter(
            "continuum_presence_reports", "Presence reports sent to the oracle, by outcome"
            " (delivered, failed: the next report is a snapshot)", ["result"],
            registry=self.registry)
        self.presence_held = Gauge(
            "continuum_presence_connections",
            "Connections of enrolled devices this process reports as open",
            registry=self.registry)
        self.presence_waiting = Gauge(
            "continuum_presence_waiting",
            "Ended connections waiting to be reported (bounded by --presence-max-waiting)",
            registry=self.registry)
        self.presence_dropped = Counter(
            "continuum_presence_dropped",
            "Ended connections forgotten unreported because the queue was full (an oracle"
            " outage); the oracle ends them when a snapshot no longer lists them",
            registry=self.registry)
        self.region_store_up = Gauge(
            "continuum_region_store_up",
            "1 while the store of this region answered its last call or probe, 0 once it did"
            " not: sends to devices homed there are refused STORE_UNAVAILABLE meanwhile",
            ["region"], registry=self.registry)
        self.region_store_errors = Counter(
            "continuum_region_store_errors",
            "Calls to a region's store that failed (unreachable, refused the write, or no"
            " store configured for it)", ["region"], registry=self.registry)
        self._region_up: dict[str, Gauge] = {}

    # What `RegionalStore` reports (its `RegionHealth`): kept per region, read on every call.

    def region_failed(self, region: str) -> None:
        self._up(region).set(0)
        self.region_store_errors.labels(region).inc()

    def region_answered(self, region: str) -> None:
        self._up(region).set(1)

    def _up(self, region: str) -> Gauge:
        gauge = self._region_up.get(region)
        if gauge is None:
            gauge = self._region_up[region] = self.region_store_up.labels(region)
        return gauge
