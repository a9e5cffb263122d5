"""One small async database interface over SQLite (default) and PostgreSQL.

Queries are written once, with PostgreSQL's `$1` placeholders, in SQL both
engines accept; SQLite gets them rewritten to its equivalent `?1`.  Every
state change runs in `transaction()`, which also serialises writers (SQLite:
BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock), because
peer lists are derived from several tables and two admins editing groups at
once must not push lists computed from each other's half-done changes.

Migrations are the numbered files in `oracle/migrations/`, applied in order
at start and recorded in `schema_migrations`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from runtime.clock import now_ms

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_WRITER_LOCK_ID = 0x636F6E74  # "cont": one advisory lock for every oracle writer
_PLACEHOLDER = re.compile(r"\$(\d+)")

Row = dict[str, Any]
T = TypeVar("T")


class Connection(ABC):
    """What a query needs: run SQL, get rows back as dicts."""

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> None: ...

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Run one statement once per row of arguments (a batch: one call, not one per row)."""
        for row in rows:
            await self.execute(sql, *row)

    async def fetch_bulk(self, sql: str, *args: Any) -> list[Row]:
        """`fetch` for a result that may be large (many peer lists): off the event loop
        where the engine would otherwise block it."""
        return await self.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else next(iter(row.values()))


class Database(Connection):
    """A connection pool of one engine; `transaction()` hands out a serialised writer."""

    @abstractmethod
    def transaction(self) -> Any:
        """Async context manager yielding a Connection whose changes commit together."""

    @abstractmethod
    async def run_script(self, conn: Connection, script: str) -> None:
        """Run a migration file's statements inside the current transaction."""

    @abstractmethod
    async def close(self) -> None: ...

    def fold_function(self, needle: str) -> str:
        """The SQL function that lower-cases text to match `needle` (already lower case)."""
        return "lower"

    async def migrate(self) -> list[int]:
        """Apply every migration not yet recorded; returns the numbers applied now."""
        applied_now: list[int] = []
        async with self.transaction() as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)")
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                number = int(path.name.split("_", 1)[0])
                if number in done:
                    continue
                await self.run_script(conn, path.read_text(encoding="utf-8"))
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3)",
                    number, path.stem, now_ms())
                applied_now.append(number)
        return applied_now


def _statements(script: str) -> list[str]:
    """Split a migration into statements (our migrations never put ';' inside literals)."""
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# A batch of more rows than this is written from a worker thread (see `executemany`).
_ROWS_ON_LOOP = 64


class _SqliteConnection(Connection):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # Set when this transaction wrote a large batch: its commit then leaves the loop too.
        self.wrote_bulk = False

    async def execute(self, sql: str, *args: Any) -> None:
        self._conn.execute(_PLACEHOLDER.sub(r"?\1", sql), args)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """A large batch (a group's worth of peer lists, 50 MB for 1,000 members) runs in a
        worker thread: SQLite releases the GIL while it writes, so the event loop goes on
        answering.  The caller holds the database lock, so no one else uses the connection."""
        statement = _PLACEHOLDER.sub(r"?\1", sql)
        if len(rows) <= _ROWS_ON_LOOP:
            self._conn.executemany(statement, rows)
        else:
            self.wrote_bulk = True
            await _in_thread(self._conn.executemany, statement, rows)

    async def fetch_bulk(self, sql: str, *args: Any) -> list[Row]:
        def run() -> list[Row]:
            cursor = self._conn.execute(_PLACEHOLDER.sub(r"?\1", sql), args)
            return [dict(row) for row in cursor.fetchall()]
        return await _in_thread(run)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        cursor = self._conn.execute(_PLACEHOLDER.sub(r"?\1", sql), args)
        return [dict(row) for row in cursor.fetchall()]


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread, waited for to its end even if the caller is
    cancelled meanwhile: the connection is the caller's (under the database lock) until
    the call returns, so the lock must not be released while the thread still uses it."""
    call = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await call
        raise


_UNICODE_LOWER = "unicode_lower"


def _fold(text: str | None) -> str | None:
    return None if text is None else text.lower()


class SqliteDatabase(Database):
    """Connections on the event-loop thread: each query is a short indexed lookup,
    cheaper than a hop to a worker thread, as in the relay's embedded store.

    A file database has two: the writer, whose transactions are serialised by a lock
    and may take a second (a group of 1,000's peer lists), and a reader for queries
    outside a transaction, which in WAL mode sees the last commit without waiting for
    the writer: so requests (and /healthz) are answered while a large change is written.
    """

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._connect(path)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._plain = _SqliteConnection(self._conn)
        # One in-memory database is one connection: there, reads wait for the writer's lock.
        self._reader = None if path == ":memory:" else self._connect(path)
        self._lock = asyncio.Lock()

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.create_function(_UNICODE_LOWER, 1, _fold, deterministic=True)
        return conn

    async def execute(self, sql: str, *args: Any) -> None:
        async with self.transaction() as conn:
            await conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        if self._reader is not None:
            cursor = self._reader.execute(_PLACEHOLDER.sub(r"?\1", sql), args)
            return [dict(row) for row in cursor.fetchall()]
        async with self._lock:
            return await self._plain.fetch(sql, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._plain.wrote_bulk = False
            try:
                yield self._plain
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if self._plain.wrote_bulk:
                # The commit writes the batch to the WAL (50 MB for a group of 1,000's peer
                # lists): in a worker thread, so the loop does not wait for the disk.  A small
                # transaction commits here: a thread hop would cost more than its commit, and
                # it holds the lock that every request's query waits for.
                await _in_thread(self._conn.execute, "COMMIT")
            else:
                self._conn.execute("COMMIT")

    async def run_script(self, conn: Connection, script: str) -> None:
        for statement in _statements(script):
            await conn.execute(statement)

    def fold_function(self, needle: str) -> str:
        """SQLite's lower() folds ASCII only: a needle beyond ASCII needs Python's (as
        PostgreSQL's lower() does), which costs a call per row, so only then."""
        return "lower" if needle.isascii() else _UNICODE_LOWER

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._conn.close()


class _PostgresConnection(Connection):
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(sql, *args)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            await self._conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [dict(row) for row in await self._conn.fetch(sql, *args)]


class PostgresDatabase(Database):
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str) -> PostgresDatabase:
        import asyncpg  # only needed when a DSN is configured
        return cls(await asyncpg.create_pool(dsn, min_size=1, max_size=5, timeout=10))

    async def execute(self, sql: str, *args: Any) -> None:
        async with self.transaction() as conn:
            await conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [dict(row) for row in await self._pool.fetch(sql, *args)]

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._pool.acquire() as raw, raw.transaction():
            await raw.execute("SELECT pg_advisory_xact_lock($1)", _WRITER_LOCK_ID)
            yield _PostgresConnection(raw)

    async def run_script(self, conn: Connection, script: str) -> None:
        for statement in _statements(script):
            await conn.execute(statement)

    async def close(self) -> None:
        await self._pool.close()


async def open_database(url: str) -> Database:
    """`sqlite:///path` (or a bare path), `sqlite://:memory:`, or `postgresql://…`; migrated."""
    if url.startswith(("postgresql://", "postgres://")):
        db: Database = await PostgresDatabase.connect(url)
    elif url in ("sqlite://:memory:", ":memory:"):
        db = SqliteDatabase(":memory:")
    elif url.startswith("sqlite:///"):
        db = SqliteDatabase(url[len("sqlite:///"):])
    elif "://" not in url:
        db = SqliteDatabase(url)
    else:
        raise ValueError(f"unknown database {url!r}: use sqlite:///path or postgresql://…")
    try:
        await db.migrate()
    except BaseException:
        await db.close()
        raise
    return db
