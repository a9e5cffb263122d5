"""A group's page reads a page of its members, never the whole list: measured in rows the
database hands back while the page is served, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from oracle_support import Admin
from test_oracle_api import admin, server  # noqa: F401  (fixtures on both databases)

from oracle import OracleServer
from oracle.dashboard import PAGE_SIZE
from oracle.db import Database
from proto import Identity

MEMBERS = 600


@contextmanager
def rows_read(db: Database) -> Iterator[list[int]]:
    """Count the rows every fetch on `db` returns (the real database answers them)."""
    counted: list[int] = []
    fetch = db.fetch

    async def counting(sql: str, *args: object) -> list:
        rows = await fetch(sql, *args)
        counted.append(len(rows))
        return rows

    db.fetch = counting  # type: ignore[method-assign]
    try:
        yield counted
    finally:
        del db.fetch  # back to the class's method


async def test_a_large_groups_pages_read_a_page_of_members_not_all(
        admin: Admin, server: OracleServer) -> None:
    assert server.oracle is not None
    registry = server.oracle.registry
    group = await registry.create_group("everyone")
    async with registry.db.transaction() as conn:  # enrol quickly: one transaction
        keys = [Identity.generate().public.text for _ in range(MEMBERS)]
        await conn.executemany("INSERT INTO devices (key, name, tags, enrolled_at_ms)"
                               " VALUES ($1, $2, '', 0)", [(k, f"m{n:04d}") for n, k in
                                                           enumerate(keys)])
        await conn.executemany("INSERT INTO memberships (group_id, device_key) VALUES ($1, $2)",
                               [(group.id, k) for k in keys])
    for path in (f"/groups/{group.id}", f"/groups/{group.id}?find=m00", "/groups",
                 f"/?group={group.id}"):
        with rows_read(registry.db) as counted:
            async with admin.session.get(server.url + path) as response:
                assert response.status == 200
                html = await response.text()
        assert sum(counted) < 3 * PAGE_SIZE + 20, (path, counted)  # not 600 members
        if path == f"/groups/{group.id}":
            assert f"{MEMBERS} members" in html
            assert html.count("<tr data-key=") == PAGE_SIZE
        if "find" in path:
            assert "no active device outside this group matches" in html
