"""The dashboard login over real sockets: one scrypt per attempt whoever the user, checked off
the event loop, and refused when another site posts the form (login CSRF)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
import structlog
from oracle_support import oracle_settings
from tally import ATTACKS_REJECTED, TALLY

import oracle.__main__ as oracle_main
from oracle import OracleServer
from runtime.logs import EventSampler, configure_logging

# How long each password check is made to take in the responsiveness test: long enough that a
# check on the event loop would visibly hold a concurrent request.
SLOW_CHECK_S = 0.4


class ScryptCalls:
    """hashlib.scrypt, counted (from any thread) and optionally slowed down."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.count, self.delay_s = 0, delay_s
        self._lock = threading.Lock()
        self._real = hashlib.scrypt

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self._lock:
            self.count += 1
        time.sleep(self.delay_s)
        return self._real(*args, **kwargs)


@pytest.fixture
def scrypt(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScryptCalls]:
    calls = ScryptCalls()
    monkeypatch.setattr(hashlib, "scrypt", calls)
    yield calls


async def _login(url: str, username: str, password: str, source: str = "127.0.0.1",
                 headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http, \
            http.post(f"{url}/login", data={"username": username, "password": password},
                      headers=headers or {}, allow_redirects=False) as response:
        await response.read()
        return response


async def test_known_and_unknown_usernames_cost_one_scrypt_each(tmp_path, scrypt) -> None:
    async with OracleServer(oracle_settings(tmp_path)) as server:
        password = await server.create_admin("admin")
        for username, secret, status in (("admin", "wrong", 401), ("ghost", "wrong", 401),
                                         ("admin", password, 303)):
            before = scrypt.count
            assert (await _login(server.url, username, secret)).status == status
            assert scrypt.count - before == 1, username


async def test_the_event_loop_answers_while_passwords_are_checked(tmp_path, scrypt) -> None:
    async with OracleServer(oracle_settings(tmp_path)) as server:
        await server.create_admin("admin")
        scrypt.delay_s, started = SLOW_CHECK_S, scrypt.count
        finished: list[str] = []

        async def login(source: str) -> None:
            assert (await _login(server.url, "admin", "wrong", source)).status == 401
            finished.append("login")

        logins = [asyncio.create_task(login(f"127.0.0.{n}")) for n in range(2, 6)]
        deadline = time.monotonic() + 10
        while scrypt.count == started and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert scrypt.count > started, "no password check began"
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http, http.get(server.url + "/healthz") as response:
            assert response.status == 200
        finished.append("healthz")
        healthz_s = time.monotonic() - t0
        await asyncio.wait_for(asyncio.gather(*logins), timeout=30)
    assert finished[0] == "healthz", finished
    assert healthz_s < SLOW_CHECK_S, healthz_s


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"},
], ids=["foreign-origin", "null-origin", "cross-site", "same-site"])
async def test_a_login_form_posted_from_another_site_is_refused(tmp_path, headers) -> None:
    async with OracleServer(oracle_settings(tmp_path)) as server:
        password = await server.create_admin("admin")
        refused = await _login(server.url, "admin", password, headers=headers)
        assert refused.status == 403 and "Set-Cookie" not in refused.headers
        assert server.oracle is not None
        assert server.oracle.login_throttle.retry_after("admin", "127.0.0.1") == 0
        TALLY[ATTACKS_REJECTED] += 1


async def test_logins_from_the_oracles_own_pages_and_from_scripts_work(tmp_path) -> None:
    async with OracleServer(oracle_settings(tmp_path)) as server:
        password = await server.create_admin("admin")
        own_host = server.url.split("://", 1)[1]
        for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": server.url},
                        {"Origin": server.url},
                        {"Origin": f"https://{own_host}"},  # TLS ended by a proxy in front
                        {}):  # a script: no browser headers at all
            response = await _login(server.url, "admin", password, headers=headers)
            assert response.status == 303, headers


@pytest.fixture
def _oracle_log() -> Iterator[io.StringIO]:
    """The oracle process's log set-up (its sampler) on a stream; the set-up conftest made
    is put back afterwards."""
    config, stream = structlog.get_config(), io.StringIO()
    configure_logging("info", stream, sampler=EventSampler(
        oracle_main.SAMPLED_EVENTS, per_s=oracle_main.SAMPLED_LINES_PER_S))
    yield stream
    structlog.configure(**config)


async def test_a_flood_of_cross_site_logins_writes_a_sample_of_lines(tmp_path, _oracle_log) -> None:
    """A login form posted from another site costs no password check, and each wrote a
    warning (~380 bytes, 240 of them the poster's): a loop of them an unbounded log.  Now a
    few lines a second, the next one saying how many were dropped."""
    floods = 60
    async with OracleServer(oracle_settings(tmp_path)) as server:
        started = time.monotonic()
        for _ in range(floods):
            refused = await _login(server.url, "admin", "guess",
                                   headers={"Origin": "http://evil.example"})
            assert refused.status == 403
        seconds = time.monotonic() - started
        await asyncio.sleep(1.05)  # the next line, a second later, counts the dropped
        await _login(server.url, "admin", "guess", headers={"Origin": "http://evil.example"})
    lines = [json.loads(line) for line in _oracle_log.getvalue().splitlines()]
    kept = [line for line in lines if line["event"] == "login_cross_site"]
    assert len(kept) <= oracle_main.SAMPLED_LINES_PER_S * (int(seconds) + 2) + 1 < floods
    assert len(kept) + sum(line.get("suppressed", 0) for line in kept) == floods + 1
