"""The configuration API (SPEC §21) on both databases: the merge rule as the oracle applies
it, and every bad input refused with a clear 400 or 404 that changes nothing.  (Delivery to
devices through relays: tests/test_config.py.)"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from oracle_support import Admin, oracle_database, oracle_settings

from oracle import OracleServer
from proto import Identity
from proto.config import MAX_CONFIG_BYTES


@pytest.fixture(params=["sqlite", "postgres"])
async def admin(request, tmp_path) -> AsyncIterator[Admin]:
    """An administrator of an oracle on SQLite, then on PostgreSQL (migration 0006 on both)."""
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(oracle_database(request.param, tmp_path))
        server = await stack.enter_async_context(OracleServer(oracle_settings(tmp_path, url)))
        client = await Admin.login(server)
        stack.push_async_callback(client.close)
        yield client


async def enroll(admin: Admin, identities: list[Identity]) -> None:
    for number, identity in enumerate(identities):
        await admin.call("POST", "/v1/devices", {"key": identity.public.text,
                                                 "name": f"d{number:03}"}, expect=201)


async def test_groups_merge_in_name_order_under_the_devices_own_document(admin) -> None:
    one, two = Identity.generate(), Identity.generate()
    await enroll(admin, [one, two])
    b = await admin.call("POST", "/v1/groups", {"name": "b-later"}, expect=201)
    a = await admin.call("POST", "/v1/groups", {"name": "a-first"}, expect=201)
    for group in (a, b):
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{one.public.text}")
    await admin.call("PUT", f"/v1/groups/{a['id']}/config",
                     {"log": {"level": "info", "file": "a"}, "mode": "a"})
    await admin.call("PUT", f"/v1/groups/{b['id']}/config", {"log": {"level": "debug"}})
    view = await admin.call("PUT", f"/v1/devices/{one.public.text}/config", {"mode": "own"})
    assert view["desired"] == {"mode": "own"}
    assert view["merged"] == {"log": {"level": "debug", "file": "a"}, "mode": "own"}
    version = view["version"]
    # Renaming reorders the merge: a-first is now after b-later.
    await admin.call("PATCH", f"/v1/groups/{a['id']}", {"name": "c-last"})
    view = await admin.call("GET", f"/v1/devices/{one.public.text}/config")
    assert view["merged"] == {"log": {"level": "info", "file": "a"}, "mode": "own"}
    assert view["version"] == version + 1 and view["behind"]
    # A device in no group with no document holds {} and is issued nothing.
    other = await admin.call("GET", f"/v1/devices/{two.public.text}/config")
    assert other["merged"] == {} and other["version"] == 0 and not other["behind"]
    # Leaving a group takes its keys away; clearing the device's document too.
    await admin.call("DELETE", f"/v1/groups/{b['id']}/members/{one.public.text}")
    await admin.call("DELETE", f"/v1/devices/{one.public.text}/config")
    view = await admin.call("GET", f"/v1/devices/{one.public.text}/config")
    assert view["merged"] == {"log": {"level": "info", "file": "a"}, "mode": "a"}
    assert view["desired"] is None
    assert (await admin.call("GET", f"/v1/groups/{a['id']}/config"))["config"]["mode"] == "a"
    await admin.call("DELETE", f"/v1/groups/{a['id']}", expect=204)
    assert (await admin.call("GET", f"/v1/devices/{one.public.text}/config"))["merged"] == {}


@pytest.mark.parametrize("body,message", [
    (b"not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"),
    (b'{"a": 1, "a": 2}', "duplicate key"), (b'{"a": NaN}', "NaN"),
    (b'{"a": "' + b"x" * MAX_CONFIG_BYTES + b'"}', "bytes, more than"),
    (b"{" + b'"a":{' * 40 + b"}" * 41, "nests deeper"), (b"\xff{}", "UTF-8"),
])
async def test_bad_input_is_a_clear_400_and_changes_nothing(admin, body: bytes,
                                                            message: str) -> None:
    group = await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201)
    for path in (f"/v1/groups/{group['id']}/config",):
        async with admin.session.put(admin.base_url + path, data=body,
                                     headers={**admin.headers,
                                              "Content-Type": "application/json"}) as response:
            assert response.status == 400
            assert message in (await response.json())["error"]
    assert (await admin.call("GET", f"/v1/groups/{group['id']}/config"))["config"] is None


async def test_unknown_targets_and_merged_documents_over_the_bound_are_refused(admin) -> None:
    one = Identity.generate()
    await enroll(admin, [one])
    await admin.call("PUT", "/v1/groups/nosuchgroup/config", {"a": 1}, expect=404)
    await admin.call("PUT", f"/v1/devices/{Identity.generate().public.text}/config", {"a": 1},
                     expect=404)
    a = await admin.call("POST", "/v1/groups", {"name": "a"}, expect=201)
    await admin.call("PUT", f"/v1/groups/{a['id']}/members/{one.public.text}")
    half = "x" * (MAX_CONFIG_BYTES // 2)
    await admin.call("PUT", f"/v1/groups/{a['id']}/config", {"a": half})
    refused = await admin.call("PUT", f"/v1/devices/{one.public.text}/config", {"b": half},
                               expect=400)
    assert one.public.text in refused["error"] and "merged configuration" in refused["error"]
    view = await admin.call("GET", f"/v1/devices/{one.public.text}/config")
    assert view["desired"] is None and view["merged"] == {"a": half}


async def test_reissue_after_a_restore_issues_every_configured_device_again(admin) -> None:
    one, two = Identity.generate(), Identity.generate()
    await enroll(admin, [one, two])
    assert (await admin.call("PUT", f"/v1/devices/{one.public.text}/config",
                             {"x": 1}))["version"] == 1
    await admin.call("POST", "/v1/peer-lists/reissue")
    again = await admin.call("GET", f"/v1/devices/{one.public.text}/config")
    assert again["version"] == 2 and again["merged"] == {"x": 1} and again["behind"]
    assert (await admin.call("GET", f"/v1/devices/{two.public.text}/config"))["version"] == 0
