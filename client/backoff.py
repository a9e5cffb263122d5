"""Reconnect delays: exponential with full jitter, bounded.

Thousands of devices lose their relay at the same moment when it restarts;
without jitter they would all reconnect in the same millisecond, again and
again.  "Full jitter" (a uniform draw below the exponential ceiling) spreads
them out while keeping the expected delay short.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays for successive failed attempts: uniform in [0, min(cap, base·2ⁿ)], at least `base`."""

    def __init__(self, base_s: float = 0.1, cap_s: float = 5.0,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError("backoff needs 0 < base_s <= cap_s")
        self.base_s = base_s
        self.cap_s = cap_s
        self._uniform = uniform
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self._failures, 32))
        self._failures += 1
        return max(self.base_s, self._uniform(0.0, ceiling))

    def reset(self) -> None:
        """A connection succeeded: the next failure starts from `base_s` again."""
        self._failures = 0
