"""Embedded mailbox store: SQLite in the relay's process, in memory or in a file.

This is the zero-set-up default for one relay on a laptop or a gateway.  With
a file, WAL journaling makes every committed `accept` survive a killed process
(synchronous=NORMAL is crash-safe in WAL mode; only power loss can drop the
last transactions).  Rate-limit buckets stay in memory: they describe the
last second, not anything a restart must keep.

Layout: an envelope's bytes are one `body` row; each recipient's `mailbox`
row refers to it (and repeats its sender and size, so removing an entry
settles the counts without reading the body).  A trigger removes a body with
its last mailbox row, inside the same statement, so no crash can leave an
orphan behind.

Calls run on the event loop thread, cheaper than a hop to a worker thread.
Reads are single statements; every write (accept, ack, expiry, the access
floor; the health probe alone) goes through `GroupCommit`: on a file, those issued
during one loop turn share one transaction, committed before any of them
returns (in memory, where a commit writes nothing, each commits at once).  This
process is the file's only writer, so mailbox sizes and the bytes each
sender's bodies take (the byte budgets) are counted once at open and then
kept in memory, sparing queries on every accept; a write changes them as it
runs (the writes after it in its batch check against them), and a batch that
is not committed undoes its changes.  Scale-out uses the Redis store.

Every SQLite failure (a full disk, an I/O error, a locked or corrupt file)
becomes StoreUnavailableError, and a transaction it interrupted is rolled
back, so the store works again as soon as the disk does.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from proto import Envelope, Origin, PublicKey
from proto.access import Stamp
from proto.errors import ReplayError, StoreUnavailableError
from proto.limits import DEFAULT_MAX_ENVELOPE_BYTES

from .base import (ExpiredMessage, MailboxLimits, MailboxStore, StoredMessage, Subscription,
                   Wake)
from .embedded import EmbeddedWakeups, check_budgets, check_mailbox, parse_tag
from .group_commit import GroupCommit
from .token_bucket import TokenBuckets

# seq, recipient, sender, msg_id, origin, size, body of an entry that expired
_Due = tuple[int, bytes, bytes, bytes, int, int, int]

SCHEMA_VERSION = 2
# ping() commits and removes a body this large: if that cannot be written,
# neither can the largest envelope a default relay admits.
_PROBE_BYTES = DEFAULT_MAX_ENVELOPE_BYTES

_SCHEMA = """
CREATE TABLE body (
    id INTEGER PRIMARY KEY,
    sender BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    origin INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    raw BLOB NOT NULL
);
CREATE INDEX body_by_expiry ON body (expires_at_ms);
CREATE TABLE mailbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient BLOB NOT NULL,
    body INTEGER NOT NULL REFERENCES body (id),
    sender BLOB NOT NULL,  -- the body's, so an ack settles the sender's budget
    size INTEGER NOT NULL  -- the body's length
);
CREATE INDEX mailbox_by_recipient ON mailbox (recipient, seq);
CREATE INDEX mailbox_by_body ON mailbox (body);
CREATE TRIGGER last_entry_removes_body AFTER DELETE ON mailbox
    WHEN NOT EXISTS (SELECT 1 FROM mailbox WHERE body = OLD.body)
BEGIN
    DELETE FROM body WHERE id = OLD.body;
END;
CREATE TABLE probe (id INTEGER PRIMARY KEY, filler BLOB NOT NULL);
"""

# The highest access-list stamp applied (one row, once a list was): new in version 2.
_FLOOR = """
CREATE TABLE access_floor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL,
    version INTEGER NOT NULL
);
"""

_SEEN = """
CREATE TABLE IF NOT EXISTS seen (
    sender BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_until ON seen (until_ms);
"""


def _origin_of_kind(column: str) -> str:
    """Files from before the kind was sealed kept an envelope's kind (1 DATA, 2 RECEIPT,
    3 EXPIRY, 4 PEER_CHANGE) where its origin now goes; only EXPIRY was a relay's notice."""
    return f"CASE {column} WHEN 3 THEN {int(Origin.RELAY)} ELSE {int(Origin.DEVICE)} END"


# Files written before bodies were shared held one row per copy, bytes inline:
# each old row becomes a body of its own and the one entry referring to it.
_FROM_VERSION_0 = """
DROP INDEX mailbox_by_recipient;
DROP INDEX mailbox_by_expiry;
ALTER TABLE mailbox RENAME TO mailbox_v0;
""" + _SCHEMA + f"""
INSERT INTO body (id, sender, msg_id, origin, expires_at_ms, raw)
    SELECT seq, sender, msg_id, {_origin_of_kind("kind")}, expires_at_ms, raw FROM mailbox_v0;
INSERT INTO mailbox (seq, recipient, body, sender, size)
    SELECT seq, recipient, seq, sender, length(raw) FROM mailbox_v0;
DROP TABLE mailbox_v0;
"""

# Files written while envelopes showed their kind.
_FROM_VERSION_1 = f"""
ALTER TABLE body RENAME COLUMN kind TO origin;
UPDATE body SET origin = {_origin_of_kind("origin")};
"""


class _Counts:
    """Mailbox sizes and the bytes the budgets count, kept in memory (this process is the
    file's only writer), with a journal of changes so a batch not committed can undo its own.

    Writes change them as they run, so the writes after them in their batch check
    against them; `GroupCommit` marks, undoes and forgets the journal.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        # recipient -> [messages, bytes]
        self._sizes: dict[bytes, list[int]] = {
            recipient: [messages, size] for recipient, messages, size in db.execute(
                "SELECT recipient, count(*), sum(size) FROM mailbox GROUP BY recipient")}
        # sender -> bytes of its bodies, and their sum: what the budgets count.
        self._stored: dict[bytes, int] = dict(db.execute(
            "SELECT sender, sum(length(raw)) FROM body GROUP BY sender"))
        self._stored_total = sum(self._stored.values())
        # (recipient, messages, bytes) from grow, (sender, None, bytes) from body.
        self._journal: list[tuple[bytes, int | None, int]] = []

    def mailbox(self, recipient: bytes) -> tuple[int, int]:
        """(messages, bytes) in one mailbox."""
        messages, size = self._sizes.get(recipient, (0, 0))
        return messages, size

    def check_budgets(self, sender: bytes, size: int, limits: MailboxLimits) -> None:
        """QuotaExceededError unless one more body of `size` fits both byte budgets."""
        check_budgets(sender, self._stored.get(sender, 0), self._stored_total, size, limits)

    def grow(self, recipient: bytes, messages: int, size: int) -> None:
        """A mailbox gained (or, negative, lost) entries and bytes."""
        self._journal.append((recipient, messages, size))
        entry = self._sizes.setdefault(recipient, [0, 0])
        entry[0] += messages
        entry[1] += size
        if entry[0] <= 0:
            del self._sizes[recipient]

    def body(self, sender: bytes, size: int) -> None:
        """A body of `size` was stored (size > 0) or removed (size < 0)."""
        self._journal.append((sender, None, size))
        self._stored_total += size
        used = self._stored.get(sender, 0) + size
        if used > 0:
            self._stored[sender] = used
        else:
            self._stored.pop(sender, None)

    def mark(self) -> int:
        return len(self._journal)

    def undo_to(self, mark: int) -> None:
        """Take back every change since `mark`, latest first."""
        undone = self._journal[mark:]
        for key, messages, size in reversed(undone):
            if messages is None:
                self.body(key, -size)
            else:
                self.grow(key, -messages, -size)
        del self._journal[mark:]  # the changes and their undoing

    def forget(self) -> None:
        """The batch was committed: its changes stay."""
        self._journal.clear()


class SqliteStore(MailboxStore):
    """`path` is a file path, or ":memory:" for a store that lives as long as the process."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        try:
            if str(path) != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._create_or_upgrade()
            self._counts = _Counts(self._db)
        except (sqlite3.Error, OSError) as exc:
            raise _unavailable(exc) from None
        self._writes = GroupCommit(self._db, self._counts, per_turn=str(path) != ":memory:")
        self._wakeups = EmbeddedWakeups()
        self._buckets = TokenBuckets()

    def _create_or_upgrade(self) -> None:
        """Bring the file to SCHEMA_VERSION in one transaction: a crash leaves either."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version == 1:
            upgrade = _FROM_VERSION_1 + _FLOOR
        elif version == 0:
            old_mailbox = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mailbox'").fetchone()
            upgrade = (_FROM_VERSION_0 if old_mailbox else _SCHEMA) + _FLOOR
        else:
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this relay's {SCHEMA_VERSION}")
        self._db.executescript("BEGIN IMMEDIATE;" + upgrade + _SEEN
                               + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits,
                     recipients: Sequence[PublicKey] | None = None) -> None:
        sender, size = envelope.sender.raw, len(envelope.raw)
        mailboxes = [key.raw for key in recipients or envelope.recipient_keys]
        counts = self._counts
        appended: list[tuple[bytes, int, bool]] = []  # (mailbox, seq, it held nothing before)

        def work(db: sqlite3.Connection) -> None:
            try:
                db.execute("INSERT INTO seen (sender, msg_id, until_ms) VALUES (?, ?, ?)",
                           (sender, envelope.msg_id, replay_until_ms))
            except sqlite3.IntegrityError:
                raise ReplayError("message id already used by this sender") from None
            for recipient in mailboxes:  # raising here rolls the `seen` row back too
                check_mailbox(recipient, *counts.mailbox(recipient), size, limits)
            counts.check_budgets(sender, size, limits)
            body = db.execute(
                "INSERT INTO body (sender, msg_id, origin, expires_at_ms, raw)"
                " VALUES (?, ?, ?, ?, ?)",
                (sender, envelope.msg_id, int(envelope.origin), envelope.expires_at_ms,
                 envelope.raw)).lastrowid
            counts.body(sender, size)
            for recipient in mailboxes:
                was_empty = counts.mailbox(recipient)[0] == 0
                seq = db.execute(
                    "INSERT INTO mailbox (recipient, body, sender, size) VALUES (?, ?, ?, ?)",
                    (recipient, body, sender, size)).lastrowid
                appended.append((recipient, seq, was_empty))
                counts.grow(recipient, 1, size)

        def wake() -> None:
            for recipient, seq, was_empty in appended:
                self._wakeups.appended(recipient, seq, envelope.raw if was_empty else None)

        await self._writes.run(work, committed=wake)

    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        after_seq = parse_tag(after) if after is not None else 0
        try:
            rows = self._db.execute(
                "SELECT mailbox.seq, body.raw FROM mailbox JOIN body ON body.id = mailbox.body"
                " WHERE mailbox.recipient = ? AND mailbox.seq > ? ORDER BY mailbox.seq LIMIT ?",
                (recipient.raw, after_seq or 0, limit)).fetchall()
        except sqlite3.Error as exc:
            raise _unavailable(exc) from None
        return [StoredMessage(str(seq), raw) for seq, raw in rows]

    async def ack(self, recipient: PublicKey, tag: str) -> bool:
        seq = parse_tag(tag)
        if seq is None:
            return False

        def work(db: sqlite3.Connection) -> bool:
            changes = db.total_changes
            rows = db.execute("DELETE FROM mailbox WHERE seq = ? AND recipient = ?"
                              " RETURNING sender, size", (seq, recipient.raw)).fetchall()
            if not rows:
                return False
            sender, size = rows[0]
            self._counts.grow(recipient.raw, -1, -size)
            # total_changes counts the rows triggers changed too: 2 means the body went.
            if db.total_changes - changes > 1:
                self._counts.body(sender, -size)
            return True

        return await self._writes.run(work, one_statement=True)

    async def take_expired(self, now_ms: int, limit: int) -> list[ExpiredMessage]:
        def work(db: sqlite3.Connection) -> list[_Due]:
            rows = db.execute(
                "SELECT mailbox.seq, mailbox.recipient, body.sender, body.msg_id, body.origin,"
                " mailbox.size, mailbox.body FROM body JOIN mailbox ON mailbox.body = body.id"
                " WHERE body.expires_at_ms <= ? ORDER BY body.expires_at_ms LIMIT ?",
                (now_ms, limit)).fetchall()
            db.executemany("DELETE FROM mailbox WHERE seq = ?", [(row[0],) for row in rows])
            db.execute("DELETE FROM seen WHERE until_ms <= ?", (now_ms,))
            bodies = {row[6] for row in rows}
            kept = {body for (body,) in db.execute(
                f"SELECT id FROM body WHERE id IN ({','.join('?' * len(bodies))})",
                tuple(bodies))} if bodies else set()
            removed = bodies - kept
            for _seq, recipient, sender, _msg_id, _origin, size, body in rows:
                self._counts.grow(recipient, -1, -size)
                if body in removed:
                    removed.discard(body)
                    self._counts.body(sender, -size)
            return rows

        rows = await self._writes.run(work)
        return [ExpiredMessage(PublicKey(r), PublicKey(s), m, Origin(o))
                for _seq, r, s, m, o, _size, _body in rows]

    async def allow(self, sender: PublicKey, now_ms: int, rate_per_s: float,
                    burst: int) -> bool:
        return self._buckets.take(sender.raw, now_ms, rate_per_s, burst)

    async def depth(self, recipient: PublicKey) -> int:
        return self._counts.mailbox(recipient.raw)[0]

    async def subscribe(self, recipient: PublicKey, wake: Wake) -> Subscription:
        def newest_held() -> int | None:
            try:
                (newest,) = self._db.execute("SELECT max(seq) FROM mailbox WHERE recipient = ?",
                                             (recipient.raw,)).fetchone()
            except sqlite3.Error as exc:
                raise _unavailable(exc) from None
            return newest

        return self._wakeups.watch(recipient.raw, wake, newest_held)

    async def access_list_floor(self) -> Stamp:
        try:
            row = self._db.execute("SELECT epoch, version FROM access_floor").fetchone()
        except sqlite3.Error as exc:
            raise _unavailable(exc) from None
        return Stamp(*row) if row else Stamp(0, 0)

    async def raise_access_list_floor(self, stamp: Stamp) -> Stamp:
        def work(db: sqlite3.Connection) -> Stamp:
            row = db.execute("SELECT epoch, version FROM access_floor").fetchone()
            floor = max(Stamp(*row) if row else Stamp(0, 0), stamp)
            db.execute("INSERT OR REPLACE INTO access_floor (id, epoch, version) VALUES (1, ?, ?)",
                       floor)
            return floor

        return await self._writes.run(work)

    async def ping(self) -> None:
        """Commit and remove a probe body as large as an envelope may be."""
        def probe(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO probe (filler) VALUES (zeroblob(?))", (_PROBE_BYTES,))
            db.execute("DELETE FROM probe")

        await self._writes.run(probe, alone=True)

    async def close(self) -> None:
        self._writes.flush()  # writes still queued are committed, not dropped
        with contextlib.suppress(sqlite3.Error):
            self._db.close()


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(f"mailbox store failed: {exc}")
