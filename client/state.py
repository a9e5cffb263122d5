"""The device's state file: one SQLite database in the device home, so a reboot loses nothing.

Devices restart all the time (power, watchdogs, updates).  What must outlive
the process is written here, in the home next to the key:

    outbox    envelopes no relay has accepted yet, in the order they were made, with the
              plaintext when the device sealed them itself (to seal them again once the
              relay's ±300 s clock window has passed, keeping msg_id and expiry)
    sent      each message this device sent: the relay's answer (queued / accepted /
              refused with its code / expired unsent) and how long it is kept
    sent_to   per message and recipient: pending / delivered / expired
    sent_hash per message, the content hash of each time it was sealed: what a receipt
              for it may name
    seen      (sender, msg_id) already handled, until the envelope can no longer be
              valid (created_at + ttl + skew), so a re-delivery after a restart is a duplicate
    transfer_out        each file this device sends (SPEC §17): where it is, its manifest,
                        how many chunks are in the outbox or past it, and the outcome
    transfer_in         each file arriving: its manifest and envelope (for the one receipt),
                        how many chunks are on disk, and whether it was surfaced
    transfer_in_chunk   which chunks of it are on disk, so a re-sent chunk is a duplicate

Why SQLite (stdlib `sqlite3`): a change that spans tables (a message marked
seen *and* its receipt queued) commits atomically, a crash at any instant
leaves the last commit, and it is one file.  WAL lets a `listen` and a
`send` in the same home read while the other writes; `synchronous=FULL`
makes each commit reach the disk before it returns, so "durable before
`send` returns" also holds across a power cut, not only a killed process.
The file is created 0600: queued plaintexts are in it.

Only rows live here; what they mean is decided by `outbox`, `tracking` and
`dedup`, which use this module and stay the one home of their rules.
Bounded: `prune` forgets what can no longer matter and caps each table.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from .fair_trim import fair_trim

STATE_FILE = "state.db"
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id BLOB NOT NULL UNIQUE,
    envelope BLOB NOT NULL,
    plaintext BLOB,
    reply INTEGER NOT NULL,
    kind INTEGER
);
CREATE TABLE sent (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id BLOB NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    keep_until_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    error TEXT
);
CREATE INDEX sent_keep_until ON sent (keep_until_ms);
CREATE TABLE sent_to (
    msg_id BLOB NOT NULL REFERENCES sent (msg_id) ON DELETE CASCADE,
    recipient BLOB NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (msg_id, recipient)
) WITHOUT ROWID;
CREATE TABLE sent_hash (
    msg_id BLOB NOT NULL REFERENCES sent (msg_id) ON DELETE CASCADE,
    content_hash BLOB NOT NULL,
    PRIMARY KEY (msg_id, content_hash)
) WITHOUT ROWID;
CREATE TABLE seen (
    sender BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    forget_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, msg_id)
) WITHOUT ROWID;
CREATE INDEX seen_forget_at ON seen (forget_at_ms);
"""
_TRANSFERS = """
CREATE TABLE transfer_out (
    transfer_id BLOB PRIMARY KEY,
    sender BLOB NOT NULL,
    recipient BLOB NOT NULL,
    path TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL,
    manifest BLOB NOT NULL,
    manifest_msg_id BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    next_index INTEGER NOT NULL,
    state TEXT NOT NULL,
    error TEXT
) WITHOUT ROWID;
CREATE TABLE transfer_in (
    sender BLOB NOT NULL,
    transfer_id BLOB NOT NULL,
    manifest BLOB NOT NULL,
    envelope BLOB NOT NULL,
    received INTEGER NOT NULL,
    state TEXT NOT NULL,
    forget_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, transfer_id)
) WITHOUT ROWID;
CREATE TABLE transfer_in_chunk (
    sender BLOB NOT NULL,
    transfer_id BLOB NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (sender, transfer_id, idx),
    FOREIGN KEY (sender, transfer_id) REFERENCES transfer_in ON DELETE CASCADE
) WITHOUT ROWID;
"""
# How each older version becomes this one.  Version 1 kept each sent message's kind,
# which the device cannot know for an envelope sealed elsewhere now that it is sealed.
# Version 3 keeps the kind of what the device sealed itself (transfers seal kinds 7 and 8).
_TO_3 = "ALTER TABLE outbox ADD COLUMN kind INTEGER;" + _TRANSFERS
_UPGRADES = {0: _SCHEMA + _TRANSFERS, 1: "ALTER TABLE sent DROP COLUMN kind;" + _TO_3, 2: _TO_3}


@dataclass(frozen=True)
class StoredSend:
    """One outbox row: the exact bytes to send next."""

    envelope: bytes
    plaintext: bytes | None
    reply: bool
    kind: int | None = None  # what the device sealed, when neither DATA nor RECEIPT


@dataclass(frozen=True)
class TransferOutRow:
    """A file being sent by `sender` (the key that signed its manifest, and signs its chunks):
    chunks [0, next_index) are in the outbox or accepted."""

    transfer_id: bytes
    sender: bytes
    recipient: bytes
    path: str
    mtime_ns: int
    manifest: bytes
    manifest_msg_id: bytes
    expires_at_ms: int
    next_index: int
    state: str
    error: str | None = None


@dataclass(frozen=True)
class TransferInRow:
    """A file arriving from `sender`: `received` of its chunks are on disk."""

    sender: bytes
    transfer_id: bytes
    manifest: bytes
    envelope: bytes
    received: int
    state: str
    forget_at_ms: int


@dataclass(frozen=True)
class SentRow:
    msg_id: bytes
    created_at_ms: int
    expires_at_ms: int
    state: str
    error: str | None
    recipients: dict[bytes, str]


class DeviceState:
    """The open state file; every method commits at once unless inside `transaction()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._depth = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # created owner-only before SQLite opens it (its -wal follows)
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def in_home(cls, home: Path) -> DeviceState:
        return cls(home / STATE_FILE)

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        if version not in _UPGRADES:
            raise ValueError(f"{self.path}: schema version {version} is not {SCHEMA_VERSION}"
                             " (written by another version of continuum-client)")
        self._db.executescript(
            f"BEGIN; {_UPGRADES[version]} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """Everything inside commits together or not at all; nests (the outermost commits).

        `durable=False` (outermost only) skips the fsync of this commit: for
        changes a power cut may undo because redoing them is harmless (a
        relay's final answer, whose loss only means sending the same bytes
        again and hearing REPLAY or the same refusal).  A later durable
        commit makes it durable too.
        """
        outermost = self._depth == 0
        if outermost:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if outermost:
                self._db.execute("ROLLBACK")
                self._db.execute("PRAGMA synchronous=FULL")
            raise
        self._depth -= 1
        if outermost:
            self._db.execute("COMMIT")
            if not durable:
                self._db.execute("PRAGMA synchronous=FULL")

    def _write(self, sql: str, parameters: Iterable[object] = ()) -> int:
        with self.transaction():
            return self._db.execute(sql, tuple(parameters)).rowcount

    # -- outbox ---------------------------------------------------------------------------

    def put_outgoing(self, msg_id: bytes, send: StoredSend) -> None:
        """Add an envelope to the outbox (once: a second put of the same msg_id is ignored)."""
        self._write("INSERT OR IGNORE INTO outbox (msg_id, envelope, plaintext, reply, kind)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (msg_id, send.envelope, send.plaintext, send.reply, send.kind))

    def replace_outgoing(self, msg_id: bytes, envelope: bytes) -> None:
        """The envelope was sealed again (same msg_id): send these bytes from now on."""
        self._write("UPDATE outbox SET envelope = ? WHERE msg_id = ?", (envelope, msg_id))

    def remove_outgoing(self, msg_id: bytes) -> None:
        self._write("DELETE FROM outbox WHERE msg_id = ?", (msg_id,))

    def outgoing(self) -> list[StoredSend]:
        """The outbox, oldest first."""
        rows = self._db.execute("SELECT envelope, plaintext, reply, kind FROM outbox ORDER BY seq")
        return [StoredSend(envelope, plaintext, bool(reply), kind)
                for envelope, plaintext, reply, kind in rows]

    # -- sent messages --------------------------------------------------------------------

    def track_sent(self, msg_id: bytes, created_at_ms: int, expires_at_ms: int,
                   keep_until_ms: int, state: str, recipients: dict[bytes, str],
                   content_hash: bytes) -> None:
        """Start following a message (once per msg_id)."""
        with self.transaction():
            added = self._write(
                "INSERT OR IGNORE INTO sent (msg_id, created_at_ms, expires_at_ms,"
                " keep_until_ms, state) VALUES (?, ?, ?, ?, ?)",
                (msg_id, created_at_ms, expires_at_ms, keep_until_ms, state))
            if added:
                self._db.executemany("INSERT INTO sent_to (msg_id, recipient, status)"
                                     " VALUES (?, ?, ?)",
                                     [(msg_id, key, status) for key, status in recipients.items()])
                self.add_content_hash(msg_id, content_hash)

    def add_content_hash(self, msg_id: bytes, content_hash: bytes) -> None:
        self._write("INSERT OR IGNORE INTO sent_hash (msg_id, content_hash) VALUES (?, ?)",
                    (msg_id, content_hash))

    def content_hashes(self, msg_id: bytes) -> list[bytes]:
        return [value for (value,) in self._db.execute(
            "SELECT content_hash FROM sent_hash WHERE msg_id = ?", (msg_id,))]

    def set_sent_state(self, msg_id: bytes, state: str, error: str | None = None) -> None:
        self._write("UPDATE sent SET state = ?, error = ? WHERE msg_id = ?", (state, error, msg_id))

    def recipient_status(self, msg_id: bytes, recipient: bytes) -> str | None:
        row = self._db.execute("SELECT status FROM sent_to WHERE msg_id = ? AND recipient = ?",
                               (msg_id, recipient)).fetchone()
        return row[0] if row else None

    def sent_expires_at(self, msg_id: bytes) -> int | None:
        row = self._db.execute("SELECT expires_at_ms FROM sent WHERE msg_id = ?",
                               (msg_id,)).fetchone()
        return row[0] if row else None

    def recipients(self, msg_id: bytes) -> list[bytes]:
        return [key for (key,) in self._db.execute(
            "SELECT recipient FROM sent_to WHERE msg_id = ? ORDER BY recipient", (msg_id,))]

    def set_recipient_status(self, msg_id: bytes, recipient: bytes, status: str) -> None:
        self._write("UPDATE sent_to SET status = ? WHERE msg_id = ? AND recipient = ?",
                    (status, msg_id, recipient))

    def sent_rows(self) -> list[SentRow]:
        """Every message still followed, oldest first, with its recipients."""
        recipients: dict[bytes, dict[bytes, str]] = {}
        for msg_id, key, status in self._db.execute("SELECT msg_id, recipient, status FROM sent_to"):
            recipients.setdefault(msg_id, {})[key] = status
        rows = self._db.execute("SELECT msg_id, created_at_ms, expires_at_ms, state, error"
                                " FROM sent ORDER BY seq")
        return [SentRow(msg_id, created, expires, state, error, recipients.get(msg_id, {}))
                for msg_id, created, expires, state, error in rows]

    # -- seen -----------------------------------------------------------------------------

    def seen(self, sender: bytes, msg_id: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM seen WHERE sender = ? AND msg_id = ?",
                                (sender, msg_id)).fetchone() is not None

    def add_seen(self, sender: bytes, msg_id: bytes, forget_at_ms: int) -> None:
        self._write("INSERT OR REPLACE INTO seen (sender, msg_id, forget_at_ms) VALUES (?, ?, ?)",
                    (sender, msg_id, forget_at_ms))

    def count_seen(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])

    # -- transfers (SPEC §17) -----------------------------------------------------------

    def add_transfer_out(self, row: TransferOutRow) -> None:
        self._write("INSERT INTO transfer_out (transfer_id, sender, recipient, path, mtime_ns,"
                    " manifest, manifest_msg_id, expires_at_ms, next_index, state, error)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.transfer_id, row.sender, row.recipient, row.path, row.mtime_ns, row.manifest,
                     row.manifest_msg_id, row.expires_at_ms, row.next_index, row.state,
                     row.error))

    def transfers_out(self, state: str) -> list[TransferOutRow]:
        rows = self._db.execute(
            "SELECT transfer_id, sender, recipient, path, mtime_ns, manifest, manifest_msg_id,"
            " expires_at_ms, next_index, state, error FROM transfer_out WHERE state = ?",
            (state,))
        return [TransferOutRow(*row) for row in rows]

    def set_transfer_out(self, transfer_id: bytes, *, next_index: int | None = None,
                         state: str | None = None, error: str | None = None) -> None:
        if next_index is not None:
            self._write("UPDATE transfer_out SET next_index = ? WHERE transfer_id = ?",
                        (next_index, transfer_id))
        if state is not None:
            self._write("UPDATE transfer_out SET state = ?, error = ? WHERE transfer_id = ?",
                        (state, error, transfer_id))

    def add_transfer_in(self, row: TransferInRow) -> None:
        self._write("INSERT INTO transfer_in (sender, transfer_id, manifest, envelope, received,"
                    " state, forget_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (row.sender, row.transfer_id, row.manifest, row.envelope, row.received,
                     row.state, row.forget_at_ms))

    _IN_COLUMNS = "sender, transfer_id, manifest, envelope, received, state, forget_at_ms"

    def transfer_in(self, sender: bytes, transfer_id: bytes) -> TransferInRow | None:
        row = self._db.execute(f"SELECT {self._IN_COLUMNS} FROM transfer_in"
                               " WHERE sender = ? AND transfer_id = ?",
                               (sender, transfer_id)).fetchone()
        return TransferInRow(*row) if row else None

    def transfers_in(self, state: str) -> list[TransferInRow]:
        rows = self._db.execute(f"SELECT {self._IN_COLUMNS} FROM transfer_in WHERE state = ?",
                                (state,))
        return [TransferInRow(*row) for row in rows]

    def transfers_in_to_forget(self, now_ms: int) -> list[TransferInRow]:
        rows = self._db.execute(f"SELECT {self._IN_COLUMNS} FROM transfer_in"
                                " WHERE forget_at_ms < ?", (now_ms,))
        return [TransferInRow(*row) for row in rows]

    def has_chunk(self, sender: bytes, transfer_id: bytes, index: int) -> bool:
        return self._db.execute("SELECT 1 FROM transfer_in_chunk WHERE sender = ? AND"
                                " transfer_id = ? AND idx = ?",
                                (sender, transfer_id, index)).fetchone() is not None

    def add_chunk(self, sender: bytes, transfer_id: bytes, index: int) -> None:
        with self.transaction():
            self._write("INSERT INTO transfer_in_chunk (sender, transfer_id, idx)"
                        " VALUES (?, ?, ?)", (sender, transfer_id, index))
            self._write("UPDATE transfer_in SET received = received + 1"
                        " WHERE sender = ? AND transfer_id = ?", (sender, transfer_id))

    def set_transfer_in_state(self, sender: bytes, transfer_id: bytes, state: str) -> None:
        """A finished transfer keeps its row (so a re-delivered chunk is known), not its
        chunk list."""
        with self.transaction():
            self._write("UPDATE transfer_in SET state = ? WHERE sender = ? AND transfer_id = ?",
                        (state, sender, transfer_id))
            if state != "receiving":
                self._write("DELETE FROM transfer_in_chunk WHERE sender = ? AND transfer_id = ?",
                            (sender, transfer_id))

    def remove_transfer_in(self, sender: bytes, transfer_id: bytes) -> None:
        self._write("DELETE FROM transfer_in WHERE sender = ? AND transfer_id = ?",
                    (sender, transfer_id))

    # -- bounds ---------------------------------------------------------------------------

    def prune(self, now_ms: int, *, max_seen: int, max_sent: int,
              max_finished_transfers: int = 4096) -> None:
        """Forget what can no longer matter, then cap each table, oldest first.

        Arriving transfers that are finished (taken, failed or refused: no file of theirs is
        kept here) are only remembered so that their chunks are known; the oldest beyond
        `max_finished_transfers` go (a chunk of one is then dropped as unknown)."""
        with self.transaction():
            self._db.execute("DELETE FROM seen WHERE forget_at_ms < ?", (now_ms,))
            self._cap_seen(max_seen)
            # A message still in the outbox is kept whatever its age: it is still being sent.
            self._db.execute("DELETE FROM sent WHERE keep_until_ms < ? AND msg_id NOT IN"
                             " (SELECT msg_id FROM outbox)", (now_ms,))
            self._db.execute(
                "DELETE FROM sent WHERE seq IN (SELECT seq FROM sent WHERE msg_id NOT IN"
                " (SELECT msg_id FROM outbox) ORDER BY seq"
                " LIMIT max(0, (SELECT count(*) FROM sent) - ?))", (max_sent,))
            self._db.execute(
                "DELETE FROM transfer_in WHERE (sender, transfer_id) IN (SELECT sender,"
                " transfer_id FROM transfer_in WHERE state IN ('surfaced', 'failed', 'refused')"
                " ORDER BY forget_at_ms LIMIT max(0, (SELECT count(*) FROM transfer_in WHERE"
                " state IN ('surfaced', 'failed', 'refused')) - ?))", (max_finished_transfers,))
            # A finished or failed outgoing transfer is only history once its chunks expired.
            self._db.execute("DELETE FROM transfer_out WHERE state != 'sending'"
                             " AND expires_at_ms < ?", (now_ms,))

    def _cap_seen(self, max_seen: int) -> None:
        """At most `max_seen` pairs, taken from the senders holding the most, each losing
        its soonest to expire (`fair_trim`: one peer's flood pushes out only its own)."""
        excess = self.count_seen() - max_seen
        if excess <= 0:
            return
        counts = dict(self._db.execute("SELECT sender, count(*) FROM seen GROUP BY sender"))
        for sender, drop in fair_trim(counts, excess).items():
            self._db.execute("DELETE FROM seen WHERE sender = ? AND msg_id IN (SELECT msg_id"
                             " FROM seen WHERE sender = ? ORDER BY forget_at_ms LIMIT ?)",
                             (sender, sender, drop))


def transaction(state: DeviceState | None, *, durable: bool = True) -> AbstractContextManager[None]:
    """`state.transaction()`, or nothing to commit for a device that keeps its state in memory."""
    return contextlib.nullcontext() if state is None else state.transaction(durable=durable)
