"""The device's stream rules (`client.stream_rules`), without a socket: two `DeviceStreams`
talk through a hand-carried list of frames, and the relay's part is played by the test
(which may also play a hostile relay)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.stream_rules import DeviceStreams, Offered, State
from proto import Kind, Limits, seal_envelope
from proto.errors import ErrorCode, ProtocolError, StreamBrokenError
from proto.frames import StreamAbort, StreamAccept, StreamCredit, StreamData, StreamFin, StreamOpen
from proto.streams import OpenRequest
from proto_support import ALICE, BOB, MALLORY
from tally import ATTACKS_REJECTED, INPUTS_TRIED, TALLY

NOW = 1_700_000_000_000
LIMITS = Limits()


def pair(window: int = 4096):
    alice = DeviceStreams(is_peer={BOB.public})
    bob = DeviceStreams(is_peer={ALICE.public})
    mine = alice.open(ALICE, BOB.public, "tcp/22", now_ms=NOW, limits=LIMITS, window=window)
    [offer] = alice.frames_to_send()
    event = bob.receive(offer, BOB, now_ms=NOW, limits=LIMITS)
    assert isinstance(event, Offered) and event.end.service == "tcp/22"
    bob.accept(event.end, BOB, event.request, event.envelope, now_ms=NOW, limits=LIMITS,
               window=window)
    [accept] = bob.frames_to_send()
    alice.receive(accept, ALICE, now_ms=NOW, limits=LIMITS)
    assert mine.state is State.OPEN
    return alice, mine, bob, event.end


def carry(source: DeviceStreams, target: DeviceStreams, identity) -> list:
    frames = source.frames_to_send()
    for frame in frames:
        target.receive(frame, identity, now_ms=NOW, limits=LIMITS)
    return frames


def test_data_flows_within_the_window_and_reading_grants_it_back() -> None:
    alice, mine, bob, theirs = pair(window=4096)
    taken = alice.write(mine, memoryview(b"x" * 10_000), max_chunk=1000)
    assert taken == 4 * 1000  # 4 chunks of 1017 wire bytes fit in 4096
    carry(alice, bob, BOB)
    assert alice.write(mine, memoryview(b"x" * 100), max_chunk=1000) == 0  # 28 bytes of credit
    read = b""
    while len(read) < 3000:
        read += bob.read(theirs, 3000 - len(read))  # a chunk at a time, as it came
    assert read == b"x" * 3000
    [credit] = bob.frames_to_send()  # granted once a quarter window (1024) was read
    assert credit == StreamCredit(theirs.stream_id, 2 * 1017)
    alice.receive(credit, ALICE, now_ms=NOW, limits=LIMITS)
    assert alice.write(mine, memoryview(b"y" * 5000), max_chunk=1000) == 2000


def test_fins_half_close_each_way_and_the_stream_ends_when_both_are_read() -> None:
    alice, mine, bob, theirs = pair()
    alice.write(mine, memoryview(b"request"), max_chunk=1000)
    assert alice.finish(mine)
    carry(alice, bob, BOB)
    assert bob.read(theirs, 100) == b"request"
    assert bob.read(theirs, 100) is None  # alice's end of data
    bob.write(theirs, memoryview(b"reply"), max_chunk=1000)  # bob may still send
    assert bob.finish(theirs)
    carry(bob, alice, ALICE)
    assert alice.read(mine, 100) == b"reply" and alice.read(mine, 100) is None
    assert mine.state is State.ENDED and theirs.state is State.ENDED
    assert mine.error is None and len(alice) == len(bob) == 0
    with pytest.raises(StreamBrokenError):
        alice.write(mine, memoryview(b"more"), max_chunk=1000)


@pytest.mark.parametrize("attack", ["drop", "repeat", "flip", "fin_as_data", "cut_as_fin",
                                    "over_credit"])
def test_a_relay_that_tampers_with_chunks_breaks_the_stream_never_the_data(attack: str) -> None:
    alice, mine, bob, theirs = pair(window=4096)
    alice.write(mine, memoryview(b"a" * 10 + b"b" * 10), max_chunk=10)
    first, second = alice.frames_to_send()
    if attack == "drop":
        delivered = [second]
    elif attack == "repeat":
        delivered = [first, first]
    elif attack == "flip":
        delivered = [StreamData(first.stream_id, first.chunk[:-1] + bytes([first.chunk[-1] ^ 1]))]
    elif attack == "fin_as_data":
        delivered = [StreamFin(first.stream_id, first.chunk)]
    elif attack == "cut_as_fin":
        alice.finish(mine)
        [fin] = alice.frames_to_send()
        delivered = [first, StreamData(fin.stream_id, fin.chunk)]
    else:
        delivered = [StreamData(first.stream_id, b"\x00" * 5000)]
    TALLY[INPUTS_TRIED] += 1
    for frame in delivered:
        bob.receive(frame, BOB, now_ms=NOW, limits=LIMITS)
    with pytest.raises(StreamBrokenError):
        while bob.read(theirs, 100):
            pass
    aborts = [f for f in bob.frames_to_send() if isinstance(f, StreamAbort)]
    assert [f.code for f in aborts] == [ErrorCode.STREAM_BROKEN]
    TALLY[ATTACKS_REJECTED] += 1


def offer_from(opener, *, now_ms: int = NOW, kind: Kind = Kind.STREAM_OPEN) -> StreamOpen:
    if kind is Kind.STREAM_OPEN:
        streams = DeviceStreams(is_peer=set())
        streams.open(opener, BOB.public, "tcp/22", now_ms=now_ms, limits=LIMITS)
        [offer] = streams.frames_to_send()
        return offer
    envelope = seal_envelope(opener, kind, [BOB.public],
                             OpenRequest(bytes(range(32)), bytes(24), "tcp/22").encode(),
                             ttl_s=60, now_ms=now_ms)
    return StreamOpen(1000, envelope.raw)


@pytest.mark.parametrize("case, words", [
    ("non-peer", "not a peer"),
    ("stale", "too old"),
    ("replayed", "taken already"),
    ("sealed as data", "not STREAM_OPEN"),
])
def test_offers_refused_before_the_application_sees_them(case: str, words: str) -> None:
    bob = DeviceStreams(is_peer={ALICE.public})
    if case == "non-peer":
        offer = offer_from(MALLORY)
    elif case == "stale":
        offer = offer_from(ALICE, now_ms=NOW - 60_000 - 300_001)
    elif case == "sealed as data":
        offer = offer_from(ALICE, kind=Kind.DATA)
    else:
        offer = offer_from(ALICE)
        assert isinstance(bob.receive(offer, BOB, now_ms=NOW, limits=LIMITS), Offered)
        [end] = list(bob._ends.values())
        bob.abort(end, StreamBrokenError("done"))  # it ended; the same open comes again
        bob.frames_to_send()
    TALLY[INPUTS_TRIED] += 1
    assert bob.receive(offer, BOB, now_ms=NOW, limits=LIMITS) is None
    [refusal] = bob.frames_to_send()
    assert refusal.code == ErrorCode.STREAM_REFUSED and words in refusal.message
    TALLY[ATTACKS_REJECTED] += 1


def test_a_relay_clock_years_ahead_does_not_make_the_device_forget_the_opens_it_took() -> None:
    """A relay announcing a clock ten years ahead, delivering a peer's open stamped then, must
    not make the device forget the opens it took by its own clock: a later relay replaying
    one of them is refused (as `Device._prune` does for messages)."""
    bob = DeviceStreams(is_peer={ALICE.public})
    first = offer_from(ALICE)
    assert isinstance(bob.receive(first, BOB, now_ms=NOW, local_ms=NOW, limits=LIMITS), Offered)
    [end] = list(bob._ends.values())
    bob.abort(end, StreamBrokenError("done"))
    bob.frames_to_send()
    ahead = NOW + 10 * 365 * 86_400_000
    offered = bob.receive(offer_from(ALICE, now_ms=ahead), BOB, now_ms=ahead, local_ms=NOW,
                          limits=LIMITS)
    assert isinstance(offered, Offered)
    TALLY[INPUTS_TRIED] += 1
    assert bob.receive(first, BOB, now_ms=NOW, local_ms=NOW, limits=LIMITS) is None
    [refusal] = bob.frames_to_send()
    assert refusal.code == ErrorCode.STREAM_REFUSED and "taken already" in refusal.message
    TALLY[ATTACKS_REJECTED] += 1


def test_an_answer_that_does_not_prove_the_peer_breaks_the_open() -> None:
    alice = DeviceStreams(is_peer={BOB.public})
    mine = alice.open(ALICE, BOB.public, "tcp/22", now_ms=NOW, limits=LIMITS)
    [offer] = alice.frames_to_send()
    mallory = DeviceStreams(is_peer={ALICE.public})
    event = mallory.receive(offer, MALLORY, now_ms=NOW, limits=LIMITS)  # not for mallory
    assert event is None
    forged = seal_envelope(MALLORY, Kind.STREAM_ACCEPT, [ALICE.public], b"\x00", ttl_s=60,
                           now_ms=NOW)
    alice.receive(StreamAccept(mine.stream_id, 1000, forged.raw), ALICE, now_ms=NOW,
                  limits=LIMITS)
    assert mine.state is State.ENDED and isinstance(mine.error, StreamBrokenError)
    assert [f.code for f in alice.frames_to_send()] == [ErrorCode.STREAM_BROKEN]


def test_an_abort_from_the_peer_surfaces_its_code_and_words() -> None:
    alice, mine, bob, theirs = pair()
    bob.abort(theirs, StreamBrokenError("port went away"))
    carry(bob, alice, ALICE)
    with pytest.raises(StreamBrokenError, match="port went away"):
        alice.read(mine, 10)


def test_losing_the_connection_ends_every_stream_and_resumes_none() -> None:
    alice, mine, bob, theirs = pair()
    ended = alice.connection_lost()
    assert ended == [mine] and alice.frames_to_send() == []
    with pytest.raises(StreamBrokenError, match="never resumed"):
        alice.read(mine, 10)
    with pytest.raises(StreamBrokenError):
        alice.write(mine, memoryview(b"x"), max_chunk=10)


def test_what_arrived_before_an_abort_can_still_be_read() -> None:
    alice, mine, bob, theirs = pair()
    alice.write(mine, memoryview(b"partial"), max_chunk=100)
    alice.abort(mine, StreamBrokenError("gone"))
    carry(alice, bob, BOB)
    assert bob.read(theirs, 100) == b"partial"
    with pytest.raises(StreamBrokenError, match="gone"):
        bob.read(theirs, 100)


def test_no_credit_is_granted_after_the_peer_finished() -> None:
    alice, mine, bob, theirs = pair(window=4096)
    alice.write(mine, memoryview(b"x" * 3000), max_chunk=1000)
    alice.finish(mine)
    carry(alice, bob, BOB)
    while bob.read(theirs, 10_000):
        pass
    assert [f for f in bob.frames_to_send() if isinstance(f, StreamCredit)] == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["open", "accept", "data", "fin", "credit", "abort"]),
                          st.booleans(), st.binary(max_size=80), st.integers(0, 2**32 - 1)),
                max_size=12))
def test_whatever_a_relay_sends_a_device_never_surfaces_data_it_did_not_seal(moves) -> None:
    """Arbitrary stream frames from a hostile relay, for the open stream's id or another:
    the device never raises out of `receive`, never hands the application a byte alice did
    not send, and a broken stream stays broken."""
    alice, mine, bob, theirs = pair(window=4096)
    alice.write(mine, memoryview(b"genuine"), max_chunk=100)
    carry(alice, bob, BOB)
    for kind, ours, blob, number in moves:
        TALLY[INPUTS_TRIED] += 1
        sid = theirs.stream_id if ours else bytes(16)
        frame = {"open": lambda: StreamOpen(number, blob),
                 "accept": lambda: StreamAccept(sid, number, blob),
                 "data": lambda: StreamData(sid, blob),
                 "fin": lambda: StreamFin(sid, blob),
                 "credit": lambda: StreamCredit(sid, max(1, number)),
                 "abort": lambda: StreamAbort(sid, number, "x")}[kind]()
        bob.receive(frame, BOB, now_ms=NOW, limits=LIMITS)
    received = b""
    try:
        while data := bob.read(theirs, 1000):
            received += data
    except ProtocolError:
        pass
    assert received == b"genuine"
