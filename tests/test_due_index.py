"""The memory store's index of what falls due when (continuum/store/due_index.py).

Against the plain rule, with hypothesis: a key is taken once, never before its due
time, and a take that returns fewer than it was allowed leaves nothing due behind;
adds into the second being taken from, and past due times, included.
"""

from __future__ import annotations

import gc

from hypothesis import example, given, settings
from hypothesis import strategies as st

from continuum.store.due_index import DueIndex

START_MS = 1_800_000_000_000

# Due times and steps of a few buckets (100 ms), so that most takes fall inside a bucket.
adds = st.tuples(st.just("add"), st.integers(-250, 400))  # due, relative to now
takes = st.tuples(st.just("take"), st.integers(0, 120), st.integers(0, 6))  # advance, most
steps = st.lists(st.one_of(adds, takes), max_size=80)


@settings(max_examples=400, deadline=None)
@given(steps)
# A key added, out of order, to the bucket a take has sorted: the next take sorts it again.
@example([("add", 50), ("take", 0, 6), ("add", 10), ("take", 20, 6)])
def test_each_key_is_taken_once_when_due_and_nothing_due_is_left_behind(
        sequence: list[tuple[str, int] | tuple[str, int, int]]) -> None:
    index = DueIndex(key_bytes=4)
    now_ms = START_MS
    pending: dict[bytes, int] = {}  # key -> due, not taken yet
    for number, step in enumerate(sequence):
        if step[0] == "add":
            key = number.to_bytes(4, "big")
            pending[key] = now_ms + step[1]
            index.add(now_ms + step[1], key)
            continue
        _, advance, most = step
        now_ms += advance
        taken = index.take(now_ms, most)
        assert len(taken) <= most
        for key in taken:
            assert pending.pop(key) <= now_ms  # once, and not early
        if len(taken) < most:
            assert all(due > now_ms for due in pending.values())
    everything = index.take(START_MS + 10**9, 10**6)
    assert sorted(everything) == sorted(pending)


def test_the_records_are_nothing_the_garbage_collector_looks_into() -> None:
    """200,000 keys add no object a collection visits: the index is a dict of bytearrays
    and a heap of the seconds that have one."""
    index = DueIndex(key_bytes=8)
    gc.collect()
    before = len(gc.get_objects())
    for number in range(200_000):
        index.add(START_MS + number * 7, number.to_bytes(8, "big"))
    gc.collect()
    assert len(gc.get_objects()) - before < 100  # 1,400 seconds of buckets, none tracked
    assert len(index.take(START_MS + 1_400_000, 10**6)) == 200_000
