"""Keys with a small-order component are refused everywhere, although libsodium's verify
alone accepts some signatures under them (issue "Wire protocol v2", finding 5); and the
invalid.json signatures break only the key validity rule, never Ed25519's equation."""

from __future__ import annotations

import hashlib

import nacl.bindings as sodium
import nacl.signing
import pytest

from proto import Identity, PublicKey, canonical
from proto.errors import SignatureError
from proto.frames import Hello, decode_frame, encode_frame
from proto.handshake import HELLO_DOMAIN, RelayHandshake, ephemeral_keypair, hello_signed_bytes
from proto.limits import DEFAULT_LIMITS
from proto.vectors import load
from proto.vectors.weak_signatures import L, ORDER_8, mixed_order_signature
from proto_support import identity

SIGNATURE_VECTORS = {v["name"]: v for v in load("invalid")["invalid"] if v["check"] == "signature"}


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


MIXED = "public key with a small-order component (A + T8); libsodium alone accepts"
ORDER_8_KEY = "public key of order 8"
NON_CANONICAL_KEY = "non-canonical public key (the neutral element as y = p + 1)"
SMALL_ORDER_R = "signature with a small-order R (the neutral element)"
NON_CANONICAL_S = "signature with a non-canonical S (S + L)"


def _parts(name: str) -> tuple[bytes, bytes, bytes]:
    """(public key, message, signature) of one invalid.json signature vector."""
    vector = SIGNATURE_VECTORS[name]
    return (bytes.fromhex(vector["public_key"]), bytes.fromhex(vector["hex"]),
            bytes.fromhex(vector["signature"]))


def _k(name: str) -> bytes:
    """k = SHA-512(R ‖ A ‖ M) mod L, the challenge of the vector's signature."""
    key, message, signature = _parts(name)
    return sodium.crypto_core_ed25519_scalar_reduce(
        hashlib.sha512(signature[:32] + key + message).digest())


def test_the_vectors_cover_each_part_of_the_rule() -> None:
    names = [MIXED, ORDER_8_KEY, NON_CANONICAL_KEY, SMALL_ORDER_R, NON_CANONICAL_S]
    assert sorted(SIGNATURE_VECTORS) == sorted(names)
    for name in names:
        key, message, signature = _parts(name)
        with pytest.raises(SignatureError):
            PublicKey(key).verify(message, signature)


def test_the_mixed_order_vector_is_one_libsodium_alone_accepts() -> None:
    key, message, signature = _parts(MIXED)
    nacl.signing.VerifyKey(key).verify(message, signature)
    assert not PublicKey(key).is_valid_point()


@pytest.mark.parametrize("name", [ORDER_8_KEY, NON_CANONICAL_KEY])
def test_the_small_order_key_vectors_satisfy_the_equation(name: str) -> None:
    """S = r and R = [r]B, and [k]A vanishes: for the neutral element always, for an
    order-8 point when 8 divides k."""
    key, _message, signature = _parts(name)
    assert sodium.crypto_scalarmult_ed25519_base_noclamp(signature[32:]) == signature[:32]
    if key == ORDER_8:
        assert int.from_bytes(_k(name), "little") % 8 == 0
    else:
        assert int.from_bytes(key, "little") == 2**255 - 19 + 1  # y = p + 1: out of range


def test_the_small_order_r_vector_satisfies_the_equation() -> None:
    """R is the neutral element and [S]B = [k]A: only the small-order R check refuses it."""
    key, _message, signature = _parts(SMALL_ORDER_R)
    assert signature[:32] == (1).to_bytes(32, "little")
    assert sodium.crypto_scalarmult_ed25519_base_noclamp(signature[32:]) == (
        sodium.crypto_scalarmult_ed25519_noclamp(_k(SMALL_ORDER_R), key))


def test_the_non_canonical_s_vector_is_a_valid_signature_once_s_is_reduced() -> None:
    key, message, signature = _parts(NON_CANONICAL_S)
    s = int.from_bytes(signature[32:], "little")
    assert s >= L
    nacl.signing.VerifyKey(key).verify(message, signature[:32] + (s - L).to_bytes(32, "little"))
