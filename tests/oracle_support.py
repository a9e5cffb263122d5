"""Helpers for oracle tests: a real oracle on 127.0.0.1 over SQLite or PostgreSQL, and an admin client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from wire import MAX_FRAME, device_handshake, error_code

from oracle import OracleServer, OracleSettings
from proto import Identity
from proto.access import AccessRequest
from proto.frames import decode_frame
from runtime.clock import now_ms

POSTGRES_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
T = TypeVar("T")
# The relay key every test oracle lets fetch its access list (`relay_key=` for `start_relay`).
TRUSTED_RELAY = Identity.generate()


def postgres_available() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5432), timeout=1):
        return True
    return False


@contextlib.asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A new empty database for one test, dropped afterwards; yields its DSN."""
    import asyncpg
    name = "oracle_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def oracle_database(engine: str, tmp_path: Path) -> AsyncIterator[str]:
    """The database URL of one test on `engine`, "sqlite" or "postgres" (what the oracle's
    fixtures are parametrized over): SQLite in `tmp_path`, or a fresh PostgreSQL database
    dropped afterwards; the test is skipped when PostgreSQL does not answer."""
    if engine == "sqlite":
        yield f"sqlite:///{tmp_path / 'oracle.db'}"
        return
    if not postgres_available():
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432")
    async with fresh_postgres_database() as dsn:
        yield dsn


def oracle_settings(tmp_path: Path, database: str | None = None, **overrides: Any) -> OracleSettings:
    return replace(OracleSettings(host="127.0.0.1", port=0,
                                  database=database or f"sqlite:///{tmp_path / 'oracle.db'}",
                                  identity_file=str(tmp_path / "oracle.key"),
                                  relay_keys=(TRUSTED_RELAY.public.text,),
                                  log_level="warning"), **overrides)


def relay_headers(oracle: OracleServer, relay: Identity = TRUSTED_RELAY) -> dict[str, str]:
    """Headers of one access-list request signed by `relay` (a fresh nonce each call)."""
    request = AccessRequest(relay.public, oracle.identity.public, now_ms(), os.urandom(16))
    return {"Authorization": request.authorization(relay)}


def trusted_relay(oracle: OracleServer, **overrides: Any) -> dict[str, Any]:
    """`start_relay` settings for a relay enforcing `oracle`'s list, with the trusted key."""
    return {"oracle_url": oracle.url, "oracle_key": oracle.identity.public.text,
            "relay_key": TRUSTED_RELAY.secret_text(), **overrides}


class Admin:
    """An administrator's HTTP client: cookie login with CSRF, or a bearer token."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url, self.session = base_url, session
        self.headers: dict[str, str] = {}

    @classmethod
    async def login(cls, server: OracleServer, username: str = "admin") -> Admin:
        password = await server.create_admin(username)
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        admin = cls(server.url, session)
        async with session.post(f"{server.url}/login", data={"username": username,
                                                             "password": password},
                                allow_redirects=False) as response:
            assert response.status == 303, await response.text()
        async with session.get(f"{server.url}/v1/me") as response:
            admin.headers = {"X-CSRF-Token": (await response.json())["csrf_token"]}
        return admin

    async def call(self, method: str, path: str, json: Any = None, expect: int = 200) -> Any:
        async with self.session.request(method, self.base_url + path, json=json,
                                        headers=self.headers) as response:
            body = await response.json() if response.content_type == "application/json" else None
            assert response.status == expect, (response.status, body)
            return body

    async def close(self) -> None:
        await self.session.close()


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 5.0,
                     interval: float = 0.02) -> T:
    """Poll `check` until it returns a truthy value; fail with the last value after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value or loop.time() > deadline:
            assert value, f"condition not met within {timeout}s (last value {value!r})"
            return value
        await asyncio.sleep(interval)



async def handshake_refusal(url: str, identity: Identity) -> str:
    """Answer a relay's challenge and return the error code it sends instead of WELCOME."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        handshake = device_handshake(identity)
        await ws.send_bytes(handshake.receive_challenge(await ws.receive_bytes(timeout=5)))
        return error_code(decode_frame(await ws.receive_bytes(timeout=5), MAX_FRAME))
