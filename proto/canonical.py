"""Strict canonical CBOR: the only way bytes enter or leave the protocol.

Signatures are computed over encoded bytes, so there must be exactly one
encoding of every value.  Decoding therefore re-encodes what it read and
refuses anything whose canonical form differs from the input: that single
check rejects trailing bytes, indefinite lengths, non-shortest integers,
unsorted or duplicate map keys, floats disguised as integers and every tag,
without us re-implementing a CBOR parser.
"""

from __future__ import annotations

from typing import Any

import cbor2

from .errors import DecodeError, InvalidFieldError, OversizeError

# Our messages nest three levels deep at most; a low bound stops stack
# exhaustion from deeply nested garbage long before recursion limits matter.
MAX_DEPTH = 8


def encode(value: Any) -> bytes:
    """Deterministic (RFC 8949 §4.2.1 core) encoding of plain CBOR values."""
    return cbor2.dumps(value, canonical=True)


def decode(data: bytes, *, max_size: int, what: str) -> Any:
    """Decode `data` or raise DecodeError; `what` names the object in messages."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise OversizeError(f"{what}: {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise DecodeError(f"{what}: empty input")
    try:
        value = cbor2.loads(
            data,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
        canonical = encode(value)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError,
            MemoryError, IndexError, KeyError) as exc:
        raise DecodeError(f"{what}: not valid CBOR ({exc})") from None
    if canonical != data:
        raise DecodeError(f"{what}: not in canonical CBOR form (or has trailing bytes)")
    _refuse_tags(value, what)
    return value


# Python types cbor2 produces for untagged CBOR.  Anything else (datetime,
# Decimal, set, regex, CBORTag, ...) came from a tag whose canonical
# re-encoding happened to match the input, and a bignum tag shows up as an
# int outside the 64-bit range of major types 0 and 1.
_UNTAGGED_TYPES = (bytes, str, bool, type(None), float, cbor2.CBORSimpleValue,
                   type(cbor2.undefined))


def _refuse_tags(value: Any, what: str) -> None:
    """Refuse tagged items: cbor2 decodes them to objects that may re-encode identically.

    A loop over a stack, not recursion: an envelope is some twenty items, and a call
    per item was a seventh of its decode."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is bytes or kind is str:
            continue
        if kind is int:
            if not -(2**64) <= item < 2**64:
                raise DecodeError(f"{what}: tagged values (bignums) are not allowed")
        elif kind is list or kind is tuple:
            pending.extend(item)
        elif kind is dict:
            for key, entry in item.items():
                pending += (key, entry)
        elif kind not in _UNTAGGED_TYPES:
            raise DecodeError(f"{what}: tagged values are not allowed ({kind.__name__})")


# -- strings at known places, without the general decoder ------------------------------------
# The frames of every message (SEND, ACK in; ACCEPTED, DELIVER out) are an array of a small
# type number and strings.  Decoding those through cbor2 and re-encoding to prove the form cost
# twice what reading them directly does; for strings, the canonical rules come down to a head
# in its shortest form and an exact length, which `string_span` checks.

BYTES = 2  # CBOR major type of a byte string
TEXT = 3  # CBOR major type of a UTF-8 text string
# The smallest length each head size may carry (below it, a shorter head was required).
_HEAD_MINIMUM = {24: 24, 25: 0x100, 26: 0x1_0000, 27: 0x1_0000_0000}


def string_span(data: bytes, pos: int, major: int) -> tuple[int, int] | None:
    """(start, end) of the string of `major` whose head is at `pos`, if that head is
    canonical (definite, shortest form) and the whole string lies within `data`; None for
    anything else, which the caller hands to `decode` to be refused with its reason."""
    head = string_head(data, pos, major)
    if head is None:
        return None
    start, length = head
    end = start + length
    return (start, end) if end <= len(data) else None


def string_head(data: bytes, pos: int, major: int) -> tuple[int, int] | None:
    """(start, length) of the string of `major` whose head is at `pos`, if that head is
    canonical and lies within `data`; the string itself may lie elsewhere (a channel's
    detached chunk, SPEC §8)."""
    if pos >= len(data) or data[pos] >> 5 != major:
        return None
    info = data[pos] & 0x1F
    if info < 24:
        return pos + 1, info
    minimum = _HEAD_MINIMUM.get(info)
    if minimum is None:
        return None  # reserved (28-30) or indefinite (31)
    start = pos + 1 + (1 << (info - 24))  # 1, 2, 4 or 8 length bytes
    if start > len(data):
        return None
    length = int.from_bytes(data[pos + 1:start], "big")
    return (start, length) if length >= minimum else None


def encode_string_head(major: int, length: int) -> bytes:
    """The canonical head of a string of `major` and `length`: what `encode` writes before
    the string's bytes, without the bytes (so a chunk can travel apart from its head)."""
    if length < 24:
        return bytes((major << 5 | length,))
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if length < 1 << (8 * size):
            return bytes((major << 5 | info,)) + length.to_bytes(size, "big")
    raise ValueError("a CBOR string is shorter than 2^64 bytes")


def uint63(value: object, what: str) -> int:
    """A counter or time field: a CBOR unsigned integer below 2^63 (fits a signed 64-bit)."""
    if type(value) is not int or not 0 <= value < 2**63:
        raise InvalidFieldError(f"{what} must be a non-negative integer below 2^63")
    return value
