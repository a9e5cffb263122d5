"""Signatures that satisfy Ed25519's equation yet break the key validity rule (SPEC §3).

Each is built from fixed inputs with libsodium's own scalar and point
operations, the way an attacker holding an ordinary key builds it, for
`invalid.json` and the tests.  A verifier must refuse every one: only the
rule (canonical A, R and S; A and R not of small order; A of prime order)
refuses them, since the signature equation [S]B = R + [k]A holds for each,
where k = SHA-512(R ‖ A ‖ M) reduced mod L.  Nothing here signs anything
real; `Identity.sign` does that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

# The order of the prime-order subgroup, and the field's prime.
L = 2**252 + 27742317777372353535851937790883648493
P = 2**255 - 19
# A point of order 8: adding it to a public key gives a key libsodium decodes and, for one
# message in eight, verifies under.
ORDER_8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
# The neutral element (x = 0, y = 1): of order 1, so [k]A vanishes for every k.
NEUTRAL = (1).to_bytes(32, "little")
# The neutral element again, spelt y = p + 1: a y-coordinate out of range.
NEUTRAL_NON_CANONICAL = (P + 1).to_bytes(32, "little")

MessageOf = Callable[[bytes, int], bytes]


def _reduce(data: bytes) -> bytes:
    return sodium.crypto_core_ed25519_scalar_reduce(data.ljust(64, b"\x00"))


def _challenge(r_point: bytes, public: bytes, message: bytes) -> bytes:
    return _reduce(hashlib.sha512(r_point + public + message).digest())


def _secret_scalar(seed: bytes) -> tuple[bytes, bytes]:
    """(a, nonce prefix) of an Ed25519 seed, as RFC 8032 derives them."""
    digest = hashlib.sha512(seed).digest()
    clamped = bytearray(digest[:32])
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    return _reduce(bytes(clamped)), digest[32:]


def mixed_order_signature(seed: bytes, message_of: MessageOf) -> tuple[bytes, bytes, bytes]:
    """(A + T8, a message, a signature libsodium alone accepts under A + T8).

    The usual signature of `seed`'s scalar, with A + T8 in the hash: it verifies
    whenever [k]T8 vanishes, i.e. for one k in eight.  `message_of(key, attempt)`
    gives the attempt-th candidate message (attempts 0, 1, …: deterministic).
    """
    a, prefix = _secret_scalar(seed)
    mixed = sodium.crypto_core_ed25519_add(bytes(nacl.signing.SigningKey(seed).verify_key),
                                           ORDER_8)
    for attempt in range(256):
        message = message_of(mixed, attempt)
        r = _reduce(hashlib.sha512(prefix + message).digest())
        r_point = sodium.crypto_scalarmult_ed25519_base_noclamp(r)
        k = _challenge(r_point, mixed, message)
        signature = r_point + sodium.crypto_core_ed25519_scalar_add(
            r, sodium.crypto_core_ed25519_scalar_mul(k, a))
        try:
            nacl.signing.VerifyKey(mixed).verify(message, signature)
        except nacl.exceptions.BadSignatureError:
            continue
        return mixed, message, signature
    raise AssertionError("no accepted signature in 256 tries (expected one in eight)")


def vanishing_key_signature(public: bytes, order: int, r: bytes,
                            message_of: MessageOf) -> tuple[bytes, bytes]:
    """(message, signature [r]B ‖ r) under a key `public` of small `order`: the equation
    holds for the first candidate message whose k makes [k]A vanish, i.e. k divisible by
    the order (every k for the neutral element, one in eight for ORDER_8)."""
    r_point = sodium.crypto_scalarmult_ed25519_base_noclamp(r)
    for attempt in range(256):
        message = message_of(public, attempt)
        if int.from_bytes(_challenge(r_point, public, message), "little") % order == 0:
            return message, r_point + r
    raise AssertionError(f"no k divisible by {order} in 256 tries")


def small_order_r_signature(seed: bytes, message: bytes) -> bytes:
    """R = the neutral element, S = k·a: [S]B = [k]A = R + [k]A under `seed`'s key."""
    a, _ = _secret_scalar(seed)
    public = bytes(nacl.signing.SigningKey(seed).verify_key)
    return NEUTRAL + sodium.crypto_core_ed25519_scalar_mul(_challenge(NEUTRAL, public, message), a)


def non_canonical_s(signature: bytes) -> bytes:
    """The same signature with S + L for S: the same scalar mod L, spelt out of range."""
    s = int.from_bytes(signature[32:], "little") + L
    return signature[:32] + s.to_bytes(32, "little")
