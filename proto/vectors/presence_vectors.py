"""presence.json: a relay's presence reports to its oracle (SPEC §20), valid and invalid.

Relay `relay` reports to oracle `oracle`: first a snapshot in one part (alice
connected, bob's ended connection that was never acknowledged), then a
changes report (alice's counts moved, carol connected).  The invalid entries
are what an oracle must refuse, each with its error code; `now_ms` is the
oracle's clock when it checks them.  (Over 10,000 connections and over the
size limit are refused too; tests/test_proto_presence.py builds those, too
big for a vector file.)
"""

from __future__ import annotations

from .. import canonical
from ..access import ORACLE_CLOCK_SKEW_MS
from ..errors import ErrorCode
from ..presence import (INSTANCE_BYTES, MAX_PRESENCE_CONNECTIONS, MAX_PRESENCE_REPORT_BYTES,
                        PRESENCE_REPORT_DOMAIN, ConnectionState, PresenceReport)
from .generate import CREATED_AT_MS, IDS, _invalid, fill

INSTANCE = fill(0x1C, INSTANCE_BYTES)
LEASE_MS = 90_000
NOW_MS = CREATED_AT_MS + 5_000


def _reports() -> tuple[PresenceReport, PresenceReport]:
    alice, bob, carol = (IDS[name].public for name in ("alice", "bob", "carol"))
    snapshot = PresenceReport(
        IDS["relay"].public, IDS["oracle"].public, CREATED_AT_MS, fill(0x5A, 16), INSTANCE,
        1, LEASE_MS, 1, True,
        (ConnectionState(alice, CREATED_AT_MS - 60_000, None, 3, 2, 0),
         ConnectionState(bob, CREATED_AT_MS - 30_000, CREATED_AT_MS - 1_000, 1, 0, 1)))
    changes = PresenceReport(
        IDS["relay"].public, IDS["oracle"].public, CREATED_AT_MS + 2_000, fill(0x5B, 16),
        INSTANCE, 2, LEASE_MS, 0, False,
        (ConnectionState(alice, CREATED_AT_MS - 60_000, None, 5, 2, 0),
         ConnectionState(carol, CREATED_AT_MS + 1_500, None, 0, 0, 0)))
    return snapshot, changes


def _vector(report: PresenceReport) -> dict:
    encoded = report.sign(IDS["relay"])
    fields = canonical.decode(encoded, max_size=MAX_PRESENCE_REPORT_BYTES, what="vector")
    return {
        "relay": "relay", "oracle": "oracle",
        "fields": {"relay_key": report.relay.raw.hex(), "oracle_key": report.oracle.raw.hex(),
                   "issued_at_ms": report.issued_at_ms, "nonce": report.nonce.hex(),
                   "instance": report.instance.hex(), "sequence": report.sequence,
                   "lease_ms": report.lease_ms, "snapshot_from": report.snapshot_from,
                   "snapshot_last": report.snapshot_last,
                   "connections": [{"device": c.device.raw.hex(),
                                    "connected_at_ms": c.connected_at_ms,
                                    "disconnected_at_ms": c.disconnected_at_ms,
                                    "sent": c.sent, "received": c.received,
                                    "refused": c.refused} for c in report.connections]},
        "signed_bytes": (PRESENCE_REPORT_DOMAIN + canonical.encode(fields[:-1])).hex(),
        "signature": fields[-1].hex(),
        "encoded": encoded.hex(),
    }


def _resigned(fields: list, signer: str = "relay") -> bytes:
    """Any fields, signed by `signer` over what they say: only the rule can refuse them."""
    return canonical.encode([*fields, IDS[signer].sign(PRESENCE_REPORT_DOMAIN
                                                       + canonical.encode(fields))])


def _invalid_reports(report: PresenceReport) -> list[dict]:
    encoded = report.sign(IDS["relay"])
    body = canonical.decode(encoded, max_size=MAX_PRESENCE_REPORT_BYTES, what="vector")[:-1]
    flipped = bytearray(encoded)
    flipped[-1] ^= 0x01

    def changed(index: int, value: object) -> bytes:
        fields = list(body)
        fields[index] = value
        return _resigned(fields)

    connections = body[9]
    one = connections[0]
    return [
        _invalid("presence report with a flipped signature bit", "presence_report",
                 bytes(flipped), ErrorCode.BAD_SIGNATURE),
        _invalid("presence report signed by another key than the relay it names",
                 "presence_report", _resigned(body, signer="alice"), ErrorCode.BAD_SIGNATURE),
        _invalid("presence report for another oracle", "presence_report",
                 changed(1, IDS["carol"].public.raw), ErrorCode.UNAUTHENTICATED),
        _invalid("presence report issued more than 60 s before the oracle's clock",
                 "presence_report", changed(2, NOW_MS - ORACLE_CLOCK_SKEW_MS - 1),
                 ErrorCode.STALE),
        _invalid("presence report issued more than 60 s ahead of the oracle's clock",
                 "presence_report", changed(2, NOW_MS + ORACLE_CLOCK_SKEW_MS + 1),
                 ErrorCode.STALE),
        _invalid("presence connections out of order", "presence_report",
                 changed(9, connections[::-1]), ErrorCode.INVALID_FIELD),
        _invalid("the same connection twice", "presence_report", changed(9, [one, one]),
                 ErrorCode.INVALID_FIELD),
        _invalid("a connection that ends before it begins", "presence_report",
                 changed(9, [[one[0], one[1], one[1] - 1, 0, 0, 0]]), ErrorCode.INVALID_FIELD),
        _invalid("a negative count", "presence_report",
                 changed(9, [[one[0], one[1], None, -1, 0, 0]]), ErrorCode.INVALID_FIELD),
        _invalid("a changes report marked as a snapshot's last part", "presence_report",
                 changed(7, 0), ErrorCode.INVALID_FIELD),
        _invalid("a snapshot that begins after this report", "presence_report",
                 changed(7, body[5] + 1), ErrorCode.INVALID_FIELD),
        _invalid("a lease of 0 ms", "presence_report", changed(6, 0), ErrorCode.INVALID_FIELD),
        _invalid("sequence 0", "presence_report", changed(5, 0), ErrorCode.INVALID_FIELD),
        _invalid("an instance id of 15 bytes", "presence_report",
                 changed(4, INSTANCE[:15]), ErrorCode.INVALID_FIELD),
        _invalid("snapshot_last as an integer", "presence_report", changed(8, 1),
                 ErrorCode.INVALID_FIELD),
        _invalid("presence report without its last element", "presence_report",
                 canonical.encode(body), ErrorCode.MALFORMED),
        _invalid("presence report cut short", "presence_report", encoded[:-7],
                 ErrorCode.MALFORMED),
    ]


def presence_vectors() -> dict:
    snapshot, changes = _reports()
    return {
        "description": "A relay's presence reports to its oracle (relay `relay`, oracle "
                       "`oracle`; keys in keys.json): a one-part snapshot and the changes "
                       "report after it. Counts are cumulative per connection. `invalid` "
                       "entries must be refused by an oracle verifying them at `now_ms` "
                       "(`check`: presence_report), each with the ErrorCode name in `error`.",
        "presence_report_domain": PRESENCE_REPORT_DOMAIN.hex(),
        "now_ms": NOW_MS,
        "max_skew_ms": ORACLE_CLOCK_SKEW_MS,
        "max_connections": MAX_PRESENCE_CONNECTIONS,
        "max_bytes": MAX_PRESENCE_REPORT_BYTES,
        "snapshot": _vector(snapshot),
        "changes": _vector(changes),
        "invalid": _invalid_reports(snapshot),
    }
