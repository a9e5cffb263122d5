"""Keys with a small-order component are refused everywhere, although libsodium's verify
alone accepts some signatures under them (issue "Wire protocol v2", finding 5)."""

from __future__ import annotations

import hashlib

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing
import pytest

from proto import Identity, PublicKey, canonical
from proto.errors import SignatureError
from proto.frames import Hello, decode_frame, encode_frame
from proto.handshake import HELLO_DOMAIN, RelayHandshake, ephemeral_keypair, hello_signed_bytes
from proto.limits import DEFAULT_LIMITS
from proto_support import identity

# A point of order 8: adding it to a public key gives a key libsodium decodes and, for one
# message in eight, verifies under.
ORDER_8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")


def mixed_order_signature(seed: bytes, message_of) -> tuple[bytes, bytes, bytes]:
    """(A + T8, a message, a signature libsodium accepts under A + T8), built as an attacker
    holding the secret for A does: the usual Ed25519 signature with A + T8 in the hash."""
    digest = hashlib.sha512(seed).digest()
    scalar = bytearray(digest[:32])
    scalar[0] &= 248
    scalar[31] = (scalar[31] & 127) | 64
    a = sodium.crypto_core_ed25519_scalar_reduce(bytes(scalar) + bytes(32))
    public = bytes(nacl.signing.SigningKey(seed).verify_key)
    mixed = sodium.crypto_core_ed25519_add(public, ORDER_8)
    for attempt in range(256):
        message = message_of(mixed, attempt)
        r = sodium.crypto_core_ed25519_scalar_reduce(hashlib.sha512(digest[32:] + message).digest())
        big_r = sodium.crypto_scalarmult_ed25519_base_noclamp(r)
        k = sodium.crypto_core_ed25519_scalar_reduce(hashlib.sha512(big_r + mixed + message).digest())
        signature = big_r + sodium.crypto_core_ed25519_scalar_add(
            r, sodium.crypto_core_ed25519_scalar_mul(k, a))
        try:
            nacl.signing.VerifyKey(mixed).verify(message, signature)
        except nacl.exceptions.BadSignatureError:
            continue
        return mixed, message, signature
    raise AssertionError("no accepted signature in 256 tries (expected one in eight)")


def test_libsodium_alone_accepts_a_signature_under_a_mixed_order_key_and_we_do_not() -> None:
    mixed, message, signature = mixed_order_signature(b"\x07" * 32,
                                                      lambda key, n: b"open valve %d" % n)
    nacl.signing.VerifyKey(mixed).verify(message, signature)  # libsodium: fine
    assert not PublicKey(mixed).is_valid_point()
    with pytest.raises(SignatureError, match="prime-order"):
        PublicKey(mixed).verify(message, signature)


def test_a_relay_refuses_a_hello_from_a_mixed_order_key() -> None:
    relay_identity, nonce, seed = identity("relay"), b"\x01" * 32, b"\x02" * 32
    ephemeral = ephemeral_keypair(b"\x03" * 32)[0]
    relay = RelayHandshake(relay_identity, nonce, seed, DEFAULT_LIMITS)
    challenge = decode_frame(relay.challenge(), 4096)
    client_nonce = b"\x04" * 32
    mixed, message, signature = mixed_order_signature(
        b"\x05" * 32, lambda key, n: hello_signed_bytes(
            challenge, PublicKey(key), client_nonce[:31] + bytes([n]), ephemeral))
    hello = Hello(PublicKey(mixed), _nonce_of(message), ephemeral, signature)
    with pytest.raises(SignatureError):
        relay.receive_hello(encode_frame(hello))


def _nonce_of(signed: bytes) -> bytes:
    """The client nonce inside HELLO's signed transcript (its 6th CBOR element)."""
    return canonical.decode(signed[len(HELLO_DOMAIN):], max_size=4096, what="transcript")[5]


def test_real_keys_are_valid_points() -> None:
    assert Identity.generate().public.is_valid_point()
