"""Presence reports: a relay tells the oracle which enrolled devices it holds (SPEC §20).

Pure wire format, shared by relays (which sign reports with their own key)
and the oracle (which verifies them with the relay's public key and decides
whether that key may report here, as for the access list, SPEC §12).

A report is canonical CBOR, signed by the relay key it names:

    [relay_key(32), oracle_key(32), issued_at_ms, nonce(16), instance(16), sequence,
     lease_ms, snapshot_from, snapshot_last, connections[…], signature(64)]

    connection = [device(32), connected_at_ms, disconnected_at_ms | null,
                  sent, received, refused]

Replicas share one relay key, so `instance` (random, drawn at process start)
names the relay process and `sequence` counts its reports from 1, so the
oracle notices a report it missed.  A connection is named by (device,
instance, connected_at_ms); its counts are cumulative for that connection,
so a report applied twice, or one lost and followed by a later one, leaves
the oracle's totals right.  `lease_ms` is how long after this report the
oracle may take the relay process for dead if it hears nothing more (its
connections then end).  A report is either the connections that changed
since the previous one (`snapshot_from` 0) or one part of a snapshot of
every connection the process holds, the parts numbered from sequence
`snapshot_from` up to the part marked `snapshot_last`: a relay that could
not reach the oracle sends one snapshot instead of replaying every event.
Connections are sorted by (device, connected_at_ms) and unique: one encoding
per report.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Collection
from itertools import pairwise

from . import canonical
from .access import ORACLE_CLOCK_SKEW_MS, REQUEST_NONCE_BYTES
from .canonical import uint63
from .errors import (DecodeError, InvalidFieldError, OversizeError, StaleError,
                     UnauthenticatedError)
from .keys import KEY_BYTES, SIGNATURE_BYTES, Identity, PublicKey

PRESENCE_REPORT_DOMAIN = b"continuum/v1/presence-report\x00"
PRESENCE_PATH = "/v1/presence"
PRESENCE_CONTENT_TYPE = "application/cbor"
INSTANCE_BYTES = 16
# At most this many connections per report: a larger snapshot is sent in parts.
MAX_PRESENCE_CONNECTIONS = 10_000
# A connection entry is at most 79 bytes (a 32-byte key, four 9-byte integers, a 9-byte
# or null time, the array header); the rest is the report's own fields.
MAX_PRESENCE_REPORT_BYTES = 256 + 80 * MAX_PRESENCE_CONNECTIONS
# How long an oracle waits for the next report at most, whatever a relay asks.
MAX_LEASE_MS = 10 * 60_000
_FIELDS = 11
# How every canonical report begins: the head of an array of _FIELDS, then of KEY_BYTES bytes.
_HEAD = bytes([0x80 | _FIELDS, 0x58, KEY_BYTES])
_CONNECTION_FIELDS = 6


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """One connection of one device to one relay process, as of the report."""

    device: PublicKey
    connected_at_ms: int
    disconnected_at_ms: int | None  # None: still connected
    sent: int  # SENDs the relay accepted from the device on this connection
    received: int  # deliveries the device acknowledged on this connection
    refused: int  # frames and SENDs refused on this connection

    @property
    def open(self) -> bool:
        return self.disconnected_at_ms is None

    def to_value(self) -> list:
        return [self.device.raw, self.connected_at_ms, self.disconnected_at_ms, self.sent,
                self.received, self.refused]

    @classmethod
    def from_value(cls, value: object) -> ConnectionState:
        if type(value) is not list or len(value) != _CONNECTION_FIELDS:
            raise InvalidFieldError(f"a presence connection is an array of {_CONNECTION_FIELDS}"
                                    " elements")
        device, connected, disconnected, sent, received, refused = value
        if type(device) is not bytes or len(device) != KEY_BYTES:
            raise InvalidFieldError(f"presence device keys must be {KEY_BYTES} bytes")
        uint63(connected, "presence connected_at_ms")
        if disconnected is not None:
            uint63(disconnected, "presence disconnected_at_ms")
            if disconnected < connected:
                raise InvalidFieldError("a connection cannot end before it began")
        for name, count in (("sent", sent), ("received", received), ("refused", refused)):
            uint63(count, f"presence {name}")
        return cls(PublicKey(device), connected, disconnected, sent, received, refused)


@dataclass(frozen=True)
class PresenceReport:
    """What one relay process says about the connections it holds or held."""

    relay: PublicKey
    oracle: PublicKey
    issued_at_ms: int
    nonce: bytes
    instance: bytes
    sequence: int
    lease_ms: int
    snapshot_from: int  # 0: the connections that changed; else the snapshot's first sequence
    snapshot_last: bool  # the snapshot's last part
    connections: tuple[ConnectionState, ...]

    @property
    def is_snapshot(self) -> bool:
        return self.snapshot_from != 0

    def _body(self) -> list:
        return [self.relay.raw, self.oracle.raw, self.issued_at_ms, self.nonce, self.instance,
                self.sequence, self.lease_ms, self.snapshot_from, self.snapshot_last,
                [c.to_value() for c in sorted(self.connections, key=_order)]]

    def sign(self, identity: Identity) -> bytes:
        """The signed wire form; `identity` must be the relay the report names."""
        if identity.public != self.relay:
            raise InvalidFieldError("a presence report is signed by the relay it names")
        self._check()
        body = self._body()
        return canonical.encode([*body, identity.sign(PRESENCE_REPORT_DOMAIN
                                                      + canonical.encode(body))])

    def _check(self) -> None:
        """The rules every report keeps, whichever side built it."""
        if len(self.nonce) != REQUEST_NONCE_BYTES:
            raise InvalidFieldError(f"presence nonce must be {REQUEST_NONCE_BYTES} bytes")
        if len(self.instance) != INSTANCE_BYTES:
            raise InvalidFieldError(f"presence instance must be {INSTANCE_BYTES} bytes")
        if self.sequence < 1:
            raise InvalidFieldError("presence sequence numbers start at 1")
        if not 1 <= self.lease_ms <= MAX_LEASE_MS:
            raise InvalidFieldError(f"presence lease_ms must be 1..{MAX_LEASE_MS}")
        if self.snapshot_from > self.sequence:
            raise InvalidFieldError("a snapshot cannot begin after the report that is part of it")
        if self.snapshot_last and not self.snapshot_from:
            raise InvalidFieldError("only a snapshot part can be its last")
        if len(self.connections) > MAX_PRESENCE_CONNECTIONS:
            raise InvalidFieldError(f"at most {MAX_PRESENCE_CONNECTIONS} connections per report")
        names = sorted(_order(c) for c in self.connections)
        if any(a == b for a, b in pairwise(names)):
            raise InvalidFieldError("presence connections must be unique")

    @staticmethod
    def claimed_relay(data: bytes) -> PublicKey:
        """The relay key a report names, read before anything else of it is decoded: an
        oracle refuses a key it does not allow before paying for the rest (a report of
        10,000 connections costs ~50 ms to decode, check the signature of and parse).
        A canonical report starts with its array's head and the key's; DecodeError for
        bytes that do not (OversizeError beyond the size bound, as `verify`)."""
        if len(data) > MAX_PRESENCE_REPORT_BYTES:
            raise OversizeError(f"presence report: {len(data)} bytes exceeds the limit of"
                                f" {MAX_PRESENCE_REPORT_BYTES}")
        if len(data) < len(_HEAD) + KEY_BYTES or not data.startswith(_HEAD):
            raise DecodeError(f"a presence report is a CBOR array of {_FIELDS} elements,"
                              " the relay key first")
        return PublicKey(data[len(_HEAD):len(_HEAD) + KEY_BYTES])

    @classmethod
    def verify(cls, data: bytes, oracle: PublicKey, now_ms: int,
               former: Collection[PublicKey] = ()) -> PresenceReport:
        """Decode a report for `oracle` (or one of its `former` keys) and check its signature
        and clock, as `AccessRequest.verify` does; whether the relay key may report here
        and the nonce is unused is the oracle's to check.

        DecodeError/InvalidFieldError (OversizeError beyond the size bound),
        UnauthenticatedError for a report to another oracle, StaleError beyond
        ORACLE_CLOCK_SKEW_MS, SignatureError.
        """
        value = canonical.decode(data, max_size=MAX_PRESENCE_REPORT_BYTES, what="presence report")
        if type(value) is not list or len(value) != _FIELDS:
            raise DecodeError(f"a presence report is a CBOR array of {_FIELDS} elements")
        (relay, named, issued_at, nonce, instance, sequence, lease_ms, snapshot_from,
         snapshot_last, connections, signature) = value
        for what, key in (("relay", relay), ("oracle", named)):
            if type(key) is not bytes or len(key) != KEY_BYTES:
                raise InvalidFieldError(f"presence {what} key must be {KEY_BYTES} bytes")
        if PublicKey(named) != oracle and PublicKey(named) not in former:
            raise UnauthenticatedError("presence report is for another oracle")
        for what, number in (("issued_at_ms", issued_at), ("sequence", sequence),
                             ("lease_ms", lease_ms), ("snapshot_from", snapshot_from)):
            uint63(number, f"presence {what}")
        for what, raw, size in (("nonce", nonce, REQUEST_NONCE_BYTES),
                                ("instance", instance, INSTANCE_BYTES)):
            if type(raw) is not bytes or len(raw) != size:
                raise InvalidFieldError(f"presence {what} must be {size} bytes")
        if type(snapshot_last) is not bool:
            raise InvalidFieldError("presence snapshot_last must be true or false")
        if type(connections) is not list:
            raise InvalidFieldError("presence connections must be an array")
        if len(connections) > MAX_PRESENCE_CONNECTIONS:
            raise InvalidFieldError(f"at most {MAX_PRESENCE_CONNECTIONS} connections per report")
        if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
            raise InvalidFieldError("presence signature must be 64 bytes")
        if abs(now_ms - issued_at) > ORACLE_CLOCK_SKEW_MS:
            raise StaleError(f"presence report issued {(now_ms - issued_at) / 1000:.0f}s from"
                             f" the oracle's clock (limit {ORACLE_CLOCK_SKEW_MS // 1000}s)")
        signer = PublicKey(relay)
        signer.verify(PRESENCE_REPORT_DOMAIN + canonical.encode(value[:-1]), signature)
        states = tuple(ConnectionState.from_value(c) for c in connections)
        if any(_raw_order(a) >= _raw_order(b) for a, b in pairwise(connections)):
            raise InvalidFieldError("presence connections must be sorted by (device,"
                                    " connected_at_ms) and unique")
        report = cls(signer, PublicKey(named), issued_at, nonce, instance, sequence, lease_ms,
                     snapshot_from, snapshot_last, states)
        report._check()
        return report


def _order(connection: ConnectionState) -> tuple[bytes, int]:
    return connection.device.raw, connection.connected_at_ms


def _raw_order(value: list) -> tuple[bytes, int]:
    return value[0], value[1]
