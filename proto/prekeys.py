"""Signed prekeys: rotating X25519 keys a device is sealed to instead of its identity key.

Without them every wrap addressed to a device opens with the X25519 key derived
from its Ed25519 identity, so whoever later steals that one key opens every
envelope ever addressed to the device that they kept a copy of (a relay's
store, a backup, a recording).  A signed prekey is a fresh X25519 key the
device signs with its identity key and deletes PREKEY_RETENTION_MS after it
stops being valid: mail sealed to it stays closed once its secret is gone,
whatever leaks later (SPEC §5, "Signed prekeys").

Wire form (protocol 2, optional):

    [prekey_id uint < 2^32, public bstr(32), valid_until_ms uint < 2^63, signature bstr(64)]

    signed bytes = PREKEY_DOMAIN ‖ canonical CBOR [owner, prekey_id, public, valid_until_ms]

The owner (the device's Ed25519 key) is signed but not sent: wherever a
prekey travels, its owner is already named beside it (the peer it is listed
for, the sender of the envelope that announces it), so 34 bytes per peer-list
entry are saved and a prekey can never be shown under another owner.
Decoding verifies the signature: a SignedPrekey object is always genuine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions

from . import canonical
from .canonical import uint63
from .errors import DecodeError, InvalidFieldError, PrekeyExpiredError
from .keys import SIGNATURE_BYTES, Identity, PublicKey
from .sealing import EPHEMERAL_KEY_BYTES, EPHEMERAL_SEED_BYTES

PREKEY_DOMAIN = b"continuum/v2/prekey\x00"
MAX_PREKEY_ID = 2**32 - 1
PREKEY_FIELDS = 4
# A prekey valid for longer than this is refused: the longer it is valid, the
# longer its secret lives, and the longer a thief of the device opens mail
# sealed to it.  The recommended validity is 7 days, renewed at half-life.
MAX_PREKEY_VALIDITY_MS = 30 * 24 * 3600 * 1000
# How long a device keeps a prekey's secret after its valid_until_ms: mail
# sealed to it up to that instant may wait in a mailbox for the longest TTL a
# relay accepts (7 days, SPEC §10), sent by a clock up to 300 s ahead of the
# relay's (the relay's STALE window).  After that nothing sealed to it can
# still be delivered, so deleting it loses no mail.
MAX_RELAY_TTL_MS = 7 * 24 * 3600 * 1000
RELAY_CLOCK_SKEW_MS = 300_000
PREKEY_RETENTION_MS = MAX_RELAY_TTL_MS + RELAY_CLOCK_SKEW_MS
_X25519_P = 2**255 - 19
# At most 115 bytes; room for a wrong shape to be refused for its shape, not its size.
_MAX_PREKEY_BYTES = 256


def check_x25519_public(public: object, what: str = "prekey") -> bytes:
    """Refuse an X25519 public key that a wrap must never be sealed to (INVALID_FIELD).

    It must be 32 bytes, canonical (u < p, so one key has one spelling) and not
    of small order: a small-order u makes every shared secret one of eight
    values anyone can compute, so the wrap would be open to all.  libsodium
    refuses those itself (its blacklist, and an all-zero result), which is the
    check used here.  A point on the twist is not refused: its owner chose and
    signed it, and would only weaken its own mail.
    """
    if type(public) is not bytes or len(public) != EPHEMERAL_KEY_BYTES:
        raise InvalidFieldError(f"{what} public key must be {EPHEMERAL_KEY_BYTES} bytes")
    if int.from_bytes(public, "little") >= _X25519_P:
        raise InvalidFieldError(f"{what} public key is not canonical (u >= 2^255 - 19)")
    try:
        nacl.bindings.crypto_scalarmult(b"\x01" * 32, public)
    except nacl.exceptions.RuntimeError:
        raise InvalidFieldError(f"{what} public key is of small order") from None
    return public


@dataclass(frozen=True)
class SignedPrekey:
    """`owner`'s X25519 key `public`, number `prekey_id`, to be sealed to before `valid_until_ms`."""

    owner: PublicKey
    prekey_id: int
    public: bytes
    valid_until_ms: int
    signature: bytes

    @staticmethod
    def signed_bytes_for(owner: PublicKey, prekey_id: int, public: bytes,
                         valid_until_ms: int) -> bytes:
        return PREKEY_DOMAIN + canonical.encode([owner.raw, prekey_id, public, valid_until_ms])

    def signed_bytes(self) -> bytes:
        return self.signed_bytes_for(self.owner, self.prekey_id, self.public, self.valid_until_ms)

    def to_value(self) -> list:
        """The CBOR array, for embedding in a peer change."""
        return [self.prekey_id, self.public, self.valid_until_ms, self.signature]

    def encode(self) -> bytes:
        return canonical.encode(self.to_value())

    @classmethod
    def decode(cls, data: bytes, owner: PublicKey) -> SignedPrekey:
        """Decode a signed prekey of `owner` and verify it (BAD_SIGNATURE under any other key)."""
        return cls.from_value(canonical.decode(data, max_size=_MAX_PREKEY_BYTES,
                                               what="signed prekey"), owner)

    @classmethod
    def from_value(cls, value: object, owner: PublicKey) -> SignedPrekey:
        """An already decoded CBOR array, checked as strictly as `decode`."""
        if type(value) is not list or len(value) != PREKEY_FIELDS:
            raise DecodeError(f"signed prekey must be a CBOR array of {PREKEY_FIELDS} elements")
        prekey_id, public, valid_until, signature = value
        check_prekey_id(prekey_id)
        check_x25519_public(public)
        uint63(valid_until, "prekey valid_until_ms")
        if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
            raise InvalidFieldError(f"prekey signature must be {SIGNATURE_BYTES} bytes")
        prekey = cls(owner, prekey_id, public, valid_until, signature)
        owner.verify(prekey.signed_bytes(), signature)
        return prekey

    def check_usable(self, now_ms: int) -> None:
        """Raise unless a sender may seal to this prekey at `now_ms` (or an oracle take it).

        PREKEY_EXPIRED once `valid_until_ms` is reached: its owner may already be
        counting down to deleting the secret, so mail sealed to it now could
        arrive after the secret is gone.  INVALID_FIELD if it claims validity
        beyond MAX_PREKEY_VALIDITY_MS from now: a secret kept that long is no
        forward secrecy worth the name.
        """
        if now_ms >= self.valid_until_ms:
            raise PrekeyExpiredError(
                f"prekey {self.prekey_id} of {self.owner.text} expired at {self.valid_until_ms}")
        if self.valid_until_ms - now_ms > MAX_PREKEY_VALIDITY_MS:
            raise InvalidFieldError(
                f"prekey {self.prekey_id} is valid for more than"
                f" {MAX_PREKEY_VALIDITY_MS // 86_400_000} days")


@dataclass(frozen=True)
class PrekeySecret:
    """The secret half of one of this device's prekeys; it never leaves the device."""

    prekey_id: int
    secret: bytes = field(repr=False)
    valid_until_ms: int

    @property
    def deletable_at_ms(self) -> int:
        """When the device must delete it (SPEC §5): nothing sealed to it can arrive later."""
        return self.valid_until_ms + PREKEY_RETENTION_MS


def check_prekey_id(value: object) -> int:
    """A prekey id, in a prekey or in the wrap that names it: a CBOR uint below 2^32."""
    if type(value) is not int or not 0 <= value <= MAX_PREKEY_ID:
        raise InvalidFieldError(f"prekey id must be an integer in [0, {MAX_PREKEY_ID}]")
    return value


def create_prekey(owner: Identity, prekey_id: int, seed: bytes,
                  valid_until_ms: int) -> tuple[SignedPrekey, PrekeySecret]:
    """A new prekey from 32 random bytes `seed` (drawn by the caller), signed by `owner`.

    The X25519 pair is libsodium's crypto_box_seed_keypair(seed), as for the
    envelope's ephemeral key, so vectors can pin it.
    """
    if len(seed) != EPHEMERAL_SEED_BYTES:
        raise InvalidFieldError(f"a prekey seed is {EPHEMERAL_SEED_BYTES} bytes")
    check_prekey_id(prekey_id)
    uint63(valid_until_ms, "prekey valid_until_ms")
    public, secret = nacl.bindings.crypto_box_seed_keypair(seed)
    signature = owner.sign(SignedPrekey.signed_bytes_for(owner.public, prekey_id, public,
                                                         valid_until_ms))
    return (SignedPrekey(owner.public, prekey_id, public, valid_until_ms, signature),
            PrekeySecret(prekey_id, secret, valid_until_ms))
