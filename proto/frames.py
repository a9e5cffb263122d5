"""WebSocket frames between a device and a relay: one canonical CBOR array per binary message.

    relay  → device   CHALLENGE [1, protocol_version, relay_nonce(32), relay_key(32),
                                   relay_ephemeral(32)]
    device → relay    HELLO     [2, device_key(32), client_nonce(32), device_ephemeral(32),
                                   signature(64)]
    relay  → device   WELCOME   [3, server_time_ms, max_envelope_bytes, relay_signature(64)]
    device → relay    SEND      [4, envelope(bstr)]
    relay  → device   ACCEPTED  [5, msg_id(16)]
    relay  → device   ERROR     [6, msg_id(16) / null, code, message(tstr)]
    relay  → device   DELIVER   [7, tag(tstr), envelope(bstr)]
    device → relay    ACK       [8, tag(tstr)]

and the stream frames of SPEC §16, the same shape in both directions (the relay
forwards what one end sends to the other):

    STREAM_OPEN    [9,  window, envelope(bstr)]        the stream's id is the envelope's msg_id
    STREAM_ACCEPT  [10, stream_id(16), window, envelope(bstr)]
    STREAM_DATA    [11, stream_id(16), chunk(bstr)]     a secretstream chunk, tag MESSAGE
    STREAM_CREDIT  [12, stream_id(16), credit]          the sender may send `credit` more bytes
    STREAM_FIN     [13, stream_id(16), chunk(bstr)]     the direction's last chunk, tag FINAL
    STREAM_ABORT   [14, stream_id(16), code, message(tstr)]

After WELCOME every frame travels sealed (`channel`).  This module only
encodes and decodes; what the handshake frames sign and prove, and the order
they come in, is `handshake`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from . import canonical
from .envelope import MSG_ID_BYTES
from .errors import (DecodeError, ErrorCode, InvalidFieldError, OversizeError,
                     UnsupportedVersionError)
from .keys import KEY_BYTES, SIGNATURE_BYTES, PublicKey
from .limits import PROTOCOL_VERSION
from .streams import CHUNK_OVERHEAD_BYTES

NONCE_BYTES = 32
EPHEMERAL_KEY_BYTES = 32
MAX_TAG_CHARS = 64
MAX_ERROR_MESSAGE_CHARS = 512
STREAM_ID_BYTES = MSG_ID_BYTES
# Windows and credits are byte counts below 2^32: far above any window a relay allows.
MAX_CREDIT = 2**32 - 1


class FrameType(IntEnum):
    CHALLENGE = 1
    HELLO = 2
    WELCOME = 3
    SEND = 4
    ACCEPTED = 5
    ERROR = 6
    DELIVER = 7
    ACK = 8
    STREAM_OPEN = 9
    STREAM_ACCEPT = 10
    STREAM_DATA = 11
    STREAM_CREDIT = 12
    STREAM_FIN = 13
    STREAM_ABORT = 14


def _bytes(value: object, length: int | None, name: str) -> bytes:
    if type(value) is not bytes:
        raise InvalidFieldError(f"{name} must be a byte string")
    if length is not None and len(value) != length:
        raise InvalidFieldError(f"{name} must be {length} bytes")
    return value


def _chunk(value: object) -> bytes:
    """A stream chunk: a secretstream message, so at least its tag and MAC (SPEC §16).
    A shorter one can never open, and costing no credit it was a frame a device could
    send without end, each passed on to its peer's relay."""
    chunk = _bytes(value, None, "stream chunk")
    if len(chunk) < CHUNK_OVERHEAD_BYTES:
        raise InvalidFieldError(f"a stream chunk is at least {CHUNK_OVERHEAD_BYTES} bytes")
    return chunk


def _uint(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value < 2**64:
        raise InvalidFieldError(f"{name} must be an unsigned integer")
    return value


def _text(value: object, max_chars: int, name: str) -> str:
    if type(value) is not str or len(value) > max_chars:
        raise InvalidFieldError(f"{name} must be text of at most {max_chars} characters")
    return value


@dataclass(frozen=True)
class Challenge:
    TYPE: ClassVar[FrameType] = FrameType.CHALLENGE
    protocol_version: int
    relay_nonce: bytes
    relay_key: PublicKey
    relay_ephemeral: bytes  # X25519, for this connection's channel keys only

    def fields(self) -> list:
        return [self.protocol_version, self.relay_nonce, self.relay_key.raw,
                self.relay_ephemeral]

    @classmethod
    def from_fields(cls, f: list) -> Challenge:
        version = _uint(f[0], "protocol version")
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersionError(
                f"relay speaks protocol {version}, this side speaks {PROTOCOL_VERSION}")
        return cls(version, _bytes(f[1], NONCE_BYTES, "relay nonce"),
                   PublicKey(_bytes(f[2], KEY_BYTES, "relay key")),
                   _bytes(f[3], EPHEMERAL_KEY_BYTES, "relay ephemeral key"))


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[FrameType] = FrameType.HELLO
    device_key: PublicKey
    client_nonce: bytes
    device_ephemeral: bytes  # X25519, for this connection's channel keys only
    signature: bytes

    def fields(self) -> list:
        return [self.device_key.raw, self.client_nonce, self.device_ephemeral, self.signature]

    @classmethod
    def from_fields(cls, f: list) -> Hello:
        return cls(PublicKey(_bytes(f[0], KEY_BYTES, "device key")),
                   _bytes(f[1], NONCE_BYTES, "client nonce"),
                   _bytes(f[2], EPHEMERAL_KEY_BYTES, "device ephemeral key"),
                   _bytes(f[3], SIGNATURE_BYTES, "hello signature"))


@dataclass(frozen=True)
class Welcome:
    TYPE: ClassVar[FrameType] = FrameType.WELCOME
    server_time_ms: int
    max_envelope_bytes: int
    relay_signature: bytes

    def fields(self) -> list:
        return [self.server_time_ms, self.max_envelope_bytes, self.relay_signature]

    @classmethod
    def from_fields(cls, f: list) -> Welcome:
        return cls(_uint(f[0], "server time"), _uint(f[1], "max envelope bytes"),
                   _bytes(f[2], SIGNATURE_BYTES, "relay signature"))


@dataclass(frozen=True)
class Send:
    TYPE: ClassVar[FrameType] = FrameType.SEND
    envelope: bytes

    def fields(self) -> list:
        return [self.envelope]

    @classmethod
    def from_fields(cls, f: list) -> Send:
        return cls(_bytes(f[0], None, "envelope"))


@dataclass(frozen=True)
class Accepted:
    TYPE: ClassVar[FrameType] = FrameType.ACCEPTED
    msg_id: bytes

    def fields(self) -> list:
        return [self.msg_id]

    @classmethod
    def from_fields(cls, f: list) -> Accepted:
        return cls(_bytes(f[0], MSG_ID_BYTES, "accepted msg_id"))


@dataclass(frozen=True)
class Error:
    """A refusal; `msg_id` names the refused envelope when there was one."""

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    msg_id: bytes | None
    code: int
    message: str

    def fields(self) -> list:
        return [self.msg_id, self.code, self.message[:MAX_ERROR_MESSAGE_CHARS]]

    @classmethod
    def from_fields(cls, f: list) -> Error:
        msg_id = None if f[0] is None else _bytes(f[0], MSG_ID_BYTES, "error msg_id")
        return cls(msg_id, _uint(f[1], "error code"),
                   _text(f[2], MAX_ERROR_MESSAGE_CHARS, "error message"))

    @property
    def error_code(self) -> ErrorCode | None:
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


@dataclass(frozen=True)
class Deliver:
    TYPE: ClassVar[FrameType] = FrameType.DELIVER
    tag: str
    envelope: bytes

    def fields(self) -> list:
        return [self.tag, self.envelope]

    @classmethod
    def from_fields(cls, f: list) -> Deliver:
        return cls(_text(f[0], MAX_TAG_CHARS, "delivery tag"), _bytes(f[1], None, "envelope"))


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[FrameType] = FrameType.ACK
    tag: str

    def fields(self) -> list:
        return [self.tag]

    @classmethod
    def from_fields(cls, f: list) -> Ack:
        return cls(_text(f[0], MAX_TAG_CHARS, "ack tag"))


def _stream_id(value: object) -> bytes:
    return _bytes(value, STREAM_ID_BYTES, "stream id")


def _credit(value: object, name: str, low: int) -> int:
    if type(value) is not int or not low <= value <= MAX_CREDIT:
        raise InvalidFieldError(f"{name} must be an integer in [{low}, {MAX_CREDIT}]")
    return value


@dataclass(frozen=True)
class StreamOpen:
    """Open a stream to the envelope's one recipient; `window` is how many chunk bytes the
    opener lets the other end send before granting more."""

    TYPE: ClassVar[FrameType] = FrameType.STREAM_OPEN
    window: int
    envelope: bytes

    def fields(self) -> list:
        return [self.window, self.envelope]

    @classmethod
    def from_fields(cls, f: list) -> StreamOpen:
        return cls(_credit(f[0], "stream window", 0), _bytes(f[1], None, "envelope"))


@dataclass(frozen=True)
class StreamAccept:
    """The answer that opens stream `stream_id`; `window` as in STREAM_OPEN, the other way."""

    TYPE: ClassVar[FrameType] = FrameType.STREAM_ACCEPT
    stream_id: bytes
    window: int
    envelope: bytes

    def fields(self) -> list:
        return [self.stream_id, self.window, self.envelope]

    @classmethod
    def from_fields(cls, f: list) -> StreamAccept:
        return cls(_stream_id(f[0]), _credit(f[1], "stream window", 0),
                   _bytes(f[2], None, "envelope"))


@dataclass(frozen=True)
class StreamData:
    TYPE: ClassVar[FrameType] = FrameType.STREAM_DATA
    stream_id: bytes
    chunk: bytes

    def fields(self) -> list:
        return [self.stream_id, self.chunk]

    @classmethod
    def from_fields(cls, f: list) -> StreamData:
        return cls(_stream_id(f[0]), _chunk(f[1]))


@dataclass(frozen=True)
class StreamCredit:
    TYPE: ClassVar[FrameType] = FrameType.STREAM_CREDIT
    stream_id: bytes
    credit: int

    def fields(self) -> list:
        return [self.stream_id, self.credit]

    @classmethod
    def from_fields(cls, f: list) -> StreamCredit:
        return cls(_stream_id(f[0]), _credit(f[1], "stream credit", 1))


@dataclass(frozen=True)
class StreamFin:
    """The last chunk of one direction (possibly of no data): the sender's half-close."""

    TYPE: ClassVar[FrameType] = FrameType.STREAM_FIN
    stream_id: bytes
    chunk: bytes

    def fields(self) -> list:
        return [self.stream_id, self.chunk]

    @classmethod
    def from_fields(cls, f: list) -> StreamFin:
        return cls(_stream_id(f[0]), _chunk(f[1]))


@dataclass(frozen=True)
class StreamAbort:
    """The stream ends now, both ways, for the reason given (SPEC §9 code and words)."""

    TYPE: ClassVar[FrameType] = FrameType.STREAM_ABORT
    stream_id: bytes
    code: int
    message: str

    def fields(self) -> list:
        return [self.stream_id, self.code, self.message[:MAX_ERROR_MESSAGE_CHARS]]

    @classmethod
    def from_fields(cls, f: list) -> StreamAbort:
        return cls(_stream_id(f[0]), _uint(f[1], "abort code"),
                   _text(f[2], MAX_ERROR_MESSAGE_CHARS, "abort message"))


StreamFrame = StreamOpen | StreamAccept | StreamData | StreamCredit | StreamFin | StreamAbort
STREAM_FRAMES = (StreamOpen, StreamAccept, StreamData, StreamCredit, StreamFin, StreamAbort)

Frame = (Challenge | Hello | Welcome | Send | Accepted | Error | Deliver | Ack | StreamOpen
         | StreamAccept | StreamData | StreamCredit | StreamFin | StreamAbort)

_FRAME_CLASSES: dict[int, tuple[type, int]] = {
    FrameType.CHALLENGE: (Challenge, 4),
    FrameType.HELLO: (Hello, 4),
    FrameType.WELCOME: (Welcome, 3),
    FrameType.SEND: (Send, 1),
    FrameType.ACCEPTED: (Accepted, 1),
    FrameType.ERROR: (Error, 3),
    FrameType.DELIVER: (Deliver, 2),
    FrameType.ACK: (Ack, 1),
    FrameType.STREAM_OPEN: (StreamOpen, 2),
    FrameType.STREAM_ACCEPT: (StreamAccept, 3),
    FrameType.STREAM_DATA: (StreamData, 2),
    FrameType.STREAM_CREDIT: (StreamCredit, 2),
    FrameType.STREAM_FIN: (StreamFin, 2),
    FrameType.STREAM_ABORT: (StreamAbort, 3),
}


# The frames every message crosses (a relay reads SEND and ACK, a device ACCEPTED and DELIVER),
# whose fields are all strings: how each field is encoded.  They are read here directly
# (`canonical.string_span`), at half the cost of cbor2 plus the re-encoding check; every other
# frame, and any of these not in canonical form, goes through the general decoder.  Writing
# them directly saved nothing: cbor2's encoder is as fast as that Python would be.
_STRING_FRAMES: dict[int, tuple[type, tuple[int, ...]]] = {
    FrameType.SEND: (Send, (canonical.BYTES,)),
    FrameType.ACCEPTED: (Accepted, (canonical.BYTES,)),
    FrameType.DELIVER: (Deliver, (canonical.TEXT, canonical.BYTES)),
    FrameType.ACK: (Ack, (canonical.TEXT,)),
}
_ARRAY_OF = (0x82, 0x83)  # the heads of arrays of 2 and 3 items: the type and 1 or 2 strings


def encode_frame(frame: Frame) -> bytes:
    return canonical.encode([int(frame.TYPE), *frame.fields()])


def _decode_strings(data: bytes, max_size: int) -> Frame | None:
    """The SEND, ACCEPTED, DELIVER or ACK frame `data` holds in canonical form, or None for
    anything else, on which the general decoder then rules (and names what is wrong).

    What it accepts the general decoder accepts too, as the same values: an array head for
    the frame's field count, its type as one byte, each string's canonical head, valid
    UTF-8 in text, and nothing after the last string."""
    if type(data) is not bytes or not 2 <= len(data) <= max_size:
        return None
    shape = _STRING_FRAMES.get(data[1])
    if shape is None or data[0] != _ARRAY_OF[len(shape[1]) - 1]:
        return None
    cls, majors = shape
    fields: list[bytes | str] = []
    pos = 2
    for major in majors:
        span = canonical.string_span(data, pos, major)
        if span is None:
            return None
        start, pos = span
        if major == canonical.BYTES:
            fields.append(data[start:pos])
        else:
            try:
                fields.append(data[start:pos].decode())
            except UnicodeDecodeError:
                return None
    if pos != len(data):
        return None
    return cls.from_fields(fields)  # type: ignore[attr-defined, no-any-return]


def decode_frame(data: bytes, max_size: int, detached: bytes = b"") -> Frame:
    """Parse one frame or raise a DecodeError subclass naming what is wrong.

    `detached` is the chunk a channel carried apart from the frame's head (SPEC §8,
    detached layout): `data` is then the head of a STREAM_DATA or STREAM_FIN that ends
    where its chunk's bytes begin, and the chunk is exactly `detached`."""
    if detached:
        return _decode_detached(data, detached, max_size)
    frame = _decode_strings(data, max_size)
    return frame if frame is not None else _decode_any(data, max_size)


# Frames whose last field, a stream chunk, a channel may carry apart from the rest (SPEC §8):
# it is already sealed end to end, so the channel authenticates it without sealing it again.
_DETACHABLE: dict[int, type[StreamData] | type[StreamFin]] = {
    FrameType.STREAM_DATA: StreamData, FrameType.STREAM_FIN: StreamFin}
_STREAM_ID_HEAD = canonical.encode_string_head(canonical.BYTES, STREAM_ID_BYTES)


def split_frame(frame: Frame) -> tuple[bytes, bytes]:
    """(head, detached): a stream chunk apart from the rest of its frame, whose encoding is
    `head + detached`; every other frame whole, with nothing detached."""
    if isinstance(frame, (StreamData, StreamFin)) and len(frame.stream_id) == STREAM_ID_BYTES:
        head = (bytes((0x83, frame.TYPE)) + _STREAM_ID_HEAD + frame.stream_id
                + canonical.encode_string_head(canonical.BYTES, len(frame.chunk)))
        return head, frame.chunk
    return encode_frame(frame), b""


def _decode_detached(head: bytes, detached: bytes, max_size: int) -> StreamData | StreamFin:
    """The frame a detached chunk belongs to: only a STREAM_DATA or STREAM_FIN whose head, in
    canonical form, ends with the chunk's length, so exactly one encoding is accepted."""
    if len(head) + len(detached) > max_size:
        raise OversizeError(f"frame of {len(head) + len(detached)} bytes exceeds the limit"
                            f" of {max_size}")
    cls = _DETACHABLE.get(head[1]) if len(head) > 1 and head[0] == 0x83 else None
    if cls is None:
        raise DecodeError("only a STREAM_DATA or STREAM_FIN frame may carry a detached chunk")
    id_span = canonical.string_span(head, 2, canonical.BYTES)
    chunk_head = None if id_span is None else canonical.string_head(head, id_span[1],
                                                                   canonical.BYTES)
    if chunk_head != (len(head), len(detached)):
        raise DecodeError("a detached chunk's frame must end with the chunk's canonical"
                          " length")
    assert id_span is not None
    return cls(_stream_id(head[id_span[0]:id_span[1]]), _chunk(detached))


def _decode_any(data: bytes, max_size: int) -> Frame:
    """Any frame, through the general canonical decoder."""
    value = canonical.decode(data, max_size=max_size, what="frame")
    if type(value) is not list or not value or type(value[0]) is not int:
        raise DecodeError("frame must be a CBOR array starting with its type")
    entry = _FRAME_CLASSES.get(value[0])
    if entry is None:
        raise DecodeError(f"unknown frame type {value[0]}")
    if (value[0] == FrameType.CHALLENGE and len(value) > 1 and type(value[1]) is int
            and value[1] != PROTOCOL_VERSION):
        # Checked before the field count, as an envelope's version is: another version's
        # CHALLENGE may have other fields, and the answer must name the version.
        raise UnsupportedVersionError(
            f"relay speaks protocol {value[1]}, this side speaks {PROTOCOL_VERSION}")
    cls, arity = entry
    if len(value) != arity + 1:
        raise DecodeError(f"{cls.__name__} frame must have {arity} fields, got {len(value) - 1}")
    return cls.from_fields(value[1:])  # type: ignore[attr-defined, no-any-return]
