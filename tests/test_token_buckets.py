"""The in-process token buckets: exact per key, bounded in keys, O(1) per take under a flood."""

from __future__ import annotations

import time

from continuum.store.token_bucket import _PRUNE_THRESHOLD, TokenBuckets

RATE_PER_S, BURST = 20.0, 200  # the connection gate's default budget per client address
FULL_AFTER_MS = int(BURST / RATE_PER_S * 1000)


def test_refilled_buckets_are_dropped_past_the_threshold_and_spent_ones_are_kept() -> None:
    buckets = TokenBuckets()
    for index in range(_PRUNE_THRESHOLD + 100):  # one token each at 0 ms: full again at 1 s
        buckets.take(index.to_bytes(4, "big"), 0, 1.0, 2)
    spent = b"spent"
    assert [buckets.take(spent, 9_000, 1.0, 2) for _ in range(3)] == [True, True, False]
    buckets.take(b"later", 9_500, 1.0, 2)
    assert len(buckets._buckets) <= _PRUNE_THRESHOLD  # refilled ones dropped
    assert not buckets.take(spent, 9_500, 1.0, 2)  # half a token: kept, still spent

def test_a_flood_of_new_keys_costs_each_take_constant_time_past_the_threshold() -> None:
    """12,000 addresses within one refill time (none may be dropped), then 2,000 more: the
    old bucket rebuilt the whole dict for each, ~1 ms a key (2 s here, on the event loop);
    now well under a millisecond for all of them."""
    buckets = TokenBuckets()
    for index in range(12_000):
        buckets.take(index.to_bytes(4, "big"), index % FULL_AFTER_MS, RATE_PER_S, BURST)
    started = time.perf_counter()
    for index in range(12_000, 14_000):
        buckets.take(index.to_bytes(4, "big"), FULL_AFTER_MS - 1, RATE_PER_S, BURST)
    assert time.perf_counter() - started < 0.5
    assert len(buckets._buckets) == 14_000  # none refilled yet: none dropped
