"""The channel after the handshake: every frame sealed, in order, in both directions.

The handshake leaves each side with two keys (`handshake.Established.channel`),
one per direction, from libsodium's `crypto_kx` over the two ephemeral X25519
keys that both handshake signatures cover.  Every later WebSocket message is
one frame sealed with ChaCha20-Poly1305 (IETF) under the sender's direction
key, its nonce the count of messages sent before it (as Noise's CipherState
does).  A proxy on the path, even one that terminated TLS, can then neither
read, forge, drop, replay nor reorder frames: the receiver's next message
fails to open and the connection ends.  It can only cut the connection.

Pure: the counters are the only state; no clock, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions

from .errors import UnauthenticatedError

KEY_BYTES = nacl.bindings.crypto_aead_chacha20poly1305_ietf_KEYBYTES
TAG_BYTES = nacl.bindings.crypto_aead_chacha20poly1305_ietf_ABYTES
_MAX_MESSAGES = 2**64 - 1


class ChannelError(UnauthenticatedError):
    """A message that does not open under the expected key and count: tampering, a replay,
    a dropped or reordered frame, or bytes that are not this channel's.  Fatal for the
    connection, since the peer (or whatever sits between) can no longer be trusted."""


class CipherState:
    """One direction of the channel: a key and the count of messages so far."""

    __slots__ = ("_key", "_count")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a channel key is {KEY_BYTES} bytes")
        self._key, self._count = key, 0

    def _nonce(self) -> bytes:
        if self._count >= _MAX_MESSAGES:
            raise ChannelError("the channel has carried its last message")
        return b"\x00\x00\x00\x00" + self._count.to_bytes(8, "little")

    def seal(self, plaintext: bytes) -> bytes:
        ciphertext = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            plaintext, None, self._nonce(), self._key)
        self._count += 1
        return ciphertext

    def open(self, ciphertext: bytes) -> bytes:
        try:
            plaintext = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
                ciphertext, None, self._nonce(), self._key)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise ChannelError(
                f"message {self._count} of the channel does not open: altered, replayed,"
                " reordered or not from the peer") from None
        self._count += 1
        return plaintext


@dataclass(frozen=True)
class ChannelKeys:
    """The two direction keys both sides derived; each side uses them crosswise."""

    device_to_relay: bytes = field(repr=False)
    relay_to_device: bytes = field(repr=False)

    def for_relay(self) -> tuple[CipherState, CipherState]:
        """(send, receive) states of the relay's side."""
        return CipherState(self.relay_to_device), CipherState(self.device_to_relay)

    def for_device(self) -> tuple[CipherState, CipherState]:
        """(send, receive) states of the device's side."""
        return CipherState(self.device_to_relay), CipherState(self.relay_to_device)
