"""Plaintexts of receipts, expiry notices and peer changes: round trip and strictness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import canonical
from proto.errors import DecodeError, InvalidFieldError, ProtocolError
from proto.keys import PublicKey
from proto.payloads import (EXPIRY_ENTRY_BYTES, MAX_EXPIRY_ENTRIES, MAX_PEERS, ExpiryNotice,
                            PeerChange, Receipt)
from proto_support import ALICE, BOB, CAROL, cbor_values, encode_any

msg_ids = st.binary(min_size=16, max_size=16)
keys = st.binary(min_size=32, max_size=32)


@settings(max_examples=200, deadline=None)
@given(msg_ids, st.binary(min_size=32, max_size=32))
def test_receipt_round_trip(msg_id: bytes, content_hash: bytes) -> None:
    data = Receipt(msg_id, content_hash).encode()
    assert Receipt.decode(data) == Receipt(msg_id, content_hash)
    assert Receipt.decode(data).encode() == data


def test_a_receipt_names_the_content_it_answers() -> None:
    from proto_support import make_envelope
    envelope = make_envelope()
    receipt = Receipt.of(envelope)
    assert (receipt.msg_id, receipt.content_hash) == (envelope.msg_id, envelope.content_hash())


@settings(max_examples=200, deadline=None)
@given(msg_ids, keys)
def test_expiry_notice_round_trip(msg_id: bytes, key: bytes) -> None:
    notice = ExpiryNotice.single(msg_id, PublicKey(key))
    data = notice.encode()
    assert ExpiryNotice.decode(data) == notice
    assert ExpiryNotice.decode(data).encode() == data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(msg_ids, keys), min_size=1, max_size=MAX_EXPIRY_ENTRIES))
def test_batched_expiry_notice_round_trip(pairs: list[tuple[bytes, bytes]]) -> None:
    notice = ExpiryNotice(tuple((m, PublicKey(k)) for m, k in pairs))
    data = notice.encode()
    assert ExpiryNotice.decode(data) == notice and ExpiryNotice.decode(data).encode() == data
    assert len(data) <= len(pairs) * EXPIRY_ENTRY_BYTES + 3


def test_expiry_notice_entry_counts_are_bounded() -> None:
    entry = (b"m" * 16, PublicKey(b"k" * 32))
    with pytest.raises(InvalidFieldError):
        ExpiryNotice((entry,) * (MAX_EXPIRY_ENTRIES + 1)).encode()
    too_many = canonical.encode([[entry[0], entry[1].raw]] * (MAX_EXPIRY_ENTRIES + 1))
    with pytest.raises(InvalidFieldError):
        ExpiryNotice.decode(too_many)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**63 - 1), st.lists(keys, max_size=20), st.integers(0, 2**63 - 1))
def test_peer_change_round_trip(version: int, peers: list[bytes], epoch: int) -> None:
    change = PeerChange(version, tuple(PublicKey(p) for p in peers), epoch)
    data = change.encode()
    decoded = PeerChange.decode(data)
    assert decoded.version == version and decoded.epoch == epoch
    assert decoded.stamp == (epoch, version)
    assert decoded.peers == tuple(sorted(set(change.peers)))
    assert decoded.encode() == data


def test_peer_change_must_be_sorted_and_unique() -> None:
    ordered = sorted([ALICE.public.raw, BOB.public.raw, CAROL.public.raw])
    with pytest.raises(InvalidFieldError):
        PeerChange.decode(canonical.encode([0, 1, list(reversed(ordered))]))
    with pytest.raises(InvalidFieldError):
        PeerChange.decode(canonical.encode([0, 1, [ordered[0], ordered[0]]]))


@pytest.mark.parametrize("decoder,value,error", [
    (Receipt.decode, [b"\x00" * 15, b"\x00" * 32], InvalidFieldError),
    (Receipt.decode, [b"\x00" * 17, b"\x00" * 32], InvalidFieldError),
    (Receipt.decode, ["x" * 16, b"\x00" * 32], InvalidFieldError),
    (Receipt.decode, [b"\x00" * 16, b"\x00" * 31], InvalidFieldError),
    (Receipt.decode, [b"\x00" * 16, 1], InvalidFieldError),
    (Receipt.decode, [], DecodeError),
    (Receipt.decode, [b"\x00" * 16], DecodeError),  # the receipt of protocol 1
    (Receipt.decode, b"\x00" * 16, DecodeError),
    (ExpiryNotice.decode, [b"\x00" * 16, b"\x00" * 31], InvalidFieldError),
    (ExpiryNotice.decode, [b"\x00" * 16], DecodeError),
    (ExpiryNotice.decode, [b"\x00" * 16, None], InvalidFieldError),
    (PeerChange.decode, [0, -1, []], InvalidFieldError),
    (PeerChange.decode, [0, 2**63, []], InvalidFieldError),
    (PeerChange.decode, [0, True, []], InvalidFieldError),
    (PeerChange.decode, [-1, 1, []], InvalidFieldError),
    (PeerChange.decode, [2**63, 1, []], InvalidFieldError),
    (PeerChange.decode, [0, 1, [b"\x00" * 31]], InvalidFieldError),
    (PeerChange.decode, [0, 1, b""], InvalidFieldError),
    (PeerChange.decode, [0, 1, [i.to_bytes(32, "big") for i in range(MAX_PEERS + 1)]],
     InvalidFieldError),
    (PeerChange.decode, [1, []], DecodeError),  # the layout before epochs
    (PeerChange.decode, {1: []}, DecodeError),
])
def test_strict_decoding(decoder, value: object, error: type) -> None:
    with pytest.raises(error):
        decoder(canonical.encode(value))


@pytest.mark.parametrize("decoder", [Receipt.decode, ExpiryNotice.decode, PeerChange.decode])
def test_trailing_and_non_canonical_refused(decoder) -> None:
    with pytest.raises(DecodeError):
        decoder(Receipt(b"\x00" * 16, b"\x00" * 32).encode() + b"\x00")
    with pytest.raises(DecodeError):
        decoder(bytes.fromhex("9f") + b"\x50" + b"\x00" * 16 + b"\xff")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), cbor_values.map(encode_any)))
def test_garbage_raises_only_protocol_errors(data: bytes) -> None:
    for decoder in (Receipt.decode, ExpiryNotice.decode, PeerChange.decode):
        try:
            decoder(data)
        except ProtocolError:
            pass
