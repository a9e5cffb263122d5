"""Group commit: the SQLite writes issued during one event-loop turn share one transaction.

On a file, each commit is a WAL append of every page the transaction touched
(the body, both mailbox indexes, the replay window, ...), copied into the
file again at the next checkpoint: a transaction per accept and per ack wrote
about 71 KB per message delivered, while a turn's accepts and acks touch
mostly the same pages (22 KB per message batched: benchmarks/README.md).  So a
write is queued, and the first one queued in a turn schedules a flush for the
start of the next turn; by then every session that had a frame to act on has
queued its write.  The flush runs the queued works in call order inside one
BEGIN IMMEDIATE ... COMMIT, on the loop thread, with no await in between, so
no read ever sees an uncommitted row (a fetch that saw one could deliver, and
hand out the tag of, an entry that a failed commit then takes back) and no
other transaction is ever open on the connection across an await.

Only after COMMIT does a caller's await return: a returned accept is as
durable as it was with a transaction of its own.  Each work keeps its own
outcome: one that raises (a replay, a full mailbox, a budget) is undone to
its SAVEPOINT and the others go on.  A failure of the batch itself (full disk,
I/O error, a busy file) rolls everything back and raises StoreUnavailableError
in every caller of the batch, so a batch is all stored or not at all.

Works may also change the store's in-memory counts (the works after them in
the batch check against those): the counts keep a `Journal`, and what a work
or batch takes back in the database is taken back there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from proto.errors import StoreUnavailableError

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], Any]
Queued = tuple[Work, "asyncio.Future[Any]", Callable[[], None] | None]


class Journal(Protocol):
    """In-memory state the works change beside their rows."""

    def mark(self) -> int:
        """A point to undo back to."""

    def undo_to(self, mark: int) -> None:
        """Take back every change made since `mark`."""

    def forget(self) -> None:
        """Everything changed so far was committed: keep it."""


class GroupCommit:
    """Queue of writes for one connection, committed together once per loop turn.

    `per_turn=False` commits each write on its own, at once: for a database in
    memory, where a commit writes nothing, so waiting for the turn's other
    writes would only cost the caller a suspension.
    """

    def __init__(self, db: sqlite3.Connection, journal: Journal, *, per_turn: bool) -> None:
        self._db, self._journal, self._per_turn = db, journal, per_turn
        self._queue: list[Queued] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, work: Callable[[sqlite3.Connection], T], *,
                  committed: Callable[[], None] | None = None,
                  one_statement: bool = False, alone: bool = False) -> T:
        """`work(db)`'s result once the batch it ran in is committed; its exception if it
        raised one; StoreUnavailableError if the batch could not be committed.

        `committed` runs as soon as the work is committed, even if the caller was
        cancelled meanwhile (wake-ups for what it stored must not be lost with it).
        `one_statement`: the work is a single statement, atomic on its own, so alone it
        needs no BEGIN/COMMIT around it (autocommit).  `alone`: commit what is queued,
        then run this work in a transaction of its own, now (the health probe: its
        failure must not refuse the writes it would have shared a batch with)."""
        if alone:
            self.flush()
        if alone or not self._per_turn:
            return self._run_alone(work, committed, one_statement)
        loop = self._loop
        if loop is None or not loop.is_running():
            # asyncio.get_running_loop() makes a getpid() system call each time (an accept
            # and an ACK a message): ask again only when the loop may have changed.
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((work, future, committed))
        if len(self._queue) == 1:
            loop.call_soon(self.flush)
        return await future

    def _run_alone(self, work: Callable[[sqlite3.Connection], T],
                   committed: Callable[[], None] | None, one_statement: bool) -> T:
        """One work in a transaction of its own, now (nothing is ever queued then)."""
        try:
            with self._transaction(begin=not one_statement):
                result = work(self._db)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"mailbox store failed: {exc}") from None
        self._journal.forget()
        if committed is not None:
            committed()
        return result

    def flush(self) -> None:
        """Run and commit everything queued so far (also called before the connection closes)."""
        queue, self._queue = self._queue, []
        if not queue:
            return
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            self._run_all(queue, outcomes)
        except Exception as exc:  # sqlite3.Error; anything else must not leave callers hanging
            for _work, future, _committed in queue:
                if not future.done():  # a caller that gave up (a closed connection) needs none
                    future.set_exception(StoreUnavailableError(f"mailbox store failed: {exc}"))
            return
        self._journal.forget()
        for (_work, future, _committed), (result, error) in zip(queue, outcomes):
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        for (_work, _future, committed), (_result, error) in zip(queue, outcomes):
            if error is None and committed is not None:
                committed()

    def _run_all(self, queue: list[Queued],
                 outcomes: list[tuple[Any, BaseException | None]]) -> None:
        db, journal = self._db, self._journal
        several = len(queue) > 1  # a lone work refused takes the whole transaction back
        with self._transaction(begin=True):
            for work, _future, _committed in queue:
                mark = journal.mark()
                if several:
                    db.execute("SAVEPOINT work")
                try:
                    outcomes.append((work(db), None))
                except sqlite3.Error:
                    raise  # the database failed, not this work: the batch goes
                except Exception as exc:  # this work's refusal: only its changes go
                    db.execute("ROLLBACK TO work" if several else "ROLLBACK")
                    journal.undo_to(mark)
                    outcomes.append((None, exc))
                if several:
                    db.execute("RELEASE work")

    @contextlib.contextmanager
    def _transaction(self, *, begin: bool) -> Iterator[None]:
        """BEGIN IMMEDIATE (unless `begin` is False: one statement commits itself), the
        block, COMMIT if a transaction is open; if anything raises, the database and the
        journal go back to where they were before, and it propagates."""
        db, journal = self._db, self._journal
        start = journal.mark()
        if begin:
            db.execute("BEGIN IMMEDIATE")
        try:
            yield
            if db.in_transaction:
                db.execute("COMMIT")
        except BaseException:
            self._roll_back()
            journal.undo_to(start)
            raise

    def _roll_back(self) -> None:
        """End whatever transaction is open, even one a failed COMMIT left behind:
        otherwise every later BEGIN would fail and the store never recover."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
