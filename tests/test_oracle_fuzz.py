"""Property: whatever an authenticated administrator's client sends, the oracle answers
with a 4xx naming the problem (or a 2xx for a valid request), never a 5xx, and
keeps serving; unauthenticated requests never change anything."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_settings import long_run, quick

from conftest import LoopThread
from oracle.server import OracleServer
from oracle_support import oracle_settings
from proto import Identity
from tally import ATTACKS_REJECTED, INPUTS_TRIED, TALLY


@dataclass
class OracleTarget:
    loop: LoopThread
    server: OracleServer
    http: aiohttp.ClientSession
    token: str
    device: str
    group: str

    def request(self, method: str, path: str, body: bytes, token: str | None) -> tuple[int, str]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"

        async def go() -> tuple[int, str]:
            async with self.http.request(method, self.server.url + path, data=body,
                                         headers=headers, allow_redirects=False) as response:
                return response.status, (await response.read()).decode("utf-8", "replace")
        TALLY[INPUTS_TRIED] += 1
        return self.loop.run(go())

    def snapshot(self) -> str:
        status, text = self.request("GET", "/v1/groups", b"", self.token)
        assert status == 200
        _, devices = self.request("GET", "/v1/devices", b"", self.token)
        return text + devices


@pytest.fixture(scope="module")
def oracle(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OracleTarget]:
    tmp: Path = tmp_path_factory.mktemp("oracle-fuzz")
    server = OracleServer(oracle_settings(tmp))
    loop_thread.run(server.start())
    token = loop_thread.run(server.create_api_token("fuzz", "write"))

    async def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()
    http = loop_thread.run(session())
    target = OracleTarget(loop_thread, server, http, token, Identity.generate().public.text, "")
    status, _ = target.request("POST", "/v1/devices",
                               json.dumps({"key": target.device, "name": "d"}).encode(), token)
    assert status in (200, 201)
    status, text = target.request("POST", "/v1/groups", b'{"name": "g"}', token)
    assert status in (200, 201)
    target.group = json.loads(text)["id"]
    yield target
    loop_thread.run(http.close())
    loop_thread.run(server.stop())


ROUTES = [
    ("POST", "/v1/devices"), ("PATCH", "/v1/devices/{key}"), ("POST", "/v1/devices/{key}/revoke"),
    ("POST", "/v1/devices/{key}/restore"), ("POST", "/v1/groups"), ("PATCH", "/v1/groups/{group}"),
    ("PUT", "/v1/groups/{group}/members/{key}"), ("DELETE", "/v1/groups/{group}/members/{key}"),
    ("GET", "/v1/devices/{key}"), ("GET", "/v1/devices?q={text}"), ("GET", "/v1/access-list?after={text}"),
    ("GET", "/v1/devices?limit={text}&cursor={text}"), ("GET", "/v1/devices?state={text}&tag={text}"),
    ("GET", "/v1/devices?sort={text}&group={text}&q={text}&limit=2"), ("GET", "/v1/groups?limit={text}&cursor={text}"),
    ("GET", "/v1/audit?cursor={text}&limit={text}&actor={text}"), ("POST", "/v1/admins"),
    ("POST", "/v1/tokens"), ("GET", "/?cursor={text}&sort={text}"), ("GET", "/groups/{group}?find={text}"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["key", "name", "tags", "group", "q", "x"]) | st.text(max_size=8),
        inner, max_size=4),
    max_leaves=12)
bodies = st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))
path_parts = st.one_of(st.text(max_size=40), st.sampled_from(["", "..", "%00", "cpk_", "0" * 200]))



def fill(template: str, key: str, group: str, text: str) -> str:
    return template.format(key=quote(key, safe=""), group=quote(group, safe=""),
                           text=quote(text, safe=""))


def check_request(target: OracleTarget, data: st.DataObject) -> None:
    method, template = data.draw(st.sampled_from(ROUTES))
    key = data.draw(st.sampled_from([target.device]) | path_parts)
    group = data.draw(st.sampled_from([target.group]) | path_parts)
    path = fill(template, key, group, data.draw(path_parts))
    body = data.draw(bodies)
    anonymous_before = target.snapshot()
    status, text = target.request(method, path, body, None)
    assert (status in (401, 403) or path.startswith("/v1/access-list")
            or (status == 303 and not path.startswith("/v1/"))), (status, text)  # → /login
    assert target.snapshot() == anonymous_before, "an unauthenticated request changed state"
    status, text = target.request(method, path, body, target.token)
    assert status < 500, (method, path, body, status, text)
    if status >= 400:
        TALLY[ATTACKS_REJECTED] += 1


@quick(200)
@given(data=st.data())
def test_api_answers_hostile_requests_without_server_errors(oracle: OracleTarget,
                                                            data: st.DataObject) -> None:
    check_request(oracle, data)


@long_run
@given(data=st.data())
def test_api_hostile_requests_long(oracle: OracleTarget, data: st.DataObject) -> None:
    check_request(oracle, data)


def test_oracle_still_serves_after_fuzzing(oracle: OracleTarget) -> None:
    status, text = oracle.request("GET", f"/v1/devices/{oracle.device}", b"", oracle.token)
    assert status == 200 and oracle.device in text
