"""The relay's one typed settings object, from CLI flags and CONTINUUM_* variables.

Flags win over environment variables, which win over defaults (`runtime.settings`
does the parsing for both services); `describe()` is printed at start with
secrets masked, so an operator sees what is in force.
"""

from __future__ import annotations

import argparse
import functools
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proto import Identity, PublicKey
from proto.errors import InvalidFieldError
from proto.limits import DEFAULT_MAX_ENVELOPE_BYTES, Limits
from proto.regions import is_region_name
from proto.streams import CHUNK_OVERHEAD_BYTES
from runtime.settings import describe, load_settings, mask_url, repeatable
from runtime.tls import server_context, verifying_context

from runtime.client_address import (FORWARDED_HEADERS, X_FORWARDED_FOR, ProxyTrust, are_networks,
                                     parse_networks)


# Store URLs every process reaches: several relays (replicas, workers, regions) share them.
_SHARED_STORES = ("redis://", "rediss://", "unix://")

# What a relay does while it holds no valid access list (`access_list_expired`).
FAIL_CLOSED, ALARM = "fail-closed", "alarm"
ON_EXPIRY = (FAIL_CLOSED, ALARM)


@dataclass(frozen=True)
class Settings:
    """What one relay process runs with, fixed at start: each field is a --flag and a variable.

    Frozen, because sessions read it on every frame and nothing may change it
    under them; tests derive variants with dataclasses.replace.
    """

    host: str = "127.0.0.1"
    port: int = 8470
    # The embedded SQLite store, in memory (`sqlite:///path`: in a file).  `memory` keeps the
    # mailboxes in plain Python structures instead: the same contract at a fraction of the
    # CPU per message, for a relay whose mail need not outlive it (continuum/store/memory.py).
    store: str = "sqlite://:memory:"
    # Relay processes accepting from one listening socket on `port`, started, restarted and
    # stopped by one supervisor (continuum/supervisor.py): one per core.  More than one needs
    # a Redis store (the in-process stores cannot be shared).
    workers: int = 1
    # With workers: worker i (0-based) also serves /metrics and /healthz on this port + i, so
    # each worker can be scraped; 0: not served (the shared port's /metrics answers for the
    # one worker that accepted that connection).
    worker_metrics_port: int = 0
    # Relay signing key (csk_… text) for expiry notices; replicas behind one
    # load balancer share it.  Empty: a key file, else a fresh key per process.
    relay_key: str = ""
    relay_key_file: str = ""
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
    max_ttl_s: int = 7 * 24 * 3600
    max_skew_s: int = 300
    rate_per_s: float = 50.0
    rate_burst: int = 100
    mailbox_max_messages: int = 10_000
    mailbox_max_bytes: int = 64 * 1024 * 1024
    # Byte budgets of the store, each stored envelope counted once however many
    # recipients it has (QUOTA_EXCEEDED beyond them).  One sender may have one
    # full mailbox's worth waiting; the whole store, 1 GiB: far above what a
    # fleet keeps waiting, and a bound on what made-up keys can make it hold.
    sender_max_stored_bytes: int = 64 * 1024 * 1024
    store_max_bytes: int = 1024 * 1024 * 1024
    delivery_window: int = 64
    handshake_timeout_s: float = 10.0
    # Time from accept() to a complete HTTP upgrade request (slowloris bound).
    request_timeout_s: float = 10.0
    # A closing socket that has not finished its close handshake by then is aborted.
    close_timeout_s: float = 5.0
    # A device that reads nothing for this long while frames wait for it is closed.
    write_timeout_s: float = 30.0
    # Every TCP socket, from accept() until it is really gone.
    max_connections: int = 20_000
    max_pending_handshakes_per_address: int = 64
    # Steps (an accept, or a read of a socket not yet authenticated) all unauthenticated
    # peers together may take per event-loop turn, and how long they all wait after an
    # authenticated device's read (at most): what a flood of handshakes can add to an
    # established device's wait, however fast it comes (runtime/listener.TurnBudget).
    unauthenticated_steps_per_turn: int = 1
    unauthenticated_yield_ms: float = 2.0
    max_connections_per_address: int = 1_024
    max_connections_per_key: int = 1
    # Signature checks for keys this relay does not know yet, per client address.
    unknown_key_rate_per_s: float = 20.0
    unknown_key_burst: int = 200
    probation_sends: int = 10
    known_keys: int = 100_000
    # Serve wss:// (and https:// for /healthz, /metrics) with this certificate chain and
    # key (PEM files); both empty: plain ws://, e.g. behind a TLS-terminating ingress.
    tls_cert: str = ""
    tls_key: str = ""
    # Proxies whose forwarded header names the real client (CIDRs), and which header they
    # write it in: x-forwarded-for (ingress-nginx, most load balancers) or forwarded (RFC
    # 7239).  Only that one is read; the other is whatever the client sent.
    trusted_proxies: tuple[str, ...] = repeatable("trusted-proxy", "network (CIDR)")
    forwarded_header: str = X_FORWARDED_FOR
    sweep_interval_s: float = 1.0
    max_invalid_frames: int = 100
    # Messages an authenticated connection may make the relay read, any kind (SEND, ACK,
    # stream frames, a WebSocket PING or PONG), per second and at once: beyond them that
    # connection is read more slowly (nothing is refused), so the CPU one device can make
    # the relay spend on decoding and answering is bounded.  Far above what a device sends
    # (a tunnel's round trips, a receiver's ACKs, a stream's chunks and credit).
    frames_per_s: float = 5_000.0
    frame_burst: int = 1_000
    heartbeat_s: float = 30.0
    log_level: str = "info"
    # Access control: the oracle's base URL (empty: off; https:// outside one host) and
    # public key (cpk_…).
    oracle_url: str = ""
    oracle_key: str = ""
    # A CA bundle (PEM) an https:// oracle's certificate is verified against (a private CA);
    # empty: the system's trust store.
    oracle_ca_file: str = ""
    # Accept only keys the oracle enrolled, so anonymous keys cannot spam devices.
    require_enrollment: bool = False
    # What the relay does while it holds no valid access list (none yet, or the one it has
    # lapsed: the oracle is unreachable): `fail-closed` refuses every key but the oracle's
    # and disconnects the rest; `alarm` keeps enforcing the lapsed list.  Both alarm (log,
    # metrics, /healthz).  README "When the oracle goes silent".
    access_list_expired: str = FAIL_CLOSED
    # Streams (SPEC §16), relayed live, never stored.  Halves open or opening per device
    # connection and per relay process; opens waiting for an answer per connection, and how
    # long they wait; how much credit a receiver may hold out per stream (what may wait on
    # the path); opens per second and chunk bytes per second per connection (a connection
    # over its byte rate is read more slowly, so its sender slows down).
    max_streams_per_device: int = 64
    max_streams: int = 10_000
    max_pending_streams_per_device: int = 16
    stream_open_timeout_s: float = 10.0
    max_stream_window_bytes: int = 4 * 1024 * 1024
    # Credit passed on toward one connection, all its streams (what can be on its way to it),
    # and toward all connections of the process; what a device grants beyond waits.
    stream_connection_window_bytes: int = 16 * 1024 * 1024
    stream_relay_window_bytes: int = 256 * 1024 * 1024
    stream_opens_per_s: float = 20.0
    stream_open_burst: int = 40
    stream_bytes_per_s: float = 256 * 1024 * 1024
    stream_burst_bytes: int = 8 * 1024 * 1024
    # One worldwide network (README "Several regions", SPEC §19): this relay's region (its
    # `store` is that region's store), and the store of every other region, `REGION=URL`;
    # each device's mailbox lives in its home region's store, named by the oracle's list.
    region: str = ""
    region_stores: tuple[str, ...] = repeatable("region-store", "REGION=STORE_URL of another"
                                                " region")
    # Presence (with an oracle): connections of enrolled devices and their message counts go
    # to the oracle in one signed report per interval (0: never), an empty one at least
    # every heartbeat; at most presence_max_waiting ended connections wait for an oracle
    # that cannot be reached.  README "Presence".
    presence_interval_s: float = 2.0
    presence_heartbeat_s: float = 30.0
    presence_max_waiting: int = 50_000

    @functools.cached_property
    def limits(self) -> Limits:
        """Built once: the session reads it up to three times per frame.

        cached_property stores into the instance __dict__ directly, which a
        frozen dataclass allows; the settings never change, so neither does this.
        """
        return Limits(max_envelope_bytes=self.max_envelope_bytes)

    def tls_context(self) -> ssl.SSLContext | None:
        """The server TLS context, built from the PEM files; None for plain ws://."""
        return server_context(self.tls_cert, self.tls_key) if self.tls_cert else None

    def oracle_tls_context(self) -> ssl.SSLContext | bool:
        """How an `https://` oracle is verified: against `oracle_ca_file` (a private CA), else
        the system's store (True, aiohttp's default)."""
        return verifying_context(self.oracle_ca_file) if self.oracle_ca_file else True

    @functools.cached_property
    def proxy_trust(self) -> ProxyTrust:
        return ProxyTrust(parse_networks(self.trusted_proxies), self.forwarded_header)

    def region_store_urls(self) -> dict[str, str]:
        """Every region's store URL, this relay's own (`store`) included; empty without regions."""
        if not self.region:
            return {}
        return {self.region: self.store, **dict(
            entry.split("=", 1) for entry in self.region_stores)}  # type: ignore[misc]

    def describe(self) -> dict[str, object]:
        """What is in force, for the start-up log: the relay key and any URL password masked."""
        shown = describe(self, secrets={"relay_key"})
        shown["region_stores"] = [f"{name}={mask_url(url)}" for name, url
                                  in (entry.partition("=")[::2] for entry in self.region_stores)]
        return shown

    @classmethod
    def from_sources(cls, argv: list[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> Settings:
        parser = argparse.ArgumentParser(
            prog="continuum", description="Continuum relay: store-and-forward for devices.",
            epilog=_WORKERS_HELP)
        settings, _ = load_settings(cls, "CONTINUUM_", parser, argv,
                                    os.environ if environ is None else environ)
        return settings

    def validate(self) -> None:
        problems = [
            name for name, ok in [
                ("port must be 0..65535", 0 <= self.port <= 65535),
                *_worker_problems(self.workers, self.store, self.worker_metrics_port),
                ("max_envelope_bytes must be >= 1024", self.max_envelope_bytes >= 1024),
                ("max_ttl_s must be >= 1", self.max_ttl_s >= 1),
                ("rate_per_s must be > 0", self.rate_per_s > 0),
                ("rate_burst must be >= 1", self.rate_burst >= 1),
                ("frames_per_s must be > 0", self.frames_per_s > 0),
                ("frame_burst must be >= 1", self.frame_burst >= 1),
                ("delivery_window must be >= 1", self.delivery_window >= 1),
                ("mailbox_max_messages must be >= 1", self.mailbox_max_messages >= 1),
                ("request/close/write timeouts must be > 0", min(
                    self.request_timeout_s, self.close_timeout_s, self.write_timeout_s) > 0),
                ("max_connections_per_key must be >= 1", self.max_connections_per_key >= 1),
                ("max_pending_handshakes_per_address must be >= 1",
                 self.max_pending_handshakes_per_address >= 1),
                ("unknown_key_rate_per_s must be > 0", self.unknown_key_rate_per_s > 0),
                ("unauthenticated_steps_per_turn must be >= 1",
                 self.unauthenticated_steps_per_turn >= 1),
                ("unauthenticated_yield_ms must be > 0", self.unauthenticated_yield_ms > 0),
                ("trusted_proxies must be IP networks", are_networks(self.trusted_proxies)),
                (f"forwarded_header must be one of {', '.join(FORWARDED_HEADERS)}",
                 self.forwarded_header in FORWARDED_HEADERS),
                ("tls_cert and tls_key go together", bool(self.tls_cert) == bool(self.tls_key)),
                ("relay_key must be a csk_… secret key text",
                 not self.relay_key or _parses(Identity.from_text, self.relay_key)),
                ("oracle_key must be a cpk_… public key text",
                 not self.oracle_key or _parses(PublicKey.from_text, self.oracle_key)),
                ("sender_max_stored_bytes must be >= max_envelope_bytes",
                 self.sender_max_stored_bytes >= self.max_envelope_bytes),
                ("store_max_bytes must be >= max_envelope_bytes",
                 self.store_max_bytes >= self.max_envelope_bytes),
                ("oracle_url needs oracle_key", not self.oracle_url or bool(self.oracle_key)),
                ("require_enrollment needs oracle_url", not self.require_enrollment
                 or bool(self.oracle_url)),
                (f"access_list_expired must be one of {', '.join(ON_EXPIRY)}",
                 self.access_list_expired in ON_EXPIRY),
                ("oracle_url must be http:// or https://", not self.oracle_url
                 or self.oracle_url.startswith(("http://", "https://"))),
                ("stream limits must be >= 1", min(
                    self.max_streams_per_device, self.max_streams,
                    self.max_pending_streams_per_device, self.stream_open_burst) >= 1),
                ("stream_open_timeout_s, stream_opens_per_s and stream_bytes_per_s must be > 0",
                 min(self.stream_open_timeout_s, self.stream_opens_per_s,
                     self.stream_bytes_per_s) > 0),
                ("stream windows, pools and burst must hold one chunk (max_envelope_bytes + 17)",
                 min(self.max_stream_window_bytes, self.stream_burst_bytes,
                     self.stream_connection_window_bytes, self.stream_relay_window_bytes)
                 >= self.max_envelope_bytes + CHUNK_OVERHEAD_BYTES),
                *_region_problems(self.region, self.store, self.region_stores),
                ("presence_interval_s must be >= 0", self.presence_interval_s >= 0),
                ("presence_heartbeat_s must be >= presence_interval_s and <= 200",
                 self.presence_interval_s <= self.presence_heartbeat_s <= 200),
                ("presence_max_waiting must be >= 1", self.presence_max_waiting >= 1),
            ] if not ok]
        if problems:
            raise ValueError("; ".join(problems))


_WORKERS_HELP = (
    "--workers N runs N relay processes accepting on one port under a supervisor that"
    " restarts a crashed worker and stops them all on SIGTERM.  N > 1 needs a redis:// store"
    " (the memory and SQLite stores live in one process and wake only its own sessions)."
    "  Every budget (max connections, per address, per key, handshakes) is per worker: the"
    " relay's bound is N times the flag.  --worker-metrics-port P: worker i serves /metrics"
    " and /healthz on P + i.")


def _worker_problems(workers: int, store: str, metrics_port: int) -> list[tuple[str, bool]]:
    """What must hold of the worker settings: workers share one port and one store."""
    return [
        ("workers must be >= 1", workers >= 1),
        ("workers > 1 needs a redis://, rediss:// or unix:// store: the memory and SQLite"
         " stores live inside one process (their wake-ups reach only its own sessions)",
         workers == 1 or store.startswith(_SHARED_STORES)),
        ("worker_metrics_port must be 0 or 1..65535 - workers + 1",
         metrics_port == 0 or 1 <= metrics_port <= 65536 - workers),
    ]


def _region_problems(region: str, store: str,
                     region_stores: tuple[str, ...]) -> list[tuple[str, bool]]:
    """What must hold of the region settings: every region's store is shared by the relays
    of every region, so each is a Redis URL, and each region is named once."""
    names = [entry.partition("=")[0] for entry in region_stores]
    shared = _SHARED_STORES
    return [
        ("region must be a region name (a lower-case letter, then lower-case letters, digits"
         " or '-', at most 32)", not region or is_region_name(region)),
        ("region_stores need region (this relay's own)", bool(region) or not region_stores),
        ("region_stores must be REGION=URL with a region name and a redis://, rediss:// or"
         " unix:// URL", all(is_region_name(name) and url.startswith(shared) for name, url in
                             (entry.partition("=")[::2] for entry in region_stores))),
        ("region_stores must name each region once, not this relay's own",
         len(set(names)) == len(names) and region not in names),
        ("store must be redis://, rediss:// or unix:// when region is set: every region's"
         " relays reach it", not region or store.startswith(shared)),
    ]


def _parses(parse: Callable[[str], object], text: str) -> bool:
    try:
        parse(text)
    except InvalidFieldError:
        return False
    return True
