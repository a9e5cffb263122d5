"""Home regions in the access list (SPEC §19): what is refused, and hostile bytes (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_settings import quick
from proto import Identity
from proto.access import MAX_ACCESS_LIST_BYTES, AccessList
from proto.errors import ErrorCode, InvalidFieldError, ProtocolError
from proto.regions import is_region_name, region_name
from proto.vectors import load

ORACLE = Identity(bytes(range(0x80, 0xA0)))
VECTOR = bytes.fromhex(load("regions")["access_list"]["encoded"])
A, B, C = (Identity.generate().public for _ in range(3))


def regional(**changes: object) -> AccessList:
    fields: dict = dict(epoch=1, version=2, issued_at_ms=10, valid_until_ms=20,
                        oracle=ORACLE.public, groups={A: frozenset(), B: frozenset({1})},
                        revoked=frozenset(), regions=("eu", "us"), homes={A: "eu", B: "us"},
                        default_home="eu")
    fields.update(changes)
    return AccessList(**fields)


@pytest.mark.parametrize("name", ["eu", "us-east-1", "a", "a" * 32, "x9"])
def test_region_names(name: str) -> None:
    assert is_region_name(name) and region_name(name) == name


@pytest.mark.parametrize("name", ["", "EU", "1eu", "-eu", "eu_west", "a" * 33, "é", "eu ", 7, None])
def test_not_region_names(name: object) -> None:
    assert not is_region_name(name)
    with pytest.raises(InvalidFieldError):
        region_name(name)


def test_a_list_that_cannot_say_where_a_mailbox_lives_is_not_signed() -> None:
    for changes in ({"homes": {A: "eu"}},                       # B has no home
                    {"homes": {A: "eu", B: "mars"}},            # not one of the regions
                    {"homes": {A: "eu", B: "us", C: "eu"}},     # C is not enrolled
                    {"default_home": "ap"},
                    {"former_homes": {B: "us"}},                # a former home that is the home
                    {"former_homes": {C: "eu"}},
                    {"regions": ("us", "eu")},                  # not sorted
                    {"regions": (), "default_home": None}):     # homes without regions
        with pytest.raises(InvalidFieldError):
            regional(**changes).sign(ORACLE)


def test_signed_by_another_key_or_for_another_oracle_is_refused() -> None:
    document = regional().sign(ORACLE)
    with pytest.raises(ProtocolError) as caught:
        AccessList.verify(document, Identity.generate().public)
    assert caught.value.code is ErrorCode.BAD_SIGNATURE
    forged = bytearray(document)
    forged[-1] ^= 1
    with pytest.raises(ProtocolError) as caught:
        AccessList.verify(bytes(forged), ORACLE.public)
    assert caught.value.code is ErrorCode.BAD_SIGNATURE


def test_a_list_beyond_the_size_limit_is_not_read() -> None:
    with pytest.raises(ProtocolError) as caught:
        AccessList.verify(VECTOR + bytes(MAX_ACCESS_LIST_BYTES), ORACLE.public)
    assert caught.value.code is ErrorCode.OVERSIZE


def test_round_trip_keeps_every_placement() -> None:
    access = regional(former_homes={A: "us"}, draining={C: 99}, homes={A: "eu", B: "us", C: "us"})
    back = AccessList.verify(access.sign(ORACLE), ORACLE.public)
    assert back == access and back.home_of(C) == "us" and back.home_of(ORACLE.public) == "eu"


@quick(300)
@given(st.integers(0, len(VECTOR)), st.binary(max_size=8), st.integers(0, len(VECTOR) - 1))
def test_hostile_bytes_are_refused_as_protocol_errors(cut: int, junk: bytes, flip: int) -> None:
    """Truncated, extended or altered lists: a ProtocolError, never a crash or a misreading."""
    for data in (VECTOR[:cut], VECTOR[:cut] + junk,
                 VECTOR[:flip] + bytes([VECTOR[flip] ^ 0x41]) + VECTOR[flip + 1:]):
        if data == VECTOR:
            continue
        with pytest.raises(ProtocolError):
            AccessList.verify(data, ORACLE.public)


@quick(200)
@given(st.lists(st.text(alphabet="abcdEU-9 ", min_size=0, max_size=4), max_size=5),
       st.lists(st.integers(-1, 6), min_size=3, max_size=3))
def test_signed_but_odd_placements_verify_exactly_or_are_refused(regions: list[str],
                                                                  indexes: list[int]) -> None:
    """Any region table and home indexes, signed by the oracle: either the list verifies and
    re-signs to the same bytes, or it is refused with a ProtocolError."""
    from proto import canonical
    from proto.access import ACCESS_LIST_DOMAIN
    body = [1, 2, 10, 20, ORACLE.public.raw,
            sorted([[A.raw, [], indexes[0]], [B.raw, [1], indexes[1]]]), [], [], [],
            regions, indexes[2]]
    data = canonical.encode([*body, ORACLE.sign(ACCESS_LIST_DOMAIN + canonical.encode(body))])
    try:
        access = AccessList.verify(data, ORACLE.public)
    except ProtocolError:
        return
    assert access.sign(ORACLE) == data
    assert access.home_of(A) in access.regions
