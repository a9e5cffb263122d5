"""Per-key token buckets for a single process (the embedded store's rate limiter, and the
connection gate's budget of signature checks per client address)."""

from __future__ import annotations

from collections import OrderedDict

# Buckets refilled to full carry no information; past this many keys we drop those, so a
# flood of one-off keys cannot grow memory without bound.
_PRUNE_THRESHOLD = 10_000


class TokenBuckets:
    """Buckets kept in the order they were last used, so the full ones are found at the
    front: dropping them costs each take O(1), however many keys are recent.  (A rebuild
    of the whole dict for every new key once 10,000 were recent cost a new key ~1 ms:
    a flood of new client addresses made it quadratic.)"""

    def __init__(self) -> None:
        self._buckets: OrderedDict[bytes, tuple[float, int]] = OrderedDict()

    def take(self, key: bytes, now_ms: int, rate_per_s: float, burst: int) -> bool:
        """Spend one token for `key`; False when its bucket is empty."""
        buckets = self._buckets
        tokens, last_ms = buckets.pop(key, (float(burst), now_ms))
        tokens = min(float(burst), tokens + max(0, now_ms - last_ms) * rate_per_s / 1000.0)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        buckets[key] = (tokens, now_ms)  # the most recently used, last
        if len(buckets) > _PRUNE_THRESHOLD:
            self._drop_full(now_ms, rate_per_s, burst)
        return allowed

    def _drop_full(self, now_ms: int, rate_per_s: float, burst: int) -> None:
        """Drop the least recently used buckets that have refilled since: every bucket
        after the first that has not is younger, so not full either."""
        full_after_ms = burst / rate_per_s * 1000.0 if rate_per_s > 0 else float("inf")
        buckets = self._buckets
        while len(buckets) > _PRUNE_THRESHOLD:
            oldest, (_tokens, last_ms) = next(iter(buckets.items()))
            if now_ms - last_ms < full_after_ms:
                return
            del buckets[oldest]
