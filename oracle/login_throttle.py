"""Slow down password guessing at the dashboard login without letting guessers lock the admin out.

Failed logins are counted three ways, each with its own free allowance; past
it, every further failure doubles that counter's lockout (FIRST_LOCKOUT_S,
capped at MAX_LOCKOUT_S), during which even the right password is refused
with 429:

- per (username, address), FREE_PER_PAIR: one address guessing one account;
- per address, FREE_PER_ADDRESS: one address trying many usernames;
- per username over all addresses, FREE_PER_USERNAME: distributed guessing.

An address is an IPv4 address or an IPv6 /64 (one subscriber's allocation,
in which a guesser has more addresses than it needs).

What this guarantees (tests/test_oracle_login_throttle.py checks each):

- Failures from one address never delay a login from another address, for
  any username, until that username has failed FREE_PER_USERNAME times in
  all (from any addresses, none forgotten yet).
- Even then, an address that logged in as that username since the oracle
  started (the TRUSTED_PER_USERNAME most recent) is not held by the
  username's lockout: the admin's usual workstation still gets in during a
  distributed attack.  A new address waits out the lockout.
- Guessing is bounded: one address gets FREE_PER_PAIR guesses at a username
  and FREE_PER_ADDRESS in all, a username FREE_PER_USERNAME, then one guess
  per lockout (at most 96 a day once the lockout is capped).
- An address has at most one login being checked at a time, and at most
  MAX_IN_FLIGHT logins are checked at once (trusted addresses excepted), so
  parallel requests cannot outrun the counters: without this, N concurrent
  guesses would all pass the check before the first failure was counted.
- A success forgives its address's counters, not the username's, so the
  admin logging in gives a distributed guesser no fresh allowance.

Not guaranteed: behind a reverse proxy every client has the proxy's
address, so the per-address counters are shared, unless the oracle's
`--trusted-proxy` names that proxy (then its forwarded header names the
client: runtime/client_address.py).  Counters live in this process: the
oracle runs as exactly one process, and a restart forgives (and forgets
trusted addresses).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from runtime.client_address import client_unit

FREE_PER_PAIR = 5
FREE_PER_ADDRESS = 20
FREE_PER_USERNAME = 100
FIRST_LOCKOUT_S = 2.0
MAX_LOCKOUT_S = 15 * 60.0
TRUSTED_PER_USERNAME = 8
MAX_IN_FLIGHT = 8
# How long a refused concurrent attempt is told to wait: about one password check.
BUSY_RETRY_S = 1.0
# A counter untouched this long is forgotten, so memory stays bounded by recent attackers.
FORGET_AFTER_S = 3600.0
# Forgetting scans every counter, so it runs at most this often, not on every failure.
SWEEP_EVERY_S = 60.0

_Key = tuple[str, ...]


@dataclass
class _Failures:
    free: int
    count: int = 0
    locked_until: float = 0.0
    last_failure: float = 0.0

    def fail(self, now: float) -> None:
        self.count += 1
        self.last_failure = now
        if self.count > self.free:
            lockout = FIRST_LOCKOUT_S * 2 ** min(64, self.count - self.free - 1)
            self.locked_until = now + min(MAX_LOCKOUT_S, lockout)


class LoginThrottle:
    """Call `begin` before checking a password, then exactly one of `failed`, `succeeded`, `abandoned`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[_Key, _Failures] = {}
        # username → its recently successful addresses, oldest first (a dict keeps insertion order).
        self._trusted: dict[str, dict[str, None]] = {}
        self._in_flight: set[str] = set()
        self._last_sweep = clock()

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until a login for this username from this address may be tried; 0: now."""
        now, user, addr = self._clock(), _user(username), client_unit(address)
        keys = [("pair", user, addr), ("address", addr)]
        if not self._is_trusted(user, addr):
            keys.append(("username", user))
        return max([0.0, *(entry.locked_until - now for key in keys
                           if (entry := self._failures.get(key)) is not None)])

    def begin(self, username: str, address: str) -> float:
        """Admit one password check (returns 0; it is in flight until it ends) or say how long to wait."""
        wait = self.retry_after(username, address)
        if wait > 0:
            return wait
        user, addr = _user(username), client_unit(address)
        if addr in self._in_flight or (len(self._in_flight) >= MAX_IN_FLIGHT
                                       and not self._is_trusted(user, addr)):
            return BUSY_RETRY_S
        self._in_flight.add(addr)
        return 0.0

    def failed(self, username: str, address: str) -> None:
        now, user, addr = self._clock(), _user(username), client_unit(address)
        self._in_flight.discard(addr)
        self._forget_stale(now)
        for key, free in ((("pair", user, addr), FREE_PER_PAIR),
                          (("address", addr), FREE_PER_ADDRESS),
                          (("username", user), FREE_PER_USERNAME)):
            self._failures.setdefault(key, _Failures(free)).fail(now)

    def succeeded(self, username: str, address: str) -> None:
        user, addr = _user(username), client_unit(address)
        self._in_flight.discard(addr)
        self._failures.pop(("pair", user, addr), None)
        self._failures.pop(("address", addr), None)
        trusted = self._trusted.setdefault(user, {})
        trusted.pop(addr, None)
        trusted[addr] = None
        while len(trusted) > TRUSTED_PER_USERNAME:
            del trusted[next(iter(trusted))]

    def abandoned(self, username: str, address: str) -> None:
        """The check did not finish (an error, not a guess): release it without counting."""
        self._in_flight.discard(client_unit(address))

    def _is_trusted(self, user: str, addr: str) -> bool:
        return addr in self._trusted.get(user, ())

    def _forget_stale(self, now: float) -> None:
        if now - self._last_sweep < SWEEP_EVERY_S:
            return
        self._last_sweep = now
        stale = [key for key, entry in self._failures.items()
                 if now - entry.last_failure > FORGET_AFTER_S and entry.locked_until <= now]
        for key in stale:
            del self._failures[key]


def _user(username: str) -> str:
    return username[:64]
