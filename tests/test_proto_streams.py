"""Streams in the wire format (SPEC §16): the open and its answer, the keys, the chunks.

What a relay (or anyone on the path) might try is covered here without a
socket: answers from the wrong device or for another open, chunks altered,
dropped, repeated, reordered, spliced from another stream, or a cut passed off
as the end; and hypothesis on every decoder.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import Kind, canonical, decode_envelope, seal_envelope
from proto.errors import (DecodeError, InvalidFieldError, ProtocolError, SignatureError,
                          StreamBrokenError)
from proto.frames import (MAX_CREDIT, StreamAbort, StreamAccept, StreamCredit, StreamData,
                          StreamFin, StreamOpen, decode_frame, encode_frame)
from proto.streams import (CHUNK_OVERHEAD_BYTES, AcceptAnswer, OpenRequest, accept_open,
                           begin_open, read_open)
from proto_support import ALICE, BOB, MALLORY, NOW_MS, counter_random
from tally import INPUTS_TRIED, TALLY


def opened(service: str = "tcp/22", label: str = "s"):
    """alice opens a stream to bob and bob accepts: (alice's keys, bob's keys)."""
    opening = begin_open(ALICE, BOB.public, service, now_ms=NOW_MS,
                         random_bytes=counter_random(label + "a"))
    envelope = decode_envelope(opening.envelope.raw)
    request = read_open(envelope, BOB)
    answer, bob = accept_open(BOB, envelope, request, now_ms=NOW_MS + 5,
                              random_bytes=counter_random(label + "b"))
    return opening.complete(answer.raw, ALICE), bob


def test_both_ends_derive_the_same_keys_crosswise_and_chunks_open_in_order() -> None:
    alice, bob = opened()
    assert alice.send_key == bob.receive_key and alice.receive_key == bob.send_key
    assert alice.send_key != alice.receive_key
    sent = [alice.sealer.seal(f"chunk {i}".encode()) for i in range(5)]
    assert [bob.opener.open(c, final=False) for c in sent] == [f"chunk {i}".encode()
                                                                for i in range(5)]
    last = bob.sealer.seal(b"bye", final=True)
    assert len(last) == 3 + CHUNK_OVERHEAD_BYTES
    assert alice.opener.open(last, final=True) == b"bye"


def test_the_open_tells_the_peer_the_service_and_nothing_in_the_clear() -> None:
    opening = begin_open(ALICE, BOB.public, "tcp/8080", now_ms=NOW_MS)
    envelope = decode_envelope(opening.envelope.raw)
    assert envelope.recipient_keys == (BOB.public,)
    assert b"tcp/8080" not in opening.envelope.raw
    assert read_open(envelope, BOB).service == "tcp/8080"
    assert opening.stream_id == envelope.msg_id


@pytest.mark.parametrize("tamper", ["drop", "repeat", "swap", "flip", "splice"])
def test_a_relay_cannot_drop_repeat_reorder_alter_or_splice_chunks(tamper: str) -> None:
    alice, bob = opened()
    other_alice, _ = opened(label="other")
    chunks = [alice.sealer.seal(bytes([i]) * 10) for i in range(3)]
    if tamper == "drop":
        delivered = [chunks[0], chunks[2]]
    elif tamper == "repeat":
        delivered = [chunks[0], chunks[0]]
    elif tamper == "swap":
        delivered = [chunks[1], chunks[0]]
    elif tamper == "flip":
        delivered = [chunks[0][:-1] + bytes([chunks[0][-1] ^ 1])]
    else:
        delivered = [chunks[0], other_alice.sealer.seal(b"x" * 10)]
    TALLY[INPUTS_TRIED] += 1
    with pytest.raises(StreamBrokenError):
        for chunk in delivered:
            bob.opener.open(chunk, final=False)


def test_a_cut_is_never_taken_for_the_end() -> None:
    """Only the sender can make the FINAL chunk: a relay can neither pass data off as the
    end (STREAM_FIN around a MESSAGE chunk) nor the end off as data."""
    alice, bob = opened()
    data = alice.sealer.seal(b"partial")
    with pytest.raises(StreamBrokenError, match="tag"):
        bob.opener.open(data, final=True)
    alice2, bob2 = opened(label="t")
    end = alice2.sealer.seal(b"", final=True)
    with pytest.raises(StreamBrokenError, match="tag"):
        bob2.opener.open(end, final=False)


def test_nothing_follows_a_direction_s_end() -> None:
    alice, bob = opened()
    bob.opener.open(alice.sealer.seal(b"", final=True), final=True)
    with pytest.raises(StreamBrokenError):
        alice.sealer.seal(b"more")
    with pytest.raises(StreamBrokenError):
        bob.opener.open(b"\x00" * 40, final=False)


def test_an_answer_proves_the_peer_and_names_this_very_open() -> None:
    opening = begin_open(ALICE, BOB.public, "tcp/22", now_ms=NOW_MS)
    envelope = decode_envelope(opening.envelope.raw)
    request = read_open(envelope, BOB)
    # From another device than the one asked (mallory answering bob's open).
    forged, _ = accept_open(MALLORY, envelope, request, now_ms=NOW_MS)
    with pytest.raises(InvalidFieldError, match="not from"):
        opening.complete(forged.raw, ALICE)
    # Bob's answer to another open of alice's.
    other = decode_envelope(begin_open(ALICE, BOB.public, "tcp/22", now_ms=NOW_MS).envelope.raw)
    wrong, _ = accept_open(BOB, other, read_open(other, BOB), now_ms=NOW_MS)
    with pytest.raises(InvalidFieldError, match="another open"):
        opening.complete(wrong.raw, ALICE)
    # Sealed by bob as something else than an answer.
    data = seal_envelope(BOB, Kind.DATA, [ALICE.public],
                         AcceptAnswer(envelope.content_hash(), bytes(32), bytes(24)).encode(),
                         ttl_s=60, now_ms=NOW_MS)
    with pytest.raises(InvalidFieldError, match="DATA"):
        opening.complete(data.raw, ALICE)
    # A signature that does not verify.
    good, _ = accept_open(BOB, envelope, request, now_ms=NOW_MS)
    with pytest.raises(SignatureError):
        opening.complete(good.raw[:-1] + bytes([good.raw[-1] ^ 1]), ALICE)
    TALLY[INPUTS_TRIED] += 4


def test_an_open_is_read_only_as_an_open_to_this_device_alone() -> None:
    as_data = decode_envelope(seal_envelope(
        ALICE, Kind.DATA, [BOB.public], OpenRequest(bytes(32), bytes(24), "x").encode(),
        ttl_s=60, now_ms=NOW_MS).raw)
    with pytest.raises(InvalidFieldError, match="not STREAM_OPEN"):
        read_open(as_data, BOB)
    two = decode_envelope(seal_envelope(
        ALICE, Kind.STREAM_OPEN, [BOB.public, MALLORY.public],
        OpenRequest(bytes(32), bytes(24), "x").encode(), ttl_s=60, now_ms=NOW_MS).raw)
    with pytest.raises(InvalidFieldError, match="exactly one"):
        read_open(two, BOB)


def test_an_ephemeral_key_of_small_order_is_refused_before_answering() -> None:
    opening = begin_open(ALICE, BOB.public, "tcp/22", now_ms=NOW_MS)
    envelope = decode_envelope(opening.envelope.raw)
    request = read_open(envelope, BOB)
    weak = OpenRequest(bytes(32), request.header, request.service)  # the point at zero
    with pytest.raises(InvalidFieldError, match="ephemeral"):
        accept_open(BOB, envelope, weak, now_ms=NOW_MS)


def test_service_names_are_bounded() -> None:
    with pytest.raises(InvalidFieldError):
        begin_open(ALICE, BOB.public, "", now_ms=NOW_MS)
    with pytest.raises(InvalidFieldError):
        begin_open(ALICE, BOB.public, "x" * 129, now_ms=NOW_MS)
    with pytest.raises(InvalidFieldError):
        begin_open(ALICE, ALICE.public, "tcp/22", now_ms=NOW_MS)


def test_stream_frames_round_trip_and_refuse_bad_fields() -> None:
    sid = bytes(range(16))
    for frame in (StreamOpen(0, b"env"), StreamAccept(sid, 65536, b"env"),
                  StreamData(sid, b"c" * 17), StreamCredit(sid, 1), StreamFin(sid, b"f" * 17),
                  StreamAbort(sid, 27, "why")):
        assert decode_frame(encode_frame(frame), 1 << 20) == frame
    for bad in ([12, sid, 0], [12, sid, MAX_CREDIT + 1], [11, sid[:15], b""],
                [9, -1, b"e"], [14, sid, 27, 5], [10, sid, 1],
                # A chunk shorter than a secretstream tag and MAC (17 bytes) can never open.
                [11, sid, b""], [11, sid, b"c" * 16], [13, sid, b"f" * 16]):
        TALLY[INPUTS_TRIED] += 1
        with pytest.raises(ProtocolError):
            decode_frame(canonical.encode(bad), 1 << 20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_stream_payload_decoders_refuse_garbage_with_a_protocol_error(data: bytes) -> None:
    TALLY[INPUTS_TRIED] += 2
    for decode in (OpenRequest.decode, AcceptAnswer.decode):
        try:
            decode(data)
        except (DecodeError, InvalidFieldError):
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.booleans())
def test_garbage_chunks_never_open(chunk: bytes, final: bool) -> None:
    TALLY[INPUTS_TRIED] += 1
    _, bob = opened(label="g")
    with pytest.raises(StreamBrokenError):
        bob.opener.open(chunk, final=final)
