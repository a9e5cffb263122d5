"""The channel's detached layout (SPEC §8), message by message, no socket.

A stream chunk travels after its sealed head, authenticated as the AEAD's associated data:
these tests pin the bytes to libsodium's own function, prove that every byte of a message
is still covered (chunk, head, length, order), and that the receiver accepts exactly one
encoding of each frame.
"""

from __future__ import annotations

import nacl.bindings
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.channel import (DETACHED_SUBPROTOCOL, LENGTH_BYTES, ChannelError, CipherState,
                           FrameOpener, FrameSealer, Layout)
from proto.errors import DecodeError, OversizeError
from proto.frames import (Ack, Deliver, Send, StreamAbort, StreamCredit, StreamData, StreamFin,
                          decode_frame, encode_frame, split_frame)
from tally import ATTACKS_REJECTED, INPUTS_TRIED, TALLY

KEY = bytes(range(32))
STREAM_ID = bytes(range(100, 116))
MAX_FRAME = 1 << 20


def _ends(layout: Layout = Layout.DETACHED) -> tuple[FrameSealer, FrameOpener]:
    return FrameSealer(CipherState(KEY), layout), FrameOpener(CipherState(KEY), layout)


def _received(opener: FrameOpener, message: bytes) -> object:
    head, detached = opener.open(message)
    return decode_frame(head, MAX_FRAME, detached)


def test_only_the_offered_subprotocol_selects_the_detached_layout() -> None:
    assert Layout.negotiated(DETACHED_SUBPROTOCOL) is Layout.DETACHED
    for other in (None, "", "continuum.v2", DETACHED_SUBPROTOCOL.upper()):
        assert Layout.negotiated(other) is Layout.SEALED


@pytest.mark.parametrize("size", [17, 23, 24, 255, 256, 65_553, 70_000])
def test_a_chunk_travels_after_its_sealed_head_as_associated_data(size: int) -> None:
    """The very bytes of libsodium's ChaCha20-Poly1305 (IETF) with the chunk as AAD: a
    length of 4 bytes, big-endian, then the sealed head, then the chunk as it was."""
    sealer, opener = _ends()
    for count, cls in enumerate((StreamData, StreamFin)):
        frame = cls(STREAM_ID, bytes([count + 1]) * size)
        head, detached = split_frame(frame)
        assert head + detached == encode_frame(frame) and detached == frame.chunk
        nonce = bytes(4) + count.to_bytes(8, "little")
        message = sealer.seal(frame)
        assert message == (size.to_bytes(LENGTH_BYTES, "big")
                           + nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
                               head, frame.chunk, nonce, KEY)
                           + frame.chunk)
        assert _received(opener, message) == frame


def test_every_other_frame_is_sealed_whole_with_nothing_detached() -> None:
    sealer, opener = _ends()
    frames = [Send(b"\xa0" * 100), Ack("7"), Deliver("7", b"e" * 300), StreamCredit(STREAM_ID, 9),
              StreamAbort(STREAM_ID, 26, "gone")]
    for count, frame in enumerate(frames):
        nonce = bytes(4) + count.to_bytes(8, "little")
        message = sealer.seal(frame)
        sealed = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            encode_frame(frame), None, nonce, KEY)
        assert message == bytes(LENGTH_BYTES) + sealed
        assert _received(opener, message) == frame


def test_the_sealed_layout_is_the_whole_frame_as_before() -> None:
    sealer, opener = _ends(Layout.SEALED)
    frame = StreamData(STREAM_ID, b"c" * 1000)
    message = sealer.seal(frame)
    assert message == CipherState(KEY).seal(encode_frame(frame))
    assert opener.open(message) == (encode_frame(frame), b"")


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(size=st.integers(17, 3000), position=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_no_byte_of_a_detached_message_can_change_unnoticed(size: int, position: int,
                                                            bit: int) -> None:
    """A chunk is not encrypted on the hop, but it is authenticated: a flipped bit anywhere
    (length, sealed head, tag, chunk) makes the message fail to open, as in the sealed
    layout, so a relay notices a path that alters a chunk and does not pass it on."""
    sealer, opener = _ends()
    message = bytearray(sealer.seal(StreamData(STREAM_ID, bytes(size))))
    message[position % len(message)] ^= 1 << bit
    TALLY[INPUTS_TRIED] += 1
    with pytest.raises(ChannelError):
        opener.open(bytes(message))
    TALLY[ATTACKS_REJECTED] += 1


def test_messages_replayed_reordered_cut_or_moved_between_head_and_chunk_do_not_open() -> None:
    sealer = FrameSealer(CipherState(KEY), Layout.DETACHED)
    first, second = (sealer.seal(StreamData(STREAM_ID, bytes([n]) * 100)) for n in (1, 2))
    for attempt in ([second], [first, first], [first[:-1]], [first[:3]], [b""]):
        opener = FrameOpener(CipherState(KEY), Layout.DETACHED)
        with pytest.raises(ChannelError):
            for message in attempt:
                opener.open(message)
    # The same bytes split elsewhere: a byte of the chunk moved into the sealed part.
    size = int.from_bytes(first[:LENGTH_BYTES], "big")
    moved = (size - 1).to_bytes(LENGTH_BYTES, "big") + first[LENGTH_BYTES:]
    with pytest.raises(ChannelError):
        FrameOpener(CipherState(KEY), Layout.DETACHED).open(moved)
    too_long = (len(first)).to_bytes(LENGTH_BYTES, "big") + first[LENGTH_BYTES:]
    with pytest.raises(ChannelError):
        FrameOpener(CipherState(KEY), Layout.DETACHED).open(too_long)


def _sealed_apart(head: bytes, detached: bytes) -> tuple[bytes, bytes]:
    """What a hostile but keyed peer can make: any head sealed with any detached part."""
    message = (len(detached).to_bytes(LENGTH_BYTES, "big") + CipherState(KEY).seal(head, detached)
               + detached)
    return FrameOpener(CipherState(KEY), Layout.DETACHED).open(message)


@pytest.mark.parametrize("head,detached,why", [
    (encode_frame(Ack("1"))[:-1], b"1", "only a STREAM_DATA"),
    (encode_frame(Send(b"envelope"))[:4], b"elope", "only a STREAM_DATA"),
    (split_frame(StreamData(STREAM_ID, b"x" * 30))[0], b"x" * 29, "canonical length"),
    (split_frame(StreamData(STREAM_ID, b"x" * 30))[0] + b"\x00", b"x" * 30, "canonical length"),
    # The chunk's length in a longer head than canonical (0x58 with a length below 24).
    (b"\x83\x0b\x50" + STREAM_ID + b"\x58\x05", b"x" * 5, "canonical length"),
    (b"\x83\x0b\x4f" + STREAM_ID[:15] + b"\x45", b"x" * 5, "stream id must be 16 bytes"),
    (b"\x83\x0b", b"x", "canonical length"),
    (b"", b"x", "only a STREAM_DATA"),
], ids=["ack", "send", "short chunk", "trailing byte", "long head", "short id", "no id",
        "empty head"])
def test_a_detached_part_is_refused_unless_it_is_exactly_a_stream_chunk(
        head: bytes, detached: bytes, why: str) -> None:
    opened_head, opened_detached = _sealed_apart(head, detached)
    TALLY[INPUTS_TRIED] += 1
    with pytest.raises(DecodeError, match=why):
        decode_frame(opened_head, MAX_FRAME, opened_detached)
    TALLY[ATTACKS_REJECTED] += 1


def test_a_detached_chunk_counts_toward_the_frame_limit() -> None:
    head, detached = split_frame(StreamData(STREAM_ID, b"x" * 1000))
    assert decode_frame(head, len(head) + 1000, detached).chunk == detached
    with pytest.raises(OversizeError):
        decode_frame(head, len(head) + 999, detached)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(head=st.binary(max_size=40), detached=st.binary(min_size=1, max_size=40))
def test_garbage_heads_with_a_detached_part_are_refused_as_bad_frames(head: bytes,
                                                                      detached: bytes) -> None:
    """Whatever a keyed peer seals apart, the receiver either reads the one frame those bytes
    encode or refuses them as a bad frame; nothing else escapes."""
    TALLY[INPUTS_TRIED] += 1
    try:
        frame = decode_frame(head, MAX_FRAME, detached)
    except DecodeError:
        return
    assert isinstance(frame, (StreamData, StreamFin))
    assert split_frame(frame) == (head, detached)


def test_a_detached_chunk_shorter_than_a_tag_and_mac_is_refused() -> None:
    """A chunk is a secretstream message (SPEC §16): under 17 bytes it can never open, and
    costing no credit it was a frame a device could send without end."""
    for cls in (StreamData, StreamFin):
        head, detached = split_frame(cls(STREAM_ID, b"x" * 16))
        TALLY[INPUTS_TRIED] += 1
        with pytest.raises(DecodeError, match="at least 17 bytes"):
            decode_frame(head, MAX_FRAME, detached)
        TALLY[ATTACKS_REJECTED] += 1
        head, detached = split_frame(cls(STREAM_ID, b"x" * 17))
        assert decode_frame(head, MAX_FRAME, detached) == cls(STREAM_ID, b"x" * 17)
