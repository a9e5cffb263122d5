"""Hostile input: decoders may refuse, but only ever with a ProtocolError.

A relay turns ProtocolError into an error frame; any other exception would
be a crash path reachable by an unauthenticated peer.  The default run keeps
examples modest; `pytest -m fuzz` repeats the same properties with
≥100 000 examples each (CONTINUUM_FUZZ_EXAMPLES overrides the count).
"""

from __future__ import annotations


import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_settings import long_run, quick

from proto.envelope import decode_envelope
from proto.errors import ProtocolError, SignatureError
from proto.frames import Ack, Challenge, Deliver, Error, Send, decode_frame, encode_frame
from proto.handshake import DeviceHandshake, RelayHandshake, ephemeral_keypair, sign_hello
from proto.limits import DEFAULT_LIMITS, PROTOCOL_VERSION
from proto_support import (ALICE, BOB, CAROL, cbor_values, encode_any, envelope_fields,
                           field_replacements, make_envelope, mutations)

ENVELOPE = make_envelope(b"fuzz me", recipients=(BOB, CAROL))
ENVELOPE_FIELDS = envelope_fields(ENVELOPE)
EPH = ephemeral_keypair(bytes(32))[0]
CHALLENGE = Challenge(PROTOCOL_VERSION, bytes(range(32)), BOB.public, EPH)
FRAMES = [encode_frame(f) for f in (
    Send(ENVELOPE.raw), Deliver("tag-1", ENVELOPE.raw), Ack("tag-1"),
    Error(ENVELOPE.msg_id, 6, "replay"), CHALLENGE, sign_hello(CHALLENGE, ALICE, bytes(32), EPH),
)]


envelope_inputs = st.one_of(
    st.binary(max_size=600),
    mutations(ENVELOPE.raw),
    field_replacements(ENVELOPE_FIELDS),
    cbor_values.map(encode_any),
)
frame_inputs = st.one_of(
    st.binary(max_size=600),
    st.sampled_from(FRAMES).flatmap(mutations),
    st.sampled_from(FRAMES).flatmap(lambda f: st.integers(1, 9).map(lambda n: f[:n])),
    cbor_values.map(encode_any),
    st.lists(cbor_values, max_size=5).flatmap(
        lambda rest: st.integers(0, 9).map(lambda t: encode_any([t, *rest]))),
)


def check_envelope(data: bytes) -> None:
    """Decode, verify and open: each step either succeeds or raises ProtocolError."""
    try:
        env = decode_envelope(data)
    except ProtocolError:
        return
    if data == ENVELOPE.raw:
        env.verify()
        return
    try:
        env.verify()
    except SignatureError:
        pass
    else:
        pytest.fail("an altered envelope verified")
    for reader in (BOB, CAROL, ALICE):
        try:
            env.open(reader)
        except ProtocolError:
            pass


def check_frame(data: bytes) -> None:
    """Decode; a frame that decodes re-encodes to the same bytes, and its contents are checked."""
    try:
        frame = decode_frame(data, DEFAULT_LIMITS.max_frame_bytes)
    except ProtocolError:
        return
    assert encode_frame(frame) == data
    if isinstance(frame, (Send, Deliver)):
        check_envelope(frame.envelope)


def check_handshake(data: bytes) -> None:
    """Hostile bytes as HELLO to a relay and as WELCOME to a device: only ProtocolError."""
    relay = RelayHandshake(BOB, CHALLENGE.relay_nonce, bytes(32), DEFAULT_LIMITS)
    device = DeviceHandshake(ALICE, bytes(32), bytes(32), DEFAULT_LIMITS.max_envelope_bytes)
    device.receive_challenge(relay.challenge())
    for step in (relay.receive_hello, device.receive_welcome):
        try:
            step(data)
        except ProtocolError:
            pass


@quick(300)
@given(envelope_inputs)
def test_envelope_hostile_input(data: bytes) -> None:
    check_envelope(data)


@quick(300)
@given(frame_inputs)
def test_frame_hostile_input(data: bytes) -> None:
    check_frame(data)
    check_handshake(data)


@long_run
@given(envelope_inputs)
def test_envelope_hostile_input_long(data: bytes) -> None:
    check_envelope(data)


@long_run
@given(frame_inputs)
def test_frame_hostile_input_long(data: bytes) -> None:
    check_frame(data)
    check_handshake(data)
