"""The device's half of one relay connection, as a pure object: messages in, events out.

`DeviceProtocol` runs the handshake (through `proto.handshake`), then turns
each message from the relay into one event and each thing the device wants
to say into a frame.  No I/O, no clock read, no randomness: the nonce and
`now_ms` come in, so it is tested frame by frame without a socket.

The connection's limits are the relay's, as announced in WELCOME, bounded by
this device's own cap: a relay configured for larger envelopes than the
protocol default still has its deliveries decoded, not dropped as bad frames.

Contract for the shell (`connection.py`): after every call, write
`data_to_send()` in order.  `receive` raises during the handshake (the
connection has failed: the relay's refusal, or why it cannot be trusted);
after it, a frame that opens but is bad becomes a `BadFrame` event, and a
message that does not open in the sealed channel raises ChannelError: the
path was tampered with and the connection must end.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum, auto

from proto import Identity, PublicKey
from proto.channel import FrameOpener, FrameSealer, Layout
from proto.errors import OversizeError, ProtocolError, error_for_code
from proto.frames import (STREAM_FRAMES, Accepted, Ack, Deliver, Error, Frame, Send, StreamFrame,
                          decode_frame)
from proto.handshake import DeviceHandshake, Established, HandshakeState


@dataclass(frozen=True)
class Connected:
    """The handshake succeeded: the relay proved `terms.relay_key`."""

    terms: Established
    # Relay clock minus ours: envelopes are stamped in relay time, so a device
    # with a wrong clock is not refused as STALE.
    clock_offset_ms: int


@dataclass(frozen=True)
class Delivered:
    """A mailbox entry: decide what it is, then `ack(tag)` once dealt with."""

    tag: str
    envelope: bytes


@dataclass(frozen=True)
class SendAccepted:
    msg_id: bytes


@dataclass(frozen=True)
class SendRefused:
    """The relay refused something; `msg_id` names our envelope, None a refusal of no send."""

    msg_id: bytes | None
    error: ProtocolError


@dataclass(frozen=True)
class StreamArrived:
    """A stream frame (SPEC §16), for the device's streams (`stream_rules`)."""

    frame: StreamFrame


@dataclass(frozen=True)
class BadFrame:
    """The relay sent something that is not a frame a device can receive: counted, ignored."""

    detail: str


Event = Connected | Delivered | SendAccepted | SendRefused | StreamArrived | BadFrame


class Phase(Enum):
    HANDSHAKE = auto()
    OPEN = auto()


class DeviceProtocol:
    """One relay connection as the device sees it; see the module docstring for the contract."""

    def __init__(self, identity: Identity, client_nonce: bytes, ephemeral_seed: bytes,
                 max_envelope_bytes: int,
                 pinned_relay_keys: Collection[PublicKey] | None = None,
                 layout: Layout = Layout.SEALED) -> None:
        self.layout = layout  # the channel's, as the WebSocket handshake negotiated it
        self._handshake = DeviceHandshake(identity, client_nonce, ephemeral_seed,
                                          max_envelope_bytes, pinned_relay_keys)
        self._out: list[bytes] = []
        self._sealer: FrameSealer | None = None
        self._opener: FrameOpener | None = None
        self.phase = Phase.HANDSHAKE
        self.terms: Established | None = None

    @property
    def relay_key(self) -> PublicKey | None:
        return self.terms.relay_key if self.terms is not None else None

    def data_to_send(self) -> list[bytes]:
        """Frames to write now, in order; after each call the list starts empty."""
        out, self._out = self._out, []
        return out

    def receive(self, data: bytes, now_ms: int) -> Event | None:
        """One binary WebSocket message from the relay."""
        if self.phase is Phase.HANDSHAKE:
            return self._receive_handshake(data, now_ms)
        assert self.terms is not None and self._opener is not None
        data, detached = self._opener.open(data)  # ChannelError: the connection must end
        try:
            frame = decode_frame(data, self.terms.limits.max_frame_bytes, detached)
        except ProtocolError as exc:
            return BadFrame(f"undecodable frame: {exc.message}")
        if isinstance(frame, Deliver):
            return Delivered(frame.tag, frame.envelope)
        if isinstance(frame, Accepted):
            return SendAccepted(frame.msg_id)
        if isinstance(frame, Error):
            return SendRefused(frame.msg_id, error_for_code(frame.code, frame.message))
        if isinstance(frame, STREAM_FRAMES):
            return StreamArrived(frame)
        return BadFrame(f"a relay may not send {type(frame).__name__.upper()} here")

    def receive_non_binary(self) -> BadFrame:
        return BadFrame("frames must be binary WebSocket messages")

    def _receive_handshake(self, data: bytes, now_ms: int) -> Connected | None:
        if self._handshake.state is HandshakeState.AWAITING_CHALLENGE:
            self._out.append(self._handshake.receive_challenge(data))
            return None
        terms = self._handshake.receive_welcome(data)
        self.terms = terms
        sealer, opener = terms.channel.for_device()
        self._sealer = FrameSealer(sealer, self.layout)
        self._opener = FrameOpener(opener, self.layout)
        self.phase = Phase.OPEN
        return Connected(terms, terms.server_time_ms - now_ms)

    def send(self, envelope: bytes) -> None:
        """Queue one SEND; OversizeError (nothing queued) if the relay would refuse its size."""
        assert self.terms is not None, "send before the handshake completed"
        limit = self.terms.limits.max_envelope_bytes
        if len(envelope) > limit:
            raise OversizeError(
                f"envelope of {len(envelope)} bytes exceeds the relay's limit of {limit}")
        self._emit(Send(envelope))

    def ack(self, tag: str) -> None:
        """Queue the ACK of one delivery: the relay removes it from the mailbox."""
        self._emit(Ack(tag))

    def send_stream(self, frames: list[StreamFrame]) -> None:
        """Queue stream frames, in order (`stream_rules` made them)."""
        for frame in frames:
            self._emit(frame)

    def _emit(self, frame: Frame) -> None:
        assert self._sealer is not None, "a frame before the handshake completed"
        self._out.append(self._sealer.seal(frame))
