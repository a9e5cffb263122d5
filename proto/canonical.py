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
    """Refuse tagged items: cbor2 decodes them to objects that may re-encode identically."""
    if type(value) is int:
        if not -(2**64) <= value < 2**64:
            raise DecodeError(f"{what}: tagged values (bignums) are not allowed")
    elif type(value) in (list, tuple):
        for item in value:
            _refuse_tags(item, what)
    elif type(value) is dict:
        for key, item in value.items():
            _refuse_tags(key, what)
            _refuse_tags(item, what)
    elif type(value) not in _UNTAGGED_TYPES:
        raise DecodeError(f"{what}: tagged values are not allowed ({type(value).__name__})")


def uint63(value: object, what: str) -> int:
    """A counter or time field: a CBOR unsigned integer below 2^63 (fits a signed 64-bit)."""
    if type(value) is not int or not 0 <= value < 2**63:
        raise InvalidFieldError(f"{what} must be a non-negative integer below 2^63")
    return value
