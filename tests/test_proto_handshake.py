"""The two handshake state machines and the sealed channel, message by message, no socket."""

from __future__ import annotations

from dataclasses import replace

import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import canonical
from proto.errors import (DecodeError, ErrorCode, NotEnrolledError, OversizeError, ProtocolError,
                          RevokedError, SignatureError, UnauthenticatedError, UnexpectedFrameError,
                          UnsupportedVersionError)
from proto.frames import Challenge, Error, Hello, Send, Welcome, decode_frame, encode_frame
from proto import canonical as cbor
from proto.channel import ChannelError, CipherState
from proto.handshake import (HANDSHAKE_FRAME_MAX_BYTES, HELLO_DOMAIN, WELCOME_DOMAIN,
                             DeviceHandshake, HandshakeState, RelayHandshake, ephemeral_keypair,
                             hello_signed_bytes, sign_hello, welcome_signed_bytes)
from proto.limits import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits
from proto_support import ALICE, BOB, MALLORY, identity

RELAY = identity("relay")
RELAY_NONCE = bytes(range(32))
CLIENT_NONCE = bytes(range(32, 64))
RELAY_SEED, DEVICE_SEED = b"\x51" * 32, b"\x52" * 32
RELAY_EPH, DEVICE_EPH = ephemeral_keypair(RELAY_SEED)[0], ephemeral_keypair(DEVICE_SEED)[0]
NOW = 1_700_000_000_000


def pair(relay_limits: Limits = DEFAULT_LIMITS, device_cap: int = 1 << 20, device=ALICE,
         pinned=None) -> tuple[RelayHandshake, DeviceHandshake]:
    return (RelayHandshake(RELAY, RELAY_NONCE, RELAY_SEED, relay_limits),
            DeviceHandshake(device, CLIENT_NONCE, DEVICE_SEED, device_cap, pinned))


def challenge_of(relay_key=RELAY.public, nonce: bytes = RELAY_NONCE) -> Challenge:
    return Challenge(PROTOCOL_VERSION, nonce, relay_key, RELAY_EPH)


def decoded(data: bytes):
    return decode_frame(data, HANDSHAKE_FRAME_MAX_BYTES)


def test_exchange_establishes_the_same_terms_on_both_sides() -> None:
    relay, device = pair()
    hello = device.receive_challenge(relay.challenge())
    assert relay.receive_hello(hello) == ALICE.public
    welcome, relay_terms = relay.welcome(NOW)
    device_terms = device.receive_welcome(welcome)
    assert relay_terms == device_terms
    assert device_terms.device_key == ALICE.public and device_terms.relay_key == RELAY.public
    assert device_terms.server_time_ms == NOW
    assert relay.state is device.state is HandshakeState.ESTABLISHED


def test_signed_transcripts_cover_every_field_both_sides_sent() -> None:
    challenge = challenge_of()
    transcript = [PROTOCOL_VERSION, RELAY_NONCE, RELAY.public.raw, RELAY_EPH, ALICE.public.raw,
                  CLIENT_NONCE, DEVICE_EPH]
    assert hello_signed_bytes(challenge, ALICE.public, CLIENT_NONCE, DEVICE_EPH) == (
        HELLO_DOMAIN + cbor.encode(transcript))
    hello = Hello(ALICE.public, CLIENT_NONCE, DEVICE_EPH, bytes(64))
    assert welcome_signed_bytes(challenge, hello, NOW, 65_536) == (
        WELCOME_DOMAIN + cbor.encode([*transcript, NOW, 65_536]))


@pytest.mark.parametrize("field,value", [("server_time_ms", NOW + 250_000),
                                         ("max_envelope_bytes", 600)])
def test_a_welcome_changed_in_transit_is_refused(field: str, value: int) -> None:
    """Before: a proxy shifted a device's clock by 250 s and shrank its limit to 600 B."""
    relay, device = pair()
    relay.receive_hello(device.receive_challenge(relay.challenge()))
    welcome = decoded(relay.welcome(NOW)[0])
    with pytest.raises(SignatureError):
        device.receive_welcome(encode_frame(replace(welcome, **{field: value})))


def test_a_pinned_device_refuses_any_other_relay_before_saying_hello() -> None:
    relay, device = pair(pinned={MALLORY.public})
    with pytest.raises(UnauthenticatedError, match="not one this device trusts"):
        device.receive_challenge(relay.challenge())
    relay, device = pair(pinned={RELAY.public})
    assert decoded(device.receive_challenge(relay.challenge()))


def test_the_channel_seals_each_direction_and_any_tampering_ends_it() -> None:
    relay, device = pair()
    relay.receive_hello(device.receive_challenge(relay.challenge()))
    welcome, relay_terms = relay.welcome(NOW)
    device_terms = device.receive_welcome(welcome)
    device_send, device_receive = device_terms.channel.for_device()
    relay_send, relay_receive = relay_terms.channel.for_relay()
    first, second = device_send.seal(b"ack 1"), device_send.seal(b"ack 2")
    assert relay_receive.open(first) == b"ack 1" and relay_receive.open(second) == b"ack 2"
    assert device_receive.open(relay_send.seal(b"deliver")) == b"deliver"
    with pytest.raises(ChannelError):
        relay_receive.open(second)  # replayed
    relay_send2, relay_receive2 = relay_terms.channel.for_relay()
    third, fourth = device_send.seal(b"3"), device_send.seal(b"4")
    del third
    with pytest.raises(ChannelError):
        relay_receive2.open(fourth)  # dropped one before it (a fresh state expects message 0)
    flipped = bytearray(relay_send2.seal(b"accepted"))
    flipped[0] ^= 1
    with pytest.raises(ChannelError):
        device_terms.channel.for_device()[1].open(bytes(flipped))
    assert "relay_to_device" not in repr(relay_terms)  # keys never reach a log line


@pytest.mark.parametrize("size", [0, 1, 600, 70_000])
def test_the_channel_is_libsodiums_chacha20_poly1305_ietf_counted_nonces(size: int) -> None:
    """Sealed and opened by libsodium directly (`channel.CipherState`): the very bytes of
    PyNaCl's binding of the same function, nonce = 4 zero bytes ‖ count, little-endian."""
    key = bytes(range(32))
    sender, receiver = CipherState(key), CipherState(key)
    for count in range(3):
        plaintext = bytes([count]) * size
        nonce = bytes(4) + count.to_bytes(8, "little")
        sealed = sender.seal(plaintext)
        assert sealed == nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            plaintext, None, nonce, key)
        assert receiver.open(sealed) == plaintext


@pytest.mark.parametrize("garbage", [b"", b"x" * 15, b"x" * 16, bytearray(32), "x" * 32],
                         ids=["empty", "shorter than a tag", "a tag of zeros", "bytearray", "str"])
def test_the_channel_refuses_what_is_not_a_sealed_message(garbage) -> None:
    receiver = CipherState(bytes(32))
    with pytest.raises(ChannelError):
        receiver.open(garbage)
    plaintext = b"still message 0"
    assert receiver.open(CipherState(bytes(32)).seal(plaintext)) == plaintext


@pytest.mark.parametrize("announced,cap,limit,above", [
    (65_536, 1 << 20, 65_536, False),       # the relay's limit when it is below the cap
    (262_144, 1 << 20, 262_144, False),     # a relay above the protocol default: followed
    (262_144, 100_000, 100_000, True),      # never above the device's own cap
])
def test_device_takes_the_announced_limit_bounded_by_its_cap(announced: int, cap: int,
                                                              limit: int, above: bool) -> None:
    relay, device = pair(Limits(max_envelope_bytes=announced), cap)
    relay.receive_hello(device.receive_challenge(relay.challenge()))
    welcome, _ = relay.welcome(NOW)
    terms = device.receive_welcome(welcome)
    assert terms.limits.max_envelope_bytes == limit
    assert terms.relay_limit_above_cap is above


# -- the relay refuses -----------------------------------------------------------------------

def _honest_hello() -> Hello:
    return sign_hello(challenge_of(), ALICE, CLIENT_NONCE, DEVICE_EPH)


@pytest.mark.parametrize("hello,error", [
    (b"", DecodeError),
    (b"\x00", DecodeError),
    (encode_frame(Send(b"x")), UnexpectedFrameError),
    (encode_frame(Error(None, 13, "no")), UnexpectedFrameError),       # a device sends no ERROR
    (b"\x82" + b"\x00" * HANDSHAKE_FRAME_MAX_BYTES, OversizeError),    # never parsed past the cap
    (encode_frame(replace(_honest_hello(), client_nonce=bytes(32))), SignatureError),
    (encode_frame(replace(_honest_hello(), device_key=BOB.public)), SignatureError),
    (encode_frame(sign_hello(challenge_of(nonce=bytes(32)), ALICE, CLIENT_NONCE, DEVICE_EPH)),
     SignatureError),                                                  # another connection's
    (encode_frame(sign_hello(challenge_of(MALLORY.public), ALICE, CLIENT_NONCE, DEVICE_EPH)),
     SignatureError),                                                  # for another relay
    (encode_frame(replace(_honest_hello(), device_ephemeral=RELAY_EPH)), SignatureError),
])
def test_relay_refuses_a_bad_hello(hello: bytes, error: type) -> None:
    relay, _ = pair()
    with pytest.raises(error):
        relay.receive_hello(hello)
    assert relay.state is HandshakeState.FAILED
    with pytest.raises(RuntimeError):
        relay.welcome(NOW)  # a failed handshake can never be welcomed


def test_a_welcome_signature_cannot_pass_as_a_hello() -> None:
    """Domain separation: the relay's own signature is no device's HELLO."""
    relay, device = pair(device=RELAY)
    relay.receive_hello(device.receive_challenge(relay.challenge()))
    welcome = decoded(relay.welcome(NOW)[0])
    assert isinstance(welcome, Welcome)
    other, _ = pair()
    with pytest.raises(SignatureError):
        other.receive_hello(encode_frame(Hello(RELAY.public, CLIENT_NONCE, DEVICE_EPH,
                                               welcome.relay_signature)))


@pytest.mark.parametrize("error,code", [
    (RevokedError("revoked"), ErrorCode.REVOKED),
    (NotEnrolledError("unknown"), ErrorCode.NOT_ENROLLED),
    (SignatureError("bad"), ErrorCode.UNAUTHENTICATED),
    (UnexpectedFrameError("SEND first"), ErrorCode.UNAUTHENTICATED),
])
def test_refusal_keeps_actionable_codes_and_hides_the_rest(error, code: ErrorCode) -> None:
    relay, _ = pair()
    frame = decoded(relay.refuse(error))
    assert isinstance(frame, Error)
    assert (frame.msg_id, frame.code, frame.message) == (None, int(code), error.message)
    assert relay.state is HandshakeState.FAILED


# -- the device refuses ----------------------------------------------------------------------

def test_device_raises_the_relays_refusal() -> None:
    _, device = pair()
    with pytest.raises(RevokedError, match="gone"):
        device.receive_challenge(encode_frame(Error(None, int(ErrorCode.REVOKED), "gone")))


def test_device_refuses_another_protocol_version() -> None:
    _, device = pair()
    for version in (1, PROTOCOL_VERSION + 1):  # a v1 relay's CHALLENGE has one field less
        _, device = pair()
        other = canonical.encode([1, version, RELAY_NONCE, RELAY.public.raw])
        with pytest.raises(UnsupportedVersionError):
            device.receive_challenge(other)


def test_device_refuses_a_welcome_from_a_relay_without_the_announced_key() -> None:
    """A relay that names RELAY's key in CHALLENGE but signs WELCOME with another key."""
    relay, device = pair()
    hello = decoded(device.receive_challenge(relay.challenge()))
    limit = DEFAULT_LIMITS.max_envelope_bytes
    forged = Welcome(NOW, limit, MALLORY.sign(welcome_signed_bytes(challenge_of(), hello, NOW,
                                                                   limit)))
    with pytest.raises(SignatureError):
        device.receive_welcome(encode_frame(forged))
    assert device.state is HandshakeState.FAILED


def test_device_refuses_a_welcome_made_for_another_connection() -> None:
    relay, device = pair()
    device.receive_challenge(relay.challenge())
    # The same relay and device key, but the other connection's device nonce.
    other = DeviceHandshake(ALICE, bytes(32), DEVICE_SEED, 1 << 20)
    relay.receive_hello(other.receive_challenge(relay.challenge()))
    with pytest.raises(SignatureError):
        device.receive_welcome(relay.welcome(NOW)[0])


def test_device_wants_welcome_after_challenge() -> None:
    relay, device = pair()
    device.receive_challenge(relay.challenge())
    with pytest.raises(UnexpectedFrameError):
        device.receive_welcome(relay.challenge())
    with pytest.raises(RuntimeError):
        device.receive_challenge(relay.challenge())  # out of order is a caller's bug


def test_unauthenticated_refusal_reaches_the_device_as_its_exception() -> None:
    relay, device = pair()
    device.receive_challenge(relay.challenge())
    with pytest.raises(UnauthenticatedError):
        device.receive_welcome(relay.refuse(SignatureError("bad hello")))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_bytes_only_ever_raise_protocol_errors(data: bytes) -> None:
    relay, device = pair()
    device.receive_challenge(relay.challenge())
    for step in (relay.receive_hello, device.receive_welcome):
        with pytest.raises(ProtocolError):
            step(data)
