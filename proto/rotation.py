"""Key changes: an old key introduces its successor, and both sign for it.

A device or the oracle that moves to a new key keeps its place (its name,
groups and peers; relays' and devices' trust) only if the key everyone knows
vouches for the new one.  One statement does that, in two flavours that
differ only by their signing domain, so neither can pass for the other:

    [old_key(32), new_key(32), issued_at_ms, old_signature(64), new_signature(64)]

    signed bytes  = DOMAIN ‖ canonical CBOR [old_key, new_key, issued_at_ms]
    old_signature = Ed25519 by old_key: the key being replaced names its successor
    new_signature = Ed25519 by new_key: the successor holds its secret (proof of
                    possession, so nobody can be made the successor of a key whose
                    secret they do not hold, and no key is introduced by mistake)

`KeyRotation` (KEY_ROTATION_DOMAIN) is a device's, sent to the oracle sealed
in a DATA envelope from the old key.  `OracleKeyChange` (ORACLE_KEY_CHANGE_DOMAIN)
is one link of the oracle's `OracleKeyChain`: every change the oracle's key
went through, oldest first, each link's old key the previous link's new key.
Relays get the chain with the access list and devices in a DATA envelope
from the oracle's current key; each walks it forward from the key it trusts.
A walk only goes forward (keys never repeat and times only grow along the
chain), so replaying an old statement or an old chain never moves anyone
back to an earlier key.

Decoding verifies both signatures: an object of these types is always genuine.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar, TypeVar

from . import canonical
from .canonical import uint63
from .errors import DecodeError, InvalidFieldError
from .keys import KEY_BYTES, SIGNATURE_BYTES, Identity, PublicKey

KEY_ROTATION_DOMAIN = b"continuum/v1/key-rotation\x00"
ORACLE_KEY_CHANGE_DOMAIN = b"continuum/v1/oracle-key-change\x00"
# How long a device's KeyRotation counts after its issued_at_ms: the ttl of the envelope that
# carries it, and the oracle refuses one issued longer ago (plus the relays' 300 s clock skew).
# So a statement left behind by an interrupted rotation is dead within a day, not applied days
# later; resuming signs a fresh one.
KEY_ROTATION_TTL_S = 24 * 3600
# A link is about 210 bytes: a whole chain fits in one 64 KiB envelope with room to spare.
MAX_ORACLE_KEY_CHANGES = 128
_FIELDS = 5
_MAX_STATEMENT_BYTES = 256
_MAX_CHAIN_BYTES = MAX_ORACLE_KEY_CHANGES * _MAX_STATEMENT_BYTES

ChangeT = TypeVar("ChangeT", bound="_KeyChange")


@dataclass(frozen=True)
class _KeyChange:
    old: PublicKey
    new: PublicKey
    issued_at_ms: int
    old_signature: bytes
    new_signature: bytes

    DOMAIN: ClassVar[bytes]
    WHAT: ClassVar[str]

    @classmethod
    def sign(cls: type[ChangeT], old: Identity, new: Identity, issued_at_ms: int) -> ChangeT:
        """The statement `old` → `new` at `issued_at_ms`, signed by both."""
        if old.public == new.public:
            raise InvalidFieldError(f"a {cls.WHAT} needs a new key, not the old one again")
        uint63(issued_at_ms, f"{cls.WHAT} issued_at")
        message = cls._signed_bytes(old.public, new.public, issued_at_ms)
        return cls(old.public, new.public, issued_at_ms, old.sign(message), new.sign(message))

    @classmethod
    def _signed_bytes(cls, old: PublicKey, new: PublicKey, issued_at_ms: int) -> bytes:
        return cls.DOMAIN + canonical.encode([old.raw, new.raw, issued_at_ms])

    def signed_bytes(self) -> bytes:
        return self._signed_bytes(self.old, self.new, self.issued_at_ms)

    def to_value(self) -> list:
        """The CBOR array (for embedding in a chain or an access list)."""
        return [self.old.raw, self.new.raw, self.issued_at_ms, self.old_signature,
                self.new_signature]

    def encode(self) -> bytes:
        return canonical.encode(self.to_value())

    @classmethod
    def decode(cls: type[ChangeT], data: bytes) -> ChangeT:
        """Decode and verify both signatures; DecodeError or SignatureError says why not."""
        return cls.from_value(canonical.decode(data, max_size=_MAX_STATEMENT_BYTES,
                                               what=cls.WHAT))

    @classmethod
    def from_value(cls: type[ChangeT], value: object) -> ChangeT:
        """An already decoded CBOR array, checked as strictly as `decode`."""
        return cls.unverified(value).verified()

    def verified(self: ChangeT) -> ChangeT:
        """This statement, once both its signatures verify (SignatureError if not)."""
        message = self.signed_bytes()
        self.old.verify(message, self.old_signature)
        self.new.verify(message, self.new_signature)
        return self

    @classmethod
    def unverified(cls: type[ChangeT], value: object) -> ChangeT:
        """An already decoded CBOR array checked for everything but its signatures: for a
        chain, whose shape is checked before any of them (`OracleKeyChain.from_value`)."""
        what = cls.WHAT
        if type(value) is not list or len(value) != _FIELDS:
            raise DecodeError(f"{what} must be a CBOR array of {_FIELDS} elements")
        old, new, issued_at, old_signature, new_signature = value
        for name, key in (("old", old), ("new", new)):
            if type(key) is not bytes or len(key) != KEY_BYTES:
                raise InvalidFieldError(f"{what} {name} key must be {KEY_BYTES} bytes")
        uint63(issued_at, f"{what} issued_at")
        for name, signature in (("old", old_signature), ("new", new_signature)):
            if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
                raise InvalidFieldError(f"{what} {name} signature must be {SIGNATURE_BYTES} bytes")
        if old == new:
            raise InvalidFieldError(f"a {what} needs a new key, not the old one again")
        return cls(PublicKey(old), PublicKey(new), issued_at, old_signature, new_signature)


@dataclass(frozen=True)
class KeyRotation(_KeyChange):
    """A device's move from `old` to `new`; the oracle re-points the device's record to `new`."""

    DOMAIN: ClassVar[bytes] = KEY_ROTATION_DOMAIN
    WHAT: ClassVar[str] = "key rotation"


@dataclass(frozen=True)
class OracleKeyChange(_KeyChange):
    """One step of the oracle's key: relays and devices trusting `old` trust `new` instead."""

    DOMAIN: ClassVar[bytes] = ORACLE_KEY_CHANGE_DOMAIN
    WHAT: ClassVar[str] = "oracle key change"


@dataclass(frozen=True)
class OracleKeyChain:
    """Every key change of one oracle, oldest first; empty for an oracle that never rotated.

    Wire form: a CBOR array of `OracleKeyChange` arrays.  Each link's old key is
    the previous link's new key, `issued_at_ms` grows strictly, and no key
    appears twice, so following the chain from any of its keys leads to the
    same end, and only forward.
    """

    links: tuple[OracleKeyChange, ...] = ()

    def __post_init__(self) -> None:
        links = self.links
        if len(links) > MAX_ORACLE_KEY_CHANGES:
            raise InvalidFieldError(
                f"an oracle key chain holds at most {MAX_ORACLE_KEY_CHANGES} changes")
        for before, after in pairwise(links):
            if after.old != before.new:
                raise InvalidFieldError("each oracle key change must start at the key the"
                                        " previous one introduced")
            if after.issued_at_ms <= before.issued_at_ms:
                raise InvalidFieldError("oracle key changes must be in the order issued")
        keys = [links[0].old, *(link.new for link in links)] if links else []
        if len(set(keys)) != len(keys):
            raise InvalidFieldError("an oracle key chain must not return to an earlier key")

    @property
    def current(self) -> PublicKey | None:
        """The key the chain ends at (None: no change yet)."""
        return self.links[-1].new if self.links else None

    @property
    def former(self) -> frozenset[PublicKey]:
        """Every key the oracle moved away from: nobody may speak for the oracle with them."""
        return frozenset(link.old for link in self.links)

    def follow(self, trusted: PublicKey) -> PublicKey:
        """The oracle's key for someone who trusts `trusted`: the end of the chain if
        `trusted` is on it, else `trusted` itself (the chain is not about that key)."""
        if trusted in self.former:
            assert self.current is not None
            return self.current
        return trusted

    def introduces(self, trusted: PublicKey, sender: PublicKey) -> bool:
        """Whether this chain makes `sender` the oracle for someone who trusts `trusted`:
        `sender` is where it ends, and `trusted` a key it moved away from."""
        return sender == self.current and trusted in self.former

    def extended(self, change: OracleKeyChange) -> OracleKeyChain:
        """This chain with one more change at its end (InvalidFieldError if it does not fit)."""
        if self.links and change.old != self.current:
            raise InvalidFieldError("an oracle key change must start at the chain's current key")
        return OracleKeyChain((*self.links, change))

    def to_value(self) -> list:
        return [link.to_value() for link in self.links]

    def encode(self) -> bytes:
        return canonical.encode(self.to_value())

    @classmethod
    def decode(cls, data: bytes, *, trusted: PublicKey | None = None) -> OracleKeyChain:
        """Decode and verify the chain's order and every link's signatures (`from_value`)."""
        return cls.from_value(cls.decode_value(data), trusted=trusted)

    @staticmethod
    def decode_value(data: bytes) -> object:
        """The CBOR value of a chain, bounded in size, nothing about it checked yet: for
        `claimed_keys`, then `from_value`, without decoding it twice."""
        return canonical.decode(data, max_size=_MAX_CHAIN_BYTES, what="oracle key chain")

    @staticmethod
    def claimed_keys(value: object) -> tuple[frozenset[PublicKey], PublicKey | None]:
        """(`former`, `current`) as the chain `value` (`decode_value`) claims them, no
        signature checked: whether a chain is about a given oracle at all is known before
        paying for up to 2 x MAX_ORACLE_KEY_CHANGES signature checks (anyone can send a
        device a chain of their own keys).  InvalidFieldError for what is not a chain's
        shape."""
        keys = []
        for link in _changes(value):
            if (type(link) is not list or len(link) != _FIELDS
                    or any(type(key) is not bytes or len(key) != KEY_BYTES for key in link[:2])):
                raise InvalidFieldError("an oracle key change names two 32-byte keys first")
            keys.append((PublicKey(link[0]), PublicKey(link[1])))
        return frozenset(old for old, _new in keys), (keys[-1][1] if keys else None)

    @classmethod
    def from_value(cls, value: object, *, trusted: PublicKey | None = None) -> OracleKeyChain:
        """A decoded chain: its shape (links that connect, in order, no key twice) checked
        before any signature, then every link's signatures, the link leaving `trusted`
        (the key the caller follows the chain from) first.  Checked in the links' order,
        a chain of 127 valid links of someone's own keys ending in one forged link from
        the caller's oracle cost 254 signature checks before it failed; now a forged
        chain fails at its first check, and a malformed one before any."""
        chain = cls(tuple(OracleKeyChange.unverified(link) for link in _changes(value)))
        for link in sorted(chain.links, key=lambda link: link.old != trusted):
            link.verified()
        return chain


def _changes(value: object) -> list:
    """A chain's CBOR array of key changes, checked for type and length only."""
    if type(value) is not list:
        raise InvalidFieldError("an oracle key chain must be an array of key changes")
    if len(value) > MAX_ORACLE_KEY_CHANGES:
        raise InvalidFieldError(
            f"an oracle key chain holds at most {MAX_ORACLE_KEY_CHANGES} changes")
    return value
