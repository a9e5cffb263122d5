"""The embedded store's own promises: its files upgrade in place, a full database is a store fault.

The contract every store keeps is in test_store_contract.py; these are about
SQLite files: one written before bodies were shared still serves its mail,
and SQLITE_FULL (a genuine one, from `PRAGMA max_page_count`) surfaces as
StoreUnavailableError, makes ping() fail, and leaves the store working again
once there is room.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from continuum.store import MailboxLimits
from continuum.store.sqlite import SCHEMA_VERSION, SqliteStore
from proto import Envelope, Identity, Kind, Origin, seal_envelope
from proto.access import Stamp
from proto.errors import MailboxFullError, ReplayError, StoreUnavailableError

ROOMY = MailboxLimits(max_messages=1000, max_bytes=10_000_000)

# The layout of the previous release, one row per copy with the bytes inline.
_VERSION_0 = """
CREATE TABLE mailbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, recipient BLOB NOT NULL,
    sender BLOB NOT NULL, msg_id BLOB NOT NULL, kind INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL, raw BLOB NOT NULL);
CREATE INDEX mailbox_by_recipient ON mailbox (recipient, seq);
CREATE INDEX mailbox_by_expiry ON mailbox (expires_at_ms);
CREATE TABLE seen (sender BLOB NOT NULL, msg_id BLOB NOT NULL, until_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, msg_id)) WITHOUT ROWID;
CREATE INDEX seen_by_until ON seen (until_ms);
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def envelope(sender: Identity, recipients: list[Identity], text: bytes = b"hi") -> Envelope:
    return seal_envelope(sender, Kind.DATA, [r.public for r in recipients], text, ttl_s=600,
                         now_ms=now_ms())


async def test_a_file_from_before_shared_bodies_still_serves_its_mail(tmp_path: Path) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    old = envelope(alice, [bob, carol], b"written by the previous release")
    path = tmp_path / "mail.db"
    with sqlite3.connect(path) as db:
        db.executescript(_VERSION_0)
        db.executemany("INSERT INTO mailbox (recipient, sender, msg_id, kind, expires_at_ms, raw)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       [(r.public.raw, alice.public.raw, old.msg_id, 1, old.expires_at_ms,
                         old.raw) for r in (bob, carol)])
        db.execute("INSERT INTO seen VALUES (?, ?, ?)",
                   (alice.public.raw, old.msg_id, now_ms() + 60_000))
    store = SqliteStore(path)
    try:
        assert await store.depth(bob.public) == 1
        with pytest.raises(ReplayError):
            await store.accept(old, replay_until_ms=now_ms() + 60_000, limits=ROOMY)
        [bobs] = await store.fetch(bob.public, None, 10)
        assert bobs.raw == old.raw
        assert await store.ack(bob.public, bobs.tag)
        newer = envelope(alice, [bob])
        await store.accept(newer, replay_until_ms=now_ms() + 60_000, limits=ROOMY)
        assert [e.raw for e in await store.fetch(bob.public, None, 10)] == [newer.raw]
        assert [e.raw for e in await store.fetch(carol.public, None, 10)] == [old.raw]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_file_that_kept_kinds_keeps_only_their_origin(tmp_path: Path) -> None:
    """Version 1 stored each envelope's kind, since sealed; what remains is whether a relay
    wrote it (an EXPIRY notice), so no notice is ever sent about a notice."""
    alice, bob = Identity.generate(), Identity.generate()
    path = tmp_path / "mail.db"
    store = SqliteStore(path)
    by_kind = {kind: envelope(alice, [bob], kind.name.encode()) for kind in Kind}
    for env in by_kind.values():
        await store.accept(env, replay_until_ms=now_ms() + 60_000, limits=ROOMY)
    await store.close()
    with sqlite3.connect(path) as db:  # what version 1 wrote
        db.execute("ALTER TABLE body RENAME COLUMN origin TO kind")
        db.execute("DROP TABLE access_floor")
        db.executemany("UPDATE body SET kind = ? WHERE msg_id = ?",
                       [(int(kind), env.msg_id) for kind, env in by_kind.items()])
        db.execute("PRAGMA user_version = 1")
    store = SqliteStore(path)
    try:
        expired = await store.take_expired(now_ms() + 10**9, 100)
        assert {m.msg_id: m.origin for m in expired} == {
            env.msg_id: Origin.RELAY if kind is Kind.EXPIRY else Origin.DEVICE
            for kind, env in by_kind.items()}
        assert await store.access_list_floor() == Stamp(0, 0)  # version 1 had no floor
        assert await store.raise_access_list_floor(Stamp(9, 1)) == Stamp(9, 1)
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


async def test_a_full_database_is_a_store_fault_and_recovers(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    store = SqliteStore(tmp_path / "mail.db")
    try:
        await store.ping()
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages + 8}")  # room for a few bodies only
        with pytest.raises(StoreUnavailableError, match="full"):
            for _ in range(100):
                await store.accept(envelope(alice, [bob], b"x" * 4000),
                                   replay_until_ms=now_ms() + 60_000, limits=ROOMY)
        with pytest.raises(StoreUnavailableError, match="full"):
            await store.ping()  # what /healthz asks: it must not say "ok" now
        stored = await store.depth(bob.public)
        store._db.execute("PRAGMA max_page_count = 1073741823")  # the disk has room again
        await store.ping()
        await store.accept(envelope(alice, [bob]), replay_until_ms=now_ms() + 60_000,
                           limits=ROOMY)
        assert len(await store.fetch(bob.public, None, 1000)) == stored + 1
    finally:
        await store.close()


async def test_bodies_go_with_their_last_entry(tmp_path: Path) -> None:
    """One row per envelope whatever its recipients, removed by the last ack or expiry."""
    alice, bob, carol = (Identity.generate() for _ in range(3))
    store = SqliteStore(tmp_path / "mail.db")

    def bodies() -> int:
        return store._db.execute("SELECT count(*) FROM body").fetchone()[0]

    try:
        acked, expiring = envelope(alice, [bob, carol]), envelope(alice, [bob, carol])
        for env in (acked, expiring):
            await store.accept(env, replay_until_ms=now_ms() + 60_000, limits=ROOMY)
        assert bodies() == 2
        for reader in (bob, carol):
            first = (await store.fetch(reader.public, None, 10))[0]
            assert await store.ack(reader.public, first.tag)
            assert bodies() == (2 if reader is bob else 1)
        assert len(await store.take_expired(expiring.expires_at_ms + 1, 100)) == 2
        assert bodies() == 0
    finally:
        await store.close()


# -- group commit: the writes of one loop turn share one transaction -----------------------


def commits_of(store: SqliteStore) -> list[str]:
    """Every COMMIT the store's connection runs from now on (SQLite's own statement trace)."""
    commits: list[str] = []
    store._db.set_trace_callback(
        lambda statement: commits.append(statement) if statement == "COMMIT" else None)
    return commits


async def test_the_writes_of_one_turn_commit_once_in_call_order(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    store = SqliteStore(tmp_path / "mail.db")
    try:
        await store.accept(envelope(alice, [bob], b"delivered earlier"),
                           replay_until_ms=now_ms() + 60_000, limits=ROOMY)
        [earlier] = await store.fetch(bob.public, None, 10)
        commits = commits_of(store)
        sent = [envelope(alice, [bob], bytes([i])) for i in range(8)]
        acked, *_ = await asyncio.gather(
            store.ack(bob.public, earlier.tag),
            *(store.accept(env, replay_until_ms=now_ms() + 60_000, limits=ROOMY) for env in sent))
        assert acked is True
        assert commits == ["COMMIT"]
        assert [e.raw for e in await store.fetch(bob.public, None, 100)] == [e.raw for e in sent]
    finally:
        await store.close()


async def test_a_refused_accept_leaves_the_others_of_its_batch_stored(tmp_path: Path) -> None:
    """Each accept keeps its own outcome; those after a refusal still see the ones before it
    (the mailbox fills, the same id twice is a replay), and all commit once."""
    alice, bob, carol = (Identity.generate() for _ in range(3))
    store = SqliteStore(tmp_path / "mail.db")
    limits = MailboxLimits(max_messages=3, max_bytes=10_000_000, sender_max_bytes=40_000)
    try:
        old = envelope(alice, [carol], b"stored in an earlier batch")
        await store.accept(old, replay_until_ms=now_ms() + 60_000, limits=limits)
        first, second, third, fourth = (envelope(alice, [bob], bytes([i])) for i in range(4))
        huge = envelope(alice, [carol], b"x" * 40_000)
        calls = [first, old, second, first, huge, third, fourth]
        commits = commits_of(store)
        outcomes = await asyncio.gather(
            *(store.accept(env, replay_until_ms=now_ms() + 60_000, limits=limits)
              for env in calls), return_exceptions=True)
        assert commits == ["COMMIT"]
        assert [type(o).__name__ for o in outcomes] == [
            "NoneType", "ReplayError", "NoneType", "ReplayError", "QuotaExceededError",
            "NoneType", "MailboxFullError"]
        assert [e.raw for e in await store.fetch(bob.public, None, 100)] == \
            [first.raw, second.raw, third.raw]
        assert [e.raw for e in await store.fetch(carol.public, None, 100)] == [old.raw]
        assert await store.depth(bob.public) == 3 and await store.depth(carol.public) == 1
        # The refused ones left nothing behind: not their ids, not their bytes.
        await store.accept(huge, replay_until_ms=now_ms() + 60_000, limits=ROOMY)
        with pytest.raises(MailboxFullError):
            await store.accept(fourth, replay_until_ms=now_ms() + 60_000, limits=limits)
    finally:
        await store.close()


def refuse_commits(store: SqliteStore) -> None:
    """Make SQLite itself refuse every COMMIT, as a failing disk does at the WAL write."""
    def authorize(action: int, first: str | None, *_: object) -> int:
        denied = action == sqlite3.SQLITE_TRANSACTION and first == "COMMIT"
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK

    store._db.set_authorizer(authorize)


def fill_database(store: SqliteStore) -> None:
    """Room for a page or two more: the batch's inserts hit SQLITE_FULL midway."""
    assert store._db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")


@pytest.mark.parametrize("fault", [refuse_commits, fill_database],
                         ids=["commit refused", "database full"])
async def test_a_batch_that_cannot_commit_refuses_all_of_it_and_stores_none(
        tmp_path: Path, fault: Callable[[SqliteStore], None]) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    store = SqliteStore(tmp_path / "mail.db")
    limits = MailboxLimits(max_messages=4, max_bytes=10_000_000)
    try:
        waiting = envelope(alice, [bob], b"stored before")
        await store.accept(waiting, replay_until_ms=now_ms() + 60_000, limits=limits)
        [entry] = await store.fetch(bob.public, None, 10)
        batch = [envelope(alice, [bob], bytes([i]) * 3000) for i in range(6)]
        fault(store)
        outcomes = await asyncio.gather(
            store.ack(bob.public, entry.tag),
            *(store.accept(env, replay_until_ms=now_ms() + 60_000, limits=limits)
              for env in batch), return_exceptions=True)
        assert all(isinstance(o, StoreUnavailableError) for o in outcomes), outcomes
        assert [e.raw for e in await store.fetch(bob.public, None, 100)] == [waiting.raw]
        assert store._db.execute("SELECT count(*) FROM seen").fetchone()[0] == 1
        # Room again (the fault gone): the same store takes the same messages, and its
        # counts were given back too (the mailbox holds 4: the waiting one and 3 more).
        store._db.set_authorizer(None)
        store._db.execute("PRAGMA max_page_count = 1073741823")
        outcomes = await asyncio.gather(
            *(store.accept(env, replay_until_ms=now_ms() + 60_000, limits=limits)
              for env in batch[:4]), return_exceptions=True)
        assert [type(o).__name__ for o in outcomes] == ["NoneType"] * 3 + ["MailboxFullError"]
        assert await store.ack(bob.public, entry.tag)
        assert [e.raw for e in await store.fetch(bob.public, None, 100)] == \
            [env.raw for env in batch[:3]]
    finally:
        await store.close()


async def test_an_accept_whose_caller_is_cancelled_while_queued_is_stored_and_wakes(
        tmp_path: Path) -> None:
    """A connection that closes while its accept waits for the batch: the message is
    committed anyway (the device retries and hears REPLAY), so its recipient must hear of it."""
    alice, bob = Identity.generate(), Identity.generate()
    store = SqliteStore(tmp_path / "mail.db")
    woken: list[str] = []
    try:
        await store.subscribe(bob.public, lambda _entry: woken.append("bob"))
        sent = envelope(alice, [bob])
        task = asyncio.create_task(store.accept(sent, replay_until_ms=now_ms() + 60_000,
                                                limits=ROOMY))
        await asyncio.sleep(0)  # the accept is queued; its batch runs next turn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert woken == ["bob"]
        assert [e.raw for e in await store.fetch(bob.public, None, 10)] == [sent.raw]
        with pytest.raises(ReplayError):
            await store.accept(sent, replay_until_ms=now_ms() + 60_000, limits=ROOMY)
    finally:
        await store.close()


async def test_closing_commits_the_writes_still_queued(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    store = SqliteStore(tmp_path / "mail.db")
    sent = envelope(alice, [bob])
    task = asyncio.create_task(store.accept(sent, replay_until_ms=now_ms() + 60_000,
                                            limits=ROOMY))
    await asyncio.sleep(0)  # queued; its batch would run next turn, after the close
    await store.close()
    await task  # ACCEPTED: it was committed before the file was closed
    reopened = SqliteStore(tmp_path / "mail.db")
    try:
        assert [e.raw for e in await reopened.fetch(bob.public, None, 10)] == [sent.raw]
    finally:
        await reopened.close()


async def test_a_health_probe_that_cannot_write_refuses_no_accept_beside_it(
        tmp_path: Path) -> None:
    """The probe writes as much as the largest envelope: with less room than that left,
    /healthz says unavailable, but the small messages of the same turn are still stored."""
    alice, bob = Identity.generate(), Identity.generate()
    store = SqliteStore(tmp_path / "mail.db")
    try:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages + 4}")  # 16 KiB of room
        sent = [envelope(alice, [bob], bytes([i])) for i in range(2)]
        outcomes = await asyncio.gather(
            store.accept(sent[0], replay_until_ms=now_ms() + 60_000, limits=ROOMY),
            store.ping(),
            store.accept(sent[1], replay_until_ms=now_ms() + 60_000, limits=ROOMY),
            return_exceptions=True)
        assert outcomes[0] is None and outcomes[2] is None, outcomes
        assert isinstance(outcomes[1], StoreUnavailableError)
        assert [e.raw for e in await store.fetch(bob.public, None, 10)] == [e.raw for e in sent]
    finally:
        await store.close()
