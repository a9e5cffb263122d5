"""Embedded mailbox store: SQLite in the relay's process, in memory or in a file.

This is the zero-set-up default for one relay on a laptop or a gateway.  With
a file, WAL journaling makes every committed `accept` survive a killed process
(synchronous=NORMAL is crash-safe in WAL mode; only power loss can drop the
last transactions).  Rate-limit buckets stay in memory: they describe the
last second, not anything a restart must keep.

Calls run on the event loop thread: each is one short indexed transaction,
cheaper than a hop to a worker thread.  This process is the file's only
writer, so mailbox sizes are counted once at open and then kept in memory,
sparing a query per recipient on every accept.  Scale-out uses the Redis store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from proto import Envelope, Kind, PublicKey
from proto.errors import MailboxFullError, ReplayError, StoreUnavailableError

from .base import ExpiredMessage, MailboxLimits, MailboxStore, StoredMessage, Subscription
from .wakeups import WakeupHub
from .token_bucket import TokenBuckets

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient BLOB NOT NULL,
    sender BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    kind INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS mailbox_by_recipient ON mailbox (recipient, seq);
CREATE INDEX IF NOT EXISTS mailbox_by_expiry ON mailbox (expires_at_ms);
CREATE TABLE IF NOT EXISTS seen (
    sender BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_until ON seen (until_ms);
"""


class _SqliteSubscription(Subscription):
    def __init__(self, hub: WakeupHub, recipient: bytes, wake: Callable[[], None]) -> None:
        self._hub, self._recipient, self._wake = hub, recipient, wake

    async def close(self) -> None:
        self._hub.remove(self._recipient, self._wake)


class SqliteStore(MailboxStore):
    """`path` is a file path, or ":memory:" for a store that lives as long as the process."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # recipient -> [messages, bytes]; changed only after a commit succeeded.
        self._sizes: dict[bytes, list[int]] = {
            recipient: [messages, size] for recipient, messages, size in self._db.execute(
                "SELECT recipient, count(*), sum(length(raw)) FROM mailbox GROUP BY recipient")}
        self._wakeups = WakeupHub()
        self._buckets = TokenBuckets()

    def _transaction(self, work: Callable[[sqlite3.Connection], object]) -> object:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"mailbox store failed: {exc}") from None

    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits) -> None:
        sender, size = envelope.sender.raw, len(envelope.raw)
        recipients = [key.raw for key in envelope.recipient_keys]

        def work(db: sqlite3.Connection) -> None:
            try:
                db.execute("INSERT INTO seen (sender, msg_id, until_ms) VALUES (?, ?, ?)",
                           (sender, envelope.msg_id, replay_until_ms))
            except sqlite3.IntegrityError:
                raise ReplayError("message id already used by this sender") from None
            for recipient in recipients:  # raising here rolls the `seen` row back too
                messages, total = self._sizes.get(recipient, (0, 0))
                if messages + 1 > limits.max_messages or total + size > limits.max_bytes:
                    raise MailboxFullError(f"mailbox of {PublicKey(recipient).text} is full "
                                           f"({messages} messages, {total} bytes)")
            db.executemany(
                "INSERT INTO mailbox (recipient, sender, msg_id, kind, expires_at_ms, raw)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(r, sender, envelope.msg_id, int(envelope.kind), envelope.expires_at_ms,
                  envelope.raw) for r in recipients])

        self._transaction(work)
        for recipient in recipients:
            self._grow(recipient, 1, size)
            self._wakeups.wake(recipient)

    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        after_seq = _parse_tag(after) if after is not None else 0
        try:
            rows = self._db.execute(
                "SELECT seq, raw FROM mailbox WHERE recipient = ? AND seq > ?"
                " ORDER BY seq LIMIT ?", (recipient.raw, after_seq or 0, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"mailbox store failed: {exc}") from None
        return [StoredMessage(str(seq), raw) for seq, raw in rows]

    async def ack(self, recipient: PublicKey, tag: str) -> bool:
        seq = _parse_tag(tag)
        if seq is None:
            return False

        try:
            # One statement is atomic on its own (autocommit), so no BEGIN/COMMIT
            # round trips; fetchall steps it to completion, which commits it.
            rows = self._db.execute("DELETE FROM mailbox WHERE seq = ? AND recipient = ?"
                                    " RETURNING length(raw)", (seq, recipient.raw)).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"mailbox store failed: {exc}") from None
        if not rows:
            return False
        self._grow(recipient.raw, -1, -rows[0][0])
        return True

    async def take_expired(self, now_ms: int, limit: int) -> list[ExpiredMessage]:
        def work(db: sqlite3.Connection) -> list[ExpiredMessage]:
            rows = db.execute(
                "DELETE FROM mailbox WHERE seq IN (SELECT seq FROM mailbox"
                " WHERE expires_at_ms <= ? ORDER BY expires_at_ms LIMIT ?)"
                " RETURNING recipient, sender, msg_id, kind, length(raw)",
                (now_ms, limit)).fetchall()
            db.execute("DELETE FROM seen WHERE until_ms <= ?", (now_ms,))
            return rows

        rows = self._transaction(work)
        for recipient, _sender, _msg_id, _kind, size in rows:  # type: ignore[attr-defined]
            self._grow(recipient, -1, -size)
        return [ExpiredMessage(PublicKey(r), PublicKey(s), m, Kind(k))
                for r, s, m, k, _size in rows]  # type: ignore[attr-defined]

    async def allow(self, sender: PublicKey, now_ms: int, rate_per_s: float,
                    burst: int) -> bool:
        return self._buckets.take(sender.raw, now_ms, rate_per_s, burst)

    async def depth(self, recipient: PublicKey) -> int:
        return self._sizes.get(recipient.raw, (0, 0))[0]

    def _grow(self, recipient: bytes, messages: int, size: int) -> None:
        entry = self._sizes.setdefault(recipient, [0, 0])
        entry[0] += messages
        entry[1] += size
        if entry[0] <= 0:
            del self._sizes[recipient]

    async def subscribe(self, recipient: PublicKey,
                        wake: Callable[[], None]) -> Subscription:
        self._wakeups.add(recipient.raw, wake)
        return _SqliteSubscription(self._wakeups, recipient.raw, wake)

    async def ping(self) -> None:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"mailbox store failed: {exc}") from None

    async def close(self) -> None:
        self._db.close()


def _parse_tag(tag: str) -> int | None:
    """Tags are decimal sequence numbers; anything else a device sends matches nothing."""
    if not tag.isascii() or not tag.isdigit() or len(tag) > 19:
        return None
    return int(tag)
