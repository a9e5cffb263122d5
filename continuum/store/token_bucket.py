"""Per-sender token buckets for a single process (the embedded store's rate limiter)."""

from __future__ import annotations

# Buckets refilled to full carry no information; past this many senders we
# drop those, so a flood of one-off keys cannot grow memory without bound.
_PRUNE_THRESHOLD = 10_000


class TokenBuckets:
    def __init__(self) -> None:
        self._buckets: dict[bytes, tuple[float, int]] = {}

    def take(self, key: bytes, now_ms: int, rate_per_s: float, burst: int) -> bool:
        """Spend one token for `key`; False when its bucket is empty."""
        tokens, last_ms = self._buckets.get(key, (float(burst), now_ms))
        tokens = min(float(burst), tokens + max(0, now_ms - last_ms) * rate_per_s / 1000.0)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if len(self._buckets) >= _PRUNE_THRESHOLD and key not in self._buckets:
            self._prune(now_ms, rate_per_s, burst)
        self._buckets[key] = (tokens, now_ms)
        return allowed

    def _prune(self, now_ms: int, rate_per_s: float, burst: int) -> None:
        full_after_ms = burst / rate_per_s * 1000.0 if rate_per_s > 0 else float("inf")
        self._buckets = {k: v for k, v in self._buckets.items()
                         if now_ms - v[1] < full_after_ms}
