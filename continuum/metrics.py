"""Prometheus metrics of one relay, in a registry of its own.

A registry per relay (not the global default) lets tests and benchmarks run
several relays in one process without their counters mixing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter("continuum_messages_accepted", "Envelopes stored for delivery",
                                registry=self.registry)
        self.rejected = Counter("continuum_messages_rejected", "Envelopes or frames refused",
                                ["reason"], registry=self.registry)
        self.delivered = Counter("continuum_messages_delivered",
                                 "Envelopes pushed to a connected device",
                                 registry=self.registry)
        self.acked = Counter("continuum_messages_acked",
                             "Deliveries acknowledged by the device and removed",
                             registry=self.registry)
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
        self.verify_seconds = Histogram(
            "continuum_verify_seconds", "Ed25519 envelope signature verify time",
            buckets=(2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3), registry=self.registry)
        # Streams (SPEC §16): relayed live, never stored.
        self.streams_open = Gauge(
            "continuum_streams_open",
            "Stream halves open or waiting for an answer on this relay process",
            registry=self.registry)
        self.stream_bytes = Counter(
            "continuum_stream_bytes", "Stream chunk bytes relayed from the devices connected here",
            registry=self.registry)
        self.stream_frames_dropped = Counter(
            "continuum_stream_frames_dropped",
            "Stream frames dropped because their stream had ended (they crossed its end)",
            ["reason"], registry=self.registry)
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
