"""The oracle's signed access list: which keys are enrolled, which are revoked.

Pure wire format, shared by the oracle (which signs it) and every relay
(which verifies it with the oracle's public key, holding no private key).

Wire form (canonical CBOR, decoded as strictly as an envelope):

    [version, issued_at_ms, oracle_key(32), enrolled[key(32)…], revoked[key(32)…], signature(64)]

with both key lists sorted and unique, and the signature Ed25519 by
`oracle_key` over ACCESS_LIST_DOMAIN ‖ canonical CBOR of the first five elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from . import canonical
from .errors import DecodeError, InvalidFieldError, SignatureError
from .keys import KEY_BYTES, SIGNATURE_BYTES, Identity, PublicKey

ACCESS_LIST_DOMAIN = b"continuum/v1/access-list\x00"
ACCESS_LIST_PATH = "/v1/access-list"
ACCESS_LIST_CONTENT_TYPE = "application/cbor"
# 32-byte keys plus CBOR framing: room for about a quarter of a million devices.
MAX_ACCESS_LIST_BYTES = 8 * 1024 * 1024
_FIELD_COUNT = 6


def _keys(value: object, what: str) -> frozenset[PublicKey]:
    if type(value) is not list:
        raise InvalidFieldError(f"access list {what} must be a list of keys")
    keys = []
    for item in value:
        if type(item) is not bytes or len(item) != KEY_BYTES:
            raise InvalidFieldError(f"access list {what} keys must be {KEY_BYTES} bytes")
        keys.append(PublicKey(item))
    # One encoding per set, so equal lists have equal bytes and signatures.
    if any(a >= b for a, b in pairwise(keys)):
        raise InvalidFieldError(f"access list {what} keys must be sorted and unique")
    return frozenset(keys)


@dataclass(frozen=True)
class AccessList:
    """Which keys may use the relays; `version` only ever grows."""

    version: int
    issued_at_ms: int
    oracle: PublicKey
    enrolled: frozenset[PublicKey]
    revoked: frozenset[PublicKey]

    def _body(self) -> list:
        return [self.version, self.issued_at_ms, self.oracle.raw,
                [k.raw for k in sorted(self.enrolled)], [k.raw for k in sorted(self.revoked)]]

    def sign(self, identity: Identity) -> bytes:
        """The signed wire form; `identity` must be the oracle named in the list."""
        if identity.public != self.oracle:
            raise InvalidFieldError("an access list is signed by the oracle it names")
        body = self._body()
        return canonical.encode([*body, identity.sign(ACCESS_LIST_DOMAIN + canonical.encode(body))])

    @classmethod
    def verify(cls, data: bytes, oracle: PublicKey) -> AccessList:
        """Decode and check the signature; SignatureError unless `oracle` signed it."""
        value = canonical.decode(data, max_size=MAX_ACCESS_LIST_BYTES, what="access list")
        if type(value) is not list or len(value) != _FIELD_COUNT:
            raise DecodeError(f"access list must be a CBOR array of {_FIELD_COUNT} elements")
        version, issued_at, key, enrolled, revoked, signature = value
        for name, number in (("version", version), ("issued_at", issued_at)):
            if type(number) is not int or not 0 <= number < 2**63:
                raise InvalidFieldError(f"access list {name} must be a non-negative integer")
        if type(key) is not bytes or len(key) != KEY_BYTES or PublicKey(key) != oracle:
            raise SignatureError("access list names another oracle")
        if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
            raise InvalidFieldError("access list signature must be 64 bytes")
        oracle.verify(ACCESS_LIST_DOMAIN + canonical.encode(value[:-1]), signature)
        return cls(version, issued_at, oracle, _keys(enrolled, "enrolled"),
                   _keys(revoked, "revoked"))
