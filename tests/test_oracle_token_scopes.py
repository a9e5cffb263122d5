"""API tokens are not administrators (audit F1), on SQLite and on PostgreSQL.

A token has a scope chosen when it is made: `read` (GETs and /metrics) or `write` (also
devices and groups).  No token manages administrators or tokens: that takes an admin's
session.  A token records the admin who made it, and deleting that admin revokes it.
Tokens made before migration 0008 become `write` tokens, their creator read from the
audit log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from oracle_support import Admin, oracle_database, oracle_settings
from test_oracle_api import admin, new_key  # noqa: F401  (`admin` logs in to `server` below)

import oracle.__main__ as oracle_main
from oracle import OracleServer
from oracle.auth import _token_hash  # what the table holds of a token
from oracle.db import MIGRATIONS_DIR, Database, PostgresDatabase, SqliteDatabase

ADMINS_ONLY = "managing administrators and API tokens needs an administrator's session"


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request, tmp_path: Path) -> AsyncIterator[str]:
    """The database URL of one test, on each engine."""
    async with oracle_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def server(database: str, tmp_path: Path) -> AsyncIterator[OracleServer]:
    async with OracleServer(oracle_settings(tmp_path, database)) as started:
        yield started


class Bearer:
    """A script holding one API token."""

    def __init__(self, server: OracleServer, token: str) -> None:
        self.url, self.headers = server.url, {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.request(
                method, self.url + path, json=json, headers=self.headers) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()


async def make_token(admin: Admin, name: str, scope: str) -> str:
    """A token made from the admin's session, as the dashboard makes it."""
    return (await admin.call("POST", "/v1/tokens", {"name": name, "scope": scope},
                             expect=201))["token"]


@pytest.mark.parametrize("scope", ["read", "write"])
async def test_no_token_manages_admins_or_tokens(admin: Admin, server: OracleServer,
                                                 scope: str) -> None:
    await admin.call("POST", "/v1/admins", {"username": "bob"}, expect=201)
    await make_token(admin, "other", "read")
    script = Bearer(server, await make_token(admin, "script", scope))
    for method, path, body in (
            ("POST", "/v1/admins", {"username": "mallory"}),
            ("DELETE", "/v1/admins/bob", None),
            ("GET", "/v1/admins", None),
            ("POST", "/v1/tokens", {"name": "backdoor", "scope": "write"}),
            ("DELETE", "/v1/tokens/other", None),
            ("GET", "/v1/tokens", None),
            ("GET", "/admins", None)):
        status, answer = await script.call(method, path, body)
        assert status == 403, (method, path, status, answer)
        text = answer["error"] if isinstance(answer, dict) else answer
        assert ADMINS_ONLY in text, (method, path, text)
    admins = (await admin.call("GET", "/v1/admins"))["admins"]
    assert [a["username"] for a in admins] == ["admin", "bob"]
    tokens = (await admin.call("GET", "/v1/tokens"))["tokens"]
    assert [t["name"] for t in tokens] == ["other", "script"]
    # The admin's own session still manages both.
    await admin.call("DELETE", "/v1/tokens/other", expect=204)
    await admin.call("DELETE", "/v1/admins/bob", expect=204)


async def test_a_read_token_reads_and_scrapes_but_changes_nothing(
        admin: Admin, server: OracleServer) -> None:
    key = new_key()
    await admin.call("POST", "/v1/devices", {"key": key, "name": "boiler"}, expect=201)
    group = await admin.call("POST", "/v1/groups", {"name": "heat"}, expect=201)
    await admin.call("PUT", f"/v1/groups/{group['id']}/members/{key}")
    reader = Bearer(server, await make_token(admin, "prometheus", "read"))

    for method, path, body in (
            ("POST", "/v1/devices", {"key": new_key(), "name": "intruder"}),
            ("PATCH", f"/v1/devices/{key}", {"name": "renamed"}),
            ("POST", f"/v1/devices/{key}/revoke", None),
            ("DELETE", f"/v1/devices/{key}", None),
            ("POST", "/v1/groups", {"name": "new"}),
            ("PATCH", f"/v1/groups/{group['id']}", {"name": "renamed"}),
            ("DELETE", f"/v1/groups/{group['id']}/members/{key}", None),
            ("DELETE", f"/v1/groups/{group['id']}", None),
            ("PUT", f"/v1/groups/{group['id']}/config", {"interval": 5}),
            ("POST", "/v1/peer-lists/reissue", None)):
        status, answer = await reader.call(method, path, body)
        assert status == 403, (method, path, status, answer)
        assert "scope is 'read'" in answer["error"], answer

    for path in ("/v1/status", "/v1/devices", f"/v1/devices/{key}", "/v1/groups",
                 f"/v1/groups/{group['id']}", f"/v1/devices/{key}/config", "/v1/audit",
                 "/metrics", "/"):
        status, _ = await reader.call("GET", path)
        assert status == 200, path
    status, me = await reader.call("GET", "/v1/me")
    assert (status, me["name"], me["scope"]) == (200, "token:prometheus", "read")
    status, metrics = await reader.call("GET", "/metrics")
    assert "continuum_oracle_devices" in metrics

    device = await admin.call("GET", f"/v1/devices/{key}")
    assert device["name"] == "boiler" and not device["revoked"]
    assert [(g["name"], g["members"]) for g in (await admin.call("GET", "/v1/groups"))["groups"]] \
        == [("heat", [key])]
    log = (await admin.call("GET", "/v1/audit"))["entries"]
    assert log[0]["action"] == "token.create" and log[0]["detail"] == {"scope": "read"}


async def test_a_write_token_manages_devices_and_groups(admin: Admin,
                                                        server: OracleServer) -> None:
    writer = Bearer(server, await make_token(admin, "ci", "write"))
    key = new_key()
    assert (await writer.call("POST", "/v1/devices", {"key": key, "name": "d"}))[0] == 201
    status, group = await writer.call("POST", "/v1/groups", {"name": "g"})
    assert status == 201
    assert (await writer.call("PUT", f"/v1/groups/{group['id']}/members/{key}"))[0] == 200
    assert (await writer.call("PATCH", f"/v1/devices/{key}", {"name": "renamed"}))[0] == 200
    assert (await writer.call("POST", f"/v1/devices/{key}/revoke"))[0] == 200
    assert (await writer.call("POST", "/v1/peer-lists/reissue"))[0] == 200
    device = await admin.call("GET", f"/v1/devices/{key}")
    assert device["name"] == "renamed" and device["revoked"]
    status, me = await writer.call("GET", "/v1/me")
    assert (status, me["scope"]) == (200, "write")
    (listed,) = (await admin.call("GET", "/v1/tokens"))["tokens"]
    assert (listed["name"], listed["scope"], listed["created_by"]) == ("ci", "write", "admin")


async def test_a_token_needs_a_scope(admin: Admin) -> None:
    for body in ({"name": "ci"}, {"name": "ci", "scope": "admin"}, {"name": "ci", "scope": 1}):
        answer = await admin.call("POST", "/v1/tokens", body, expect=400)
        assert "scope must be read" in answer["error"]
    assert (await admin.call("GET", "/v1/tokens"))["tokens"] == []


async def test_deleting_an_admin_revokes_the_tokens_they_made(server: OracleServer) -> None:
    alice, bob, carol = [await Admin.login(server, name) for name in ("alice", "bob", "carol")]
    try:
        alices = [Bearer(server, await make_token(alice, "alice-read", "read")),
                  Bearer(server, await make_token(alice, "alice-write", "write"))]
        bobs = Bearer(server, await make_token(bob, "bob-read", "read"))
        for script in (*alices, bobs):
            assert (await script.call("GET", "/v1/me"))[0] == 200

        await carol.call("DELETE", "/v1/admins/alice", expect=204)
        for script in alices:
            assert (await script.call("GET", "/v1/me"))[0] == 401
            assert (await script.call("GET", "/metrics"))[0] == 401
        assert (await bobs.call("GET", "/v1/me"))[0] == 200

        tokens = (await carol.call("GET", "/v1/tokens"))["tokens"]
        assert [(t["name"], t["scope"], t["created_by"]) for t in tokens] == [
            ("bob-read", "read", "bob")]
        log = (await carol.call("GET", "/v1/audit?limit=3"))["entries"]
        assert [(e["action"], e["target"], e["actor"]) for e in log] == [
            ("admin.delete", "alice", "carol"), ("token.revoke", "alice-write", "carol"),
            ("token.revoke", "alice-read", "carol")]
        assert log[0]["detail"] == {"tokens_revoked": ["alice-read", "alice-write"]}
        assert log[1]["detail"] == {"created_by": "alice", "reason": "its creator was deleted"}
        # The name is free again, and the new token is carol's.
        await make_token(carol, "alice-read", "read")

        # A token the CLI made has no creator: no admin's deletion revokes it.
        cli = Bearer(server, await server.create_api_token("cli-made", "read"))
        await carol.call("DELETE", "/v1/admins/bob", expect=204)
        assert (await bobs.call("GET", "/v1/me"))[0] == 401
        assert (await cli.call("GET", "/v1/me"))[0] == 200
    finally:
        for client in (alice, bob, carol):
            await client.close()


async def test_the_admins_page_shows_each_tokens_scope_and_creator(
        admin: Admin, server: OracleServer) -> None:
    await make_token(admin, "ci", "write")
    await make_token(admin, "prometheus", "read")
    await server.create_api_token("from-cli", "read")
    async with admin.session.get(server.url + "/admins") as response:
        assert response.status == 200
        page = await response.text()
    for name, scope, creator in (("ci", "write", "admin"), ("prometheus", "read", "admin"),
                                 ("from-cli", "read", "command line")):
        row = page.split(f'<tr data-token="{name}">', 1)[1].split("</tr>", 1)[0]
        assert f'<td data-label="Scope">{scope}</td>' in row, row
        assert creator in row.split('data-label="Created by">', 1)[1].split("</td>", 1)[0], row
    assert '<select name="scope"' in page


async def _database_before_scopes(url: str) -> Database:
    """A database with migrations 0001-0007 only: what an oracle of before 0008 left."""
    if url.startswith("sqlite:///"):
        db: Database = SqliteDatabase(url[len("sqlite:///"):])
    else:
        db = await PostgresDatabase.connect(url)
    async with db.transaction() as conn:
        await conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                           " name TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)")
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            number = int(path.name.split("_", 1)[0])
            if number < 8:
                await db.run_script(conn, path.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2, 0)",
                                   number, path.stem)
    return db


async def test_tokens_made_before_scopes_become_write_tokens_with_their_creator(
        database: str, tmp_path: Path) -> None:
    """0008: old tokens keep what they did with devices and groups (write), lose the admin
    routes, and the admin whose session made one (per the audit log) becomes its creator."""
    db = await _database_before_scopes(database)
    try:
        async with db.transaction() as conn:
            for username in ("alice", "bob"):
                await conn.execute("INSERT INTO admins (username, password_hash, created_at_ms)"
                                   " VALUES ($1, 'x', 0)", username)
            for n, name in enumerate(("by-alice", "by-cli", "remade-by-token")):
                await conn.execute("INSERT INTO api_tokens (token_hash, name, created_at_ms)"
                                   " VALUES ($1, $2, 0)", f"hash-{n}", name)
            # (id, actor, via, target): remade-by-token was alice's, revoked, then a token's.
            for entry in ((1, "alice", "session", "by-alice"), (2, "cli:root", "cli", "by-cli"),
                          (3, "bob", "session", "remade-by-token"),
                          (4, "token:x", "token", "remade-by-token")):
                await conn.execute("INSERT INTO audit_log (id, at_ms, actor, via, action, target)"
                                   " VALUES ($1, 0, $2, $3, 'token.create', $4)", *entry)
        assert await db.migrate() == [8]
        rows = await db.fetch("SELECT name, scope, created_by FROM api_tokens ORDER BY name")
        assert rows == [{"name": "by-alice", "scope": "write", "created_by": "alice"},
                        {"name": "by-cli", "scope": "write", "created_by": None},
                        {"name": "remade-by-token", "scope": "write", "created_by": None}]
    finally:
        await db.close()


async def test_a_token_made_before_scopes_still_manages_devices_but_not_admins(
        database: str, tmp_path: Path) -> None:
    db = await _database_before_scopes(database)
    old_token = "cot_made-before-scopes"
    try:
        await db.execute("INSERT INTO api_tokens (token_hash, name, created_at_ms)"
                         " VALUES ($1, 'ci', 0)", _token_hash(old_token))
    finally:
        await db.close()
    async with OracleServer(oracle_settings(tmp_path, database)) as server:
        script = Bearer(server, old_token)
        assert (await script.call("POST", "/v1/devices", {"key": new_key(), "name": "d"}))[0] \
            == 201
        assert (await script.call("POST", "/v1/groups", {"name": "g"}))[0] == 201
        assert (await script.call("POST", "/v1/admins", {"username": "m"}))[0] == 403
        assert (await script.call("POST", "/v1/tokens", {"name": "t", "scope": "read"}))[0] \
            == 403
        assert (await script.call("GET", "/v1/me"))[1]["scope"] == "write"


def test_the_cli_makes_a_token_only_with_a_scope(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """What the Helm chart's metrics Secret holds: `create-token NAME --scope read`."""
    url = f"sqlite:///{tmp_path / 'oracle.db'}"
    logging = structlog.get_config()  # main() sets the process's logging up: put back after
    try:
        _cli_token(url, tmp_path, capsys)
    finally:
        structlog.configure(**logging)


def _cli_token(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        oracle_main.main(["create-token", "prometheus", "--database", url])
    assert refused.value.code == 2 and "--scope" in capsys.readouterr().err
    oracle_main.main(["create-token", "prometheus", "--scope", "read", "--database", url])
    token = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    assert token.startswith("cot_")

    async def check() -> None:
        async with OracleServer(oracle_settings(tmp_path, url)) as server:
            scraper = Bearer(server, token)
            assert (await scraper.call("GET", "/metrics"))[0] == 200
            assert (await scraper.call("POST", "/v1/groups", {"name": "g"}))[0] == 403
            (listed,) = await server.oracle.auth.api_tokens()  # type: ignore[union-attr]
            assert (listed.scope, listed.created_by) == ("read", None)
    asyncio.run(check())
