"""A token bucket of one connection: its frames, stream opens and stream bytes per second.

Pure (the time comes in as `now_ms`), so the rules that use it stay testable frame by
frame; the keyed buckets a store shares between connections are `store.token_bucket`.
"""

from __future__ import annotations


class Bucket:
    """`rate_per_s` tokens a second, at most `burst` saved up; starts full."""

    __slots__ = ("_rate", "_burst", "_tokens", "_last_ms")

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self._rate, self._burst, self._tokens = rate_per_s, burst, burst
        self._last_ms: int | None = None

    def _refill(self, now_ms: int) -> None:
        if self._last_ms is not None and now_ms > self._last_ms:
            self._tokens = min(self._burst,
                               self._tokens + (now_ms - self._last_ms) * self._rate / 1000)
        self._last_ms = now_ms if self._last_ms is None else max(self._last_ms, now_ms)

    def try_take(self, amount: float, now_ms: int) -> bool:
        """Take `amount` if the bucket holds it; False (nothing taken) if not."""
        self._refill(now_ms)
        if self._tokens < amount:
            return False
        self._tokens -= amount
        return True

    def borrow(self, amount: float, now_ms: int) -> float:
        """Take `amount` even into debt; the seconds until the debt is paid back (0: none)."""
        self._refill(now_ms)
        self._tokens -= amount
        return self.debt_s()

    def debt_s(self) -> float:
        """Seconds until the debt of the last take is paid back (0: none), as of that take."""
        return -self._tokens / self._rate if self._tokens < 0 else 0.0
