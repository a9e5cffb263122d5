"""Signed prekeys (SPEC §5): the round trip, every refusal, and garbage on the decoders."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_settings import quick

from proto import canonical
from proto.envelope import Kind, decode_envelope, seal_envelope
from proto.errors import (DecryptError, InvalidFieldError, PrekeyExpiredError, ProtocolError,
                          SignatureError, UnknownPrekeyError)
from proto.payloads import PeerChange
from proto.prekeys import (MAX_PREKEY_VALIDITY_MS, PREKEY_RETENTION_MS, PrekeySecret,
                           SignedPrekey, create_prekey)
from proto_support import (ALICE, BOB, CAROL, NOW_MS, TTL_S, counter_random, encode_any,
                           field_replacements, mutations)

WEEK_MS = 7 * 86_400_000
PREKEY, SECRET = create_prekey(BOB, 3, bytes([0x42]) * 32, NOW_MS + WEEK_MS)
CAROL_PREKEY, CAROL_SECRET = create_prekey(CAROL, 9, bytes([0x43]) * 32, NOW_MS + WEEK_MS)


def seal(recipients=(BOB, CAROL), prekeys=None, now_ms: int = NOW_MS, plaintext=b"for bob"):
    return seal_envelope(ALICE, Kind.DATA, [r.public for r in recipients], plaintext,
                         ttl_s=TTL_S, now_ms=now_ms, random_bytes=counter_random("prekeys"),
                         prekeys=prekeys)


def test_signed_prekey_round_trip() -> None:
    assert SignedPrekey.decode(PREKEY.encode(), BOB.public) == PREKEY
    assert len(PREKEY.encode()) == 111  # id 3: one byte; the largest id takes four more
    assert SECRET.deletable_at_ms == NOW_MS + WEEK_MS + PREKEY_RETENTION_MS
    assert SECRET.secret.hex() not in repr(SECRET) and repr(SECRET.secret) not in repr(SECRET)


def test_a_prekey_verifies_only_under_its_owner() -> None:
    with pytest.raises(SignatureError):
        SignedPrekey.decode(PREKEY.encode(), CAROL.public)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_every_signed_field_is_covered(index: int) -> None:
    value = PREKEY.to_value()
    value[index] = {0: 4, 1: CAROL_PREKEY.public, 2: PREKEY.valid_until_ms + 1}[index]
    with pytest.raises(SignatureError):
        SignedPrekey.decode(canonical.encode(value), BOB.public)


def test_usability_window() -> None:
    PREKEY.check_usable(NOW_MS)
    PREKEY.check_usable(PREKEY.valid_until_ms - 1)
    with pytest.raises(PrekeyExpiredError):
        PREKEY.check_usable(PREKEY.valid_until_ms)
    with pytest.raises(InvalidFieldError):
        PREKEY.check_usable(PREKEY.valid_until_ms - MAX_PREKEY_VALIDITY_MS - 1)


@pytest.mark.parametrize("public", [bytes(32), bytes([1]) + bytes(31), b"\xff" * 32,
                                    (2**255 - 19 + 9).to_bytes(32, "little"), bytes(31)])
def test_unusable_x25519_keys_are_refused(public: bytes) -> None:
    signed = SignedPrekey.signed_bytes_for(BOB.public, 3, public, PREKEY.valid_until_ms)
    data = canonical.encode([3, public, PREKEY.valid_until_ms, BOB.sign(signed)])
    with pytest.raises(InvalidFieldError):
        SignedPrekey.decode(data, BOB.public)


def test_seal_to_a_prekey_and_open_with_its_secret_only() -> None:
    env = decode_envelope(seal(prekeys={BOB.public: PREKEY}).raw)
    by_key = {r.key: r.prekey_id for r in env.recipients}
    assert by_key == {BOB.public: 3, CAROL.public: None}
    assert env.open(BOB, {3: SECRET}).plaintext == b"for bob"
    assert env.open(CAROL).plaintext == b"for bob"  # her wrap is to her identity key
    with pytest.raises(UnknownPrekeyError):
        env.open(BOB)  # never falls back to the identity key
    with pytest.raises(UnknownPrekeyError):
        env.open(BOB, {4: PrekeySecret(4, SECRET.secret, SECRET.valid_until_ms)})
    with pytest.raises(DecryptError):  # the right id with another secret: nothing opens
        env.open(BOB, {3: PrekeySecret(3, CAROL_SECRET.secret, SECRET.valid_until_ms)})


def test_each_prekey_entry_costs_its_id() -> None:
    plain, with_prekey = seal(), seal(prekeys={BOB.public: PREKEY})
    # array(3) is one byte like array(2); the id 3 is one byte (up to five for ids >= 2^16)
    assert len(with_prekey.raw) - len(plain.raw) == 1


def test_the_sender_refuses_an_expired_prekey_or_one_of_another_owner() -> None:
    with pytest.raises(PrekeyExpiredError):
        seal(prekeys={BOB.public: PREKEY}, now_ms=PREKEY.valid_until_ms)
    with pytest.raises(InvalidFieldError):
        seal(prekeys={BOB.public: CAROL_PREKEY})
    # A prekey of someone who is not a recipient is not looked at.
    seal(recipients=(CAROL,), prekeys={BOB.public: PREKEY}, now_ms=PREKEY.valid_until_ms)


def test_the_recipient_refuses_a_wrap_sealed_after_the_prekey_expired() -> None:
    late = PrekeySecret(3, SECRET.secret, NOW_MS)  # bob's record: valid until NOW_MS
    env = decode_envelope(seal(prekeys={BOB.public: PREKEY}).raw)
    with pytest.raises(PrekeyExpiredError):
        env.open(BOB, {3: late})


def test_peer_change_with_prekeys_round_trip() -> None:
    change = PeerChange(5, tuple(sorted([BOB.public, CAROL.public])), 11, (PREKEY,))
    decoded = PeerChange.decode(change.encode())
    assert decoded.prekeys == (PREKEY,) and decoded.prekeys_by_peer() == {BOB.public: PREKEY}
    both = PeerChange(5, change.peers, 11, (CAROL_PREKEY, PREKEY))
    assert PeerChange.decode(both.encode()).prekeys_by_peer() == {BOB.public: PREKEY,
                                                                  CAROL.public: CAROL_PREKEY}
    bare = PeerChange(5, change.peers, 11)
    assert len(canonical.decode(bare.encode(), max_size=1 << 16, what="t")) == 3
    assert len(change.encode()) - len(bare.encode()) == 1 + 111 + 1  # array, prekey, one null


def test_peer_change_refuses_prekeys_of_non_peers_or_twice() -> None:
    with pytest.raises(InvalidFieldError):
        PeerChange(5, (CAROL.public,), 11, (PREKEY,)).encode()
    with pytest.raises(InvalidFieldError):
        PeerChange(5, (BOB.public,), 11, (PREKEY, PREKEY)).encode()


def test_peer_change_prekey_is_verified_under_the_peer_beside_it() -> None:
    peers = sorted([BOB.public, CAROL.public])
    slots = [None, None]
    slots[peers.index(CAROL.public)] = PREKEY.to_value()  # bob's prekey in carol's slot
    with pytest.raises(SignatureError):
        PeerChange.decode(canonical.encode([11, 5, [p.raw for p in peers], slots]))


VALID_CHANGE = PeerChange(5, (BOB.public, CAROL.public), 11, (PREKEY, CAROL_PREKEY)).encode()


@quick(300)
@given(st.one_of(st.binary(max_size=300), mutations(PREKEY.encode()),
                 field_replacements(PREKEY.to_value()),
                 st.lists(st.one_of(st.integers(-1, 2**64), st.binary(max_size=70), st.none()),
                          max_size=6).map(encode_any)))
def test_signed_prekey_decoder_only_refuses_with_protocol_errors(data: bytes) -> None:
    try:
        prekey = SignedPrekey.decode(data, BOB.public)
    except ProtocolError:
        return
    assert prekey.encode() == data  # only a genuine, canonical prekey gets through


@quick(300)
@given(st.one_of(mutations(VALID_CHANGE), st.binary(max_size=400)))
def test_peer_change_decoder_only_refuses_with_protocol_errors(data: bytes) -> None:
    try:
        change = PeerChange.decode(data)
    except ProtocolError:
        return
    assert change.encode() == data


PREKEY_ENVELOPE = seal(prekeys={BOB.public: PREKEY}).raw


@quick(300)
@given(mutations(PREKEY_ENVELOPE))
def test_envelope_decoder_refuses_mutated_prekey_wraps_with_protocol_errors(data: bytes) -> None:
    try:
        env = decode_envelope(data)
        env.open(BOB, {3: SECRET})
    except ProtocolError:
        return
    assert data == PREKEY_ENVELOPE  # only the untouched envelope opens
