"""Keyset pagination: opaque cursors and page sizes, shared by every paginated list.

An offset makes the database count past every skipped row (page 2,000 of a
100,000-device list reads 100,000 rows) and shifts under concurrent inserts;
a cursor names the last row shown, so the next page is one index walk from
it whatever its depth.  A cursor is base64url JSON of the listing it belongs
to (a list and its sort order) and that row's sort values; a cursor from
another listing or sort is refused rather than silently starting elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import InvalidInput

T = TypeVar("T")
MAX_LIMIT = 1000
Scalar = str | int


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing and the cursor of the next (None: this is the last page)."""

    items: list[T]
    next_cursor: str | None


def encode_cursor(listing: str, values: Sequence[Scalar]) -> str:
    raw = json.dumps([listing, *values], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str, listing: str, types: Sequence[type]) -> list[Scalar]:
    """The sort values a cursor names, checked against the listing and the value types."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidInput("cursor is not one this oracle issued") from None
    if (not isinstance(decoded, list) or len(decoded) != len(types) + 1
            or decoded[0] != listing
            or not all(type(v) is t for v, t in zip(decoded[1:], types, strict=True))):
        raise InvalidInput("cursor belongs to another list or sort order") from None
    return decoded[1:]


def parse_limit(query: Mapping[str, str], default: int | None) -> int | None:
    """`limit` from a query string: 1..MAX_LIMIT, or `default` when absent."""
    if "offset" in query:
        raise InvalidInput("offset is not supported: pass the next_cursor of the previous page"
                           " as cursor")
    text = query.get("limit")
    if text is None or text == "":
        return default
    try:
        limit = int(text)
    except ValueError:
        raise InvalidInput(f"limit must be an integer 1..{MAX_LIMIT}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be an integer 1..{MAX_LIMIT}")
    return limit
