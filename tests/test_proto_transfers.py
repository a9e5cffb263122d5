"""Transfer manifests and chunks (SPEC §17): one encoding each, strict decoding, chunk rules."""

from __future__ import annotations

import hashlib

import pytest
from fuzz_settings import quick
from hypothesis import given
from hypothesis import strategies as st

from proto import Identity, Kind, Limits, seal_envelope
from proto import canonical
from proto.envelope import decode_envelope
from proto.errors import DecodeError, InvalidFieldError, ProtocolError
from proto.limits import MAX_TTL_SECONDS
from proto.prekeys import MAX_PREKEY_ID, create_prekey
from proto.transfers import (CHUNK_ENVELOPE_OVERHEAD, MAX_CHUNK_BYTES, MAX_FILE_BYTES, Chunk,
                             Manifest, chunk_size_for, file_hasher)

TID = bytes(range(16))
HASH = bytes(32)


def manifest(size: int = 10, chunk_size: int = 4, name: str = "notes.txt") -> Manifest:
    return Manifest.for_file(TID, size, HASH, chunk_size, name, "text/plain")


def test_a_manifest_and_a_chunk_round_trip_in_canonical_cbor() -> None:
    original = manifest()
    assert original.chunk_count == 3
    assert Manifest.decode(original.encode()) == original
    chunk = Chunk(TID, 2, b"xy")
    assert Chunk.decode(chunk.encode()) == chunk
    assert canonical.decode(original.encode(), max_size=1024, what="m")[4] == 3


def test_the_file_hash_is_unkeyed_blake2b_256() -> None:
    hasher = file_hasher()
    hasher.update(b"abc")
    assert hasher.digest() == hashlib.blake2b(b"abc", digest_size=32).digest()


@pytest.mark.parametrize("fields, error", [
    ([TID, 10, HASH, 4, 2, "n", "t"], "ceil"),  # chunk count not ceil(size / chunk size)
    ([TID, 10, HASH, 4, 4, "n", "t"], "ceil"),
    ([TID, 10, HASH, 0, 0, "n", "t"], "chunk size"),
    ([TID, 10, HASH, MAX_CHUNK_BYTES + 1, 1, "n", "t"], "chunk size"),
    ([TID, MAX_FILE_BYTES + 1, HASH, MAX_CHUNK_BYTES, 2**24 + 1, "n", "t"], "size"),
    ([TID[:15], 10, HASH, 4, 3, "n", "t"], "transfer id"),
    ([TID, 10, HASH[:31], 4, 3, "n", "t"], "hash"),
    ([TID, 10, HASH, 4, 3, "../etc/passwd", "t"], "plain file name"),
    ([TID, 10, HASH, 4, 3, "..", "t"], "plain file name"),
    ([TID, 10, HASH, 4, 3, "", "t"], "plain file name"),
    ([TID, 10, HASH, 4, 3, "a\nb", "t"], "plain file name"),
    ([TID, 10, HASH, 4, 3, "x" * 256, "t"], "name"),
    ([TID, 10, HASH, 4, 3, "n", "t" * 128], "media type"),
    ([TID, -1, HASH, 4, 3, "n", "t"], "size"),
    ([TID, True, HASH, 4, 3, "n", "t"], "size"),
])
def test_a_manifest_that_breaks_a_rule_is_refused(fields: list, error: str) -> None:
    with pytest.raises(InvalidFieldError, match=error):
        Manifest.decode(canonical.encode(fields))


@pytest.mark.parametrize("data", [
    canonical.encode([TID, 10, HASH, 4, 3, "n"]),  # six elements
    canonical.encode({"id": TID}),
    canonical.encode([TID, 10, HASH, 4, 3, "n", "t"]) + b"\x00",  # trailing bytes
    bytes(2000),  # over the manifest's size bound
])
def test_a_manifest_of_the_wrong_shape_is_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Manifest.decode(data)


@pytest.mark.parametrize("fields, error", [
    ([TID, 0, b""], "1.."),
    ([TID, 0, "text"], "1.."),
    ([TID[:8], 0, b"x"], "transfer id"),
    ([TID, -1, b"x"], "index"),
    ([TID, 2**63, b"x"], "index"),
])
def test_a_chunk_that_breaks_a_rule_is_refused(fields: list, error: str) -> None:
    with pytest.raises(InvalidFieldError, match=error):
        Chunk.decode(canonical.encode(fields))


def test_a_chunk_fits_its_manifest_only_by_transfer_index_and_length() -> None:
    m = manifest()  # 10 bytes in chunks of 4: 4, 4, 2
    for index, length in ((0, 4), (1, 4), (2, 2)):
        m.check_chunk(Chunk(TID, index, b"z" * length))
    refusals = {
        "another transfer": Chunk(bytes(16), 0, b"zzzz"),
        "outside": Chunk(TID, 3, b"zz"),
        "holds 3 bytes": Chunk(TID, 0, b"zzz"),
        "holds 4 bytes": Chunk(TID, 2, b"zzzz"),  # the last chunk is the remainder
    }
    for error, chunk in refusals.items():
        with pytest.raises(InvalidFieldError, match=error):
            m.check_chunk(chunk)


def test_an_empty_file_has_no_chunks() -> None:
    empty = manifest(size=0)
    assert empty.chunk_count == 0 and Manifest.decode(empty.encode()) == empty


@pytest.mark.parametrize("limit", [1024, 64 * 1024, 1024 * 1024, 16 * 1024 * 1024 + 4096])
def test_a_full_chunk_always_seals_under_the_relay_limit(limit: int) -> None:
    """The worst case: the largest index and ttl, a wrap naming a prekey."""
    alice, bob = Identity.generate(), Identity.generate()
    size = chunk_size_for(limit)
    assert size == min(MAX_CHUNK_BYTES, limit - CHUNK_ENVELOPE_OVERHEAD)
    prekey, _ = create_prekey(bob, MAX_PREKEY_ID, bytes(32), valid_until_ms=2**62 + 1000)
    plaintext = Chunk(TID, 2**63 - 1, b"\xff" * size).encode()
    envelope = seal_envelope(alice, Kind.TRANSFER_CHUNK, [bob.public], plaintext,
                             ttl_s=MAX_TTL_SECONDS, now_ms=2**62,
                             limits=Limits(max_envelope_bytes=limit),
                             prekeys={bob.public: prekey})
    assert len(envelope.raw) <= limit
    assert decode_envelope(envelope.raw, Limits(max_envelope_bytes=limit)).msg_id


def test_a_limit_too_small_for_any_chunk_is_refused() -> None:
    with pytest.raises(InvalidFieldError, match="no room"):
        chunk_size_for(CHUNK_ENVELOPE_OVERHEAD)


@quick(300)
@given(st.binary(max_size=2048))
def test_garbage_never_decodes_as_anything_but_a_protocol_error(data: bytes) -> None:
    for decode in (Manifest.decode, Chunk.decode):
        try:
            decode(data)
        except ProtocolError:
            pass


@quick(300)
@given(st.lists(st.one_of(st.binary(max_size=40), st.integers(-2**64, 2**64),
                          st.text(max_size=300), st.none(), st.booleans()),
                max_size=8))
def test_well_formed_cbor_of_any_shape_decodes_or_is_refused(fields: list) -> None:
    data = canonical.encode(fields)
    for decode in (Manifest.decode, Chunk.decode):
        try:
            value = decode(data)
        except ProtocolError:
            continue
        assert value.encode() == data  # what decodes has exactly this one encoding


def test_an_oversize_chunk_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(DecodeError, match="exceeds the limit"):
        Chunk.decode(bytes(MAX_CHUNK_BYTES + 100))
