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

- Failures from one address never lock out a login from another address,
  for any username, until that username has failed FREE_PER_USERNAME times in
  all (from any addresses, none forgotten yet).
- Even then, an address that logged in as that username since the oracle
  started (the TRUSTED_PER_USERNAME most recent) is not held by the
  username's lockout: the admin's usual workstation still gets in during a
  distributed attack.  A new address waits out the lockout.
- Guessing is bounded: one address gets FREE_PER_PAIR guesses at a username
  and FREE_PER_ADDRESS in all, a username FREE_PER_USERNAME, then one guess
  per lockout (at most 96 a day once the lockout is capped).
- Logins for usernames that exist are never starved by attempts for
  usernames that do not, from any number of addresses: each kind has its
  own MAX_IN_FLIGHT_KNOWN / MAX_IN_FLIGHT_UNKNOWN password checks at once
  (trusted addresses excepted).  A login whose kind's checks are all taken
  waits for one, in arrival order, up to WAIT_S (at most MAX_WAITING wait
  per kind; past either, 429 with Retry-After BUSY_RETRY_S).  Guesses at
  an existing username do share its kind's checks, but only until that
  username has failed FREE_PER_USERNAME times; after that they are refused
  before they wait (as above), so they can hold up the admin for at most
  that many checks per account.  Before, one allowance of 8 for all: 200
  addresses each guessing random names kept it full, and an admin with the
  right password on a new address got 429 every time.
- CPU stays bounded per caller: an address has at most one login being
  checked or waiting at a time, and at most MAX_IN_FLIGHT_KNOWN +
  MAX_IN_FLIGHT_UNKNOWN untrusted checks run at once, so parallel requests
  cannot outrun the counters: without this, N concurrent guesses would all
  pass the check before the first failure was counted.  A login that waited
  is checked against the counters again once its turn comes.
- A success forgives its address's counters, not the username's, so the
  admin logging in gives a distributed guesser no fresh allowance.

Not guaranteed: that a username's existence stays secret under a flood.
Someone who keeps the unknown usernames' checks taken sees a login for an
existing username start at once and one for an unknown username wait: the
price of not letting anyone with enough addresses lock every admin out.
Every guarantee above holds when the attacker knows the usernames.  Nor,
behind a reverse proxy, are addresses told apart: every client has the
proxy's address, so the per-address counters are shared, unless the
oracle's `--trusted-proxy` names that proxy (then its forwarded header names
the client: runtime/client_address.py).  Counters live in this process: the
oracle runs as exactly one process, and a restart forgives (and forgets
trusted addresses).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from runtime.client_address import client_unit

FREE_PER_PAIR = 5
FREE_PER_ADDRESS = 20
FREE_PER_USERNAME = 100
FIRST_LOCKOUT_S = 2.0
MAX_LOCKOUT_S = 15 * 60.0
TRUSTED_PER_USERNAME = 8
# Password checks at once for usernames that exist and for those that do not (trusted
# addresses excepted): the scrypt work untrusted callers can queue.
MAX_IN_FLIGHT_KNOWN = 4
MAX_IN_FLIGHT_UNKNOWN = 4
# A login that finds its kind's checks taken waits this long at most, behind at most
# MAX_WAITING others (a few checks' worth: a browser's request should not hang for long).
WAIT_S = 5.0
MAX_WAITING = 64
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


class _Checks:
    """One kind's allowance of password checks at once, and its logins waiting, oldest first."""

    __slots__ = ("limit", "running", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.waiting: deque[asyncio.Future[None]] = deque()

    def hand_over(self) -> None:
        """A check ended: the oldest waiting login still there takes its place."""
        self.running -= 1
        while self.waiting and self.running < self.limit:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.running += 1


class LoginThrottle:
    """Call `begin` before checking a password; once it returned 0, exactly one of `failed`,
    `succeeded`, `abandoned`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[_Key, _Failures] = {}
        # username → its recently successful addresses, oldest first (a dict keeps insertion order).
        self._trusted: dict[str, dict[str, None]] = {}
        # address → the checks its login runs (or waits) in; None: a trusted address, uncounted.
        self._in_flight: dict[str, _Checks | None] = {}
        self._known = _Checks(MAX_IN_FLIGHT_KNOWN)
        self._unknown = _Checks(MAX_IN_FLIGHT_UNKNOWN)
        self._last_sweep = clock()

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until a login for this username from this address may be tried; 0: now."""
        now, user, addr = self._clock(), _user(username), client_unit(address)
        keys = [("pair", user, addr), ("address", addr)]
        if not self._is_trusted(user, addr):
            keys.append(("username", user))
        return max([0.0, *(entry.locked_until - now for key in keys
                           if (entry := self._failures.get(key)) is not None)])

    @property
    def checks_in_flight(self) -> int:
        """Untrusted password checks running now (waiting logins not counted)."""
        return self._known.running + self._unknown.running

    async def begin(self, username: str, address: str, known: bool, wait_s: float = WAIT_S,
                    ) -> float:
        """Admit one password check (returns 0; it is in flight until it ends) or say how long
        to wait.  `known`: the username is an account's; its login never waits behind those
        for usernames that are not.  A login whose kind's checks are taken waits for one,
        in arrival order, up to `wait_s`."""
        wait = self.retry_after(username, address)
        if wait > 0:
            return wait
        user, addr = _user(username), client_unit(address)
        if addr in self._in_flight:
            return BUSY_RETRY_S
        if self._is_trusted(user, addr):
            self._in_flight[addr] = None
            return 0.0
        checks = self._known if known else self._unknown
        if checks.running < checks.limit and not checks.waiting:
            checks.running += 1
            self._in_flight[addr] = checks
            return 0.0
        if len(checks.waiting) >= MAX_WAITING:
            return BUSY_RETRY_S
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        checks.waiting.append(turn)
        self._in_flight[addr] = checks  # its one login at a time, while it waits too
        try:
            await asyncio.wait_for(asyncio.shield(turn), wait_s)
        except TimeoutError:
            if not turn.done():
                self._leave(addr, checks, turn)
                return BUSY_RETRY_S
            # Its turn came just as the time ran out: it takes it.
        except BaseException:  # the request was cancelled (its client went away)
            self._leave(addr, checks, turn)
            raise
        # Its turn came: the counters may have moved while it waited.
        wait = self.retry_after(username, address)
        if wait > 0:
            self._release(addr)
            return wait
        return 0.0

    def failed(self, username: str, address: str) -> None:
        now, user, addr = self._clock(), _user(username), client_unit(address)
        self._release(addr)
        self._forget_stale(now)
        for key, free in ((("pair", user, addr), FREE_PER_PAIR),
                          (("address", addr), FREE_PER_ADDRESS),
                          (("username", user), FREE_PER_USERNAME)):
            self._failures.setdefault(key, _Failures(free)).fail(now)

    def succeeded(self, username: str, address: str) -> None:
        user, addr = _user(username), client_unit(address)
        self._release(addr)
        self._failures.pop(("pair", user, addr), None)
        self._failures.pop(("address", addr), None)
        trusted = self._trusted.setdefault(user, {})
        trusted.pop(addr, None)
        trusted[addr] = None
        while len(trusted) > TRUSTED_PER_USERNAME:
            del trusted[next(iter(trusted))]

    def abandoned(self, username: str, address: str) -> None:
        """The check did not finish (an error, not a guess): release it without counting."""
        self._release(client_unit(address))

    def _release(self, addr: str) -> None:
        """The address's check ended: its place goes to the oldest login waiting for one."""
        if addr not in self._in_flight:
            return
        checks = self._in_flight.pop(addr)
        if checks is not None:
            checks.hand_over()

    def _leave(self, addr: str, checks: _Checks, turn: asyncio.Future[None]) -> None:
        """A waiting login gives up: out of the queue, or, if its turn came, out of its check."""
        if turn.done():
            self._release(addr)
            return
        turn.cancel()
        checks.waiting.remove(turn)
        del self._in_flight[addr]

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
