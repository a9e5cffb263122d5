"""The handshake, CHALLENGE → HELLO → WELCOME, as one small state machine per side.

Every party that connects or accepts (the relay, the device library, the
test wire client, the load generator) runs these two objects, so there is
one implementation of the exchange and of what it proves:

    relay  → device   CHALLENGE [1, version, relay_nonce(32), relay_key(32), relay_eph(32)]
    device → relay    HELLO     [2, device_key(32), client_nonce(32), device_eph(32), sig(64)]
    relay  → device   WELCOME   [3, server_time_ms, max_envelope_bytes, relay_sig(64)]

HELLO's signature proves the device holds its key, WELCOME's that the relay
holds the key it announced.  Each signs the whole transcript up to itself
(`transcript`): both nonces, both identity keys, both ephemeral keys, the
version, and in WELCOME the relay's clock and limit, so no field can be
changed in transit and neither signature replays on another connection; the
distinct domains stop one being passed off as the other.  The ephemeral
X25519 keys give the connection its channel keys (libsodium `crypto_kx`):
every frame after WELCOME is sealed (`channel`), so a proxy on the path
cannot forge an ACK, an ACCEPTED or an EXPIRY's DELIVER.  A device may pin
the relay keys it accepts; it then refuses any other before sending HELLO.

Pure in the sans-I/O sense: message bytes in, message bytes out; nonces,
ephemeral seeds and the clock come from the caller, so both machines run in
tests without a socket and produce the vectors byte for byte.  The caller
moves the bytes and enforces the deadline (SPEC §8: HELLO within 10 s).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TypeVar

import nacl.bindings

from . import canonical
from .channel import ChannelKeys
from .errors import (AccessListUnavailableError, ErrorCode, NotEnrolledError, ProtocolError,
                     RateLimitedError, RevokedError, UnauthenticatedError, UnexpectedFrameError,
                     error_for_code)
from .frames import NONCE_BYTES, Challenge, Error, Frame, Hello, Welcome, decode_frame, encode_frame
from .keys import Identity, PublicKey
from .limits import PROTOCOL_VERSION, Limits

HELLO_DOMAIN = b"continuum/v2/hello\x00"
WELCOME_DOMAIN = b"continuum/v2/welcome\x00"
EPHEMERAL_SEED_BYTES = nacl.bindings.crypto_kx_SEED_BYTES
# Largest handshake frame either side reads: CHALLENGE is 106 bytes, HELLO 169, WELCOME
# about 85, an ERROR at most 512 characters.  A peer that has not authenticated
# yet never makes the other side buffer or parse more than this.
HANDSHAKE_FRAME_MAX_BYTES = 4096
# Refusals a device can act on (stop retrying this key, or retry later); every
# other failure is UNAUTHENTICATED with the reason in the message (SPEC §8).
_REFUSALS_KEPT = (RevokedError, NotEnrolledError, RateLimitedError, AccessListUnavailableError)
F = TypeVar("F", bound=Frame)


def _transcript(challenge: Challenge, device_key: PublicKey, client_nonce: bytes,
                device_ephemeral: bytes) -> list:
    return [challenge.protocol_version, challenge.relay_nonce, challenge.relay_key.raw,
            challenge.relay_ephemeral, device_key.raw, client_nonce, device_ephemeral]


def hello_signed_bytes(challenge: Challenge, device_key: PublicKey, client_nonce: bytes,
                       device_ephemeral: bytes) -> bytes:
    """HELLO_DOMAIN ‖ canonical CBOR of the transcript so far (CHALLENGE, then HELLO's fields)."""
    return HELLO_DOMAIN + canonical.encode(
        _transcript(challenge, device_key, client_nonce, device_ephemeral))


def welcome_signed_bytes(challenge: Challenge, hello: Hello, server_time_ms: int,
                         max_envelope_bytes: int) -> bytes:
    """WELCOME_DOMAIN ‖ canonical CBOR of the whole transcript, WELCOME's fields included."""
    return WELCOME_DOMAIN + canonical.encode(
        [*_transcript(challenge, hello.device_key, hello.client_nonce, hello.device_ephemeral),
         server_time_ms, max_envelope_bytes])


def ephemeral_keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(public, secret) X25519 pair for one connection, from the caller's random seed."""
    if len(seed) != EPHEMERAL_SEED_BYTES:
        raise ValueError(f"an ephemeral seed is {EPHEMERAL_SEED_BYTES} bytes")
    return nacl.bindings.crypto_kx_seed_keypair(seed)


def sign_hello(challenge: Challenge, identity: Identity, client_nonce: bytes,
               device_ephemeral: bytes) -> Hello:
    """The HELLO that answers `challenge` as `identity`."""
    signed = hello_signed_bytes(challenge, identity.public, client_nonce, device_ephemeral)
    return Hello(identity.public, client_nonce, device_ephemeral, identity.sign(signed))


def _channel_keys_of_device(public: bytes, secret: bytes, relay_ephemeral: bytes) -> ChannelKeys:
    # libsodium refuses a small-order peer key (it would fix the shared secret).
    try:
        receive, send = nacl.bindings.crypto_kx_client_session_keys(public, secret,
                                                                    relay_ephemeral)
    except Exception:
        raise UnauthenticatedError("the relay's ephemeral key gives no shared secret") from None
    return ChannelKeys(device_to_relay=send, relay_to_device=receive)


def _channel_keys_of_relay(public: bytes, secret: bytes, device_ephemeral: bytes) -> ChannelKeys:
    try:
        receive, send = nacl.bindings.crypto_kx_server_session_keys(public, secret,
                                                                    device_ephemeral)
    except Exception:
        raise UnauthenticatedError("the device's ephemeral key gives no shared secret") from None
    return ChannelKeys(device_to_relay=receive, relay_to_device=send)


@dataclass(frozen=True)
class Established:
    """What a completed handshake proved and agreed, the same on both sides."""

    device_key: PublicKey
    relay_key: PublicKey
    # The relay's clock when it sent WELCOME: devices stamp envelopes in relay time.
    server_time_ms: int
    # Envelope limit for this connection: the relay's, bounded on a device by its own cap.
    limits: Limits
    # The keys of the sealed channel every later frame travels in (never logged).
    channel: ChannelKeys = field(repr=False)
    # Device side: the relay announced more than this device's cap (larger deliveries
    # cannot be read, so the device should warn its operator).
    relay_limit_above_cap: bool = False


class HandshakeState(Enum):
    AWAITING_CHALLENGE = auto()  # device: nothing received yet
    AWAITING_HELLO = auto()      # relay: CHALLENGE sent
    AWAITING_WELCOME = auto()    # device: HELLO sent
    HELLO_READ = auto()          # relay: HELLO parsed, its signature not yet checked
    HELLO_VERIFIED = auto()      # relay: the device proved its key; WELCOME or a refusal next
    ESTABLISHED = auto()
    FAILED = auto()


def _expect_state(actual: HandshakeState, expected: HandshakeState, step: str) -> None:
    if actual is not expected:
        raise RuntimeError(f"handshake {step} called in state {actual.name}")


class RelayHandshake:
    """The relay's side: send CHALLENGE, read and verify HELLO, then WELCOME or a refusal.

    Between reading HELLO and verifying it the relay may decide not to spend a
    signature check on the claimed key; between verifying and `welcome` it
    decides whether the proven key may connect (access list).  `refuse` is
    the answer if not.
    """

    def __init__(self, identity: Identity, relay_nonce: bytes, ephemeral_seed: bytes,
                 limits: Limits) -> None:
        if len(relay_nonce) != NONCE_BYTES:
            raise ValueError(f"relay nonce must be {NONCE_BYTES} bytes")
        self._identity = identity
        self._limits = limits
        self._ephemeral = ephemeral_keypair(ephemeral_seed)
        self._challenge = Challenge(PROTOCOL_VERSION, relay_nonce, identity.public,
                                    self._ephemeral[0])
        self._hello: Hello | None = None
        self.state = HandshakeState.AWAITING_HELLO

    def challenge(self) -> bytes:
        """The first frame of the connection: send it at once."""
        return encode_frame(self._challenge)

    def receive_hello(self, data: bytes) -> PublicKey:
        """`read_hello` then `verify_hello`: the key the device proved."""
        self.read_hello(data)
        return self.verify_hello()

    def read_hello(self, data: bytes) -> PublicKey:
        """The key HELLO *claims*, not yet proven: the caller may decide it will not spend a
        signature check on it (a budget for unknown keys) before calling `verify_hello`.

        Raises DecodeError subclasses for bytes that are not a HELLO frame and
        UnexpectedFrameError for another frame.
        """
        _expect_state(self.state, HandshakeState.AWAITING_HELLO, "read_hello")
        self.state = HandshakeState.FAILED  # until proven otherwise
        self._hello = _expect(decode_frame(data, HANDSHAKE_FRAME_MAX_BYTES), Hello,
                              peer_is_relay=False)
        self.state = HandshakeState.HELLO_READ
        return self._hello.device_key

    def verify_hello(self) -> PublicKey:
        """The key the device proved; SignatureError if HELLO does not sign this connection's
        transcript with that key."""
        _expect_state(self.state, HandshakeState.HELLO_READ, "verify_hello")
        assert self._hello is not None
        hello = self._hello
        self.state = HandshakeState.FAILED
        hello.device_key.verify(
            hello_signed_bytes(self._challenge, hello.device_key, hello.client_nonce,
                               hello.device_ephemeral), hello.signature)
        self.state = HandshakeState.HELLO_VERIFIED
        return hello.device_key

    def welcome(self, now_ms: int) -> tuple[bytes, Established]:
        """WELCOME to send, and the connection's terms and channel keys."""
        _expect_state(self.state, HandshakeState.HELLO_VERIFIED, "welcome")
        assert self._hello is not None
        hello, limit = self._hello, self._limits.max_envelope_bytes
        self.state = HandshakeState.FAILED
        keys = _channel_keys_of_relay(*self._ephemeral, hello.device_ephemeral)
        signature = self._identity.sign(welcome_signed_bytes(self._challenge, hello, now_ms, limit))
        self.state = HandshakeState.ESTABLISHED
        return (encode_frame(Welcome(now_ms, limit, signature)),
                Established(hello.device_key, self._identity.public, now_ms, self._limits, keys))

    def refuse(self, error: ProtocolError) -> bytes:
        """The ERROR frame that ends a failed handshake (the caller then closes, 1008).

        REVOKED, NOT_ENROLLED, RATE_LIMITED and ACCESS_LIST_UNAVAILABLE keep their codes;
        every other failure is UNAUTHENTICATED, with the reason in the message.
        """
        self.state = HandshakeState.FAILED
        code = error.code if isinstance(error, _REFUSALS_KEPT) else ErrorCode.UNAUTHENTICATED
        return encode_frame(Error(None, int(code), error.message))


class DeviceHandshake:
    """The device's side: answer CHALLENGE with HELLO, then verify WELCOME.

    `max_envelope_bytes` is this device's own cap: the connection's limit is
    the relay's announced one, never more than that.  With `pinned_relay_keys`
    the device talks only to relays holding one of those keys.
    """

    def __init__(self, identity: Identity, client_nonce: bytes, ephemeral_seed: bytes,
                 max_envelope_bytes: int,
                 pinned_relay_keys: Collection[PublicKey] | None = None) -> None:
        if len(client_nonce) != NONCE_BYTES:
            raise ValueError(f"client nonce must be {NONCE_BYTES} bytes")
        self._identity = identity
        self._client_nonce = client_nonce
        self._ephemeral = ephemeral_keypair(ephemeral_seed)
        self._cap = max_envelope_bytes
        self._pinned = pinned_relay_keys
        self._challenge: Challenge | None = None
        self._hello: Hello | None = None
        self.state = HandshakeState.AWAITING_CHALLENGE

    def receive_challenge(self, data: bytes) -> bytes:
        """The HELLO to send; raises the relay's refusal (an ERROR frame), why CHALLENGE is
        bad, or UnauthenticatedError for a relay key that is not pinned."""
        _expect_state(self.state, HandshakeState.AWAITING_CHALLENGE, "receive_challenge")
        self.state = HandshakeState.FAILED
        challenge = _expect(decode_frame(data, HANDSHAKE_FRAME_MAX_BYTES), Challenge,
                            peer_is_relay=True)
        if self._pinned is not None and challenge.relay_key not in self._pinned:
            raise UnauthenticatedError(
                f"relay key {challenge.relay_key.text} is not one this device trusts")
        self._challenge = challenge
        self._hello = sign_hello(challenge, self._identity, self._client_nonce,
                                 self._ephemeral[0])
        self.state = HandshakeState.AWAITING_WELCOME
        return encode_frame(self._hello)

    def receive_welcome(self, data: bytes) -> Established:
        """The connection's terms; raises the relay's refusal, or SignatureError if the relay
        did not sign this transcript with the key its CHALLENGE announced."""
        _expect_state(self.state, HandshakeState.AWAITING_WELCOME, "receive_welcome")
        assert self._challenge is not None and self._hello is not None
        self.state = HandshakeState.FAILED
        welcome = _expect(decode_frame(data, HANDSHAKE_FRAME_MAX_BYTES), Welcome,
                          peer_is_relay=True)
        challenge = self._challenge
        challenge.relay_key.verify(
            welcome_signed_bytes(challenge, self._hello, welcome.server_time_ms,
                                 welcome.max_envelope_bytes), welcome.relay_signature)
        keys = _channel_keys_of_device(*self._ephemeral, challenge.relay_ephemeral)
        self.state = HandshakeState.ESTABLISHED
        limit = min(welcome.max_envelope_bytes, self._cap)
        return Established(self._identity.public, challenge.relay_key, welcome.server_time_ms,
                           Limits(max_envelope_bytes=limit), keys,
                           relay_limit_above_cap=welcome.max_envelope_bytes > self._cap)


def _expect(frame: Frame, expected: type[F], *, peer_is_relay: bool) -> F:
    """`frame` if it is an `expected`.  A relay's ERROR instead is its refusal, raised as
    the matching exception; a device may not send ERROR, so from it that is unexpected."""
    if isinstance(frame, expected):
        return frame
    if peer_is_relay and isinstance(frame, Error):
        raise error_for_code(frame.code, frame.message)
    raise UnexpectedFrameError(
        f"expected {expected.__name__.upper()}, got {type(frame).__name__.upper()}")
