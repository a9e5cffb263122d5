"""The relay's stream rules (SPEC §16), frame by frame, without a socket or a store.

Tables of two or more connections are wired by the real `StreamRouter`
(`stream_support`): each test sends what a device would send and asserts on
what each device is written, what is refused, and what the relay holds.
The socket-level behaviour of the same rules is in tests/test_streams.py.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from continuum.protocol import CLOSE_POLICY_VIOLATION, RouteStreams
from proto import Kind, seal_envelope
from proto.errors import ErrorCode
from proto.frames import (StreamAbort, StreamAccept, StreamCredit, StreamData, StreamFin,
                          StreamOpen, encode_frame)
from proto.streams import OpenRequest
from proto_support import ALICE, BOB, CAROL, MALLORY
from stream_support import NOW, World, access_list, answer, open_frame
from tally import ATTACKS_REJECTED, INPUTS_TRIED, TALLY
from test_relay_protocol import authenticated, frames

WINDOW = 64 * 1024


async def open_stream(world: World, window: int = WINDOW):
    """alice opens a stream to bob, who accepts it: (alice, bob, stream id, keys...)."""
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    offer, opening = open_frame(ALICE, BOB, window)
    alice.send(offer)
    [delivered] = bob.take()
    assert delivered == offer
    raw, bob_keys = answer(BOB, offer)
    bob.send(StreamAccept(opening.stream_id, window, raw))
    [accepted] = alice.take()
    assert isinstance(accepted, StreamAccept)
    return alice, bob, opening.stream_id, opening.complete(accepted.envelope, ALICE), bob_keys


def aborts(frames: list) -> list[str]:
    return [ErrorCode(f.code).name for f in frames if isinstance(f, StreamAbort)]


async def test_a_stream_opens_carries_data_both_ways_and_ends_with_both_fins() -> None:
    world = World()
    alice, bob, sid, alice_keys, bob_keys = await open_stream(world)
    assert world.budget.open == 2  # one half per connection
    alice.send(StreamData(sid, alice_keys.sealer.seal(b"ping")))
    [data] = bob.take()
    assert bob_keys.opener.open(data.chunk, final=False) == b"ping"
    bob.send(StreamData(sid, bob_keys.sealer.seal(b"pong")))
    assert alice_keys.opener.open(alice.take()[0].chunk, final=False) == b"pong"
    alice.send(StreamFin(sid, alice_keys.sealer.seal(b"", final=True)))
    assert isinstance(bob.take()[0], StreamFin)
    bob.send(StreamFin(sid, bob_keys.sealer.seal(b"", final=True)))
    assert isinstance(alice.take()[0], StreamFin)
    assert len(alice.table) == len(bob.table) == 0 and world.budget.open == 0
    assert alice.refused == bob.refused == []


async def test_an_open_to_a_device_connected_nowhere_fails_at_once() -> None:
    world = World()
    alice = await world.connect(ALICE)
    offer, _ = open_frame(ALICE, BOB)
    alice.send(offer)
    assert aborts(alice.take()) == ["PEER_UNREACHABLE"]
    assert len(alice.table) == 0 and world.budget.open == 0


def _resigned(offer: StreamOpen, flip: int) -> StreamOpen:
    raw = bytearray(offer.envelope)
    raw[flip] ^= 1
    return StreamOpen(offer.window, bytes(raw))


@pytest.mark.parametrize("case, code", [
    ("bad signature", "BAD_SIGNATURE"),
    ("sealed by another key", "WRONG_SENDER"),
    ("two recipients", "INVALID_FIELD"),
    ("to itself", "INVALID_FIELD"),
    ("to a non-peer", "NOT_PEER"),
    ("from a non-peer to a group member", "NOT_PEER"),
    ("stale", "STALE"),
])
async def test_opens_are_verified_like_sends(case: str, code: str) -> None:
    world = World()
    opener = MALLORY if case.startswith("from a non-peer") else ALICE
    conn = await world.connect(opener)
    await world.connect(BOB)
    await world.connect(CAROL)
    offer, _ = open_frame(opener, BOB)
    if case == "bad signature":
        offer = _resigned(offer, len(offer.envelope) - 1)
    elif case == "sealed by another key":
        offer, _ = open_frame(BOB, CAROL)
    elif case in ("two recipients", "to itself"):
        targets = [BOB.public, CAROL.public] if case == "two recipients" else [ALICE.public]
        envelope = seal_envelope(ALICE, Kind.STREAM_OPEN, targets,
                                 OpenRequest(bytes(32), bytes(24), "x").encode(), ttl_s=60,
                                 now_ms=NOW)
        offer = StreamOpen(WINDOW, envelope.raw)
    elif case == "to a non-peer":
        offer, _ = open_frame(ALICE, CAROL)
    elif case == "stale":
        offer, _ = open_frame(ALICE, BOB, now_ms=NOW - 400_000)
    conn.send(offer)
    TALLY[INPUTS_TRIED] += 1
    assert conn.codes() == [code] and conn.refused[0].abuse
    assert [f for f in conn.take() if not isinstance(f, StreamAbort)] == []
    assert world.budget.open == 0
    TALLY[ATTACKS_REJECTED] += 1


async def test_windows_above_the_relays_bound_are_lowered_to_it() -> None:
    world = World()
    bound = world.settings.max_stream_window_bytes
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    offer, opening = open_frame(ALICE, BOB, window=bound * 4)
    alice.send(offer)
    [offered] = bob.take()
    assert offered.window == bound and offered.envelope == offer.envelope
    bob.send(StreamAccept(opening.stream_id, bound * 2, answer(BOB, offer)[0]))
    [accepted] = alice.take()
    assert accepted.window == bound and alice.refused == bob.refused == []
    assert bob.table.half(opening.stream_id).may_send == bound


async def test_an_undecodable_open_is_refused_without_a_stream_id() -> None:
    world = World()
    alice = await world.connect(ALICE)
    alice.send(StreamOpen(WINDOW, b"\x80 not an envelope"))
    assert [r.stream_id for r in alice.refused] == [None] and alice.codes() == ["MALFORMED"]


async def test_bounds_on_pending_opens_per_device() -> None:
    world = World(max_pending_streams_per_device=2, max_streams_per_device=10)
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    for _ in range(3):
        alice.send(open_frame(ALICE, BOB)[0])
    assert alice.codes() == ["STREAM_LIMIT"] and not alice.refused[0].abuse
    assert "waits for 2 answers" in alice.refused[0].error.message
    assert len(bob.take()) == 2 and world.budget.open == 4


async def test_bounds_on_streams_per_device() -> None:
    world = World(max_pending_streams_per_device=5, max_streams_per_device=2)
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    for _ in range(2):
        alice.send(open_frame(ALICE, BOB)[0])
    for offer in bob.take():
        bob.send(StreamAccept(open_sid(offer), WINDOW, answer(BOB, offer)[0]))
    assert [type(f) for f in alice.take()] == [StreamAccept, StreamAccept]
    alice.send(open_frame(ALICE, BOB)[0])
    assert alice.codes() == ["STREAM_LIMIT"] and "has 2 streams" in alice.refused[0].error.message
    assert world.budget.open == 4


def open_sid(offer: StreamOpen) -> bytes:
    from proto import decode_envelope
    return decode_envelope(offer.envelope).msg_id


async def test_a_relay_wide_bound_refuses_opens_and_offers() -> None:
    world = World(max_streams=1)
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    alice.send(open_frame(ALICE, BOB)[0])
    # The opener's half took the relay's one slot: the offer to bob is refused for it.
    assert aborts(alice.take()) == ["STREAM_LIMIT"] and bob.take() == []
    assert world.budget.open == 0


async def test_the_rate_of_opens_is_bounded_per_connection() -> None:
    world = World(stream_opens_per_s=1.0, stream_open_burst=2, max_pending_streams_per_device=10,
                  max_streams_per_device=10)
    alice = await world.connect(ALICE)
    for _ in range(3):
        alice.send(open_frame(ALICE, BOB)[0])
    assert [c for c in alice.codes()] == ["RATE_LIMITED"]
    assert aborts(alice.take()) == ["PEER_UNREACHABLE", "PEER_UNREACHABLE"]


async def test_a_sender_may_send_only_what_the_receiver_granted() -> None:
    world = World()
    alice, bob, sid, keys, _ = await open_stream(world, window=1000)
    alice.send(StreamData(sid, keys.sealer.seal(b"x" * (1000 - 17))))  # exactly the window
    assert len(bob.take()) == 1 and alice.refused == []
    alice.send(StreamData(sid, keys.sealer.seal(b"y")))  # beyond it
    TALLY[INPUTS_TRIED] += 1
    assert alice.codes() == ["STREAM_BROKEN"] and alice.refused[0].abuse
    assert aborts(bob.take()) == ["STREAM_BROKEN"]
    assert world.budget.open == 0
    TALLY[ATTACKS_REJECTED] += 1


async def test_credit_lets_the_sender_go_on_and_is_bounded_by_the_relay_window() -> None:
    world = World()
    alice, bob, sid, keys, _ = await open_stream(world, window=1000)
    alice.send(StreamData(sid, keys.sealer.seal(b"x" * 983)))
    bob.take()
    bob.send(StreamCredit(sid, 1000))
    assert alice.take() == [StreamCredit(sid, 1000)]
    alice.send(StreamData(sid, keys.sealer.seal(b"x" * 983)))
    assert len(bob.take()) == 1 and alice.refused == []
    # Holding out more credit than the relay's bound would let more wait on the path.
    bob.send(StreamCredit(sid, world.settings.max_stream_window_bytes + 1))
    assert bob.codes() == ["INVALID_FIELD"]
    assert aborts(alice.take()) == ["STREAM_BROKEN"]


@pytest.mark.parametrize("case", ["data before the answer", "data after fin",
                                  "credit before the answer", "answer twice",
                                  "answer sealed to another"])
async def test_frames_out_of_place_end_the_stream_at_both_ends(case: str) -> None:
    world = World()
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    offer, opening = open_frame(ALICE, BOB)
    alice.send(offer)
    bob.take()
    sid = opening.stream_id
    raw, keys = answer(BOB, offer)
    if case == "data before the answer":
        bob.send(StreamData(sid, b"x" * 20))
        culprit, other = bob, alice
    elif case == "credit before the answer":
        bob.send(StreamCredit(sid, 10))
        culprit, other = bob, alice
    elif case == "answer sealed to another":
        envelope = seal_envelope(BOB, Kind.STREAM_ACCEPT, [CAROL.public], b"x", ttl_s=60,
                                 now_ms=NOW)
        bob.send(StreamAccept(sid, WINDOW, envelope.raw))
        culprit, other = bob, alice
    else:
        bob.send(StreamAccept(sid, WINDOW, raw))
        alice.take()
        if case == "answer twice":
            bob.send(StreamAccept(sid, WINDOW, raw))
        else:
            bob.send(StreamFin(sid, keys.sealer.seal(b"", final=True)))
            bob.send(StreamData(sid, b"x" * 20))
        culprit, other = bob, alice
    TALLY[INPUTS_TRIED] += 1
    assert culprit.refused and culprit.refused[-1].abuse
    assert "STREAM_BROKEN" in aborts(other.take())
    assert world.budget.open == 0


async def test_an_abort_reaches_the_other_end_with_its_reason() -> None:
    world = World()
    alice, bob, sid, _, _ = await open_stream(world)
    bob.send(StreamAbort(sid, int(ErrorCode.STREAM_REFUSED), "port closed"))
    assert alice.take() == [StreamAbort(sid, int(ErrorCode.STREAM_REFUSED), "port closed")]
    assert world.budget.open == 0


async def test_a_refused_offer_reaches_the_opener() -> None:
    world = World()
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    offer, opening = open_frame(ALICE, BOB)
    alice.send(offer)
    bob.take()
    bob.send(StreamAbort(opening.stream_id, int(ErrorCode.STREAM_REFUSED), "no such service"))
    assert alice.take() == [StreamAbort(opening.stream_id, int(ErrorCode.STREAM_REFUSED),
                                        "no such service")]
    assert world.budget.open == 0


async def test_a_connection_that_closes_ends_its_streams_at_the_other_end() -> None:
    world = World()
    alice, bob, sid, _, _ = await open_stream(world)
    await world.disconnect(bob)
    [abort] = alice.take()
    assert abort.code == ErrorCode.STREAM_BROKEN and "connection" in abort.message
    assert world.budget.open == 0


@pytest.mark.parametrize("change, code", [
    ({"groups": {ALICE: {0}, BOB: {1}, CAROL: {1}}}, "NOT_PEER"),
    ({"groups": {BOB: {0, 1}, CAROL: {1}}, "draining": (ALICE,)}, "REVOKED"),
], ids=["peer-group-left", "key-draining"])
async def test_a_list_that_no_longer_allows_a_stream_ends_it_at_both_ends(
        change: dict, code: str) -> None:
    """Streams and opens are checked against each new list, not only the one they were
    opened under: a key rotated away from may only drain its mailbox (SPEC §15)."""
    world = World()
    world.access.apply(access_list(2, {ALICE: {0}, BOB: {0, 1}, CAROL: {1}}))
    alice, bob, sid, _, _ = await open_stream(world)
    unanswered, _ = open_frame(ALICE, BOB)
    alice.send(unanswered)
    assert bob.take() == [unanswered]
    carol = await world.connect(CAROL)
    other, _ = open_frame(BOB, CAROL)
    bob.send(other)
    assert carol.take() == [other]
    world.access.apply(access_list(3, **change))
    assert aborts(alice.take()) == aborts(bob.take()) == [code, code]
    assert carol.take() == [] and world.budget.open == 2  # bob's open to carol waits on
    assert alice.table.half(sid) is None and len(alice.table) == 0 and len(bob.table) == 1
    assert alice.refused == bob.refused == []


async def test_a_lost_stream_bus_withdraws_opens_waiting_for_an_answer() -> None:
    """The answer may have been lost with the bus: the opener's relay cannot tell where the
    half that answered is, so it withdraws the open from every connection of the peer."""
    world = World()
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    offer, opening = open_frame(ALICE, BOB)
    alice.send(offer)
    assert bob.take() == [offer]
    world.router.lost_replica(None, "the bus was lost")
    assert aborts(alice.take()) == aborts(bob.take()) == ["STREAM_BROKEN"]
    assert world.budget.open == 0
    raw, _ = answer(BOB, offer)
    bob.send(StreamAccept(opening.stream_id, WINDOW, raw))  # too late: nothing to answer
    assert bob.dropped == ["stream_ended"] and alice.take() == []


async def test_frames_for_a_gone_connection_are_answered_by_the_router() -> None:
    world = World()
    alice, bob, sid, keys, _ = await open_stream(world)
    # Bob's connection vanishes from the router without its table being closed (a race).
    world.router._endpoints.pop(bob.address.connection)
    alice.send(StreamData(sid, keys.sealer.seal(b"x")))
    [abort] = alice.take()
    assert abort.code == ErrorCode.STREAM_BROKEN


async def test_unanswered_opens_end_at_their_deadline_at_both_ends() -> None:
    world = World(stream_open_timeout_s=2.0)
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    alice.send(open_frame(ALICE, BOB)[0])
    bob.take()
    world.now += 1999
    world.router.expire(world.now)
    assert alice.take() == bob.take() == []
    world.now += 1
    world.router.expire(world.now)
    assert aborts(bob.take()) == ["STREAM_BROKEN"]
    assert aborts(alice.take()) == ["PEER_UNREACHABLE"]
    assert world.budget.open == 0


async def test_an_answer_from_a_second_connection_of_the_peer_is_turned_away() -> None:
    world = World()
    alice = await world.connect(ALICE)
    bob1, bob2 = await world.connect(BOB), await world.connect(BOB)
    offer, opening = open_frame(ALICE, BOB)
    alice.send(offer)
    assert bob1.take() == [offer] and bob2.take() == [offer]
    bob1.send(StreamAccept(opening.stream_id, WINDOW, answer(BOB, offer)[0]))
    bob2.send(StreamAccept(opening.stream_id, WINDOW, answer(BOB, offer)[0]))
    assert [type(f) for f in alice.take()] == [StreamAccept]
    assert aborts(bob2.take()) == ["STREAM_BROKEN"]
    assert len(bob1.table) == 1 and len(bob2.table) == 0


async def test_frames_crossing_a_stream_s_end_are_dropped_quietly() -> None:
    world = World()
    alice, bob, sid, keys, _ = await open_stream(world)
    bob.send(StreamAbort(sid, int(ErrorCode.STREAM_BROKEN), "bye"))
    alice.take()
    alice.send(StreamData(sid, keys.sealer.seal(b"late")))
    alice.send(StreamCredit(sid, 5))
    assert alice.dropped == ["stream_ended", "stream_ended"] and alice.refused == []
    assert bob.take() == []


async def test_a_connection_over_its_byte_rate_is_paused_not_refused() -> None:
    world = World(stream_bytes_per_s=100_000.0, stream_burst_bytes=70_000)
    alice, bob, sid, keys, _ = await open_stream(world, window=200_000)
    alice.send(StreamData(sid, keys.sealer.seal(b"x" * 60_000)))
    assert alice.paused == []
    alice.send(StreamData(sid, keys.sealer.seal(b"x" * 60_000)))
    assert alice.paused and 0.4 < alice.paused[0] < 0.6  # 50 kB of debt at 100 kB/s
    assert len(bob.take()) == 2 and alice.refused == []


async def test_bytes_waiting_for_a_receiver_that_reads_nothing_stay_within_its_window() -> None:
    """100 streams whose receiver never grants credit: whatever the senders try, the relay
    passes (and so may hold) at most one window per stream."""
    world = World(max_streams_per_device=200, max_pending_streams_per_device=200)
    window = 8 * 1024
    senders = [await world.connect(ALICE) for _ in range(1)]
    receiver = await world.connect(BOB)
    alice = senders[0]
    streams = []
    for _ in range(100):
        offer, opening = open_frame(ALICE, BOB, window)
        alice.send(offer)
        receiver.take()
        raw, _ = answer(BOB, offer)
        receiver.send(StreamAccept(opening.stream_id, window, raw))
        accepted = alice.take()[0]
        streams.append((opening.stream_id, opening.complete(accepted.envelope, ALICE)))
    for sid, keys in streams:
        for _ in range(3):  # three windows' worth, in window-sized chunks
            alice.send(StreamData(sid, keys.sealer.seal(b"x" * (window - 17))))
    passed = sum(len(f.chunk) for f in receiver.take() if isinstance(f, StreamData))
    assert passed == 100 * window
    assert alice.codes() == ["STREAM_BROKEN"] * 100  # each second chunk broke its stream


# -- the same rules through RelayProtocol: sealed frames, abuse counting -------------------

def test_stream_frames_go_through_the_sealed_channel_and_refusals_count_as_abuse() -> None:
    conversation = authenticated(max_invalid_frames=3)
    offer, _ = open_frame(ALICE, BOB)
    request = conversation.receive(encode_frame(offer))
    assert isinstance(request, RouteStreams)  # the offer, for the router
    for _ in range(3):
        other, _ = open_frame(ALICE, BOB)
        bad = StreamOpen(WINDOW, other.envelope[:-1] + bytes([other.envelope[-1] ^ 1]))
        assert conversation.receive(encode_frame(bad)) is None
    out = frames(conversation)
    assert [ErrorCode(f.code).name for f in out if isinstance(f, StreamAbort)] == [
        "BAD_SIGNATURE"] * 3
    assert conversation.close is not None and conversation.close.code == CLOSE_POLICY_VIOLATION


def test_an_idle_connection_holds_no_stream_table() -> None:
    conversation = authenticated()
    assert conversation.protocol._streams is None
    assert conversation.protocol.close_streams() == ()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["data", "fin", "credit", "abort", "accept"]),
                          st.integers(0, 2), st.integers(0, 70_000)), max_size=30))
def test_any_sequence_of_device_frames_keeps_the_books_straight(moves, ) -> None:
    """Whatever a device sends for its streams, the table never raises, and the relay-wide
    count always equals the halves held."""
    import asyncio

    async def run() -> None:
        world = World()
        alice, bob, sid, keys, _ = await open_stream(world)
        ids = [sid, os.urandom(16), bytes(16)]
        for kind, which, size in moves:
            TALLY[INPUTS_TRIED] += 1
            stream_id = ids[which]
            frame = {"data": lambda: StreamData(stream_id, b"\x00" * size),
                     "fin": lambda: StreamFin(stream_id, b"\x00" * size),
                     "credit": lambda: StreamCredit(stream_id, max(1, size)),
                     "abort": lambda: StreamAbort(stream_id, 27, "x"),
                     "accept": lambda: StreamAccept(stream_id, size, b"\x00")}[kind]()
            (alice if size % 2 else bob).send(frame)
            assert world.budget.open == len(alice.table) + len(bob.table)
        await world.disconnect(alice)
        await world.disconnect(bob)
        assert world.budget.open == 0

    asyncio.run(run())


# -- the credit pools: what can be on its way to one connection, and to the relay ---------

async def accepted_streams(world: World, alice, bob, count: int, window: int,
                           open_window: int | None = None) -> list:
    """`count` streams from alice to bob: (id, the window alice got, alice's keys)."""
    streams = []
    for _ in range(count):
        offer, opening = open_frame(ALICE, BOB, window if open_window is None else open_window)
        alice.send(offer)
        bob.take()
        raw, _ = answer(BOB, offer)
        bob.send(StreamAccept(opening.stream_id, window, raw))
        [accepted] = alice.take()
        streams.append((opening.stream_id, accepted.window,
                        opening.complete(accepted.envelope, ALICE)))
    return streams


async def test_a_connection_s_streams_share_one_pool_of_credit() -> None:
    """Bob grants 64 KiB to each of 5 streams, but only 192 KiB may be on its way to his
    connection (or wait there unread): the last two start with nothing, and get their
    credit as bob reads."""
    window = 64 * 1024
    world = World(stream_connection_window_bytes=3 * window, max_streams_per_device=10,
                  max_pending_streams_per_device=10)
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    streams = await accepted_streams(world, alice, bob, 5, window, open_window=0)
    assert [w for _, w, _ in streams] == [window] * 3 + [0, 0]
    sid, _, keys = streams[0]
    alice.send(StreamData(sid, keys.sealer.seal(b"x" * (window - 17))))  # uses stream 0's credit
    assert len([f for f in bob.take() if isinstance(f, StreamData)]) == 1
    assert alice.take() == []  # on its way to bob, or waiting for him: still exposed
    bob.send(StreamCredit(sid, window))  # bob read it, and grants it back
    # That made room: the oldest held stream gets it; stream 0's new credit waits behind
    # stream 4 (no overtaking).
    assert alice.take() == [StreamCredit(streams[3][0], window)]
    assert world.budget.credit == 3 * window


async def test_the_relay_wide_pool_is_shared_and_refilled_at_the_tick() -> None:
    """Connections share the relay's pool: what one frees is passed on at once by the tables
    the freeing frames reach, and by any other at the router's next tick."""
    window = 64 * 1024
    world = World(stream_relay_window_bytes=window, max_streams_per_device=10)
    alice, bob1 = await world.connect(ALICE), await world.connect(BOB)
    [(first, granted, _)] = await accepted_streams(world, alice, bob1, 1, window,
                                                   open_window=0)
    assert granted == window and world.budget.credit == window  # bob1's grant fills it
    bob2 = await world.connect(BOB)  # the same device's second connection
    offer, opening = open_frame(ALICE, BOB, 0)
    alice.send(offer)
    bob1.take()  # offered to both; bob1 lets it wait
    bob2.take()
    bob2.send(StreamAccept(opening.stream_id, window, answer(BOB, offer)[0]))
    [accepted] = alice.take()
    assert accepted.window == 0  # nothing left in the relay's pool: held at bob2's half
    alice.send(StreamAbort(first, 27, "done"))  # bob1's stream ends: the pool is free...
    assert aborts(bob1.take()) == ["STREAM_BROKEN"]
    assert world.budget.credit == 0 and alice.take() == []
    world.router.expire(world.now)  # ...and bob2's held credit gets it at the next tick
    assert alice.take() == [StreamCredit(opening.stream_id, window)]
    assert world.budget.credit == window


async def test_a_receiver_granting_back_credit_nothing_used_gains_no_room() -> None:
    """Bob grants each stream's window again and again before any data came: it was never
    his to read, so it frees nothing, and what may be on its way to him stays within his
    pool however much alice then sends (64 streams so granted let 256 MiB through a 16 MiB
    pool, and several such pairs past the relay-wide one)."""
    window, pool = 128 * 1024, 1024 * 1024
    world = World(stream_connection_window_bytes=pool, max_stream_window_bytes=32 * window,
                  max_streams_per_device=16, max_pending_streams_per_device=16)
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    streams = await accepted_streams(world, alice, bob, 8, window)  # the pool, granted
    for sid, _, _ in streams:
        for _ in range(31):  # up to the stream's bound of credit outstanding, not beyond
            TALLY[INPUTS_TRIED] += 1
            bob.send(StreamCredit(sid, window))
    assert bob.refused == []
    credit = {sid: granted for sid, granted, _ in streams}
    for frame in alice.take():
        if isinstance(frame, StreamCredit):
            credit[frame.stream_id] += frame.credit
    assert sum(credit.values()) <= pool
    for sid, _, keys in streams:
        while credit[sid] > 17:
            size = min(credit[sid], 65_536) - 17
            alice.send(StreamData(sid, keys.sealer.seal(b"x" * size)))
            credit[sid] -= size + 17
    passed = sum(len(f.chunk) for f in bob.take() if isinstance(f, StreamData))
    assert passed <= pool and alice.refused == []
    TALLY[ATTACKS_REJECTED] += 1


async def test_a_receiver_with_many_stalled_streams_gets_at_most_its_pool() -> None:
    """100 streams with 256 KiB windows whose receiver reads nothing: the relay passes at
    most its connection's pool (4 MiB here), whatever the senders try."""
    window, pool = 256 * 1024, 4 * 1024 * 1024
    world = World(stream_connection_window_bytes=pool, max_streams_per_device=200,
                  max_pending_streams_per_device=200)
    alice, bob = await world.connect(ALICE), await world.connect(BOB)
    streams = await accepted_streams(world, alice, bob, 100, window)
    for sid, granted, keys in streams:
        while granted > 17:
            size = min(granted, 65_536) - 17
            alice.send(StreamData(sid, keys.sealer.seal(b"x" * size)))
            granted -= size + 17
    passed = sum(len(f.chunk) for f in bob.take() if isinstance(f, StreamData))
    assert passed == pool and alice.refused == []
