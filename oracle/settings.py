"""The oracle's one typed settings object, from CLI flags and CONTINUUM_ORACLE_* variables.

Flags win over environment variables, which win over defaults; `describe()`
is printed at start with secrets masked (a PostgreSQL DSN may carry a password).
"""

from __future__ import annotations

import argparse
import functools
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from proto import PublicKey
from proto.errors import ProtocolError
from runtime.client_address import (FORWARDED_HEADERS, X_FORWARDED_FOR, ProxyTrust, are_networks,
                                     parse_networks)
from proto.regions import MAX_REGIONS, is_region_name
from runtime.settings import describe, load_settings, repeatable

from .regions import Regions
from runtime.tls import server_context

ENV_PREFIX = "CONTINUUM_ORACLE_"
# A week: a list signed for longer would outlive any revocation a relay could miss.
MAX_VALIDITY_S = 7 * 24 * 3600


@dataclass(frozen=True)
class OracleSettings:
    """What one oracle process runs with, fixed at start: each field is a --flag and a variable."""

    host: str = "127.0.0.1"
    port: int = 8480
    # sqlite:///path (zero set-up default) or postgresql://user@host/db.
    database: str = "sqlite:///oracle.db"
    # The oracle's Ed25519 key file (0600), created on first start.
    identity_file: str = "oracle.key"
    # Continuum relays the oracle connects to as a device (ws://…/v1/connect), repeatable.
    relays: tuple[str, ...] = repeatable("relay", "relay URL")
    # Public keys (cpk_…) of relays allowed to fetch the access list besides those in `relays`
    # (which prove their key when the oracle connects), e.g. another region's, repeatable.
    relay_keys: tuple[str, ...] = repeatable("relay-key", "relay public key (cpk_…)")
    # How long a relay's long-poll for a newer access list is held open.
    longpoll_s: float = 25.0
    # How long a signed access list is valid (SPEC §12): the oracle signs it again when half
    # of that is left, and a relay that stops hearing from the oracle acts on its
    # --access-list-expired setting once it lapses.  So this bounds how long a revoked key
    # can still use a relay that the oracle cannot reach (README).
    access_list_validity_s: float = 600.0
    # Lifetime of a peer-change envelope in an offline device's mailbox.
    push_ttl_s: int = 7 * 24 * 3600
    # How long one peer-change send may wait for a relay before it is retried later.
    send_timeout_s: float = 5.0
    # Re-seal a stored envelope older than this (relays refuse stale created_at).
    reseal_after_s: int = 120
    # How long a rotated device's old key may still fetch its mailbox: by default the relays'
    # longest message lifetime, so everything waiting for the old key can still be drained.
    rotation_drain_s: int = 7 * 24 * 3600
    session_ttl_s: int = 12 * 3600
    # A client must send a complete request's headers within this long of connecting (or of
    # the previous response), and its body within this long after: half-sent requests
    # (slowloris) are closed instead of held for aiohttp's default hour.
    request_timeout_s: float = 10.0
    # Open sockets, counted from accept(); one more is aborted at once.  Below the usual
    # 1024 file descriptors a process may open, so the database and relays still get theirs.
    max_connections: int = 512
    # Of those, open at once from one client address (an IPv4 address, an IPv6 /64), so one
    # client holding half-sent requests cannot take every socket and keep relays from
    # fetching the access list: it takes max_connections / this many addresses to fill the
    # cap.  The --trusted-proxy networks have no share (every client behind them comes from
    # them).  A value above max_connections is max_connections.
    max_connections_per_address: int = 64
    # Proxies (the dashboard's ingress) whose forwarded header names the real client, so the
    # login throttle counts each client's failures, not the proxy's; and which header they
    # write it in (x-forwarded-for or forwarded): only that one is read.
    trusted_proxies: tuple[str, ...] = repeatable("trusted-proxy", "network (CIDR)")
    forwarded_header: str = X_FORWARDED_FOR
    # Set when the dashboard is served over HTTPS, so the session cookie is Secure.
    secure_cookies: bool = False
    # Serve https:// with this certificate chain and key (PEM files): relays fetch the access
    # list over it.  Both empty: plain http://, e.g. on one host or behind a TLS proxy.
    tls_cert: str = ""
    tls_key: str = ""
    log_level: str = "info"
    # One worldwide network (SPEC §19): this oracle's region (where the relays it pushes
    # through are: the home of new devices and of its own key) and every other region.
    # Empty: no regions, and relays treat every key as local.
    region: str = ""
    other_regions: tuple[str, ...] = repeatable("other-region", "region name")
    # After a device's home moves, how long the access list names its former home, so relays
    # move the mail waiting there: the longest TTL relays accept plus their clock window.
    home_move_drain_s: int = 7 * 24 * 3600 + 600

    def regions(self) -> Regions | None:
        """The network's regions, or None when this oracle has none configured."""
        if not self.region:
            return None
        return Regions(self.region, tuple(sorted({self.region, *self.other_regions})),
                       self.home_move_drain_s * 1000)
    # Presence (README "Presence"): how often silent devices are looked for (devices offline
    # for longer than their expected check-in interval) and relay processes whose lease
    # passed are taken for dead; an http(s) URL that is POSTed each change of the silent set
    # (JSON), with at most silence_webhook_attempts tries per batch.
    silence_check_s: float = 30.0
    silence_webhook_url: str = ""
    silence_webhook_attempts: int = 5

    def tls_context(self) -> ssl.SSLContext | None:
        """The server TLS context, built from the PEM files; None for plain http://."""
        return server_context(self.tls_cert, self.tls_key) if self.tls_cert else None

    @functools.cached_property
    def proxy_trust(self) -> ProxyTrust:
        return ProxyTrust(parse_networks(self.trusted_proxies), self.forwarded_header)

    def describe(self) -> dict[str, object]:
        """Settings as printed at start: a password in the database DSN is masked."""
        return describe(self, secrets={"silence_webhook_url"})  # its path is often a token

    def validate(self) -> None:
        problems = [message for message, ok in [
            ("port must be 0..65535", 0 <= self.port <= 65535),
            ("longpoll_s must be in (0, 120]", 0 < self.longpoll_s <= 120),
            (f"access_list_validity_s must be in [1, {MAX_VALIDITY_S}]",
             1 <= self.access_list_validity_s <= MAX_VALIDITY_S),
            ("tls_cert and tls_key go together", bool(self.tls_cert) == bool(self.tls_key)),
            ("push_ttl_s must be >= 60", self.push_ttl_s >= 60),
            ("reseal_after_s must be >= 1", self.reseal_after_s >= 1),
            ("rotation_drain_s must be >= 0", self.rotation_drain_s >= 0),
            ("send_timeout_s must be > 0", self.send_timeout_s > 0),
            ("request_timeout_s must be > 0", self.request_timeout_s > 0),
            ("max_connections must be >= 1", self.max_connections >= 1),
            ("max_connections_per_address must be >= 1", self.max_connections_per_address >= 1),
            ("trusted_proxies must be IP networks", are_networks(self.trusted_proxies)),
            (f"forwarded_header must be one of {', '.join(FORWARDED_HEADERS)}",
             self.forwarded_header in FORWARDED_HEADERS),
            ("relays must be ws:// or wss:// URLs",
             all(r.startswith(("ws://", "wss://")) for r in self.relays)),
            ("relay_keys must be public keys (cpk_…)", all(map(_is_public_key, self.relay_keys))),
            ("region and other_regions must be region names (a lower-case letter, then"
             " lower-case letters, digits or '-', at most 32)",
             all(map(is_region_name, (self.region, *self.other_regions)))
             if self.region else True),
            ("other_regions need region (this oracle's own)",
             bool(self.region) or not self.other_regions),
            ("other_regions must name each region once, not this oracle's own",
             len(set(self.other_regions)) == len(self.other_regions)
             and self.region not in self.other_regions),
            (f"at most {MAX_REGIONS} regions", len(self.other_regions) < MAX_REGIONS),
            ("home_move_drain_s must be >= 0", self.home_move_drain_s >= 0),
            ("silence_check_s must be in [0.1, 3600]", 0.1 <= self.silence_check_s <= 3600),
            ("silence_webhook_url must be an http:// or https:// URL",
             not self.silence_webhook_url
             or self.silence_webhook_url.startswith(("http://", "https://"))),
            ("silence_webhook_attempts must be 1..20", 1 <= self.silence_webhook_attempts <= 20),
        ] if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_sources(cls, argv: list[str] | None = None,
                     environ: Mapping[str, str] | None = None,
                     parser: argparse.ArgumentParser | None = None,
                     ) -> tuple[OracleSettings, argparse.Namespace]:
        """Parse flags (`--relay` repeatable) over CONTINUUM_ORACLE_* variables (RELAYS comma-separated).

        Returns the settings and the parsed namespace, which also holds any
        positional arguments the caller added to `parser`.
        """
        return load_settings(cls, ENV_PREFIX, parser or argparse.ArgumentParser(
            prog="continuum-oracle serve"), argv, os.environ if environ is None else environ)


def _is_public_key(text: str) -> bool:
    try:
        PublicKey.from_text(text)
    except ProtocolError:
        return False
    return True
