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
from nacl._sodium import ffi, lib

from .errors import UnauthenticatedError

KEY_BYTES = nacl.bindings.crypto_aead_chacha20poly1305_ietf_KEYBYTES
TAG_BYTES = nacl.bindings.crypto_aead_chacha20poly1305_ietf_ABYTES
_MAX_MESSAGES = 2**64 - 1
_NONCE_PREFIX = bytes(4)


class ChannelError(UnauthenticatedError):
    """A message that does not open under the expected key and count: tampering, a replay,
    a dropped or reordered frame, or bytes that are not this channel's.  Fatal for the
    connection, since the peer (or whatever sits between) can no longer be trusted."""


class CipherState:
    """One direction of the channel: a key and the count of messages so far.

    libsodium is called through PyNaCl's own cffi binding (`nacl._sodium`), not its
    `nacl.bindings` wrappers: those format three error messages on every call whether
    they raise or not, which was over half of a seal's or open's cost, and each message
    a relay carries is opened or sealed four times (SEND, ACK in; ACCEPTED, DELIVER out).
    Same function, same arguments, same bytes.
    """

    __slots__ = ("_key", "_count")

    def __init__(self, key: bytes) -> None:
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise ValueError(f"a channel key is {KEY_BYTES} bytes")
        self._key, self._count = key, 0

    def _nonce(self) -> bytes:
        if self._count >= _MAX_MESSAGES:
            raise ChannelError("the channel has carried its last message")
        return _NONCE_PREFIX + self._count.to_bytes(8, "little")

    def seal(self, plaintext: bytes) -> bytes:
        if type(plaintext) is not bytes:
            raise TypeError("a channel seals bytes")
        size = len(plaintext) + TAG_BYTES
        ciphertext = ffi.new("unsigned char[]", size)
        if lib.crypto_aead_chacha20poly1305_ietf_encrypt(
                ciphertext, ffi.NULL, plaintext, len(plaintext), ffi.NULL, 0, ffi.NULL,
                self._nonce(), self._key) != 0:
            raise ChannelError("libsodium refused to seal")  # it never does for these sizes
        self._count += 1
        return ffi.buffer(ciphertext, size)[:]

    def open(self, ciphertext: bytes) -> bytes:
        if type(ciphertext) is not bytes or len(ciphertext) < TAG_BYTES:
            raise self._unopened()
        size = len(ciphertext) - TAG_BYTES
        plaintext = ffi.new("unsigned char[]", size)
        if lib.crypto_aead_chacha20poly1305_ietf_decrypt(
                plaintext, ffi.NULL, ffi.NULL, ciphertext, len(ciphertext), ffi.NULL, 0,
                self._nonce(), self._key) != 0:
            raise self._unopened()
        self._count += 1
        return ffi.buffer(plaintext, size)[:]

    def _unopened(self) -> ChannelError:
        return ChannelError(f"message {self._count} of the channel does not open: altered,"
                            " replayed, reordered or not from the peer")


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
