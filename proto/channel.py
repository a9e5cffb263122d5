"""The channel after the handshake: every frame sealed, in order, in both directions.

The handshake leaves each side with two keys (`handshake.Established.channel`),
one per direction, from libsodium's `crypto_kx` over the two ephemeral X25519
keys that both handshake signatures cover.  Every later WebSocket message is
one frame sealed with ChaCha20-Poly1305 (IETF) under the sender's direction
key, its nonce the count of messages sent before it (as Noise's CipherState
does); in the detached layout a device may negotiate (`Layout`), a stream chunk
travels after its sealed head, authenticated but not encrypted again.  A proxy
on the path, even one that terminated TLS, can then neither read (a detached
chunk only as the ciphertext its two ends sealed), forge, drop, replay nor
reorder frames: the receiver's next message fails to open and the connection
ends.  It can only cut the connection.

Pure: the counters are the only state; no clock, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import nacl.bindings
from nacl._sodium import ffi, lib

from .errors import UnauthenticatedError
from .frames import Frame, encode_frame, split_frame

KEY_BYTES = nacl.bindings.crypto_aead_chacha20poly1305_ietf_KEYBYTES
TAG_BYTES = nacl.bindings.crypto_aead_chacha20poly1305_ietf_ABYTES
# The WebSocket subprotocol (RFC 6455 §1.9) a device offers to have stream chunks detached
# (`Layout.DETACHED`).  A relay that knows it selects it; one that predates it selects none,
# and both sides keep the whole-frame layout, so old and new peers meet without a word.
DETACHED_SUBPROTOCOL = "continuum.v2.detached"
LENGTH_BYTES = 4  # the detached layout's big-endian length of the detached chunk
# The most a channel message adds to its frame, in either layout.
OVERHEAD_BYTES = TAG_BYTES + LENGTH_BYTES
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

    def seal(self, plaintext: bytes, associated: bytes = b"") -> bytes:
        """`plaintext` sealed, and `associated` authenticated with it but not encrypted."""
        if type(plaintext) is not bytes or type(associated) is not bytes:
            raise TypeError("a channel seals bytes")
        size = len(plaintext) + TAG_BYTES
        ciphertext = ffi.new("unsigned char[]", size)
        if lib.crypto_aead_chacha20poly1305_ietf_encrypt(
                ciphertext, ffi.NULL, plaintext, len(plaintext), associated or ffi.NULL,
                len(associated), ffi.NULL, self._nonce(), self._key) != 0:
            raise ChannelError("libsodium refused to seal")  # it never does for these sizes
        self._count += 1
        return ffi.buffer(ciphertext, size)[:]

    def open(self, ciphertext: bytes, associated: bytes = b"") -> bytes:
        if type(ciphertext) is not bytes or len(ciphertext) < TAG_BYTES:
            raise self._unopened()
        size = len(ciphertext) - TAG_BYTES
        plaintext = ffi.new("unsigned char[]", size)
        if lib.crypto_aead_chacha20poly1305_ietf_decrypt(
                plaintext, ffi.NULL, ffi.NULL, ciphertext, len(ciphertext),
                associated or ffi.NULL, len(associated), self._nonce(), self._key) != 0:
            raise self._unopened()
        self._count += 1
        return ffi.buffer(plaintext, size)[:]

    def _unopened(self) -> ChannelError:
        return ChannelError(f"message {self._count} of the channel does not open: altered,"
                            " replayed, reordered or not from the peer")


class Layout(Enum):
    """How a frame lies in its channel message (SPEC §8).

    SEALED: the whole frame sealed, the default.  DETACHED: a stream chunk, which is already
    sealed end to end (secretstream, SPEC §16), travels after its sealed head as the AEAD's
    associated data: authenticated, in order, by the channel as before, but not encrypted
    a second time.  The channel's seals and opens were about half a tunnel's CPU per byte
    (four per chunk: the sender seals, the relay opens and seals again, the receiver
    opens), and authenticating 64 KiB alone (Poly1305) costs about a third of sealing it.
    """

    SEALED = auto()
    DETACHED = auto()

    @classmethod
    def negotiated(cls, subprotocol: str | None) -> Layout:
        """The layout of a connection whose WebSocket handshake selected `subprotocol`."""
        return cls.DETACHED if subprotocol == DETACHED_SUBPROTOCOL else cls.SEALED


class FrameSealer:
    """The sending side of one direction: a frame in, its channel message out."""

    __slots__ = ("_cipher", "_detached")

    def __init__(self, cipher: CipherState, layout: Layout) -> None:
        self._cipher, self._detached = cipher, layout is Layout.DETACHED

    def seal(self, frame: Frame) -> bytes:
        if not self._detached:
            return self._cipher.seal(encode_frame(frame))
        head, detached = split_frame(frame)
        return (len(detached).to_bytes(LENGTH_BYTES, "big") + self._cipher.seal(head, detached)
                + detached)


class FrameOpener:
    """The receiving side of one direction: a channel message in, the frame's bytes out."""

    __slots__ = ("_cipher", "_detached")

    def __init__(self, cipher: CipherState, layout: Layout) -> None:
        self._cipher, self._detached = cipher, layout is Layout.DETACHED

    def open(self, message: bytes) -> tuple[bytes, bytes]:
        """(frame, b"") or, for a detached chunk, (the frame's head, the chunk), as
        `frames.decode_frame` takes them; ChannelError if the message does not open."""
        if not self._detached:
            return self._cipher.open(message), b""
        if type(message) is not bytes or len(message) < OVERHEAD_BYTES:
            raise self._cipher._unopened()
        size = int.from_bytes(message[:LENGTH_BYTES], "big")
        if size > len(message) - OVERHEAD_BYTES:
            raise self._cipher._unopened()
        end = len(message) - size
        detached = message[end:]
        return self._cipher.open(message[LENGTH_BYTES:end], detached), detached


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
