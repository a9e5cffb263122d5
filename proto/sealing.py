"""End-to-end encryption of one payload to many recipients.

Construction (all primitives from libsodium via PyNaCl):

1. A fresh 32-byte content key K and 24-byte nonce N encrypt the payload once
   with XChaCha20-Poly1305-IETF; the associated data binds the envelope header
   (sender, recipients, message id, times, kind), so the ciphertext cannot be
   lifted into another envelope or re-signed under another sender's name.
2. K is wrapped for each recipient with crypto_box (X25519 + XSalsa20-Poly1305)
   from the sender's X25519 key to the recipient's, both derived from their
   Ed25519 keys.  A wrapped key is nonce(24) ‖ box(K) = 72 bytes.

The payload is carried once however many recipients there are; only the
72-byte wrap is per recipient.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from .errors import DecryptError
from .keys import Identity, PublicKey

RandomBytes = Callable[[int], bytes]

CONTENT_KEY_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
PAYLOAD_NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
BOX_NONCE_BYTES = nacl.public.Box.NONCE_SIZE
BOX_MAC_BYTES = nacl.bindings.crypto_box_ZEROBYTES - nacl.bindings.crypto_box_BOXZEROBYTES
WRAPPED_KEY_BYTES = BOX_NONCE_BYTES + CONTENT_KEY_BYTES + BOX_MAC_BYTES
PAYLOAD_OVERHEAD_BYTES = PAYLOAD_NONCE_BYTES + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES


def _curve_private(identity: Identity) -> nacl.public.PrivateKey:
    return identity.signing_key.to_curve25519_private_key()


def _curve_public(key: PublicKey) -> nacl.public.PublicKey:
    try:
        return nacl.signing.VerifyKey(key.raw).to_curve25519_public_key()
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError):
        raise DecryptError(f"{key.text} is not a usable Ed25519 point") from None


def seal(
    plaintext: bytes,
    sender: Identity,
    recipients: list[PublicKey],
    associated_data: bytes,
    random_bytes: RandomBytes = os.urandom,
) -> tuple[bytes, list[bytes]]:
    """Return (payload, wrapped keys in the order of `recipients`)."""
    content_key = random_bytes(CONTENT_KEY_BYTES)
    nonce = random_bytes(PAYLOAD_NONCE_BYTES)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, associated_data, nonce, content_key)
    sender_curve = _curve_private(sender)
    wraps = [
        bytes(nacl.public.Box(sender_curve, _curve_public(recipient)).encrypt(
            content_key, random_bytes(BOX_NONCE_BYTES)))
        for recipient in recipients
    ]
    return nonce + ciphertext, wraps


def unseal(
    payload: bytes,
    wrapped_key: bytes,
    sender: PublicKey,
    recipient: Identity,
    associated_data: bytes,
) -> bytes:
    """Decrypt a payload addressed to `recipient`; DecryptError on any tampering."""
    try:
        box = nacl.public.Box(_curve_private(recipient), _curve_public(sender))
        content_key = box.decrypt(wrapped_key)
        nonce, ciphertext = payload[:PAYLOAD_NONCE_BYTES], payload[PAYLOAD_NONCE_BYTES:]
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext, associated_data, nonce, content_key)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError):
        raise DecryptError("payload does not decrypt: not for this key, or altered") from None
