"""Plaintexts of the protocol's own envelope kinds (everything but DATA).

These live inside the encrypted payload, so only the addressed device reads
them; each is a small canonical CBOR array decoded as strictly as the envelope.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import canonical
from .access import Stamp
from .canonical import uint63
from .envelope import CONTENT_HASH_BYTES, MSG_ID_BYTES, Envelope
from .errors import DecodeError, InvalidFieldError
from .keys import KEY_BYTES, PublicKey
from .prekeys import SignedPrekey

_MAX_PAYLOAD_BYTES = 64 * 1024
MAX_PEERS = 1024


def _array(data: bytes, length: int, what: str, optional: int = 0) -> list:
    """A CBOR array of `length` elements, or up to `optional` more."""
    value = canonical.decode(data, max_size=_MAX_PAYLOAD_BYTES, what=what)
    if type(value) is not list or not length <= len(value) <= length + optional:
        raise DecodeError(f"{what} must be a CBOR array of {length} elements"
                          + (f" (or {length + optional})" if optional else ""))
    return value


def _msg_id(value: object, what: str) -> bytes:
    if type(value) is not bytes or len(value) != MSG_ID_BYTES:
        raise InvalidFieldError(f"{what} message id must be {MSG_ID_BYTES} bytes")
    return value


def _key(value: object, what: str) -> PublicKey:
    if type(value) is not bytes or len(value) != KEY_BYTES:
        raise InvalidFieldError(f"{what} key must be {KEY_BYTES} bytes")
    return PublicKey(value)


@dataclass(frozen=True)
class Receipt:
    """Sent by a recipient after it decrypted `msg_id`: proof of delivery of exactly the
    envelope whose signed bytes hash to `content_hash` (`Envelope.content_hash`)."""

    msg_id: bytes
    content_hash: bytes

    @classmethod
    def of(cls, envelope: Envelope) -> Receipt:
        return cls(envelope.msg_id, envelope.content_hash())

    def encode(self) -> bytes:
        return canonical.encode([self.msg_id, self.content_hash])

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        msg_id, content_hash = _array(data, 2, "receipt")
        if type(content_hash) is not bytes or len(content_hash) != CONTENT_HASH_BYTES:
            raise InvalidFieldError(f"receipt content hash must be {CONTENT_HASH_BYTES} bytes")
        return cls(_msg_id(msg_id, "receipt"), content_hash)


# Entries of one EXPIRY notice: each is 53 bytes encoded, so a full notice stays
# well inside the default 64 KiB envelope (a relay with a smaller limit sends fewer).
MAX_EXPIRY_ENTRIES = 1000
EXPIRY_ENTRY_BYTES = 53


@dataclass(frozen=True)
class ExpiryNotice:
    """Sent by a relay to a sender: each (msg_id, recipient) expired unread in that mailbox.

    One entry is encoded `[msg_id, recipient]`; several (up to
    MAX_EXPIRY_ENTRIES) as an array of such pairs, so a storm of expiries
    costs the relay one signature per notice, not one per message and
    recipient.  Each form has exactly one encoding: a batch of one is refused.
    """

    entries: tuple[tuple[bytes, PublicKey], ...]

    @classmethod
    def single(cls, msg_id: bytes, recipient: PublicKey) -> ExpiryNotice:
        return cls(((msg_id, recipient),))

    def encode(self) -> bytes:
        if not 1 <= len(self.entries) <= MAX_EXPIRY_ENTRIES:
            raise InvalidFieldError(f"an expiry notice holds 1..{MAX_EXPIRY_ENTRIES} entries")
        pairs = [[msg_id, recipient.raw] for msg_id, recipient in self.entries]
        return canonical.encode(pairs[0] if len(pairs) == 1 else pairs)

    @classmethod
    def decode(cls, data: bytes) -> ExpiryNotice:
        value = canonical.decode(data, max_size=_MAX_PAYLOAD_BYTES, what="expiry notice")
        if type(value) is not list or not value:
            raise DecodeError("expiry notice must be a non-empty CBOR array")
        if type(value[0]) is not list:
            pairs = [value]
        elif 2 <= len(value) <= MAX_EXPIRY_ENTRIES:
            pairs = value
        else:
            raise InvalidFieldError(
                f"a batched expiry notice holds 2..{MAX_EXPIRY_ENTRIES} entries")
        entries = []
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise DecodeError("each expiry notice entry must be a [msg_id, recipient] array")
            entries.append((_msg_id(pair[0], "expiry notice"), _key(pair[1], "expiry notice")))
        return cls(tuple(entries))


@dataclass(frozen=True)
class PeerChange:
    """The oracle's word on whom a device may talk to; its `stamp` only ever grows.

    `version` counts this device's lists; `epoch` is the oracle's epoch when
    the list was issued (see `Stamp`), so a restored oracle's lists outrank the
    ones it issued before the backup was taken.  Wire order: epoch, version, peers.

    `prekeys` are the current signed prekeys of some of the peers (SPEC §6).  On
    the wire they are an optional fourth element, parallel to `peers`: null, or
    that peer's signed prekey (its owner is the peer beside it, so it is not
    repeated).  A list without prekeys keeps the three-element form, the only
    encoding of "no prekeys" (an all-null array is refused), byte for byte as
    before prekeys existed.  Decoding verifies every prekey under its peer's key.
    """

    version: int
    peers: tuple[PublicKey, ...]
    epoch: int = 0
    prekeys: tuple[SignedPrekey, ...] = ()

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.epoch, self.version)

    def prekeys_by_peer(self) -> dict[PublicKey, SignedPrekey]:
        """Peer → its signed prekey, as `seal_envelope` takes them."""
        return {prekey.owner: prekey for prekey in self.prekeys}

    def encode(self) -> bytes:
        peers = sorted(set(self.peers))
        fields = [self.epoch, self.version, [p.raw for p in peers]]
        if self.prekeys:
            by_owner = self.prekeys_by_peer()
            if len(by_owner) != len(self.prekeys) or not by_owner.keys() <= set(peers):
                raise InvalidFieldError("a peer change holds at most one prekey per peer,"
                                        " and only for its peers")
            fields.append([by_owner[p].to_value() if p in by_owner else None for p in peers])
        return canonical.encode(fields)

    @classmethod
    def decode(cls, data: bytes) -> PeerChange:
        epoch, version, peers, *prekey_field = _array(data, 3, "peer change", optional=1)
        uint63(epoch, "peer change epoch")
        uint63(version, "peer change version")
        if type(peers) is not list or len(peers) > MAX_PEERS:
            raise InvalidFieldError(f"peer change peers must be a list of at most {MAX_PEERS}")
        keys = tuple(_key(p, "peer change") for p in peers)
        # One encoding per peer set, as for envelope recipients.
        if any(a >= b for a, b in zip(keys, keys[1:])):
            raise InvalidFieldError("peer change peers must be sorted by key and unique")
        prekeys = _peer_prekeys(prekey_field[0], keys) if prekey_field else ()
        return cls(version, keys, epoch, prekeys)


def _peer_prekeys(value: object, peers: tuple[PublicKey, ...]) -> tuple[SignedPrekey, ...]:
    """The fourth element of a peer change: one null or signed prekey per peer, not all null."""
    if type(value) is not list or len(value) != len(peers):
        raise InvalidFieldError("peer change prekeys must be an array parallel to its peers")
    prekeys = tuple(SignedPrekey.from_value(item, peer)
                    for item, peer in zip(value, peers) if item is not None)
    if not prekeys:
        raise InvalidFieldError("a peer change without prekeys has three elements, not a"
                                " fourth of nulls")
    return prekeys
