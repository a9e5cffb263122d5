"""Frames: encoding, strict decoding, limits (the handshake is tests/test_proto_handshake.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import canonical, frames
from proto.errors import (DecodeError, ErrorCode, InvalidFieldError, OversizeError, ProtocolError,
                          UnsupportedVersionError)
from proto.frames import (MAX_ERROR_MESSAGE_CHARS, MAX_TAG_CHARS, Accepted, Ack, Challenge, Deliver,
                          Error, FrameType, Send, Welcome, decode_frame, encode_frame)
from proto.handshake import ephemeral_keypair, sign_hello
from proto.limits import DEFAULT_LIMITS, PROTOCOL_VERSION
from proto_support import ALICE, identity, make_envelope, mutations

RELAY = identity("relay")
MAX = DEFAULT_LIMITS.max_frame_bytes
RELAY_NONCE = bytes(range(32))
CLIENT_NONCE = bytes(range(32, 64))
EPH = ephemeral_keypair(bytes(32))[0]
CHALLENGE = Challenge(PROTOCOL_VERSION, RELAY_NONCE, RELAY.public, EPH)


def _welcome() -> Welcome:
    return Welcome(1_700_000_000_000, DEFAULT_LIMITS.max_envelope_bytes, b"\x07" * 64)


def sample_frames() -> list:
    env = make_envelope().raw
    return [
        CHALLENGE,
        sign_hello(CHALLENGE, ALICE, CLIENT_NONCE, EPH),
        _welcome(),
        Send(env),
        Accepted(b"\x01" * 16),
        Error(b"\x02" * 16, int(ErrorCode.REPLAY), "already stored"),
        Error(None, int(ErrorCode.UNAUTHENTICATED), ""),
        Deliver("mailbox-42", env),
        Ack("mailbox-42"),
    ]


@pytest.mark.parametrize("frame", sample_frames(), ids=lambda f: type(f).__name__)
def test_round_trip(frame) -> None:
    data = encode_frame(frame)
    assert data[1] == int(frame.TYPE)
    decoded = decode_frame(data, MAX)
    assert decoded == frame
    assert encode_frame(decoded) == data


@pytest.mark.parametrize("frame", sample_frames(), ids=lambda f: type(f).__name__)
def test_every_truncation_and_trailing_byte(frame) -> None:
    data = encode_frame(frame)
    for length in range(len(data)):
        with pytest.raises(DecodeError):
            decode_frame(data[:length], MAX)
    with pytest.raises(DecodeError):
        decode_frame(data + b"\x00", MAX)


def test_oversize() -> None:
    data = encode_frame(Send(b"x" * 1000))
    with pytest.raises(OversizeError):
        decode_frame(data, len(data) - 1)
    assert decode_frame(data, len(data)) == Send(b"x" * 1000)


def test_frame_limit_is_envelope_plus_overhead() -> None:
    env = b"x" * DEFAULT_LIMITS.max_envelope_bytes
    assert decode_frame(encode_frame(Deliver("t" * MAX_TAG_CHARS, env)), MAX).envelope == env


def test_error_message_is_truncated_on_encode() -> None:
    frame = Error(None, 1, "x" * (MAX_ERROR_MESSAGE_CHARS + 100))
    decoded = decode_frame(encode_frame(frame), MAX)
    assert decoded.message == "x" * MAX_ERROR_MESSAGE_CHARS


def test_error_code_lookup() -> None:
    assert Error(None, 6, "").error_code is ErrorCode.REPLAY
    assert Error(None, 9999, "").error_code is None


@pytest.mark.parametrize("value,error", [
    ([], DecodeError),
    ([0], DecodeError),
    ([99, b""], DecodeError),
    ([True, b""], DecodeError),
    (["4", b""], DecodeError),
    ({4: b""}, DecodeError),
    ([4], DecodeError),
    ([4, b"", b""], DecodeError),
    ([1, 1, RELAY_NONCE, RELAY.public.raw], UnsupportedVersionError),  # a v1 relay
    ([1, 3, RELAY_NONCE, RELAY.public.raw, EPH], UnsupportedVersionError),
    ([1, 0, RELAY_NONCE, RELAY.public.raw, EPH], UnsupportedVersionError),
    ([1, PROTOCOL_VERSION, RELAY_NONCE, RELAY.public.raw], DecodeError),
    ([1, PROTOCOL_VERSION, RELAY_NONCE[:31], RELAY.public.raw, EPH], InvalidFieldError),
    ([1, PROTOCOL_VERSION, RELAY_NONCE, RELAY.public.raw[:31], EPH], InvalidFieldError),
    ([1, PROTOCOL_VERSION, RELAY_NONCE, RELAY.public.raw, EPH[:31]], InvalidFieldError),
    ([1, True, RELAY_NONCE, RELAY.public.raw, EPH], InvalidFieldError),
    ([2, ALICE.public.raw, CLIENT_NONCE, b"\x00" * 64], DecodeError),  # a v1 HELLO
    ([2, ALICE.public.raw, CLIENT_NONCE, EPH, b"\x00" * 63], InvalidFieldError),
    ([2, ALICE.public.raw, "nonce", EPH, b"\x00" * 64], InvalidFieldError),
    ([3, -1, 65536, b"\x00" * 64], InvalidFieldError),
    ([3, 0, "65536", b"\x00" * 64], InvalidFieldError),
    ([4, "envelope"], InvalidFieldError),
    ([5, b"\x00" * 15], InvalidFieldError),
    ([6, b"\x00" * 16, -1, "x"], InvalidFieldError),
    ([6, b"\x00" * 15, 1, "x"], InvalidFieldError),
    ([6, None, 1, "x" * (MAX_ERROR_MESSAGE_CHARS + 1)], InvalidFieldError),
    ([6, None, 1, b"x"], InvalidFieldError),
    ([7, "t" * (MAX_TAG_CHARS + 1), b""], InvalidFieldError),
    ([7, 7, b""], InvalidFieldError),
    ([8, b"tag"], InvalidFieldError),
    ([8, None], InvalidFieldError),
])
def test_strict_decoding(value: object, error: type) -> None:
    with pytest.raises(error):
        decode_frame(canonical.encode(value), MAX)


@pytest.mark.parametrize("data", [
    "9f0480ff", "8218044140", "c28204" + "40",
    # SEND and ACK, the frames read without cbor2 (`frames._decode_strings`):
    "8204580141",                     # a 1-byte string with a 1-byte length head
    "82045900" "0141",                # ... with a 2-byte one
    "82045a0000" "000141",            # ... 4-byte
    "82045b" "0000000000000001" "41",  # ... 8-byte
    "82045c41", "82045f4141ff",       # reserved head, indefinite string
    "8204414141",                     # a byte after the frame
    "8304414141",                     # an array head for one field more
    "820862c328",                     # ACK whose tag is not UTF-8
    "82087f6161ff",                   # ACK with an indefinite tag
    "d8188204" "40",                  # a tag before the array
])
def test_non_canonical_frames(data: str) -> None:
    with pytest.raises(DecodeError):
        decode_frame(bytes.fromhex(data), MAX)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=300))
def test_send_deliver_carry_any_bytes(tag_seed: bytes, envelope: bytes) -> None:
    tag = tag_seed.hex()[:MAX_TAG_CHARS]
    for frame in (Send(envelope), Deliver(tag, envelope), Ack(tag)):
        assert decode_frame(encode_frame(frame), MAX) == frame


def test_frame_types_are_stable() -> None:
    assert {t.name: t.value for t in FrameType} == {
        "CHALLENGE": 1, "HELLO": 2, "WELCOME": 3, "SEND": 4,
        "ACCEPTED": 5, "ERROR": 6, "DELIVER": 7, "ACK": 8,
        "STREAM_OPEN": 9, "STREAM_ACCEPT": 10, "STREAM_DATA": 11, "STREAM_CREDIT": 12,
        "STREAM_FIN": 13, "STREAM_ABORT": 14}


# Lengths at each boundary of a string's head: 0, 1, 2, 4 and 8 length bytes (1 << 32 is
# left out: a 4 GiB string).
HEAD_BOUNDARIES = (0, 23, 24, 255, 256, 65_535, 65_536)
MESSAGE_FRAMES = [frame for n in HEAD_BOUNDARIES
                  for frame in (Send(b"e" * n), Accepted(bytes(16)),
                                Deliver("t" * min(n, MAX_TAG_CHARS), b"e" * n),
                                Ack("t" * min(n, MAX_TAG_CHARS)))]
BIG = 2 * 65_536


def _outcome(decode, data: bytes) -> object:
    try:
        return decode(data, BIG)
    except ProtocolError as exc:
        return type(exc)


@pytest.mark.parametrize("frame", MESSAGE_FRAMES, ids=repr)
def test_message_frames_are_read_without_the_general_decoder(frame) -> None:
    """The direct path is taken (so the property below is not vacuous) and agrees."""
    data = encode_frame(frame)
    assert frames._decode_strings(data, BIG) == frame == frames._decode_any(data, BIG)


message_frame_inputs = st.one_of(
    st.sampled_from([encode_frame(f) for f in MESSAGE_FRAMES if len(encode_frame(f)) < 300]
                    ).flatmap(mutations),
    st.tuples(st.sampled_from([0x81, 0x82, 0x83]), st.sampled_from([4, 5, 7, 8]),
              st.binary(max_size=40)).map(lambda t: bytes(t[:2]) + t[2]),
    st.tuples(st.sampled_from([4, 5, 7, 8]), st.text(max_size=30), st.binary(max_size=30)).map(
        lambda t: canonical.encode([t[0], t[1], t[2]])),
)


@settings(max_examples=1500, deadline=None)
@given(message_frame_inputs)
def test_message_frames_read_directly_decode_as_the_general_decoder_does(data: bytes) -> None:
    """Whatever the input, the same frame or the same refusal as through cbor2 and its
    canonical re-encoding check."""
    assert _outcome(decode_frame, data) == _outcome(frames._decode_any, data)
