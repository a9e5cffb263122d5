"""Slow down password guessing at the dashboard login.

Failed logins are counted per username and per client address; past a few
free attempts each further failure doubles a lockout (capped), during which
even the right password is refused with 429.  Counters live in this process:
the oracle runs as exactly one process, and a restart merely forgives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

FREE_ATTEMPTS = 5
FIRST_LOCKOUT_S = 2.0
MAX_LOCKOUT_S = 15 * 60.0
# A counter untouched this long is forgotten, so memory stays bounded by recent attackers.
FORGET_AFTER_S = 3600.0


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last_failure: float = 0.0


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, _Failures] = {}

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until a login for this username from this address may be tried; 0: now."""
        now = self._clock()
        return max([0.0, *(entry.locked_until - now for key in _keys(username, address)
                           if (entry := self._failures.get(key)) is not None)])

    def failed(self, username: str, address: str) -> None:
        now = self._clock()
        self._forget_stale(now)
        for key in _keys(username, address):
            entry = self._failures.setdefault(key, _Failures())
            entry.count += 1
            entry.last_failure = now
            if entry.count > FREE_ATTEMPTS:
                lockout = FIRST_LOCKOUT_S * 2 ** (entry.count - FREE_ATTEMPTS - 1)
                entry.locked_until = now + min(MAX_LOCKOUT_S, lockout)

    def succeeded(self, username: str, address: str) -> None:
        for key in _keys(username, address):
            self._failures.pop(key, None)

    def _forget_stale(self, now: float) -> None:
        stale = [key for key, entry in self._failures.items()
                 if now - entry.last_failure > FORGET_AFTER_S and entry.locked_until <= now]
        for key in stale:
            del self._failures[key]


def _keys(username: str, address: str) -> tuple[str, str]:
    return ("user:" + username[:64], "addr:" + address)
