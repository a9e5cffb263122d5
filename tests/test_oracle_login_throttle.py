"""Password guessing at the dashboard login is slowed down without locking the admin out.

Each guarantee in oracle/login_throttle.py's docstring has a test here; the
endpoint tests guess from 127.0.0.2 (any 127/8 address is loopback on Linux)
while the admin logs in from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets

import aiohttp
import pytest

from oracle.login_throttle import (
    BUSY_RETRY_S,
    FIRST_LOCKOUT_S,
    FREE_PER_ADDRESS,
    FREE_PER_PAIR,
    FREE_PER_USERNAME,
    MAX_IN_FLIGHT_KNOWN,
    MAX_IN_FLIGHT_UNKNOWN,
    MAX_LOCKOUT_S,
    MAX_WAITING,
    LoginThrottle,
)
from oracle.server import OracleServer
from oracle_support import oracle_settings
from tally import ATTACKS_REJECTED, TALLY


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lockout_starts_after_the_free_attempts_and_doubles() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_PER_PAIR):
        throttle.failed("admin", "10.0.0.1")
    assert throttle.retry_after("admin", "10.0.0.1") == 0
    throttle.failed("admin", "10.0.0.1")
    assert throttle.retry_after("admin", "10.0.0.1") == FIRST_LOCKOUT_S
    throttle.failed("admin", "10.0.0.1")
    assert throttle.retry_after("admin", "10.0.0.1") == 2 * FIRST_LOCKOUT_S
    assert throttle.retry_after("admin", "10.9.9.9") == 0  # same username, another address
    assert throttle.retry_after("other", "10.0.0.1") == 0  # the address's allowance is larger
    assert throttle.retry_after("other", "10.9.9.9") == 0
    clock.now += 2 * FIRST_LOCKOUT_S
    assert throttle.retry_after("admin", "10.0.0.1") == 0


def test_lockout_is_capped_and_success_forgives() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_PER_PAIR + 40):
        throttle.failed("admin", "a")
    assert throttle.retry_after("admin", "a") == MAX_LOCKOUT_S
    clock.now += MAX_LOCKOUT_S
    throttle.succeeded("admin", "a")
    throttle.failed("admin", "a")
    assert throttle.retry_after("admin", "a") == 0


async def test_login_endpoint_refuses_even_the_right_password_while_locked(tmp_path) -> None:
    async with OracleServer(oracle_settings(tmp_path)) as server:
        password = await server.create_admin("admin")
        async with aiohttp.ClientSession() as http:
            async def attempt(secret: str) -> aiohttp.ClientResponse:
                async with http.post(f"{server.url}/login", allow_redirects=False,
                                     data={"username": "admin", "password": secret}) as response:
                    await response.read()
                    return response
            for _ in range(FREE_PER_PAIR + 1):
                assert (await attempt("wrong")).status == 401
            locked = await attempt(password)
            assert locked.status == 429
            assert int(locked.headers["Retry-After"]) >= 1
            assert server.oracle is not None
            server.oracle.login_throttle = LoginThrottle()  # the lockout passed
            assert (await attempt(password)).status == 303


@pytest.mark.parametrize("username", ["", "x" * 500])
def test_odd_usernames_are_counted_without_growing_keys(username: str) -> None:
    throttle = LoginThrottle(Clock())
    for _ in range(FREE_PER_PAIR + 1):
        throttle.failed(username, "a")
    assert throttle.retry_after(username, "a") > 0


async def test_failures_from_one_address_never_lock_the_username_out_elsewhere() -> None:
    throttle = LoginThrottle(Clock())
    for _ in range(FREE_PER_USERNAME - 1):
        throttle.failed("admin", "10.0.0.1")
    assert throttle.retry_after("admin", "10.0.0.1") == MAX_LOCKOUT_S
    assert throttle.retry_after("admin", "10.0.0.2") == 0
    assert await throttle.begin("admin", "10.0.0.2", known=True) == 0


def test_one_address_trying_many_usernames_is_locked_for_every_username() -> None:
    throttle = LoginThrottle(Clock())
    for n in range(FREE_PER_ADDRESS + 1):
        throttle.failed(f"user{n}", "10.0.0.1")
    assert throttle.retry_after("admin", "10.0.0.1") == FIRST_LOCKOUT_S
    assert throttle.retry_after("admin", "10.0.0.2") == 0


def test_distributed_guessing_locks_new_addresses_but_not_the_admins_usual_one() -> None:
    throttle = LoginThrottle(Clock())
    throttle.succeeded("admin", "192.0.2.7")  # the admin's workstation, trusted from now on
    for n in range(FREE_PER_USERNAME + 1):
        throttle.failed("admin", f"10.{n // 256}.{n % 256}.1")
    assert throttle.retry_after("admin", "10.200.0.1") == FIRST_LOCKOUT_S
    assert throttle.retry_after("admin", "192.0.2.7") == 0
    throttle.succeeded("admin", "192.0.2.7")  # a success does not forgive the username's counter
    assert throttle.retry_after("admin", "10.200.0.1") == FIRST_LOCKOUT_S
    assert throttle.retry_after("other", "10.200.0.1") == 0


def test_an_ipv6_64_is_one_address_and_ipv4_mapped_is_ipv4() -> None:
    throttle = LoginThrottle(Clock())
    for n in range(FREE_PER_PAIR + 1):
        throttle.failed("admin", f"2001:db8:0:0::{n + 1:x}")
    assert throttle.retry_after("admin", "2001:db8::ffff:1234") == FIRST_LOCKOUT_S
    assert throttle.retry_after("admin", "2001:db8:0:1::1") == 0
    for _ in range(FREE_PER_PAIR + 1):
        throttle.failed("admin", "::ffff:10.0.0.1")
    assert throttle.retry_after("admin", "10.0.0.1") == FIRST_LOCKOUT_S


async def test_one_check_in_flight_per_address_and_at_most_a_few_at_once() -> None:
    throttle = LoginThrottle(Clock())
    throttle.succeeded("admin", "192.0.2.7")
    assert await throttle.begin("admin", "10.0.0.1", known=True) == 0
    # The same address, in parallel: refused at once, not queued.
    assert await throttle.begin("other", "10.0.0.1", known=False) == BUSY_RETRY_S
    throttle.failed("admin", "10.0.0.1")
    assert await throttle.begin("admin", "10.0.0.1", known=True) == 0
    throttle.abandoned("admin", "10.0.0.1")
    for n in range(MAX_IN_FLIGHT_UNKNOWN):
        assert await throttle.begin(f"nobody{n}", f"10.0.1.{n}", known=False) == 0
    assert throttle.checks_in_flight == MAX_IN_FLIGHT_UNKNOWN
    assert await throttle.begin("nobody", "10.0.2.1", known=False, wait_s=0.05) == BUSY_RETRY_S
    # A trusted address is never kept waiting for a check.
    assert await throttle.begin("admin", "192.0.2.7", known=True, wait_s=0.05) == 0
    assert throttle.checks_in_flight == MAX_IN_FLIGHT_UNKNOWN


async def test_guesses_at_unknown_usernames_never_keep_an_existing_one_waiting() -> None:
    """The audit's F2, in the decision object: with every check for unknown usernames taken
    and more of them waiting, the admin's login from a new address starts at once."""
    throttle = LoginThrottle(Clock())
    for n in range(MAX_IN_FLIGHT_UNKNOWN):
        assert await throttle.begin(f"random{n}", f"10.1.0.{n}", known=False) == 0
    waiting = [asyncio.create_task(throttle.begin(f"random-{n}", f"10.2.0.{n}", known=False))
               for n in range(10)]
    await asyncio.sleep(0)
    assert await throttle.begin("admin", "198.51.100.9", known=True, wait_s=0.05) == 0
    for n in range(MAX_IN_FLIGHT_UNKNOWN):
        throttle.failed(f"random{n}", f"10.1.0.{n}")
    assert await asyncio.gather(*waiting[:MAX_IN_FLIGHT_UNKNOWN]) == [0] * MAX_IN_FLIGHT_UNKNOWN
    for task in waiting[MAX_IN_FLIGHT_UNKNOWN:]:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_login_that_finds_its_checks_taken_waits_its_turn_in_arrival_order() -> None:
    throttle = LoginThrottle(Clock())
    for n in range(MAX_IN_FLIGHT_KNOWN):
        assert await throttle.begin("admin", f"10.0.0.{n}", known=True) == 0
    admitted: list[str] = []

    async def login(address: str) -> float:
        wait = await throttle.begin("admin", address, known=True)
        admitted.append(address)
        return wait

    queue = [asyncio.create_task(login(f"10.9.0.{n}")) for n in range(3)]
    await asyncio.sleep(0.01)
    assert admitted == []  # none refused: they wait
    throttle.failed("admin", "10.0.0.0")
    throttle.abandoned("admin", "10.0.0.1")
    await asyncio.sleep(0.01)
    assert admitted == ["10.9.0.0", "10.9.0.1"]
    throttle.succeeded("admin", "10.0.0.2")
    assert await asyncio.gather(*queue) == [0, 0, 0]
    assert admitted == ["10.9.0.0", "10.9.0.1", "10.9.0.2"]
    assert throttle.checks_in_flight == MAX_IN_FLIGHT_KNOWN


async def test_waiting_is_bounded_in_time_and_length_and_rechecks_the_counters() -> None:
    throttle = LoginThrottle(Clock())
    for n in range(MAX_IN_FLIGHT_KNOWN):
        assert await throttle.begin("admin", f"10.0.0.{n}", known=True) == 0
    assert await throttle.begin("admin", "10.9.0.1", known=True, wait_s=0.05) == BUSY_RETRY_S
    assert await throttle.begin("admin", "10.9.0.1", known=True, wait_s=0.05) == BUSY_RETRY_S
    queue = [asyncio.create_task(throttle.begin("admin", f"10.8.{n // 256}.{n % 256}",
                                                known=True)) for n in range(MAX_WAITING)]
    await asyncio.sleep(0.01)
    assert await throttle.begin("admin", "10.9.0.2", known=True) == BUSY_RETRY_S  # queue full
    # While they waited the username was locked out: their turns come, and they are refused.
    for n in range(FREE_PER_USERNAME + 1):
        throttle.failed("admin", f"10.7.{n // 256}.{n % 256}")
    for n in range(MAX_IN_FLIGHT_KNOWN):
        throttle.abandoned("admin", f"10.0.0.{n}")
    assert all(wait > 0 for wait in await asyncio.gather(*queue))
    assert throttle.checks_in_flight == 0


async def test_a_waiting_login_whose_client_went_away_gives_its_place_up() -> None:
    throttle = LoginThrottle(Clock())
    for n in range(MAX_IN_FLIGHT_KNOWN):
        assert await throttle.begin("admin", f"10.0.0.{n}", known=True) == 0
    gone = asyncio.create_task(throttle.begin("admin", "10.9.0.1", known=True))
    after = asyncio.create_task(throttle.begin("admin", "10.9.0.2", known=True))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    throttle.abandoned("admin", "10.0.0.0")
    assert await after == 0
    assert await throttle.begin("admin", "10.9.0.1", known=True, wait_s=0.01) == BUSY_RETRY_S
    throttle.abandoned("admin", "10.0.0.1")
    assert await throttle.begin("admin", "10.9.0.1", known=True) == 0


async def _post_login(http: aiohttp.ClientSession, url: str, username: str,
                      password: str) -> int:
    async with http.post(f"{url}/login", allow_redirects=False,
                         data={"username": username, "password": password}) as response:
        await response.read()
        return response.status


def _from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (a loopback alias)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def test_guesses_from_another_address_do_not_lock_the_admin_out(tmp_path) -> None:
    async with OracleServer(oracle_settings(tmp_path)) as server:
        password = await server.create_admin("admin")
        async with _from("127.0.0.2") as attacker, _from("127.0.0.1") as admin:
            statuses = [await _post_login(attacker, server.url, "admin", "guess")
                        for _ in range(FREE_PER_PAIR + 2)]
            assert statuses == [401] * (FREE_PER_PAIR + 1) + [429]
            assert await _post_login(admin, server.url, "admin", password) == 303
            assert await _post_login(attacker, server.url, "admin", password) == 429
            TALLY[ATTACKS_REJECTED] += 1


async def test_the_admin_logs_in_from_a_new_address_while_many_guess_random_names(
        tmp_path) -> None:
    """The audit's F2 over HTTP: 60 addresses each keep one wrong login for a random
    username in flight; before, every untrusted login got 429 once 8 checks were in flight,
    the right password from a new address included."""
    async with OracleServer(oracle_settings(tmp_path)) as server:
        password = await server.create_admin("newadmin")
        stop = asyncio.Event()
        statuses: dict[int, int] = {}

        async def guess(address: str) -> None:
            async with _from(address) as attacker:
                while not stop.is_set():
                    status = await _post_login(attacker, server.url, secrets.token_hex(6), "x")
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 429:
                        await asyncio.sleep(0.02)

        attackers = [asyncio.create_task(guess(f"127.0.1.{n}")) for n in range(1, 61)]
        try:
            await asyncio.sleep(1.0)
            async with _from("127.0.0.250") as admin:
                logins = [await _post_login(admin, server.url, "newadmin", password)
                          for _ in range(3)]
        finally:
            stop.set()
            await asyncio.gather(*attackers)
        assert logins == [303, 303, 303], (logins, statuses)
        assert statuses.get(401, 0) > 0  # the guesses were checked meanwhile
        TALLY[ATTACKS_REJECTED] += 1


async def test_parallel_guesses_cannot_outrun_the_throttle(tmp_path, monkeypatch) -> None:
    checks = 0
    real_scrypt = hashlib.scrypt

    def counting_scrypt(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal checks
        checks += 1
        return real_scrypt(*args, **kwargs)

    async with OracleServer(oracle_settings(tmp_path)) as server:
        await server.create_admin("admin")
        monkeypatch.setattr(hashlib, "scrypt", counting_scrypt)
        async with _from("127.0.0.2") as attacker:
            for _ in range(3):  # waves of parallel guesses
                statuses = await asyncio.gather(*(_post_login(attacker, server.url, "admin", "g")
                                                  for _ in range(20)))
                assert set(statuses) <= {401, 429}
        assert 1 <= checks <= FREE_PER_PAIR + 1
        TALLY[ATTACKS_REJECTED] += 1


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_counters(
        tmp_path) -> None:
    """Behind the chart's ingress every client has the proxy's address: without trusted
    proxies one guesser would lock the admin out; with them, each client counts alone."""
    from dataclasses import replace
    settings = replace(oracle_settings(tmp_path), trusted_proxies=("127.0.0.0/8",))
    async with OracleServer(settings) as server:
        password = await server.create_admin("admin")
        async with aiohttp.ClientSession() as proxy:
            async def login(client: str, secret: str) -> int:
                async with proxy.post(f"{server.url}/login", allow_redirects=False,
                                      data={"username": "admin", "password": secret},
                                      headers={"X-Forwarded-For": client}) as response:
                    await response.read()
                    return response.status
            statuses = [await login("198.51.100.66", "guess") for _ in range(FREE_PER_PAIR + 2)]
            assert statuses[-1] == 429
            assert await login("203.0.113.10", password) == 303  # the admin, same proxy
            TALLY[ATTACKS_REJECTED] += 1
