"""The oracle's signed access list, and the signed request a relay fetches it with.

Pure wire format, shared by the oracle (which signs the list and checks
requests) and every relay (which signs requests and verifies the list with
the oracle's public key, holding no private key of the oracle).

Access list (canonical CBOR, decoded as strictly as an envelope):

    [epoch, version, issued_at_ms, valid_until_ms, oracle_key(32),
     enrolled[[key(32), groups[uint…]]…], revoked[key(32)…], signature(64)]

or, once keys have been rotated, with two more elements before the signature:

    [..., revoked, draining[[key(32), until_ms]…], oracle_chain[change…], signature]

Enrolled keys sorted and unique, each with the sorted, unique numbers of its
peer groups; revoked keys sorted and unique; the signature Ed25519 by
`oracle_key` over ACCESS_LIST_DOMAIN ‖ canonical CBOR of every element but
the signature.  Group numbers name groups within one list only: a relay needs to
know whether two keys share a group, not which group it is, and a number of
one or two bytes per membership keeps a 10,000-device list near 40 bytes per
device (a list of peers per key would grow with the square of a group's size).

`valid_until_ms` bounds how long a relay may act on the list: the oracle signs
the same content again (a refresh: same stamp, later expiry) long before it
lapses, so a relay that stops hearing from the oracle finds out by its own
clock within one validity window, and a captured list is worthless once it
has lapsed (SPEC §12).  Lists from before the field (7 or 9 elements) are
refused: any of them could be a year-old list re-admitting a revoked key.

`draining` holds the old keys of rotated devices, each until when it may still
fetch its mailbox (and nothing else); `oracle_chain` is the oracle's
`OracleKeyChain`, ending at `oracle_key`, so a relay configured with an older
oracle key follows it forward.  The short form is the one used while both are
empty (a list has one encoding, and relays that predate rotation read it), so
the long form with both empty is refused.

In a network of several regions (SPEC §19) the list also says where each
mailbox lives: twelve elements,

    [..., revoked, draining, oracle_chain, regions[name…], default_home, signature]

with `regions` the sorted region names, each enrolled entry
`[key, groups, home]` or, for a while after its home moved,
`[key, groups, home, former_home]`, each draining entry `[key, until_ms, home]`
(homes are indexes into `regions`), and `default_home` the home of every key
the list does not place (the oracle's own key, keys not enrolled).  A relay
from before regions finds twelve elements and refuses the list (MALFORMED)
rather than deliver from the wrong store; a list without regions keeps its
eight- or ten-element form, byte for byte.

Relay request (the `Authorization` header of `GET /v1/access-list`):

    "Continuum-Relay " ‖ base64url(canonical CBOR of
        [relay_key(32), oracle_key(32), issued_at_ms, nonce(16), signature(64)])

signed by `relay_key` over ACCESS_REQUEST_DOMAIN ‖ canonical CBOR of the first
four elements.  The oracle keeps the nonces it saw for the acceptance window,
so a captured header is good for one request to one oracle, for a minute.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Collection, KeysView, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from itertools import pairwise
from typing import NamedTuple

from . import canonical
from .canonical import uint63
from .errors import (DecodeError, InvalidFieldError, SignatureError, StaleError,
                     UnauthenticatedError)
from .keys import KEY_BYTES, SIGNATURE_BYTES, Identity, PublicKey
from .regions import MAX_REGIONS, region_name
from .rotation import OracleKeyChain

ACCESS_LIST_DOMAIN = b"continuum/v1/access-list\x00"
ACCESS_REQUEST_DOMAIN = b"continuum/v1/access-list-request\x00"
ACCESS_LIST_PATH = "/v1/access-list"
# The oracle's key chain (`OracleKeyChain`, CBOR), public: it holds public keys and signatures.
ORACLE_KEY_CHAIN_PATH = "/v1/oracle-key-chain"
ACCESS_LIST_CONTENT_TYPE = "application/cbor"
RELAY_AUTH_SCHEME = "Continuum-Relay"
REQUEST_NONCE_BYTES = 16
# How far a relay's clock may be from the oracle's: a request's issued_at either way (the
# oracle keeps nonces twice this long), a list's issued_at ahead of the relay's clock.
ORACLE_CLOCK_SKEW_MS = 60_000
# About 40 bytes per enrolled key: room for about 200,000 devices.
MAX_ACCESS_LIST_BYTES = 8 * 1024 * 1024
MAX_GROUP_NUMBER = 2**32 - 1
_MAX_REQUEST_BYTES = 256
_LIST_FIELDS = 8
_ROTATED_LIST_FIELDS = 10
_REGIONS_LIST_FIELDS = 12
_FIELDS_BEFORE_EXPIRY = (7, 9)
_REQUEST_FIELDS = 5


class Stamp(NamedTuple):
    """Where a list stands in the oracle's history; stamps compare as (epoch, version).

    The version counts changes and lives in the oracle's database, so restoring
    that database from a backup takes it back.  The epoch is taken from the
    clock at every oracle start and never goes back (it is at least one more
    than the last epoch the database recorded), so every list a restored oracle
    issues outranks every list issued before, and a list from an earlier epoch
    (a replay) stays refused.  Used by the access list and by PEER_CHANGE.
    """

    epoch: int
    version: int

    def __str__(self) -> str:
        """`epoch.version`: the spelling in logs and in the oracle's ETag."""
        return f"{self.epoch}.{self.version}"


def _key(value: object, what: str) -> PublicKey:
    if type(value) is not bytes or len(value) != KEY_BYTES:
        raise InvalidFieldError(f"{what} keys must be {KEY_BYTES} bytes")
    return PublicKey(value)


def _sorted_unique(items: list, what: str) -> None:
    # One encoding per set, so equal lists have equal bytes and signatures.
    if any(a >= b for a, b in pairwise(items)):
        raise InvalidFieldError(f"{what} must be sorted and unique")


def _revoked(value: object) -> frozenset[PublicKey]:
    if type(value) is not list:
        raise InvalidFieldError("access list revoked must be a list of keys")
    keys = [_key(item, "access list revoked") for item in value]
    _sorted_unique(keys, "access list revoked keys")
    return frozenset(keys)


def _enrolled(value: object, regions: tuple[str, ...] = ()
              ) -> tuple[dict[PublicKey, frozenset[int]], dict[PublicKey, str],
                         dict[PublicKey, str]]:
    """Groups of each enrolled key; with `regions`, also each key's home and former home."""
    shape = "[key, groups, home] or [key, groups, home, former_home]" if regions else "[key, groups]"
    if type(value) is not list:
        raise InvalidFieldError(f"access list enrolled must be a list of {shape}")
    entries: dict[PublicKey, frozenset[int]] = {}
    homes: dict[PublicKey, str] = {}
    former: dict[PublicKey, str] = {}
    keys = []
    for item in value:
        if type(item) is not list or len(item) not in ((3, 4) if regions else (2,)):
            raise InvalidFieldError(f"access list enrolled entries must be {shape}")
        key, groups = _key(item[0], "access list enrolled"), item[1]
        if type(groups) is not list or any(
                type(g) is not int or not 0 <= g <= MAX_GROUP_NUMBER for g in groups):
            raise InvalidFieldError(
                f"access list groups must be a list of integers 0..{MAX_GROUP_NUMBER}")
        _sorted_unique(groups, "access list groups of a key")
        keys.append(key)
        entries[key] = frozenset(groups)
        if regions:
            homes[key] = _region_at(item[2], regions, "home")
            if len(item) == 4:
                former[key] = _region_at(item[3], regions, "former home")
                if former[key] == homes[key]:
                    raise InvalidFieldError("a key's former home is not its home")
    _sorted_unique(keys, "access list enrolled keys")
    return entries, homes, former


def _region_at(value: object, regions: tuple[str, ...], what: str) -> str:
    if type(value) is not int or not 0 <= value < len(regions):
        raise InvalidFieldError(f"access list {what} must index the list's regions"
                                f" (0..{len(regions) - 1})")
    return regions[value]


def _regions(value: object) -> tuple[str, ...]:
    if type(value) is not list or not 1 <= len(value) <= MAX_REGIONS:
        raise InvalidFieldError(f"access list regions must be a list of 1..{MAX_REGIONS} names")
    names = [region_name(item, "access list region") for item in value]
    _sorted_unique(names, "access list regions")
    return tuple(names)


def _draining(value: object, enrolled: Mapping[PublicKey, frozenset[int]],
              revoked: frozenset[PublicKey], regions: tuple[str, ...] = (),
              homes: dict[PublicKey, str] | None = None) -> Mapping[PublicKey, int]:
    """Drain deadline of each draining key; with `regions` each one's home goes into `homes`."""
    shape = "[key, until_ms, home]" if regions else "[key, until_ms]"
    if type(value) is not list:
        raise InvalidFieldError(f"access list draining must be a list of {shape}")
    keys, entries = [], {}
    for item in value:
        if type(item) is not list or len(item) != (3 if regions else 2):
            raise InvalidFieldError(f"access list draining entries must be {shape}")
        key = _key(item[0], "access list draining")
        keys.append(key)
        entries[key] = uint63(item[1], "access list draining until_ms")
        if regions:
            assert homes is not None
            homes[key] = _region_at(item[2], regions, "draining home")
    _sorted_unique(keys, "access list draining keys")
    if any(key in enrolled or key in revoked for key in entries):
        raise InvalidFieldError("a draining key is neither enrolled nor revoked")
    return MappingProxyType(entries)


_NOTHING_DRAINING: Mapping[PublicKey, int] = MappingProxyType({})
_NOWHERE: Mapping[PublicKey, str] = MappingProxyType({})


@dataclass(frozen=True)
class AccessList:
    """Which keys may use the relays and who may write to whom; stamps only ever grow.

    `groups` maps every enrolled key to the numbers of its peer groups (empty:
    in no group).  `valid_until_ms` (after `issued_at_ms`) is when the list lapses:
    `timeliness` says whether a relay may act on it now.  The rule it carries (SPEC §12): a managed key may be written
    to by the oracle, and by an enrolled key sharing at least one group with it.
    `draining` maps the old key of each rotated device to the time (Unix ms) until
    which it may still fetch its mailbox and nothing else; `oracle_chain` is how
    the oracle's key got to `oracle` (SPEC §15).

    With `regions` (SPEC §19) the list places every mailbox: `homes` names the
    home region of each enrolled and draining key, `former_homes` the region an
    enrolled key's mailbox moved away from (while its mail there is still to be
    moved), and `default_home` the home of every other key.  Without regions
    every key is local to whichever relay serves it.
    """

    epoch: int
    version: int
    issued_at_ms: int
    valid_until_ms: int
    oracle: PublicKey
    groups: Mapping[PublicKey, frozenset[int]]
    revoked: frozenset[PublicKey]
    draining: Mapping[PublicKey, int] = field(default_factory=lambda: _NOTHING_DRAINING)
    oracle_chain: OracleKeyChain = field(default=OracleKeyChain())
    regions: tuple[str, ...] = ()
    homes: Mapping[PublicKey, str] = field(default_factory=lambda: _NOWHERE)
    former_homes: Mapping[PublicKey, str] = field(default_factory=lambda: _NOWHERE)
    default_home: str | None = None

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.epoch, self.version)

    @property
    def enrolled(self) -> KeysView[PublicKey]:
        """Every enrolled key (a view: membership is O(1))."""
        return self.groups.keys()

    def expired(self, now_ms: int) -> bool:
        """Whether the list has lapsed by the clock `now_ms` (no allowance: see `timeliness`)."""
        return now_ms >= self.valid_until_ms

    def timeliness(self, now_ms: int) -> StaleError | None:
        """Why a relay must not act on this list at `now_ms`; None if it may.

        Issued more than ORACLE_CLOCK_SKEW_MS ahead of the relay's clock: one of the
        two clocks is wrong, and a relay whose clock runs behind would keep the list
        longer than the oracle meant.  Lapsed: no allowance, because the oracle
        refreshes a list when half its validity is left, so a relay whose clock runs
        ahead by less than that never sees a list it polls for lapse, and an allowance
        would only lengthen the life of a list that revokes too little.
        """
        if self.issued_at_ms > now_ms + ORACLE_CLOCK_SKEW_MS:
            return StaleError(f"access list {self.stamp} issued"
                              f" {(self.issued_at_ms - now_ms) / 1000:.0f}s ahead of this"
                              f" clock (limit {ORACLE_CLOCK_SKEW_MS // 1000}s)")
        if self.expired(now_ms):
            return StaleError(f"access list {self.stamp} lapsed"
                              f" {(now_ms - self.valid_until_ms) / 1000:.0f}s ago")
        return None

    def refreshed(self, issued_at_ms: int, valid_until_ms: int) -> AccessList:
        """The same list (same stamp and content) with a new validity, to sign again."""
        return replace(self, issued_at_ms=issued_at_ms, valid_until_ms=valid_until_ms)

    def same_content(self, other: AccessList) -> bool:
        """Whether `other` says all this list says (it is a refresh of it, or this one)."""
        return self.refreshed(other.issued_at_ms, other.valid_until_ms) == other

    def shares_group(self, sender: PublicKey, recipient: PublicKey) -> bool:
        """Whether both keys are enrolled in at least one common group; O(groups of one key)."""
        mine, theirs = self.groups.get(sender), self.groups.get(recipient)
        return mine is not None and theirs is not None and not mine.isdisjoint(theirs)

    def home_of(self, key: PublicKey) -> str | None:
        """The region whose store holds `key`'s mailbox; None when the list has no regions."""
        return self.homes.get(key, self.default_home)

    def _body(self) -> list:
        # Sorted by raw bytes (the same order as PublicKey's, without 10,000s of __lt__ calls).
        if not self.regions:
            enrolled = sorted([key.raw, sorted(groups)] for key, groups in self.groups.items())
            draining = sorted([key.raw, until] for key, until in self.draining.items())
        else:
            index = {name: number for number, name in enumerate(self.regions)}
            enrolled = sorted(
                [key.raw, sorted(groups), index[self.homes[key]],
                 *([index[self.former_homes[key]]] if key in self.former_homes else [])]
                for key, groups in self.groups.items())
            draining = sorted([key.raw, until, index[self.homes[key]]]
                              for key, until in self.draining.items())
        body = [self.epoch, self.version, self.issued_at_ms, self.valid_until_ms, self.oracle.raw,
                enrolled, sorted(key.raw for key in self.revoked)]
        if self.regions:
            assert self.default_home is not None
            body += [draining, self.oracle_chain.to_value(), list(self.regions),
                     self.regions.index(self.default_home)]
        elif self.draining or self.oracle_chain.links:
            body += [draining, self.oracle_chain.to_value()]
        return body

    def _check_regions(self) -> None:
        """Refuse to sign a list whose placement of mailboxes its own fields cannot say."""
        if not self.regions:
            if self.homes or self.former_homes or self.default_home is not None:
                raise InvalidFieldError("homes need the list's regions")
            return
        _regions(list(self.regions))
        if self.default_home not in self.regions:
            raise InvalidFieldError("the default home must be one of the list's regions")
        placed = set(self.groups) | set(self.draining)
        if set(self.homes) != placed or any(r not in self.regions for r in self.homes.values()):
            raise InvalidFieldError("every enrolled and draining key needs a home among the"
                                    " list's regions, and only they")
        for key, former in self.former_homes.items():
            if key not in self.groups or former not in self.regions or former == self.homes[key]:
                raise InvalidFieldError("a former home belongs to an enrolled key, is one of"
                                        " the list's regions and is not its home")

    def sign(self, identity: Identity) -> bytes:
        """The signed wire form; `identity` must be the oracle named in the list."""
        if identity.public != self.oracle:
            raise InvalidFieldError("an access list is signed by the oracle it names")
        if self.valid_until_ms <= self.issued_at_ms:
            raise InvalidFieldError("an access list must be valid for some time after it is issued")
        chain_end = self.oracle_chain.current
        if chain_end is not None and chain_end != self.oracle:
            raise InvalidFieldError("the oracle key chain must end at the list's oracle")
        self._check_regions()
        body = self._body()
        return canonical.encode([*body, identity.sign(ACCESS_LIST_DOMAIN + canonical.encode(body))])

    @classmethod
    def verify(cls, data: bytes, oracle: PublicKey) -> AccessList:
        """Decode and check the signature; SignatureError unless `oracle` signed it, or a
        key that the list's oracle chain leads to from `oracle` (the oracle rotated)."""
        value = canonical.decode(data, max_size=MAX_ACCESS_LIST_BYTES, what="access list")
        if type(value) is list and len(value) in _FIELDS_BEFORE_EXPIRY:
            raise DecodeError("access list without valid_until_ms (from an oracle older than"
                              " this relay): refused, it could be any age")
        if type(value) is not list or len(value) not in (_LIST_FIELDS, _ROTATED_LIST_FIELDS,
                                                         _REGIONS_LIST_FIELDS):
            raise DecodeError(f"access list must be a CBOR array of {_LIST_FIELDS},"
                              f" {_ROTATED_LIST_FIELDS} or {_REGIONS_LIST_FIELDS} elements")
        epoch, version, issued_at, valid_until, key, enrolled, revoked = value[:7]
        signature = value[-1]
        for name, number in (("epoch", epoch), ("version", version), ("issued_at", issued_at),
                             ("valid_until", valid_until)):
            uint63(number, f"access list {name}")
        if valid_until <= issued_at:
            raise InvalidFieldError("access list valid_until_ms must be after issued_at_ms")
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise InvalidFieldError(f"access list oracle key must be {KEY_BYTES} bytes")
        if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
            raise InvalidFieldError("access list signature must be 64 bytes")
        signer = PublicKey(key)
        # What the chain claims first, then the list's one signature, then the chain's: a
        # list about another oracle costs no signature check, a forged one one or two.
        former, current = (OracleKeyChain.claimed_keys(value[8]) if len(value) > _LIST_FIELDS
                           else (frozenset(), None))
        if current is not None and current != signer:
            raise InvalidFieldError("the oracle key chain must end at the list's oracle")
        if signer != oracle and not (current == signer and oracle in former):
            raise SignatureError("access list names another oracle")
        signer.verify(ACCESS_LIST_DOMAIN + canonical.encode(value[:-1]), signature)
        chain = (OracleKeyChain.from_value(value[8], trusted=oracle) if len(value) > _LIST_FIELDS
                 else OracleKeyChain())
        regions: tuple[str, ...] = ()
        default_home = None
        if len(value) == _REGIONS_LIST_FIELDS:
            regions = _regions(value[9])
            default_home = _region_at(value[10], regions, "default home")
        groups, homes, former = _enrolled(enrolled, regions)
        revoked_keys = _revoked(revoked)
        draining = _NOTHING_DRAINING
        if len(value) > _LIST_FIELDS:
            draining = _draining(value[7], groups, revoked_keys, regions, homes)
            if len(value) == _ROTATED_LIST_FIELDS and not draining and not chain.links:
                raise InvalidFieldError("an access list without draining keys or oracle key"
                                        f" changes has {_LIST_FIELDS} elements")
        return cls(epoch, version, issued_at, valid_until, signer, groups, revoked_keys, draining,
                   chain, regions, MappingProxyType(homes) if homes else _NOWHERE,
                   MappingProxyType(former) if former else _NOWHERE, default_home)


@dataclass(frozen=True)
class AccessRequest:
    """A relay's proof, on one fetch of the list, that it holds a key the oracle lets read it."""

    relay: PublicKey
    oracle: PublicKey
    issued_at_ms: int
    nonce: bytes

    def _body(self) -> list:
        return [self.relay.raw, self.oracle.raw, self.issued_at_ms, self.nonce]

    def authorization(self, identity: Identity) -> str:
        """The `Authorization` header value, signed by `identity` (the relay it names)."""
        if identity.public != self.relay:
            raise InvalidFieldError("an access-list request is signed by the relay it names")
        if len(self.nonce) != REQUEST_NONCE_BYTES:
            raise InvalidFieldError(f"request nonce must be {REQUEST_NONCE_BYTES} bytes")
        body = self._body()
        token = canonical.encode([*body, identity.sign(ACCESS_REQUEST_DOMAIN
                                                       + canonical.encode(body))])
        return f"{RELAY_AUTH_SCHEME} {base64.urlsafe_b64encode(token).rstrip(b'=').decode()}"

    @classmethod
    def verify(cls, header: str, oracle: PublicKey, now_ms: int,
               former: Collection[PublicKey] = (),
               allowed: Callable[[PublicKey], None] | None = None) -> AccessRequest:
        """Decode an `Authorization` value for `oracle` and check its signature and clock.

        A token may also name one of the oracle's `former` keys: a relay started
        with a key the oracle has since rotated away from still asks this oracle
        (and learns the chain from the list it gets).  UnauthenticatedError for a
        missing or malformed header, SignatureError, StaleError beyond
        ORACLE_CLOCK_SKEW_MS.  Whether the relay key is allowed and the nonce
        unused is the oracle's to check; `allowed` (raising for a key that is not) is
        called before the signature is checked, so a stranger's token costs no verify.
        """
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != RELAY_AUTH_SCHEME.lower() or not token:  # schemes ignore case
            raise UnauthenticatedError(f"expected Authorization: {RELAY_AUTH_SCHEME} <token>")
        try:
            data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise UnauthenticatedError("relay token is not base64url") from None
        value = canonical.decode(data, max_size=_MAX_REQUEST_BYTES, what="relay token")
        if type(value) is not list or len(value) != _REQUEST_FIELDS:
            raise DecodeError(f"relay token must be a CBOR array of {_REQUEST_FIELDS} elements")
        relay, named_oracle, issued_at, nonce, signature = value
        relay_key = _key(relay, "relay token")
        named = _key(named_oracle, "relay token")
        if named != oracle and named not in former:
            raise UnauthenticatedError("relay token is for another oracle")
        uint63(issued_at, "relay token issued_at")
        if type(nonce) is not bytes or len(nonce) != REQUEST_NONCE_BYTES:
            raise InvalidFieldError(f"relay token nonce must be {REQUEST_NONCE_BYTES} bytes")
        if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
            raise InvalidFieldError("relay token signature must be 64 bytes")
        if abs(now_ms - issued_at) > ORACLE_CLOCK_SKEW_MS:
            raise StaleError(f"relay token issued {(now_ms - issued_at) / 1000:.0f}s from the"
                             f" oracle's clock (limit {ORACLE_CLOCK_SKEW_MS // 1000}s)")
        if allowed is not None:
            allowed(relay_key)
        relay_key.verify(ACCESS_REQUEST_DOMAIN + canonical.encode(value[:-1]), signature)
        return cls(relay_key, named, issued_at, nonce)
