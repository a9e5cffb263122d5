"""Password guessing at the dashboard login is slowed down, per username and per address."""

from __future__ import annotations

import aiohttp
import pytest

from oracle.login_throttle import FIRST_LOCKOUT_S, FREE_ATTEMPTS, MAX_LOCKOUT_S, LoginThrottle
from oracle.server import OracleServer
from oracle_support import oracle_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lockout_starts_after_the_free_attempts_and_doubles() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_ATTEMPTS):
        throttle.failed("admin", "10.0.0.1")
    assert throttle.retry_after("admin", "10.0.0.1") == 0
    throttle.failed("admin", "10.0.0.1")
    assert throttle.retry_after("admin", "10.0.0.1") == FIRST_LOCKOUT_S
    throttle.failed("admin", "10.0.0.1")
    assert throttle.retry_after("admin", "10.0.0.1") == 2 * FIRST_LOCKOUT_S
    assert throttle.retry_after("admin", "10.9.9.9") == 2 * FIRST_LOCKOUT_S  # same username
    assert throttle.retry_after("other", "10.0.0.1") == 2 * FIRST_LOCKOUT_S  # same address
    assert throttle.retry_after("other", "10.9.9.9") == 0
    clock.now += 2 * FIRST_LOCKOUT_S
    assert throttle.retry_after("admin", "10.0.0.1") == 0


def test_lockout_is_capped_and_success_forgives() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_ATTEMPTS + 40):
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
            for _ in range(FREE_ATTEMPTS + 1):
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
    for _ in range(FREE_ATTEMPTS + 1):
        throttle.failed(username, "a")
    assert throttle.retry_after(username, "a") > 0
