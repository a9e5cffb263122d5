"""End-to-end encryption of one payload to many recipients (protocol 2).

Construction (all primitives from libsodium via PyNaCl):

1. The plaintext (for an envelope its `Contents`: the kind byte, then the
   application's bytes) is padded to a size bucket (`padded_size`: ISO/IEC
   7816-4, a 0x80 byte then zeros), so a relay learns a size class, not the size;
   near the envelope limit, to what still fits (the recipient only checks
   the padding's form).
2. A fresh 32-byte content key K and 24-byte nonce N encrypt it once with
   XChaCha20-Poly1305-IETF; the associated data binds the envelope header
   (sender, ephemeral key, recipients, message id, times, origin), so the
   ciphertext cannot be lifted into another envelope.
3. A commitment C = BLAKE2b-256 keyed with K over COMMIT_DOMAIN ‖ AAD travels
   beside the ciphertext and is checked (in constant time) before decrypting.
   XChaCha20-Poly1305 alone is not key-committing: one ciphertext can be made
   to decrypt under two keys to two plaintexts, so a sender could give two
   recipients two different messages under one signature.  With C, which the
   signature covers, only the K it commits to opens the payload.
4. K is wrapped for each recipient with crypto_box (X25519 + XSalsa20-Poly1305)
   from an **ephemeral** X25519 key drawn for this envelope alone to the
   recipient's key (derived from its Ed25519 key).  The ephemeral secret is
   forgotten at once, so a sender's stolen identity key opens nothing it sent
   (forward secrecy for the sender); the envelope's signature authenticates
   the sender.  A wrapped key is nonce(24) ‖ box(K) = 72 bytes.
   The wrap is sealed to whatever X25519 key the caller names: by default the
   one derived from the recipient's identity, or the recipient's signed prekey
   (`prekeys`), whose secret is deleted later, for forward secrecy on the
   receiving side too.  The wrap is the same construction either way.

payload = N(24) ‖ C(32) ‖ ciphertext; the wraps and the ephemeral key are
envelope fields.  The payload is carried once however many recipients there
are; only the 72-byte wrap is per recipient.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public
import nacl.signing

from .errors import DecryptError, InvalidFieldError
from .keys import Identity, PublicKey

RandomBytes = Callable[[int], bytes]

COMMIT_DOMAIN = b"continuum/v2/commit\x00"
CONTENT_KEY_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
PAYLOAD_NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
COMMITMENT_BYTES = 32
EPHEMERAL_KEY_BYTES = nacl.bindings.crypto_box_PUBLICKEYBYTES
EPHEMERAL_SEED_BYTES = nacl.bindings.crypto_box_SEEDBYTES
BOX_NONCE_BYTES = nacl.public.Box.NONCE_SIZE
BOX_MAC_BYTES = nacl.bindings.crypto_box_ZEROBYTES - nacl.bindings.crypto_box_BOXZEROBYTES
WRAPPED_KEY_BYTES = BOX_NONCE_BYTES + CONTENT_KEY_BYTES + BOX_MAC_BYTES
PAYLOAD_OVERHEAD_BYTES = (PAYLOAD_NONCE_BYTES + COMMITMENT_BYTES
                          + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES)
# Size buckets of the padded plaintext: powers of two from 64 bytes to 16 KiB, then
# multiples of 16 KiB (at most 2x for small payloads, at most 16 KiB more for large ones).
_SMALLEST_BUCKET = 64
_LARGE_STEP = 16 * 1024


def padded_size(length: int) -> int:
    """The bucket a plaintext of `length` bytes is padded to (one byte of marker included)."""
    needed = length + 1
    if needed <= _LARGE_STEP:
        size = _SMALLEST_BUCKET
        while size < needed:
            size *= 2
        return size
    return -(-needed // _LARGE_STEP) * _LARGE_STEP


def _pad(plaintext: bytes, padded_length: int) -> bytes:
    if padded_length <= len(plaintext):
        raise InvalidFieldError("padding needs at least one byte")
    return plaintext + b"\x80" + bytes(padded_length - len(plaintext) - 1)


def _unpad(padded: bytes) -> bytes:
    end = len(padded.rstrip(b"\x00"))
    if end == 0 or padded[end - 1] != 0x80:
        raise DecryptError("payload padding is malformed")
    return padded[:end - 1]


def _commitment(content_key: bytes, associated_data: bytes) -> bytes:
    return nacl.hash.blake2b(COMMIT_DOMAIN + associated_data, digest_size=COMMITMENT_BYTES,
                             key=content_key, encoder=nacl.encoding.RawEncoder)


def identity_x25519_secret(identity: Identity) -> bytes:
    """The X25519 secret a wrap to `identity`'s own key opens with (libsodium's conversion)."""
    return bytes(identity.signing_key.to_curve25519_private_key())


def identity_x25519_public(key: PublicKey) -> bytes:
    """The X25519 key a wrap to `key` is sealed to when no prekey is used."""
    try:
        return bytes(nacl.signing.VerifyKey(key.raw).to_curve25519_public_key())
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError):
        raise DecryptError(f"{key.text} is not a usable Ed25519 point") from None


def ephemeral_public(seed: bytes) -> bytes:
    """The ephemeral X25519 public key a sender's `seed` gives (for vectors and tests)."""
    return nacl.bindings.crypto_box_seed_keypair(seed)[0]


def seal(plaintext: bytes, recipients: list[bytes], ephemeral_seed: bytes,
         associated_data: Callable[[bytes], bytes], padded_length: int,
         random_bytes: RandomBytes = os.urandom) -> tuple[bytes, bytes, list[bytes]]:
    """(ephemeral public key, payload, wraps in the order of `recipients`).

    `recipients` are the X25519 keys the wraps are sealed to (`identity_x25519_public`,
    or a signed prekey's); `associated_data(ephemeral_public)` builds the AAD, which binds the ephemeral key;
    the plaintext is padded to `padded_length` (more than its length).
    """
    if len(ephemeral_seed) != EPHEMERAL_SEED_BYTES:
        raise InvalidFieldError(f"an ephemeral seed is {EPHEMERAL_SEED_BYTES} bytes")
    ephemeral_pk, ephemeral_sk = nacl.bindings.crypto_box_seed_keypair(ephemeral_seed)
    aad = associated_data(ephemeral_pk)
    content_key = random_bytes(CONTENT_KEY_BYTES)
    nonce = random_bytes(PAYLOAD_NONCE_BYTES)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        _pad(plaintext, padded_length), aad, nonce, content_key)
    sender_curve = nacl.public.PrivateKey(ephemeral_sk)
    wraps = [
        bytes(nacl.public.Box(sender_curve, nacl.public.PublicKey(recipient)).encrypt(
            content_key, random_bytes(BOX_NONCE_BYTES)))
        for recipient in recipients
    ]
    return ephemeral_pk, nonce + _commitment(content_key, aad) + ciphertext, wraps


def unseal(payload: bytes, wrapped_key: bytes, ephemeral_key: bytes, recipient_secret: bytes,
           associated_data: bytes) -> bytes:
    """Decrypt a payload whose wrap was sealed to the X25519 key of `recipient_secret`
    (`identity_x25519_secret`, or a prekey's secret); DecryptError on any tampering."""
    try:
        box = nacl.public.Box(nacl.public.PrivateKey(recipient_secret),
                              nacl.public.PublicKey(ephemeral_key))
        content_key = box.decrypt(wrapped_key)
        nonce = payload[:PAYLOAD_NONCE_BYTES]
        commitment = payload[PAYLOAD_NONCE_BYTES:PAYLOAD_NONCE_BYTES + COMMITMENT_BYTES]
        ciphertext = payload[PAYLOAD_NONCE_BYTES + COMMITMENT_BYTES:]
        if not hmac.compare_digest(commitment, _commitment(content_key, associated_data)):
            raise DecryptError("the content key is not the one the payload commits to")
        padded = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext, associated_data, nonce, content_key)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError):
        raise DecryptError("payload does not decrypt: not for this key, or altered") from None
    return _unpad(padded)
