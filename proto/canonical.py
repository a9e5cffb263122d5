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

from .errors import DecodeError, OversizeError

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
    return value
