"""`PresenceTracker`, the relay's pure presence core, without sockets: what each report says.

Coalescing (a connection that changed many times is one entry), a snapshot
first and after every failure (never a replay), snapshots in parts, the
bounded queue of ended connections, heartbeats, and the oracle asking for a
snapshot.
"""

from __future__ import annotations

import pytest

from continuum.presence import ConnectionCounts, PresenceTracker
from proto import Identity

INSTANCE = bytes(16)


def keys(n: int) -> list:
    return [Identity.generate().public for _ in range(n)]


def settle_first_snapshot(tracker: PresenceTracker) -> None:
    draft = tracker.next_report(heartbeat_due=False)
    assert draft is not None and draft.snapshot_from == draft.sequence and draft.snapshot_last
    tracker.delivered(draft, wants_snapshot=False)


def test_the_first_report_is_a_snapshot_then_changes_are_coalesced_per_connection() -> None:
    tracker = PresenceTracker(INSTANCE)
    alice, bob = keys(2)
    counts = ConnectionCounts()
    a = tracker.connected(alice, 1000, counts)
    first = tracker.next_report(heartbeat_due=False)
    assert first is not None and (first.sequence, first.snapshot_from) == (1, 1)
    assert [c.device for c in first.connections] == [alice]
    tracker.delivered(first, wants_snapshot=False)
    assert tracker.next_report(heartbeat_due=False) is None  # nothing changed

    for _ in range(5):  # five sends, one ack, then alice leaves: one entry says it all
        counts.sent += 1
    counts.received += 1
    tracker.disconnected(a, 2000)
    b = tracker.connected(bob, 2100, ConnectionCounts())
    draft = tracker.next_report(heartbeat_due=False)
    assert draft is not None and (draft.sequence, draft.snapshot_from) == (2, 0)
    by_device = {c.device: c for c in draft.connections}
    assert set(by_device) == {alice, bob}
    ended = by_device[alice]
    assert (ended.connected_at_ms, ended.disconnected_at_ms, ended.sent, ended.received) == \
        (1000, 2000, 5, 1)
    tracker.delivered(draft, wants_snapshot=False)
    assert tracker.waiting == 0 and tracker.held == 1
    counts.sent += 1  # a closed connection's counts are frozen at its end
    assert tracker.next_report(heartbeat_due=False) is None
    tracker.disconnected(b, 3000)
    assert tracker.next_report(heartbeat_due=False) is not None


def test_a_failure_is_followed_by_one_snapshot_not_a_replay() -> None:
    tracker = PresenceTracker(INSTANCE)
    settle_first_snapshot(tracker)
    devices = keys(4)
    held = [tracker.connected(k, 10 * n, ConnectionCounts()) for n, k in enumerate(devices)]
    failed = tracker.next_report(heartbeat_due=False)
    assert failed is not None
    tracker.failed(failed)
    # While the oracle is away: one leaves, one flaps three times.
    tracker.disconnected(held[0], 100)
    flaps = [tracker.connected(devices[3], 200 + n, ConnectionCounts()) for n in range(3)]
    for flap in flaps[:2]:
        tracker.disconnected(flap, 300)
    snapshot = tracker.next_report(heartbeat_due=False)
    assert snapshot is not None
    assert snapshot.snapshot_from == snapshot.sequence and snapshot.snapshot_last
    states = {(c.device, c.connected_at_ms): c for c in snapshot.connections}
    # Every connection open now, and every ended one with its exact end time.
    assert states[(devices[0], 0)].disconnected_at_ms == 100
    assert {k for k, c in states.items() if c.open} == {
        (devices[1], 10), (devices[2], 20), (devices[3], 30), (devices[3], 202)}
    assert states[(devices[3], 200)].disconnected_at_ms == 300
    tracker.delivered(snapshot, wants_snapshot=False)
    assert tracker.waiting == 0
    assert tracker.next_report(heartbeat_due=False) is None


def test_a_snapshot_larger_than_a_report_goes_in_numbered_parts() -> None:
    tracker = PresenceTracker(INSTANCE, max_per_report=3)
    for n, key in enumerate(keys(7)):
        tracker.connected(key, n, ConnectionCounts())
    parts = []
    while (draft := tracker.next_report(heartbeat_due=False)) is not None:
        parts.append(draft)
        tracker.delivered(draft, wants_snapshot=False)
    assert [len(p.connections) for p in parts] == [3, 3, 1]
    assert [p.snapshot_from for p in parts] == [1, 1, 1]
    assert [p.snapshot_last for p in parts] == [False, False, True]
    assert [p.sequence for p in parts] == [1, 2, 3]
    assert len({c.device for p in parts for c in p.connections}) == 7


def test_a_part_that_fails_restarts_the_snapshot() -> None:
    tracker = PresenceTracker(INSTANCE, max_per_report=2)
    for n, key in enumerate(keys(3)):
        tracker.connected(key, n, ConnectionCounts())
    first = tracker.next_report(heartbeat_due=False)
    assert first is not None
    tracker.delivered(first, wants_snapshot=False)
    second = tracker.next_report(heartbeat_due=False)
    assert second is not None and second.snapshot_last
    tracker.failed(second)
    again = tracker.next_report(heartbeat_due=False)
    assert again is not None and again.snapshot_from == again.sequence == 3
    assert len(again.connections) == 2 and not again.snapshot_last


def test_changes_beyond_one_report_continue_at_once() -> None:
    tracker = PresenceTracker(INSTANCE, max_per_report=2)
    settle_first_snapshot(tracker)
    for n, key in enumerate(keys(5)):
        tracker.connected(key, n, ConnectionCounts())
    sizes = []
    while (draft := tracker.next_report(heartbeat_due=False)) is not None:
        sizes.append(len(draft.connections))
        more = tracker.has_more
        tracker.delivered(draft, wants_snapshot=False)
        if not more:
            break
    assert sizes == [2, 2, 1]


def test_the_queue_of_ended_connections_is_bounded_and_counts_what_it_drops() -> None:
    tracker = PresenceTracker(INSTANCE, max_ended=3)
    settle_first_snapshot(tracker)
    device = keys(1)[0]
    for n in range(10):  # the oracle is unreachable: ten connections come and go
        tracker.disconnected(tracker.connected(device, n, ConnectionCounts()), n)
    assert tracker.waiting == 3 and tracker.dropped == 7
    draft = tracker.next_report(heartbeat_due=False)
    assert draft is not None
    assert sorted(c.connected_at_ms for c in draft.connections) == [7, 8, 9]  # the newest kept


def test_heartbeats_and_a_snapshot_the_oracle_asks_for() -> None:
    tracker = PresenceTracker(INSTANCE)
    key = keys(1)[0]
    tracker.connected(key, 5, ConnectionCounts())
    settle_first_snapshot(tracker)
    beat = tracker.next_report(heartbeat_due=True)
    assert beat is not None and beat.connections == () and beat.snapshot_from == 0
    tracker.delivered(beat, wants_snapshot=True)  # e.g. the oracle missed a report
    asked = tracker.next_report(heartbeat_due=False)
    assert asked is not None and asked.snapshot_from == asked.sequence
    assert [c.device for c in asked.connections] == [key]


def test_one_report_at_a_time() -> None:
    tracker = PresenceTracker(INSTANCE)
    draft = tracker.next_report(heartbeat_due=True)
    assert draft is not None
    with pytest.raises(AssertionError):
        tracker.next_report(heartbeat_due=True)
