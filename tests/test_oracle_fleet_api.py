"""Fleet operations over real sockets, on SQLite and PostgreSQL: cursor-paginated and filtered
device lists, the append-only audit log, deleting devices, admin accounts and API tokens
from the API, and /metrics."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from oracle_support import Admin, relay_headers
from test_oracle_api import admin, new_key, server  # noqa: F401  (fixtures on both databases)

from oracle import OracleServer
from oracle.web import create_app
from proto.access import AccessList

COUNT = 23


async def _fleet(server: OracleServer) -> dict[str, str]:
    """COUNT devices dev-00…dev-22 enrolled in order (tags: every third `third`); name → key."""
    assert server.oracle is not None
    keys = {}
    for number in range(COUNT):
        key = new_key()
        while "hir" in key:  # the searches below must match the tag `third`, not a key
            key = new_key()
        await server.oracle.registry.enroll(key, f"dev-{number:02d}",
                                            ["third"] if number % 3 == 0 else [])
        keys[f"dev-{number:02d}"] = key
    return keys


async def _walk(admin: Admin, query: str, limit: int, cursor: str | None = None) -> list[dict]:
    """Every page of a listing from `cursor`, following next_cursor; checks each page's size."""
    devices: list[dict] = []
    for _ in range(100):
        path = f"/v1/devices?limit={limit}&{query}" + (f"&cursor={cursor}" if cursor else "")
        page = await admin.call("GET", path)
        assert len(page["devices"]) <= limit
        devices += page["devices"]
        cursor = page["next_cursor"]
        if cursor is None:
            return devices
        assert len(page["devices"]) == limit
    raise AssertionError("the listing never ended")


async def test_pages_hold_limit_devices_and_walk_every_match_once(
        admin: Admin, server: OracleServer) -> None:
    keys = await _fleet(server)
    names = sorted(keys)
    first = await admin.call("GET", "/v1/devices?limit=5")
    assert [d["name"] for d in first["devices"]] == names[:5] and first["next_cursor"]
    listed = (await admin.call("GET", "/v1/devices"))["devices"]
    by_enrolment = [d["name"] for d in sorted(listed, key=lambda d: (d["enrolled_at_ms"],
                                                                      d["key"]))]
    for sort, expected in (("name", names), ("-name", names[::-1]),
                           ("enrolled", by_enrolment), ("-enrolled", by_enrolment[::-1])):
        walked = await _walk(admin, f"sort={sort}", 5)
        assert [d["name"] for d in walked] == expected, sort
    # A device enrolled while someone pages is neither skipped before it nor shown twice.
    page = await admin.call("GET", "/v1/devices?limit=10")
    await server.oracle.registry.enroll(new_key(), "dev-00a")  # sorts into page one
    rest = await _walk(admin, "", 10, page["next_cursor"])
    assert [d["name"] for d in rest] == names[10:]
    # Without limit: every match at once, in the shape clients had before pagination.
    everything = await admin.call("GET", "/v1/devices")
    assert len(everything["devices"]) == COUNT + 1 and everything["next_cursor"] is None


async def test_filters_on_state_group_tag_and_search_combine(
        admin: Admin, server: OracleServer) -> None:
    keys = await _fleet(server)
    group = await admin.call("POST", "/v1/groups", {"name": "Boiler Room"}, expect=201)
    for name in ("dev-01", "dev-02", "dev-03"):
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{keys[name]}")
    await admin.call("POST", f"/v1/devices/{keys['dev-03']}/revoke")
    await admin.call("PATCH", f"/v1/devices/{keys['dev-04']}", {"name": "50%_off Ünit"})

    async def names(query: str) -> list[str]:
        return [d["name"] for d in await _walk(admin, query, 4)]

    assert await names("state=revoked") == ["dev-03"]
    assert len(await names("state=active")) == COUNT - 1
    assert await names("state=behind") == ["dev-01", "dev-02"]  # issued lists, no receipts
    assert await names(f"group={group['id']}") == ["dev-01", "dev-02", "dev-03"]
    assert await names(f"group={group['id']}&state=active") == ["dev-01", "dev-02"]
    assert await names("tag=third") == [f"dev-{n:02d}" for n in range(0, COUNT, 3)]
    assert await names("tag=THIRD&q=dev-1") == ["dev-12", "dev-15", "dev-18"]
    assert await names("q=boiler%20room") == ["dev-01", "dev-02", "dev-03"]  # a group's name
    assert await names("q=hir") == [f"dev-{n:02d}" for n in range(0, COUNT, 3)]  # a tag
    assert await names(f"q={keys['dev-05'][10:30]}") == ["dev-05"]  # part of a key
    assert await names("q=%C3%BCnit") == ["50%_off Ünit"]  # case-insensitive beyond ASCII
    assert await names("q=0%25_") == ["50%_off Ünit"]  # % and _ are literal, not wildcards
    assert await names("q=dev-1_") == []
    assert await names(f"group={group['id']}&tag=third") == ["dev-03"]
    assert await names("group=nosuchgroup") == []


@pytest.mark.parametrize(("query", "message"), [
    ("limit=0", "limit must be"), ("limit=x", "limit must be"), ("limit=1001", "limit must be"),
    ("offset=20", "offset is not supported"), ("cursor=bm9wZQ", "cursor"),
    ("cursor=%%%", "cursor"), ("state=online", "state must be"), ("sort=key", "sort must be"),
    ("tag=no%20spaces!", "tags"), ("q=" + "x" * 201, "q must be"),
])
async def test_bad_list_parameters_get_400_naming_the_problem(admin: Admin, query: str,
                                                              message: str) -> None:
    body = await admin.call("GET", f"/v1/devices?{query}", expect=400)
    assert message in body["error"]


async def test_a_cursor_belongs_to_its_sort_order(admin: Admin, server: OracleServer) -> None:
    await _fleet(server)
    by_name = (await admin.call("GET", "/v1/devices?limit=2"))["next_cursor"]
    body = await admin.call("GET", f"/v1/devices?sort=enrolled&cursor={by_name}", expect=400)
    assert "another list or sort order" in body["error"]
    groups = await admin.call("GET", "/v1/groups?limit=1")
    assert groups["next_cursor"] is None and groups["groups"] == []


async def test_groups_are_listed_a_page_at_a_time(admin: Admin) -> None:
    for name in ("alpha", "beta", "gamma", "delta"):
        await admin.call("POST", "/v1/groups", {"name": name}, expect=201)
    page = await admin.call("GET", "/v1/groups?limit=3")
    assert [g["name"] for g in page["groups"]] == ["alpha", "beta", "delta"]
    rest = await admin.call("GET", f"/v1/groups?limit=3&cursor={page['next_cursor']}")
    assert [g["name"] for g in rest["groups"]] == ["gamma"] and rest["next_cursor"] is None
    found = await admin.call("GET", "/v1/groups?q=MM")
    assert [(g["name"], g["member_count"]) for g in found["groups"]] == [("gamma", 0)]


async def test_every_change_is_audited_with_who_when_what_and_from_where(
        admin: Admin, server: OracleServer) -> None:
    key = new_key()
    await admin.call("POST", "/v1/devices", {"key": key, "name": "boiler", "tags": ["b"]},
                     expect=201)
    await admin.call("PATCH", f"/v1/devices/{key}", {"name": "boiler 2"})
    group = await admin.call("POST", "/v1/groups", {"name": "heat"}, expect=201)
    await admin.call("PUT", f"/v1/groups/{group['id']}/members/{key}")
    await admin.call("PATCH", f"/v1/groups/{group['id']}", {"name": "heating"})
    await admin.call("DELETE", f"/v1/groups/{group['id']}/members/{key}")
    await admin.call("DELETE", f"/v1/groups/{group['id']}", expect=204)
    await admin.call("POST", f"/v1/devices/{key}/revoke")
    await admin.call("POST", f"/v1/devices/{key}/restore")
    await admin.call("POST", "/v1/peer-lists/reissue")
    created = await admin.call("POST", "/v1/tokens", {"name": "ci", "scope": "write"},
                               expect=201)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {created['token']}",
                                              "X-Forwarded-For": "203.0.113.9"}) as http:
        async with http.post(f"{server.url}/v1/devices/{key}/revoke") as response:
            assert response.status == 200
    await admin.call("POST", "/v1/devices", {"key": key, "name": "dup"}, expect=409)

    log = (await admin.call("GET", "/v1/audit?limit=100"))["entries"]
    assert [e["id"] for e in log] == sorted((e["id"] for e in log), reverse=True)
    assert [e["action"] for e in log] == [
        "device.revoke", "token.create", "peer_lists.reissue", "device.restore", "device.revoke",
        "group.delete", "group.member.remove", "group.rename", "group.member.add",
        "group.create", "device.update", "device.enroll", "session.login", "admin.create"]
    by_token, *by_admin = log[:-2]
    assert (by_token["actor"], by_token["via"], by_token["target"]) == ("token:ci", "token", key)
    assert by_token["address"] == "127.0.0.1"  # X-Forwarded-For from an untrusted peer: ignored
    assert {(e["actor"], e["via"], e["address"]) for e in by_admin} == {
        ("admin", "session", "127.0.0.1")}
    assert log[-3]["detail"] == {"name": "boiler", "tags": ["b"]}
    assert log[-4]["detail"] == {"name": "boiler 2"}
    assert log[6]["detail"] == {"group": "heating", "group_id": group["id"]}
    assert all(abs(e["at_ms"] - log[0]["at_ms"]) < 60_000 for e in log)
    assert log[-1] == {**log[-1], "actor": "oracle", "via": "internal", "target": "admin"}

    # Pages of the log, and its filters.
    page = await admin.call("GET", "/v1/audit?limit=5")
    rest = await admin.call("GET", f"/v1/audit?limit=100&cursor={page['next_cursor']}")
    assert page["entries"] + rest["entries"] == log
    mine = await admin.call("GET", f"/v1/audit?target={key}&action=device.revoke")
    assert [e["actor"] for e in mine["entries"]] == ["token:ci", "admin"]
    await admin.call("GET", "/v1/audit?cursor=x", expect=400)


async def test_the_audit_log_is_append_only(admin: Admin, server: OracleServer) -> None:
    """No route changes or deletes an entry, and later changes leave earlier entries as
    they were; a change that fails leaves no entry."""
    assert server.oracle is not None
    for route in create_app(server.oracle).router.routes():
        path = route.resource.canonical if route.resource else ""
        if "audit" in path:
            assert route.method in ("GET", "HEAD"), (route.method, path)
    key = new_key()
    await admin.call("POST", "/v1/devices", {"key": key, "name": "a"}, expect=201)
    before = (await admin.call("GET", "/v1/audit"))["entries"]
    for method in ("DELETE", "PUT", "PATCH", "POST"):
        for path in ("/v1/audit", f"/v1/audit/{before[0]['id']}", "/audit"):
            async with admin.session.request(method, server.url + path, headers=admin.headers,
                                             json={"action": "x"}) as response:
                assert response.status in (404, 405), (method, path, response.status)
    await admin.call("POST", f"/v1/devices/{key}/revoke")
    await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201)
    await admin.call("POST", "/v1/groups", {"name": "g"}, expect=409)
    await admin.call("DELETE", f"/v1/devices/{new_key()}", expect=404)
    after = (await admin.call("GET", "/v1/audit"))["entries"]
    assert after[2:] == before
    assert [e["action"] for e in after[:2]] == ["group.create", "device.revoke"]


async def test_a_device_is_deleted_only_once_revoked_and_then_is_unknown(
        admin: Admin, server: OracleServer) -> None:
    key, peer = new_key(), new_key()
    for k in (key, peer):
        await admin.call("POST", "/v1/devices", {"key": k, "name": "d"}, expect=201)
    group = await admin.call("POST", "/v1/groups", {"name": "pair"}, expect=201)
    for k in (key, peer):
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{k}")
    body = await admin.call("DELETE", f"/v1/devices/{key}", expect=409)
    assert "revoke it before deleting it" in body["error"]
    await admin.call("POST", f"/v1/devices/{key}/revoke")
    await admin.call("DELETE", f"/v1/devices/{key}", expect=204)
    await admin.call("GET", f"/v1/devices/{key}", expect=404)
    await admin.call("DELETE", f"/v1/devices/{key}", expect=404)
    assert (await admin.call("GET", f"/v1/groups/{group['id']}"))["members"] == [peer]
    version = (await admin.call("GET", "/v1/status"))["access_list_version"]

    async with admin.session.get(f"{server.url}/v1/access-list?after=0",
                                 headers=relay_headers(server)) as response:
        access = AccessList.verify(await response.read(), server.identity.public)
    assert access.version >= version  # never a list from before the delete committed
    assert key not in {k.text for k in access.enrolled | access.revoked}
    # Its key may be enrolled afresh, with nothing of its past.
    fresh = await admin.call("POST", "/v1/devices", {"key": key, "name": "again"}, expect=201)
    assert fresh["groups"] == [] and fresh["peer_version"] == 0


@pytest.mark.parametrize("username", ["cli:root", "device:" + "cpk_x", "token:ci", "oracle",
                                      "a:b", " admin", "admin\t", "cli\uff1aroot",
                                      "device\ua789cpk_x", "\u043eracle", "Oracle"])
async def test_no_admin_can_be_named_like_another_kind_of_actor(
        admin: Admin, server: OracleServer, username: str) -> None:
    """The audit log names its actors `cli:USER`, `token:NAME`, `device:cpk_…` and `oracle`
    (changes no request asked for), and an admin by their bare username: an admin named
    `cli:root` made entries that read, and filter (`actor=cli:root`), as the CLI's.  Refused
    where every account is made (the API here, whose request the Admins page's form sends;
    the CLI in test_oracle_settings), with the reason."""
    refused = await admin.call("POST", "/v1/admins", {"username": username}, expect=400)
    assert "username" in refused["error"]
    assert [a["username"] for a in (await admin.call("GET", "/v1/admins"))["admins"]] == [
        "admin"]
    assert [e for e in (await admin.call("GET", "/v1/audit?action=admin.create"))["entries"]
            if e["target"] == username] == []


async def test_admins_and_tokens_are_managed_through_the_api(
        admin: Admin, server: OracleServer) -> None:
    created = await admin.call("POST", "/v1/admins", {"username": "bob"}, expect=201)
    await admin.call("POST", "/v1/admins", {"username": "bob"}, expect=409)
    await admin.call("POST", "/v1/admins", {"username": ""}, expect=400)
    bob = Admin(server.url, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
    try:
        async with bob.session.post(f"{server.url}/login", allow_redirects=False, data={
                "username": "bob", "password": created["password"]}) as response:
            assert response.status == 303
        listed = {a["username"]: a for a in (await admin.call("GET", "/v1/admins"))["admins"]}
        assert set(listed) == {"admin", "bob"} and listed["bob"]["last_login_ms"] is not None
        assert "password_hash" not in listed["bob"]
        body = await admin.call("DELETE", "/v1/admins/admin", expect=409)
        assert "your own account" in body["error"]
        await admin.call("DELETE", "/v1/admins/bob", expect=204)
        await admin.call("DELETE", "/v1/admins/bob", expect=404)
        async with bob.session.get(f"{server.url}/v1/me") as response:
            assert response.status == 401  # bob's session ended with his account
    finally:
        await bob.close()

    token = (await admin.call("POST", "/v1/tokens", {"name": "ci", "scope": "read"},
                              expect=201))["token"]
    await admin.call("POST", "/v1/tokens", {"name": "ci", "scope": "read"}, expect=409)
    await admin.call("POST", "/v1/tokens", {"name": 7, "scope": "read"}, expect=400)
    (listed,) = (await admin.call("GET", "/v1/tokens"))["tokens"]
    assert listed["name"] == "ci" and listed["last_used_ms"] is None and "token" not in listed
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.get(f"{server.url}/v1/status") as response:
            assert response.status == 200
        (listed,) = (await admin.call("GET", "/v1/tokens"))["tokens"]
        assert listed["last_used_ms"] is not None
        await admin.call("DELETE", "/v1/tokens/ci", expect=204)
        async with http.get(f"{server.url}/v1/status") as response:
            assert response.status == 401
    await admin.call("DELETE", "/v1/tokens/ci", expect=404)


def _sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    raise AssertionError(f"no sample {name}{{{wanted}}}")


async def test_metrics_count_requests_devices_and_access_list_pollers(
        admin: Admin, server: OracleServer) -> None:
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{server.url}/metrics") as response:
            assert response.status == 401
    keys = [new_key() for _ in range(3)]
    for key in keys:
        await admin.call("POST", "/v1/devices", {"key": key, "name": "d"}, expect=201)
    await admin.call("POST", f"/v1/devices/{keys[0]}/revoke")
    await admin.call("GET", f"/v1/devices/{new_key()}", expect=404)
    await admin.call("GET", "/v1/no/such/route", expect=404)
    poll = asyncio.create_task(_long_poll(admin, server))
    await asyncio.sleep(0.3)

    async with admin.session.get(f"{server.url}/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    poll.cancel()
    requests = "continuum_oracle_http_requests_total"
    assert _sample(text, requests, route="/v1/devices", method="POST", status="201") == 3
    assert _sample(text, requests, route="/v1/devices/{key}", method="GET", status="404") == 1
    assert _sample(text, requests, route="unmatched", method="GET", status="404") == 1
    assert _sample(text, "continuum_oracle_devices", state="active") == 2
    assert _sample(text, "continuum_oracle_devices", state="revoked") == 1
    assert _sample(text, "continuum_oracle_access_list_pollers") == 1
    assert "/no/such" not in text


async def _long_poll(admin: Admin, server: OracleServer) -> None:
    """Hold the current list as a relay does, then wait for the next one."""
    async with admin.session.get(f"{server.url}/v1/access-list",
                                 headers=relay_headers(server)) as response:
        held = AccessList.verify(await response.read(), server.identity.public)
    stamp = f"epoch={held.epoch}&after={held.version}&valid_until={held.valid_until_ms}"
    async with admin.session.get(f"{server.url}/v1/access-list?{stamp}",
                                 headers=relay_headers(server)) as response:
        await response.read()


async def test_the_dashboard_page_is_bounded_whatever_the_fleet(
        admin: Admin, server: OracleServer) -> None:
    """The first page shows at most 50 devices and no per-device picker."""
    for fleets in range(1, 4):
        await _fleet(server)
        async with admin.session.get(server.url + "/") as response:
            html = await response.text()
        assert html.count("<tr data-key=") == min(50, fleets * COUNT)
        assert html.count("<option") == 12  # state, presence, sort filters; none per device
    group = await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201)
    async with admin.session.get(f"{server.url}/groups/{group['id']}") as response:
        assert "<option" not in await response.text()
