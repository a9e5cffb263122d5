"""The device's protocol object, driven frame by frame without a socket."""

from __future__ import annotations

import os

import pytest

from client.protocol import (BadFrame, Connected, Delivered, DeviceProtocol, Phase, SendAccepted,
                             SendRefused)
from proto.channel import ChannelError, ChannelKeys
from proto.errors import ErrorCode, OversizeError, RevokedError, SignatureError
from proto.frames import (Accepted, Ack, Challenge, Deliver, Error, Frame, Hello, Send, Welcome,
                          decode_frame, encode_frame)
from proto.handshake import RelayHandshake, ephemeral_keypair, welcome_signed_bytes
from proto.limits import PROTOCOL_VERSION, Limits
from proto_support import ALICE, MALLORY, identity

RELAY = identity("relay")
NOW = 1_700_000_000_000
CAP = 1 << 20


class Relay:
    """The relay's end of the sealed channel, as the test plays it."""

    def __init__(self, channel: ChannelKeys) -> None:
        self.sealer, self.opener = channel.for_relay()

    def says(self, frame: Frame) -> bytes:
        return self.sealer.seal(encode_frame(frame))

    def hears(self, device: DeviceProtocol) -> list[Frame]:
        return [decode_frame(self.opener.open(d), 1 << 20) for d in device.data_to_send()]


def connected(relay_limit: int = 65_536, cap: int = CAP, relay_clock_ms: int = NOW + 5_000,
              ) -> tuple[DeviceProtocol, Connected, Relay]:
    relay = RelayHandshake(RELAY, os.urandom(32), os.urandom(32),
                           Limits(max_envelope_bytes=relay_limit))
    device = DeviceProtocol(ALICE, os.urandom(32), os.urandom(32), cap)
    assert device.receive(relay.challenge(), NOW) is None
    (hello,) = device.data_to_send()
    relay.receive_hello(hello)
    welcome, terms = relay.welcome(relay_clock_ms)
    event = device.receive(welcome, NOW)
    assert isinstance(event, Connected)
    return device, event, Relay(terms.channel)


def test_handshake_yields_the_relay_key_and_the_clock_offset() -> None:
    device, event, _ = connected(relay_clock_ms=NOW + 5_000)
    assert device.phase is Phase.OPEN and device.relay_key == RELAY.public
    assert event.clock_offset_ms == 5_000


def test_a_relay_refusal_during_the_handshake_raises_it() -> None:
    device = DeviceProtocol(ALICE, os.urandom(32), os.urandom(32), CAP)
    with pytest.raises(RevokedError):
        device.receive(encode_frame(Error(None, int(ErrorCode.REVOKED), "revoked")), NOW)


def test_a_relay_that_cannot_prove_its_key_fails_the_handshake() -> None:
    device = DeviceProtocol(ALICE, os.urandom(32), os.urandom(32), CAP)
    challenge = Challenge(PROTOCOL_VERSION, os.urandom(32), RELAY.public,  # claims RELAY's key
                          ephemeral_keypair(os.urandom(32))[0])
    device.receive(encode_frame(challenge), NOW)
    hello = decode_frame(device.data_to_send()[0], 4096)
    assert isinstance(hello, Hello)
    signed = welcome_signed_bytes(challenge, hello, NOW, 65_536)
    forged = Welcome(NOW, 65_536, MALLORY.sign(signed))  # but holds only MALLORY's
    with pytest.raises(SignatureError):
        device.receive(encode_frame(forged), NOW)


def test_frames_become_events() -> None:
    device, _, relay = connected()
    msg_id = b"\x01" * 16
    assert device.receive(relay.says(Deliver("7", b"env")), NOW) == Delivered("7", b"env")
    assert device.receive(relay.says(Accepted(msg_id)), NOW) == SendAccepted(msg_id)
    refused = device.receive(relay.says(Error(msg_id, int(ErrorCode.REPLAY), "again")), NOW)
    assert isinstance(refused, SendRefused) and refused.msg_id == msg_id
    assert refused.error.code is ErrorCode.REPLAY


@pytest.mark.parametrize("data", [b"\xff", encode_frame(Send(b"x")), encode_frame(Ack("1"))])
def test_what_a_relay_may_not_send_is_a_bad_frame_not_an_exception(data: bytes) -> None:
    device, _, relay = connected()
    assert isinstance(device.receive(relay.sealer.seal(data), NOW), BadFrame)


def test_a_frame_the_relay_did_not_seal_ends_the_connection() -> None:
    """Before: a rogue server answered a fake ACCEPTED (and forged DELIVERs) undetected."""
    device, _, _relay = connected()
    with pytest.raises(ChannelError):
        device.receive(encode_frame(Accepted(b"\x01" * 16)), NOW)


def test_deliveries_up_to_the_relays_announced_limit_are_decoded() -> None:
    """The bug this object fixed: a 256 KiB relay's 100 kB delivery was a 'bad frame'."""
    device, event, relay = connected(relay_limit=262_144)
    envelope = b"x" * 100_000
    assert event.terms.limits.max_envelope_bytes == 262_144
    assert device.receive(relay.says(Deliver("1", envelope)), NOW) == Delivered("1", envelope)


def test_deliveries_above_the_devices_cap_are_not_decoded() -> None:
    device, event, relay = connected(relay_limit=262_144, cap=100_000)
    assert event.terms.relay_limit_above_cap
    assert isinstance(device.receive(relay.says(Deliver("1", b"x" * 150_000)), NOW), BadFrame)


def test_send_refuses_what_the_relay_would_refuse_and_queues_the_rest() -> None:
    device, _, relay = connected(relay_limit=2_048)
    with pytest.raises(OversizeError):
        device.send(b"x" * 2_049)
    assert device.data_to_send() == []
    device.send(b"x" * 2_048)
    device.ack("9")
    assert relay.hears(device) == [Send(b"x" * 2_048), Ack("9")]
