"""Canonical CBOR: exactly one accepted encoding per value, everything else refused."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings

from proto import canonical
from proto.envelope import decode_envelope
from proto.errors import DecodeError, ErrorCode, OversizeError
from proto_support import cbor_values, encode_any, envelope_fields, make_envelope

# (name, non-canonical bytes) — each decodes to a value whose canonical form differs.
NON_CANONICAL = [
    ("int 0 in one extra byte", "1800"),
    ("int 23 in one extra byte", "1817"),
    ("int 255 in two extra bytes", "1900ff"),
    ("int 65535 in four extra bytes", "1a0000ffff"),
    ("int 1 in eight extra bytes", "1b0000000000000001"),
    ("negative int -1 in one extra byte", "3800"),
    ("byte string length in one extra byte", "580100"),
    ("text string length in one extra byte", "780161"),
    ("array length in one extra byte", "980100"),
    ("indefinite-length array", "9f01ff"),
    ("indefinite-length byte string", "5f4101ff"),
    ("indefinite-length text string", "7f6161ff"),
    ("indefinite-length map", "bf0101ff"),
    ("unsorted map keys", "a2020101 01".replace(" ", "")),
    ("duplicate map keys", "a201010102"),
    ("float that could be shorter", "fb3ff0000000000000"),
    ("tag 0 (date text)", "c074" + b"2013-03-21T20:04:00Z".hex()),
    ("tag 1 (epoch)", "c11a514b67b0"),
    ("tag 2 (bignum, fits 64 bits)", "c24101"),
    ("tag 2 (bignum, beyond 64 bits)", "c249" + "01" * 9),
    ("tag 3 (negative bignum)", "c349" + "01" * 9),
    ("tag 4 (decimal fraction)", "c48221196ab3"),
    ("tag 24 (embedded CBOR)", "d8184101"),
    ("tag 32 (URI)", "d8206161"),
    ("tag 35 (regex)", "d8236161"),
    ("tag 258 (set)", "d901028101"),
    ("tag 55799 (self-described)", "d9d9f701"),
    ("unknown tag", "d9fff001"),
    ("trailing byte", "0100"),
    ("two items", "8080"),
    ("truncated array", "8301"),
    ("truncated byte string", "4501"),
    ("reserved additional info", "1c"),
    ("break outside indefinite item", "ff"),
    ("invalid UTF-8", "62c328"),
    ("deep nesting", "81" * 20 + "00"),
]


@pytest.mark.parametrize("hex_data", [h for _, h in NON_CANONICAL],
                         ids=[name for name, _ in NON_CANONICAL])
def test_non_canonical_is_refused(hex_data: str) -> None:
    with pytest.raises(DecodeError) as caught:
        canonical.decode(bytes.fromhex(hex_data), max_size=1024, what="test")
    assert caught.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("hex_data", [h for _, h in NON_CANONICAL],
                         ids=[name for name, _ in NON_CANONICAL])
def test_non_canonical_in_envelope_field_is_refused(hex_data: str) -> None:
    """The same encodings spliced into a valid envelope in place of the ttl."""
    fields = envelope_fields(make_envelope())
    marker = 0xCAFE
    fields[5] = marker
    encoded = canonical.encode(fields)
    spliced = encoded.replace(cbor2.dumps(marker), bytes.fromhex(hex_data), 1)
    with pytest.raises(DecodeError):
        decode_envelope(spliced)


def test_non_shortest_integer_inside_envelope() -> None:
    raw = make_envelope().raw
    assert raw[:2] == bytes.fromhex("8a02")  # array(10), version 2
    with pytest.raises(DecodeError) as caught:
        decode_envelope(bytes.fromhex("8a1802") + raw[2:])
    assert caught.value.code is ErrorCode.MALFORMED


def test_size_limit_checked_before_parsing() -> None:
    with pytest.raises(OversizeError):
        canonical.decode(b"\x00" * 11, max_size=10, what="test")


@settings(max_examples=300, deadline=None)
@given(cbor_values)
def test_canonical_values_decode_and_reencode_identically(value: object) -> None:
    data = encode_any(value)
    try:
        decoded = canonical.decode(data, max_size=1 << 20, what="test")
    except DecodeError:
        return  # tags (and bignums) are refused by design
    assert canonical.encode(decoded) == data
