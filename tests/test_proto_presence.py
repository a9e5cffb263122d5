"""Presence reports (SPEC §20): the vectors, independently rebuilt, and every way to get one wrong.

Forged and foreign signatures, another oracle, stale and future clocks,
truncation, oversize, too many connections, and garbage (hypothesis): each
is refused with its error code, never another exception.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import Identity, PublicKey, canonical
from proto.errors import ErrorCode, ProtocolError
from proto.presence import (MAX_PRESENCE_CONNECTIONS, MAX_PRESENCE_REPORT_BYTES,
                            PRESENCE_REPORT_DOMAIN, ConnectionState, PresenceReport)
from proto.vectors import VECTOR_DIR

VECTORS = json.loads((VECTOR_DIR / "presence.json").read_text())
KEYS = json.loads((VECTOR_DIR / "keys.json").read_text())
H = bytes.fromhex


def identity(name: str) -> Identity:
    entry = next(k for k in KEYS["keys"] if k["name"] == name)
    return Identity(H(entry["seed"]))


def from_fields(f: dict) -> PresenceReport:
    """A report built from the vector's fields alone (no call into the generator)."""
    return PresenceReport(
        PublicKey(H(f["relay_key"])), PublicKey(H(f["oracle_key"])), f["issued_at_ms"],
        H(f["nonce"]), H(f["instance"]), f["sequence"], f["lease_ms"], f["snapshot_from"],
        f["snapshot_last"], tuple(ConnectionState(
            PublicKey(H(c["device"])), c["connected_at_ms"], c["disconnected_at_ms"], c["sent"],
            c["received"], c["refused"]) for c in f["connections"]))


@pytest.mark.parametrize("name", ["snapshot", "changes"])
def test_vectors_sign_and_verify_byte_for_byte(name: str) -> None:
    vector = VECTORS[name]
    assert H(VECTORS["presence_report_domain"]) == PRESENCE_REPORT_DOMAIN
    report = from_fields(vector["fields"])
    relay = identity(vector["relay"])
    assert report.sign(relay) == H(vector["encoded"])
    assert H(vector["signed_bytes"]) == PRESENCE_REPORT_DOMAIN + canonical.encode(
        canonical.decode(H(vector["encoded"]), max_size=1 << 20, what="v")[:-1])
    relay.public.verify(H(vector["signed_bytes"]), H(vector["signature"]))
    oracle = identity(vector["oracle"]).public
    assert PresenceReport.verify(H(vector["encoded"]), oracle, VECTORS["now_ms"]) == report


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["name"])
def test_invalid_vectors_are_refused_with_their_code(case: dict) -> None:
    oracle = identity("oracle").public
    with pytest.raises(ProtocolError) as refused:
        PresenceReport.verify(H(case["hex"]), oracle, VECTORS["now_ms"])
    assert refused.value.code is ErrorCode[case["error"]]


def _report(count: int = 2, **changes: object) -> PresenceReport:
    relay, oracle = identity("relay"), identity("oracle")
    fields = dict(relay=relay.public, oracle=oracle.public, issued_at_ms=VECTORS["now_ms"],
                  nonce=os.urandom(16), instance=os.urandom(16), sequence=1, lease_ms=90_000,
                  snapshot_from=1, snapshot_last=True,
                  connections=tuple(ConnectionState(Identity.generate().public, 1000 + n, None,
                                                    n, 0, 0) for n in range(count)))
    fields.update(changes)
    return PresenceReport(**fields)  # type: ignore[arg-type]


def test_a_full_report_fits_its_size_bound_and_one_more_connection_is_refused() -> None:
    relay, oracle = identity("relay"), identity("oracle").public
    full = _report(MAX_PRESENCE_CONNECTIONS).sign(relay)
    assert len(full) <= MAX_PRESENCE_REPORT_BYTES
    assert len(PresenceReport.verify(full, oracle, VECTORS["now_ms"]).connections) == \
        MAX_PRESENCE_CONNECTIONS
    with pytest.raises(ProtocolError) as refused:
        _report(MAX_PRESENCE_CONNECTIONS + 1).sign(relay)
    assert refused.value.code is ErrorCode.INVALID_FIELD
    # Signed by hand past the rule: the oracle refuses it all the same.
    body = canonical.decode(full, max_size=MAX_PRESENCE_REPORT_BYTES, what="t")[:-1]
    body[9] = [*body[9], [Identity.generate().public.raw, 1, None, 0, 0, 0]]
    body[9].sort(key=lambda c: (c[0], c[1]))
    extra = canonical.encode([*body, relay.sign(PRESENCE_REPORT_DOMAIN + canonical.encode(body))])
    with pytest.raises(ProtocolError) as refused:
        PresenceReport.verify(extra, oracle, VECTORS["now_ms"])
    assert refused.value.code is ErrorCode.INVALID_FIELD
    with pytest.raises(ProtocolError) as refused:
        PresenceReport.verify(bytes(MAX_PRESENCE_REPORT_BYTES + 1), oracle, VECTORS["now_ms"])
    assert refused.value.code is ErrorCode.OVERSIZE


def test_a_former_oracle_key_is_accepted_only_when_named_former() -> None:
    relay, old = identity("relay"), identity("carol").public
    report = _report(oracle=old).sign(relay)
    oracle = identity("oracle").public
    with pytest.raises(ProtocolError) as refused:
        PresenceReport.verify(report, oracle, VECTORS["now_ms"])
    assert refused.value.code is ErrorCode.UNAUTHENTICATED
    assert PresenceReport.verify(report, oracle, VECTORS["now_ms"], former=[old]).oracle == old


def test_only_the_relay_it_names_can_sign_a_report() -> None:
    with pytest.raises(ProtocolError) as refused:
        _report().sign(identity("alice"))
    assert refused.value.code is ErrorCode.INVALID_FIELD


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_is_refused_with_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        PresenceReport.verify(data, identity("oracle").public, VECTORS["now_ms"])


ENCODED = H(VECTORS["snapshot"]["encoded"])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(ENCODED) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_refused(position: int, mask: int) -> None:
    changed = bytearray(ENCODED)
    changed[position] ^= mask
    with pytest.raises(ProtocolError):
        PresenceReport.verify(bytes(changed), identity("oracle").public, VECTORS["now_ms"])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(ENCODED) - 1))
def test_every_truncation_is_refused(length: int) -> None:
    with pytest.raises(ProtocolError):
        PresenceReport.verify(ENCODED[:length], identity("oracle").public, VECTORS["now_ms"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**40), st.one_of(st.none(), st.integers(0, 2**20)),
                          st.integers(0, 2**63 - 1), st.integers(0, 2**32),
                          st.integers(0, 2**32)), max_size=8),
       st.integers(1, 2**40), st.booleans())
def test_any_well_formed_report_round_trips(entries: list, sequence: int, last: bool) -> None:
    connections = tuple(ConnectionState(Identity.generate().public, at,
                                        None if length is None else at + length, s, r, x)
                        for at, length, s, r, x in entries)
    report = _report(0, sequence=sequence, snapshot_from=sequence if last else 0,
                     snapshot_last=last, connections=connections)
    signed = report.sign(identity("relay"))
    decoded = PresenceReport.verify(signed, identity("oracle").public, VECTORS["now_ms"])
    assert decoded.sign(identity("relay")) == signed
    assert set(decoded.connections) == set(connections)
    assert PresenceReport.claimed_relay(signed) == identity("relay").public  # read up front


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_the_claimed_relay_is_read_only_from_a_reports_canonical_head(data: bytes) -> None:
    """What `claimed_relay` accepts is a report's own head: anything else is refused before
    a decode, and a key read from it is the one `verify` would find there."""
    try:
        claimed = PresenceReport.claimed_relay(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED
    else:
        assert data[:3] == bytes([0x8B, 0x58, 0x20]) and claimed.raw == data[3:35]
