"""The oracle's access-list endpoint: relays only, signed requests, answered from memory.

Before, anyone could fetch every key, and every poll read the whole devices
table inside the writers' lock (20 pollers: admin API median 1 ms → 437 ms;
`benchmarks/access_list_pollers.py` measures it now).
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from oracle_support import TRUSTED_RELAY, oracle_settings, relay_headers

from oracle import OracleServer
from proto import Identity
from proto.access import ORACLE_CLOCK_SKEW_MS, AccessList, AccessRequest
from runtime.clock import now_ms


@pytest.fixture
async def server(tmp_path) -> AsyncIterator[OracleServer]:
    async with OracleServer(oracle_settings(tmp_path, longpoll_s=5.0)) as started:
        yield started


async def get(server: OracleServer, query: str = "", headers: dict[str, str] | None = None,
              ) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{server.url}/v1/access-list{query}", headers=headers or {}) as response:
        return response.status, await response.read(), response.headers


def signed_by(relay: Identity, server: OracleServer, *, issued_at_ms: int | None = None,
              oracle: Identity | None = None) -> dict[str, str]:
    request = AccessRequest(relay.public, (oracle or server.identity).public,
                            now_ms() if issued_at_ms is None else issued_at_ms, os.urandom(16))
    return {"Authorization": request.authorization(relay)}


async def test_only_fresh_requests_signed_by_an_allowed_relay_key_are_served(
        server: OracleServer) -> None:
    token = await server.create_api_token("ops", "write")
    refused = {
        "no header": {},
        "an admin's bearer token": {"Authorization": f"Bearer {token}"},
        "an unknown relay key": signed_by(Identity.generate(), server),
        "a token two minutes old": signed_by(TRUSTED_RELAY, server,
                                             issued_at_ms=now_ms() - 2 * ORACLE_CLOCK_SKEW_MS),
        "a token for another oracle": signed_by(TRUSTED_RELAY, server,
                                                oracle=Identity.generate()),
        "garbage": {"Authorization": "Continuum-Relay !!!"},
    }
    for name, headers in refused.items():
        status, body, response_headers = await get(server, "?after=0", headers)
        assert status == 401, name
        assert response_headers["WWW-Authenticate"] == "Continuum-Relay", name
        assert body.startswith(b'{"error"'), name  # a reason, never the list
    headers = relay_headers(server)
    status, body, response_headers = await get(server, "?after=0", headers)
    assert status == 200
    access = AccessList.verify(body, server.identity.public)
    assert response_headers["ETag"] == f'"{access.epoch}.{access.version}"'
    status, _, _ = await get(server, "?after=0", headers)  # the same header again
    assert status == 401, "a captured request must not be replayable"


def with_a_forged_signature(headers: dict[str, str]) -> dict[str, str]:
    """The same token, its signature's last byte flipped."""
    scheme, token = headers["Authorization"].split(" ")
    data = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    data[-1] ^= 1
    return {"Authorization": f"{scheme} {base64.urlsafe_b64encode(data).rstrip(b'=').decode()}"}


async def test_a_strangers_token_is_refused_for_its_key_before_its_signature_is_checked(
        server: OracleServer) -> None:
    """Anyone can reach the endpoint: a token naming a key the oracle does not know costs it
    no signature check (its forged signature is not what it is refused for); a known relay's
    forged token is refused for its signature."""
    status, body, _ = await get(server, "?after=0",
                                with_a_forged_signature(signed_by(Identity.generate(), server)))
    assert status == 401 and b"is not allowed here" in body
    status, body, _ = await get(server, "?after=0",
                                with_a_forged_signature(signed_by(TRUSTED_RELAY, server)))
    assert status == 401 and b"is not allowed here" not in body and b"signature" in body


async def test_polls_never_touch_the_database_and_a_change_is_read_once(
        server: OracleServer) -> None:
    assert server.oracle is not None
    registry, db = server.oracle.registry, server.oracle.registry.db
    calls: list[str] = []
    for name in ("fetch", "execute", "transaction"):
        original = getattr(db, name)

        def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return _original(*args)
        setattr(db, name, counted)

    status, body, _ = await get(server, "?after=0", relay_headers(server))
    assert status == 200
    held = AccessList.verify(body, server.identity.public)
    stamp = held.stamp
    for _ in range(30):  # relays asking from scratch, answered at once
        assert (await get(server, "?after=0", relay_headers(server)))[0] == 200
    assert calls == [], f"polls read the database: {calls}"

    query = f"?epoch={stamp.epoch}&after={stamp.version}&valid_until={held.valid_until_ms}"
    waiting = [asyncio.create_task(get(server, query, relay_headers(server))) for _ in range(20)]
    await asyncio.sleep(0.3)
    assert not any(task.done() for task in waiting)
    assert calls == [], f"held polls read the database: {calls}"
    await registry.enroll(Identity.generate().public.text, "late")
    answers = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    versions = {AccessList.verify(body, server.identity.public).version
                for status, body, _ in answers if status == 200}
    assert versions == {stamp.version + 1} and len(answers) == 20
    snapshot_reads = calls.count("transaction") - 1  # the enrolment's own write
    assert snapshot_reads == 1, f"{snapshot_reads} reads for one change and 20 waiting relays"


async def test_a_relay_holding_another_stamp_is_answered_at_once(server: OracleServer) -> None:
    """Even a newer one: the relay then refuses the list and raises its alarm (SPEC §12)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body, _ = await get(server, f"?epoch={2**62}&after=1", relay_headers(server))
    assert status == 200 and loop.time() - started < 2.0
    assert AccessList.verify(body, server.identity.public).epoch < 2**62


async def test_a_relay_whose_key_the_oracle_does_not_know_never_gets_the_list(
        server: OracleServer, start_relay) -> None:
    relay = await start_relay(oracle_url=server.url, oracle_key=server.identity.public.text)
    assert not await relay.relay.access.wait_loaded(1.5)
    trusted = await start_relay(oracle_url=server.url, oracle_key=server.identity.public.text,
                                relay_key=TRUSTED_RELAY.secret_text())
    assert await trusted.relay.access.wait_loaded(5)

