"""Large transfers (SPEC §17): a file as one signed manifest and numbered chunks.

A file larger than a relay's envelope limit travels as ordinary store-and-forward
envelopes: one TRANSFER_MANIFEST (kind 7) that says what the whole file is, then
TRANSFER_CHUNK envelopes (kind 8), each holding one slice of it.  Both are sealed
and signed like any envelope, so a relay cannot read them, tell them from DATA,
nor splice chunks of one transfer into another: the transfer id is inside the
signed ciphertext, and a recipient keys transfers by (sender, transfer id).

This module is the pure part: the two plaintexts, decoded as strictly as an
envelope, the rule that a chunk fits its manifest, and the file hash.  Where the
bytes are kept, and when they are sent, belongs to the device (`client.transfers`).

    manifest  [transfer_id, size, hash, chunk_size, chunk_count, name, media_type]
    chunk     [transfer_id, index, data]

`hash` is BLAKE2b-256 (unkeyed) of the whole file; `chunk_count` is exactly
ceil(size / chunk_size), so each manifest has one encoding; every chunk but the
last holds exactly `chunk_size` bytes, the last the remainder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from . import canonical
from .canonical import uint63
from .errors import DecodeError, InvalidFieldError

TRANSFER_ID_BYTES = 16
FILE_HASH_BYTES = 32
# A chunk is at most this big whatever the relay allows: the receiver writes and fsyncs
# one chunk at a time, and a manifest may not name a chunk it could not take.
MAX_CHUNK_BYTES = 16 * 1024 * 1024
# The wire bound on a file; each device applies its own, smaller maximum.
MAX_FILE_BYTES = 2**48
MAX_NAME_BYTES = 255
MAX_MEDIA_TYPE_BYTES = 127
# Room a chunk envelope to one recipient needs besides the chunk's data (header, one wrap
# with a prekey id, nonce and commitment, signature, CBOR framing): 330 bytes at the worst,
# measured by tests/test_proto_transfers.py, so a chunk of `chunk_size_for(limit)` always
# seals under `limit`.
CHUNK_ENVELOPE_OVERHEAD = 512
_MANIFEST_MAX_BYTES = 1024
_CHUNK_FRAMING_BYTES = 64  # the chunk's array, id and index around its data


def file_hasher() -> hashlib.blake2b:
    """The hash a manifest names, fed incrementally (a file never has to fit in memory)."""
    return hashlib.blake2b(digest_size=FILE_HASH_BYTES)


def chunk_size_for(max_envelope_bytes: int) -> int:
    """The largest chunk whose envelope (to one recipient) fits a relay's envelope limit."""
    size = min(MAX_CHUNK_BYTES, max_envelope_bytes - CHUNK_ENVELOPE_OVERHEAD)
    if size < 1:
        raise InvalidFieldError(f"an envelope limit of {max_envelope_bytes} bytes leaves no room"
                                " for a chunk")
    return size


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def _transfer_id(value: object, what: str) -> bytes:
    if type(value) is not bytes or len(value) != TRANSFER_ID_BYTES:
        raise InvalidFieldError(f"{what} transfer id must be {TRANSFER_ID_BYTES} bytes")
    return value


def _text(value: object, what: str, max_bytes: int) -> str:
    if type(value) is not str or len(value.encode()) > max_bytes:
        raise InvalidFieldError(f"{what} must be text of at most {max_bytes} bytes")
    return value


def check_name(name: str) -> str:
    """A file name a receiver can use as is: one path component, no control characters."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)):
        raise InvalidFieldError(f"transfer name {name!r} is not a plain file name")
    return name


@dataclass(frozen=True)
class Manifest:
    """What a whole transfer is; the receipt for its envelope is the transfer's one receipt."""

    transfer_id: bytes
    size: int
    file_hash: bytes
    chunk_size: int
    chunk_count: int
    name: str
    media_type: str

    @classmethod
    def for_file(cls, transfer_id: bytes, size: int, file_hash: bytes, chunk_size: int,
                 name: str, media_type: str = "application/octet-stream") -> Manifest:
        manifest = cls(transfer_id, size, file_hash, chunk_size, chunk_count(size, chunk_size),
                       name, media_type)
        manifest._check()
        return manifest

    def _check(self) -> None:
        _transfer_id(self.transfer_id, "manifest")
        if not 0 <= self.size <= MAX_FILE_BYTES:
            raise InvalidFieldError(f"manifest size must be 0..{MAX_FILE_BYTES} bytes")
        if type(self.file_hash) is not bytes or len(self.file_hash) != FILE_HASH_BYTES:
            raise InvalidFieldError(f"manifest hash must be {FILE_HASH_BYTES} bytes")
        if not 1 <= self.chunk_size <= MAX_CHUNK_BYTES:
            raise InvalidFieldError(f"manifest chunk size must be 1..{MAX_CHUNK_BYTES} bytes")
        if self.chunk_count != chunk_count(self.size, self.chunk_size):
            raise InvalidFieldError("manifest chunk count must be ceil(size / chunk size)")
        check_name(_text(self.name, "manifest name", MAX_NAME_BYTES))
        _text(self.media_type, "manifest media type", MAX_MEDIA_TYPE_BYTES)

    def encode(self) -> bytes:
        self._check()
        return canonical.encode([self.transfer_id, self.size, self.file_hash, self.chunk_size,
                                 self.chunk_count, self.name, self.media_type])

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        value = canonical.decode(data, max_size=_MANIFEST_MAX_BYTES, what="transfer manifest")
        if type(value) is not list or len(value) != 7:
            raise DecodeError("transfer manifest must be a CBOR array of 7 elements")
        transfer_id, size, file_hash, chunk_size, count, name, media_type = value
        manifest = cls(transfer_id, uint63(size, "manifest size"), file_hash,
                       uint63(chunk_size, "manifest chunk size"),
                       uint63(count, "manifest chunk count"), name, media_type)
        manifest._check()
        return manifest

    def chunk_length(self, index: int) -> int:
        """How many bytes chunk `index` holds (IndexError outside the transfer)."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(index)
        if index < self.chunk_count - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.chunk_count - 1)

    def check_chunk(self, chunk: Chunk) -> None:
        """InvalidFieldError unless `chunk` is one of this transfer's, of the right length."""
        if chunk.transfer_id != self.transfer_id:
            raise InvalidFieldError("chunk belongs to another transfer")
        if not 0 <= chunk.index < self.chunk_count:
            raise InvalidFieldError(f"chunk index {chunk.index} is outside the transfer's"
                                    f" {self.chunk_count} chunks")
        expected = self.chunk_length(chunk.index)
        if len(chunk.data) != expected:
            raise InvalidFieldError(f"chunk {chunk.index} holds {len(chunk.data)} bytes,"
                                    f" the manifest says {expected}")


@dataclass(frozen=True)
class Chunk:
    """One slice of a transfer: bytes [index × chunk_size, …) of the file."""

    transfer_id: bytes
    index: int
    data: bytes

    def encode(self) -> bytes:
        return canonical.encode([self.transfer_id, self.index, self.data])

    @classmethod
    def decode(cls, data: bytes) -> Chunk:
        value = canonical.decode(data, max_size=MAX_CHUNK_BYTES + _CHUNK_FRAMING_BYTES,
                                 what="transfer chunk")
        if type(value) is not list or len(value) != 3:
            raise DecodeError("transfer chunk must be a CBOR array of 3 elements")
        transfer_id, index, body = value
        if type(body) is not bytes or not 1 <= len(body) <= MAX_CHUNK_BYTES:
            raise InvalidFieldError(f"chunk data must be 1..{MAX_CHUNK_BYTES} bytes")
        return cls(_transfer_id(transfer_id, "chunk"), uint63(index, "chunk index"), body)
