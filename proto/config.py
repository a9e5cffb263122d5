"""Plaintexts of CONFIG (kind 12) and CONFIG_REPORT (kind 13), SPEC §21.

The oracle keeps a desired-configuration document per device and per peer
group and sends each device the merged result, stamped like a peer change
(`Stamp`: epoch, version), so a device applies only newer documents and a
replay, even after a restart, changes nothing.  The device answers with the
stamp it has applied and a document of its own, its reported state.

Both documents travel as JSON text (a CBOR text string) rather than as CBOR
maps: configuration is JSON everywhere else (API, dashboard, `config.json`
in a device's home), and JSON floats, nulls and big integers survive
unchanged, where canonical CBOR would need rules of its own for them.  Each
must be a JSON object, strictly parsed (no duplicate keys, no NaN or
Infinity), of at most `MAX_CONFIG_BYTES` UTF-8 bytes and `MAX_CONFIG_DEPTH`
levels, so one fits a default 64 KiB envelope and parsing one is bounded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import canonical
from .access import Stamp
from .canonical import uint63
from .errors import DecodeError, InvalidFieldError, OversizeError

MAX_CONFIG_BYTES = 32 * 1024
MAX_CONFIG_DEPTH = 32
# The three fields around a document of the largest size: a generous bound for decoding.
_MAX_PAYLOAD_BYTES = MAX_CONFIG_BYTES + 64

JsonObject = dict[str, Any]


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """A JSON number beyond a double's range (`1e400`) parses as infinity, which no JSON
    spelling has: refused here, as NaN and Infinity are, not found later by the encoder
    (whose ValueError escaped every caller that expects a ProtocolError: a device re-fetched
    such a report without end)."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is out of range")
    return number


def _no_duplicates(pairs: list[tuple[str, Any]]) -> JsonObject:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("an object has a duplicate key")
    return result


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (1 for a flat object)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1)
                         for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_document(text: str, what: str = "configuration") -> JsonObject:
    """A JSON object from `text`, within the bounds, or InvalidFieldError / OversizeError
    saying what is wrong (the oracle's API shows the message as it is)."""
    if type(text) is not str:
        raise InvalidFieldError(f"{what} must be JSON text")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise OversizeError(f"{what} is {size} bytes, more than {MAX_CONFIG_BYTES}")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise InvalidFieldError(f"{what} nests deeper than {MAX_CONFIG_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and our own refusals above
        raise InvalidFieldError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidFieldError(f"{what} must be a JSON object ({{…}})")
    if _depth(value) > MAX_CONFIG_DEPTH:
        raise InvalidFieldError(f"{what} nests deeper than {MAX_CONFIG_DEPTH} levels")
    try:  # an escaped lone surrogate ("\\ud800") parses, but has no UTF-8 spelling
        document_text(value).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidFieldError(f"{what} holds a lone surrogate") from None
    return value


def document_text(document: JsonObject) -> str:
    """The one spelling the oracle sends and stores: keys sorted, no spaces, UTF-8 as is."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def merge(base: JsonObject, over: JsonObject) -> JsonObject:
    """`over` merged deep into `base` (neither is changed): where both hold an object at a
    key they merge key by key; any other value of `over` (null included) replaces."""
    result = dict(base)
    for key, value in over.items():
        held = result.get(key)
        result[key] = (merge(held, value) if isinstance(held, dict) and isinstance(value, dict)
                       else value)
    return result


def merged(documents: Iterable[JsonObject]) -> JsonObject:
    """Documents merged in the order given (SPEC §21, "Merge": the oracle passes a device's
    groups in name order, then its own document), so later ones win."""
    result: JsonObject = {}
    for document in documents:
        result = merge(result, document)
    return result


def _fields(data: bytes, what: str) -> tuple[Stamp, str]:
    value = canonical.decode(data, max_size=_MAX_PAYLOAD_BYTES, what=what)
    if type(value) is not list or len(value) != 3:
        raise DecodeError(f"{what} must be a CBOR array of 3 elements")
    epoch, version, text = value
    stamp = Stamp(uint63(epoch, f"{what} epoch"), uint63(version, f"{what} version"))
    if type(text) is not str:
        raise InvalidFieldError(f"{what} document must be a text string")
    return stamp, text


@dataclass(frozen=True)
class ConfigPush:
    """The oracle's desired configuration for one device: the merged document, stamped.

    `version` counts this device's documents in the oracle's database; `epoch`
    is the oracle's epoch when it was issued (SPEC §12), as for PEER_CHANGE.
    """

    epoch: int
    version: int
    document: JsonObject

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.epoch, self.version)

    def encode(self) -> bytes:
        text = document_text(self.document)
        parse_document(text)  # the same bounds a device applies
        return canonical.encode([uint63(self.epoch, "config epoch"),
                                 uint63(self.version, "config version"), text])

    @classmethod
    def decode(cls, data: bytes) -> ConfigPush:
        stamp, text = _fields(data, "config")
        return cls(stamp.epoch, stamp.version, parse_document(text))


@dataclass(frozen=True)
class ConfigReport:
    """A device's answer: the stamp of the configuration it has applied ((0, 0): none) and
    its reported state, a JSON object of the application's choosing."""

    epoch: int
    version: int
    reported: JsonObject

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.epoch, self.version)

    def encode(self) -> bytes:
        text = document_text(self.reported)
        parse_document(text, "reported state")
        return canonical.encode([uint63(self.epoch, "config report epoch"),
                                 uint63(self.version, "config report version"), text])

    @classmethod
    def decode(cls, data: bytes) -> ConfigReport:
        stamp, text = _fields(data, "config report")
        return cls(stamp.epoch, stamp.version, parse_document(text, "reported state"))
