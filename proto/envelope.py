"""The signed, sealed envelope: the unit every device sends and the relay stores.

Wire form (protocol 2): a canonical CBOR array of ten elements

    [version, origin, msg_id, sender, created_at_ms, ttl_s, ephemeral, recipients, payload,
     signature]

with `ephemeral` the sender's X25519 key for this envelope only (`sealing`) and
`recipients` an array of [recipient_key, wrapped_key] pairs sorted by key.
The signature is Ed25519 by `sender` over SIGNING_DOMAIN ‖ canonical CBOR of
the first nine elements.  Decoding checks structure only; `verify()` checks
the signature, so a relay can refuse garbage before spending a verify on it;
`open()` verifies first itself, so no caller can decrypt an unverified one.

What the envelope means (`Kind`: data, receipt, expiry notice, peer change)
is sealed inside the payload, ahead of the plaintext (`Contents`), so a relay
and whoever reads its store cannot tell receipts from data from peer changes.
The relay sees only the `Origin`: whether a relay wrote the envelope as its
own notice, which it must know so as never to send a notice about a notice.
`open()` refuses contents whose kind disagrees with the origin.

A recipient entry may carry a third element, the id of the recipient's
signed prekey its wrap is sealed to (`prekeys`, SPEC §5); without it the
wrap is sealed to the recipient's identity key, byte for byte as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import nacl.encoding
import nacl.hash

from . import canonical
from .errors import (DecodeError, DecryptError, InvalidFieldError, OversizeError,
                     PrekeyExpiredError, UnknownPrekeyError, UnsupportedVersionError)
from .keys import KEY_BYTES, SIGNATURE_BYTES, Identity, PublicKey
from .limits import DEFAULT_LIMITS, MAX_TTL_SECONDS, PROTOCOL_VERSION, Limits
from .prekeys import PrekeySecret, SignedPrekey, check_prekey_id
from .sealing import (EPHEMERAL_KEY_BYTES, EPHEMERAL_SEED_BYTES, PAYLOAD_OVERHEAD_BYTES,
                      WRAPPED_KEY_BYTES, RandomBytes, identity_x25519_public,
                      identity_x25519_secret, padded_size, seal, unseal)

SIGNING_DOMAIN = b"continuum/v2/envelope\x00"
PAYLOAD_AAD_DOMAIN = b"continuum/v2/payload\x00"
MSG_ID_BYTES = 16
CONTENT_HASH_BYTES = 32
_FIELD_COUNT = 10
_ARRAY_OF_NINE = b"\x89"  # the canonical head of the signed array (the array of ten is 0x8a)
_SIGNATURE_ITEM_BYTES = 2 + SIGNATURE_BYTES  # its canonical encoding: 0x58 0x40, 64 bytes
_MAX_UINT64 = 2**64 - 1


class Origin(IntEnum):
    """Who wrote an envelope, in its clear header: all a relay learns of what it means."""

    DEVICE = 1  # a device (the oracle included), which sent it over SEND
    RELAY = 2  # a relay, as its own notice: written to a mailbox, never accepted over SEND


class Kind(IntEnum):
    """What an envelope means to its recipient; sealed, so only recipients read it."""

    DATA = 1
    RECEIPT = 2
    EXPIRY = 3
    PEER_CHANGE = 4
    # Stream handshakes (SPEC §16): carried in STREAM_OPEN / STREAM_ACCEPT frames, never
    # stored in a mailbox.
    STREAM_OPEN = 5
    STREAM_ACCEPT = 6
    # Large transfers (SPEC §17): ordinary mailbox envelopes, one manifest then its chunks.
    TRANSFER_MANIFEST = 7
    TRANSFER_CHUNK = 8
    # Calls between peers (SPEC §18): stored in mailboxes like DATA.
    CALL = 10
    RESPONSE = 11
    # Configuration (SPEC §21): the oracle's desired document, and a device's report.
    CONFIG = 12
    CONFIG_REPORT = 13

    @property
    def origin(self) -> Origin:
        """The origin an envelope of this kind must carry: relays write expiry notices only."""
        return Origin.RELAY if self is Kind.EXPIRY else Origin.DEVICE


@dataclass(frozen=True)
class Contents:
    """What an envelope seals: one byte of `kind`, then the plaintext (SPEC §5).

    The kind is inside the committed ciphertext, so the sender's signature fixes
    it for every recipient just as it fixes the plaintext.
    """

    kind: Kind
    plaintext: bytes

    def encode(self) -> bytes:
        return bytes([self.kind]) + self.plaintext

    @classmethod
    def decode(cls, data: bytes) -> Contents:
        if not data:
            raise InvalidFieldError("sealed contents have no kind")
        try:
            kind = Kind(data[0])
        except ValueError:
            raise InvalidFieldError(f"sealed kind {data[0]} is unknown") from None
        return cls(kind, data[1:])


@dataclass(frozen=True)
class Recipient:
    """One wrap: `prekey_id` names the recipient's signed prekey it is sealed to, None its
    identity key (then the entry is the two-element pair of every envelope before prekeys)."""

    key: PublicKey
    wrapped_key: bytes
    prekey_id: int | None = None


@dataclass(frozen=True)
class Envelope:
    """A decoded envelope; `raw` is the exact bytes that were signed and sent."""

    version: int
    origin: Origin
    msg_id: bytes
    sender: PublicKey
    created_at_ms: int
    ttl_s: int
    ephemeral: bytes
    recipients: tuple[Recipient, ...]
    payload: bytes
    signature: bytes
    raw: bytes = field(repr=False, compare=False)
    # Set by a successful `verify`, so `open` does not pay for the signature twice.
    _verified: bool = field(default=False, init=False, repr=False, compare=False)
    # Set by `decode_envelope`: `raw` is the canonical encoding of exactly these fields, so
    # the signed bytes are a slice of it (`signed_bytes`).  Not carried by
    # `dataclasses.replace`, whose copy may hold other fields beside the same `raw`.
    _raw_is_canonical: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def expires_at_ms(self) -> int:
        return self.created_at_ms + self.ttl_s * 1000

    @property
    def recipient_keys(self) -> tuple[PublicKey, ...]:
        return tuple(r.key for r in self.recipients)

    def signed_bytes(self) -> bytes:
        if self._raw_is_canonical:
            # The canonical array of ten, less its head and its last item, is the canonical
            # encoding of the first nine items but for the array head, one byte either way.
            return SIGNING_DOMAIN + _ARRAY_OF_NINE + self.raw[1:-_SIGNATURE_ITEM_BYTES]
        return _signed_bytes(self._header_fields(), _recipient_array(self.recipients), self.payload)

    def _header_fields(self) -> list:
        return [self.version, int(self.origin), self.msg_id, self.sender.raw,
                self.created_at_ms, self.ttl_s, self.ephemeral]

    def verify(self) -> None:
        """Raise SignatureError unless the sender signed exactly this envelope."""
        if not self._verified:
            self.sender.verify(self.signed_bytes(), self.signature)
            object.__setattr__(self, "_verified", True)

    def open(self, identity: Identity,
             prekeys: Mapping[int, PrekeySecret] | None = None) -> Contents:
        """Verify, then decrypt the payload for `identity` and read its kind.

        `prekeys` are the secrets of `identity`'s own prekeys it still holds, by id;
        a wrap that names a prekey opens with that secret only, never with the
        identity key.  SignatureError if the sender did not sign it; DecryptError if
        `identity` is not a recipient or it was altered; UnknownPrekeyError if the
        wrap names a prekey not held (deleted, or never made); PrekeyExpiredError if
        it was sealed to a prekey at or after its valid_until_ms; InvalidFieldError if
        the sealed kind is unknown or disagrees with the origin (an expiry notice from
        a device, data from a relay): then its signer broke the rule, nobody altered it.
        """
        self.verify()
        for recipient in self.recipients:
            if recipient.key == identity.public:
                contents = Contents.decode(unseal(
                    self.payload, recipient.wrapped_key, self.ephemeral,
                    self._opening_secret(recipient, identity, prekeys or {}),
                    _associated_data(self._header_fields(), self.recipient_keys)))
                if contents.kind.origin is not self.origin:
                    raise InvalidFieldError(f"sealed kind {contents.kind.name} cannot have"
                                            f" origin {self.origin.name}")
                return contents
        raise DecryptError(f"{identity.public.text} is not a recipient of this envelope")

    def _opening_secret(self, recipient: Recipient, identity: Identity,
                        prekeys: Mapping[int, PrekeySecret]) -> bytes:
        """The X25519 secret this recipient's wrap opens with: its prekey's, or its identity's."""
        if recipient.prekey_id is None:
            return identity_x25519_secret(identity)
        held = prekeys.get(recipient.prekey_id)
        if held is None:
            raise UnknownPrekeyError(f"the wrap names prekey {recipient.prekey_id}, which"
                                     f" {identity.public.text} does not hold")
        if self.created_at_ms >= held.valid_until_ms:
            raise PrekeyExpiredError(f"sealed at {self.created_at_ms} to prekey"
                                     f" {held.prekey_id}, expired at {held.valid_until_ms}")
        return held.secret

    def content_hash(self) -> bytes:
        """BLAKE2b-256 of the signed bytes: what a receipt names, so it is bound to exactly
        this content, not only to its msg_id."""
        return nacl.hash.blake2b(self.signed_bytes(), digest_size=CONTENT_HASH_BYTES,
                                 encoder=nacl.encoding.RawEncoder)


def _recipient_array(recipients: tuple[Recipient, ...]) -> list:
    return [[r.key.raw, r.wrapped_key] if r.prekey_id is None
            else [r.key.raw, r.wrapped_key, r.prekey_id] for r in recipients]


def _signed_bytes(header: list, recipients: list, payload: bytes) -> bytes:
    return SIGNING_DOMAIN + canonical.encode([*header, recipients, payload])


def _associated_data(header: list, recipient_keys: tuple[PublicKey, ...]) -> bytes:
    return PAYLOAD_AAD_DOMAIN + canonical.encode([*header, [k.raw for k in recipient_keys]])


def seal_envelope(
    sender: Identity,
    kind: Kind,
    recipients: list[PublicKey],
    plaintext: bytes,
    *,
    ttl_s: int,
    now_ms: int,
    limits: Limits = DEFAULT_LIMITS,
    random_bytes: RandomBytes = os.urandom,
    prekeys: Mapping[PublicKey, SignedPrekey] | None = None,
) -> Envelope:
    """Encrypt `kind` and `plaintext` to every recipient, sign, and return the envelope.

    `prekeys` maps recipients to their signed prekeys (from the peer change in
    force): those recipients' wraps are sealed to the prekey, the others' to their
    identity key.  Raises InvalidFieldError / OversizeError for inputs the relay
    would refuse, so a device learns about a bad send before it touches the
    network, and PrekeyExpiredError for a prekey past its validity: the caller
    decides (wait for a newer peer change, or seal to the identity key knowingly);
    nothing here falls back to the identity key on its own.
    """
    for recipient in recipients:
        prekey = (prekeys or {}).get(recipient)
        if prekey is not None:
            if prekey.owner != recipient:
                raise InvalidFieldError(f"the prekey given for {recipient.text} is"
                                        f" {prekey.owner.text}'s")
            prekey.check_usable(now_ms)
    return seal_contents(sender, kind.origin, Contents(kind, plaintext).encode(), recipients,
                         ttl_s=ttl_s, now_ms=now_ms, limits=limits, random_bytes=random_bytes,
                         prekeys=prekeys)


def seal_contents(
    sender: Identity,
    origin: Origin,
    contents: bytes,
    recipients: list[PublicKey],
    *,
    ttl_s: int,
    now_ms: int,
    limits: Limits = DEFAULT_LIMITS,
    random_bytes: RandomBytes = os.urandom,
    prekeys: Mapping[PublicKey, SignedPrekey] | None = None,
) -> Envelope:
    """`seal_envelope` for any origin and any sealed bytes, even a kind that disagrees with
    the origin or none at all, and to prekeys whatever their validity: how the vectors and
    tests build envelopes a recipient must refuse.  Everything else seals with
    `seal_envelope`."""
    unique = sorted(set(recipients))
    if not unique:
        raise InvalidFieldError("an envelope needs at least one recipient")
    if len(unique) > limits.max_recipients:
        raise InvalidFieldError(
            f"{len(unique)} recipients exceeds the limit of {limits.max_recipients}")
    if not 1 <= ttl_s <= MAX_TTL_SECONDS:
        raise InvalidFieldError(f"ttl must be between 1 and {MAX_TTL_SECONDS} seconds")
    chosen = [(prekeys or {}).get(key) for key in unique]
    targets = [identity_x25519_public(key) if prekey is None else prekey.public
               for key, prekey in zip(unique, chosen)]
    prekey_ids = [None if prekey is None else prekey.prekey_id for prekey in chosen]
    msg_id = random_bytes(MSG_ID_BYTES)
    base = [PROTOCOL_VERSION, int(origin), msg_id, sender.public.raw, now_ms, ttl_s]
    padded = _padded_length(base, prekey_ids, len(contents), limits)
    ephemeral, payload, wraps = seal(
        contents, targets, random_bytes(EPHEMERAL_SEED_BYTES),
        lambda eph: _associated_data([*base, eph], tuple(unique)), padded, random_bytes)
    header = [*base, ephemeral]
    recipient_entries = tuple(Recipient(k, w, i) for k, w, i in zip(unique, wraps, prekey_ids))
    recipient_array = _recipient_array(recipient_entries)
    signature = sender.sign(_signed_bytes(header, recipient_array, payload))
    raw = canonical.encode([*header, recipient_array, payload, signature])
    if len(raw) > limits.max_envelope_bytes:
        raise OversizeError(
            f"envelope of {len(raw)} bytes exceeds the limit of {limits.max_envelope_bytes}"
            f" (sealed contents of {len(contents)} bytes, kind included, padded to"
            f" {padded_size(len(contents))})")
    envelope = Envelope(PROTOCOL_VERSION, origin, msg_id, sender.public, now_ms, ttl_s, ephemeral,
                        recipient_entries, payload, signature, raw)
    object.__setattr__(envelope, "_verified", True)  # we just signed it
    return envelope


def check_sent_by_device(envelope: Envelope) -> None:
    """Raise InvalidFieldError unless `envelope` may arrive in a SEND: a relay's notice never
    may (SPEC §11).

    A relay writes its notices into mailboxes itself.  Taken from a device, one
    would be a "relay notice" its recipients must refuse (its sender is no relay
    key, or its sealed kind disagrees), and it would escape expiry notices, which
    relays never send about their own.
    """
    if envelope.origin is not Origin.DEVICE:
        raise InvalidFieldError(
            f"origin {envelope.origin.name} is a relay's own notice: a device may not send one")


def _padded_length(base: list, prekey_ids: list[int | None], contents_length: int,
                   limits: Limits) -> int:
    """The contents' size bucket, or less if the bucket would push the envelope past
    the limit (never below one byte of padding: then the envelope is simply too big)."""
    bucket = padded_size(contents_length)
    shape = [*base, bytes(EPHEMERAL_KEY_BYTES),
             _recipient_array(tuple(Recipient(PublicKey(bytes(32)), bytes(WRAPPED_KEY_BYTES), i)
                                    for i in prekey_ids)),
             bytes(PAYLOAD_OVERHEAD_BYTES + bucket), bytes(64)]
    excess = len(canonical.encode(shape)) - limits.max_envelope_bytes
    return max(contents_length + 1, bucket - max(0, excess))


def _expect(value: object, typ: type, name: str) -> None:
    if type(value) is not typ:  # bool is an int subclass; be exact
        raise InvalidFieldError(f"envelope {name} must be {typ.__name__}, got {type(value).__name__}")


def _expect_bytes(value: object, length: int, name: str) -> bytes:
    _expect(value, bytes, name)
    if len(value) != length:  # type: ignore[arg-type]
        raise InvalidFieldError(f"envelope {name} must be {length} bytes, got {len(value)}")  # type: ignore[arg-type]
    return value  # type: ignore[return-value]


def _expect_uint(value: object, name: str, low: int, high: int) -> int:
    _expect(value, int, name)
    if not low <= value <= high:  # type: ignore[operator]
        raise InvalidFieldError(f"envelope {name} {value} outside [{low}, {high}]")
    return value  # type: ignore[return-value]


def decode_envelope(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Parse and structurally validate an envelope; does not check the signature."""
    value = canonical.decode(data, max_size=limits.max_envelope_bytes, what="envelope")
    if type(value) is not list:
        raise DecodeError("envelope must be a CBOR array")
    if value and type(value[0]) is int and value[0] != PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"envelope version {value[0]} is not supported (this side speaks {PROTOCOL_VERSION})")
    if len(value) != _FIELD_COUNT:
        raise DecodeError(f"envelope must have {_FIELD_COUNT} elements, got {len(value)}")
    (version, origin, msg_id, sender, created_at, ttl, ephemeral, recipients, payload,
     signature) = value
    _expect(version, int, "version")
    _expect(origin, int, "origin")
    try:
        origin_enum = Origin(origin)
    except ValueError:
        raise InvalidFieldError(f"envelope origin {origin} is unknown") from None
    _expect_bytes(msg_id, MSG_ID_BYTES, "msg_id")
    sender_key = PublicKey(_expect_bytes(sender, KEY_BYTES, "sender"))
    _expect_uint(created_at, "created_at", 0, _MAX_UINT64)
    _expect_uint(ttl, "ttl", 1, MAX_TTL_SECONDS)
    _expect_bytes(ephemeral, EPHEMERAL_KEY_BYTES, "ephemeral key")
    _expect(recipients, list, "recipients")
    if not 1 <= len(recipients) <= limits.max_recipients:
        raise InvalidFieldError(
            f"envelope must have 1..{limits.max_recipients} recipients, got {len(recipients)}")
    entries: list[Recipient] = []
    for entry in recipients:
        if type(entry) is not list or len(entry) not in (2, 3):
            raise InvalidFieldError(
                "each recipient must be a [key, wrapped_key] or [key, wrapped_key, prekey_id]")
        key = PublicKey(_expect_bytes(entry[0], KEY_BYTES, "recipient key"))
        wrapped = _expect_bytes(entry[1], WRAPPED_KEY_BYTES, "wrapped key")
        prekey_id = check_prekey_id(entry[2]) if len(entry) == 3 else None
        if entries and key <= entries[-1].key:
            raise InvalidFieldError("recipients must be sorted by key and unique")
        entries.append(Recipient(key, wrapped, prekey_id))
    _expect(payload, bytes, "payload")
    if len(payload) < PAYLOAD_OVERHEAD_BYTES:
        raise InvalidFieldError("envelope payload is shorter than its nonce and tag")
    _expect_bytes(signature, SIGNATURE_BYTES, "signature")
    envelope = Envelope(version, origin_enum, msg_id, sender_key, created_at, ttl, ephemeral,
                        tuple(entries), payload, signature, bytes(data))
    object.__setattr__(envelope, "_raw_is_canonical", True)  # `canonical.decode` proved it
    return envelope
