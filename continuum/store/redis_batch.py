"""The Redis calls of every session in one event-loop turn, sent as one pipeline.

A message costs a relay a few Redis calls (rate token, accept, fetch, ACK),
each a script of a few microseconds inside Redis, but a round trip and tens of
microseconds of client CPU when sent alone (issue #18: 80 µs sequential, 13-14
µs per command pipelined 32 deep).  `CommandBatcher` takes the calls issued
while the loop runs everyone's callbacks and sends them down one connection as
one non-transactional pipeline, then the calls issued meanwhile, and so on:

- **Order.**  Batches go down one connection of their own, each written as soon
  as the one before it was (without waiting for its replies: up to
  MAX_BATCHES_IN_FLIGHT), and Redis runs one connection's commands in the order
  they arrive, so calls take effect in the order they were issued (the contract
  `MailboxStore` states; a connection pipelining its SENDs relies on it for
  per-mailbox order).  Across a WAN a call thus waits one round trip, not the
  rest of the previous batch's too.
- **Isolation.**  Each call gets its own replies: a command Redis refuses (a
  script error, OOM) is that command's reply, an exception the caller turns into
  its own error; the other calls of the batch are unaffected.
- **Outage.**  A connection lost (or a reply not read within the socket
  timeout) after batches were written: every call whose replies were not all
  read is written again, in order, on a new connection, up to MAX_ATTEMPTS times
  (every script is safe to repeat; this is what redis-py's retry did for one
  pipeline).  Then, or if no connection can be made, each fails with
  StoreUnavailableError: a caller never hears "done" for a call whose reply was
  lost.
- **Scripts.**  A call answered NOSCRIPT (a restarted or freshly promoted Redis
  has an empty script cache) is sent again, after every known script is loaded,
  before any batch not yet written.  Every script is safe to run twice.  (Calls
  already written are not resent, so a NOSCRIPT call then takes effect after
  them; Redis loses its script cache only all at once, so the calls of one script
  are refused together and keep their order among themselves.)

The first call of an idle batcher starts its task, which runs on the loop's
next turn: whatever the current turn issues, the one after it sends.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from proto.errors import StoreUnavailableError
from runtime.tasks import cancel_all_and_wait

# Calls per pipeline.  Beyond it the rest waits for the next batch (a batch is a single
# write and read of a few hundred KB at most, well under the socket timeout).
MAX_CALLS_PER_BATCH = 1024
# Batches written and not yet answered.  Beyond it the writer waits for replies: what a
# relay asks of one Redis ahead of its answers stays bounded.
MAX_BATCHES_IN_FLIGHT = 16
# Writes of one call on successive connections before it fails as an outage, and the pause
# before each new one (a Redis restarting, a failover: seconds, not milliseconds).
MAX_ATTEMPTS = 3
_BACKOFF_S = 0.1

Command = tuple[Any, ...]
_ISSUED = itertools.count()


@dataclass(eq=False)
class _Call:
    commands: Sequence[Command]
    attempts: int = 0
    seq: int = field(default_factory=lambda: next(_ISSUED))  # issue order, kept on retries
    future: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class CommandBatcher:
    """Pipelines the calls of one loop turn over a connection of `client`'s own; `scripts`
    are the texts of every script an EVALSHA may name, loaded again on NOSCRIPT."""

    def __init__(self, client: Redis, scripts: Iterable[str]) -> None:
        self._client = client
        self._scripts = list(scripts)
        self._queue: list[_Call] = []
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None
        # Written batches whose replies are not all read, oldest first, with their connection.
        self._sent: deque[tuple[AbstractConnection, list[_Call]]] = deque()
        self._room = asyncio.Event()  # set whenever fewer than MAX_BATCHES_IN_FLIGHT are sent

    @property
    def in_flight(self) -> tuple[int, ...]:
        """The calls of each batch written and not yet answered, oldest first: what this
        relay has asked of its Redis ahead of the answers, at most MAX_BATCHES_IN_FLIGHT
        batches of at most MAX_CALLS_PER_BATCH calls (a read-only view, for tests and
        anyone watching the batcher)."""
        return tuple(len(batch) for _connection, batch in self._sent)

    def call(self, *commands: Command) -> asyncio.Future[list[Any]]:
        """Queue one call: its commands go out back to back in one batch (a script and the
        durability wait that must follow it on the same connection).  The future gets one
        reply per command, in order, each an exception where Redis refused that command;
        it fails with StoreUnavailableError if the reply could not be had."""
        call = _Call(commands)
        self._queue.append(call)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_all(),
                                                                  name="redis-batch-writer")
        return call.future

    async def close(self) -> None:
        """Stop; calls not yet answered fail as an outage."""
        await cancel_all_and_wait(task for task in (self._writer, self._reader)
                                  if task is not None)
        self._writer = self._reader = None
        closed = StoreUnavailableError("mailbox store closed")
        for _connection, batch in self._sent:
            _fail(batch, closed)
        _fail(self._queue, closed)
        self._queue = []
        self._sent.clear()
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect(nowait=True)

    async def _write_all(self) -> None:
        try:
            while self._queue:
                while len(self._sent) >= MAX_BATCHES_IN_FLIGHT:
                    self._room.clear()
                    await self._room.wait()
                batch = self._queue[:MAX_CALLS_PER_BATCH]
                del self._queue[:MAX_CALLS_PER_BATCH]
                if self._connection is None and batch[0].attempts:
                    await asyncio.sleep(_BACKOFF_S * batch[0].attempts)  # written before: lost
                await self._write(batch)
        finally:
            self._writer = None

    async def _write(self, batch: list[_Call]) -> None:
        """Write one batch and hand it to the reader (no connection to be had: it fails)."""
        try:
            connection = await self._connected()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            _fail(batch, StoreUnavailableError(f"mailbox store unreachable: {exc}"))
            return
        for call in batch:
            call.attempts += 1
        try:
            await connection.send_packed_command(_packed(batch), check_health=False)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            if connection is self._connection:
                self._sent.append((connection, batch))  # behind those written before it
                self._lose_connection(StoreUnavailableError(f"mailbox store unreachable: {exc}"))
            else:
                self._retry_or_fail(batch, StoreUnavailableError(f"connection lost: {exc}"))
            return
        except BaseException as exc:  # a bug, or cancelled: no caller may wait forever
            _fail(batch, StoreUnavailableError(f"mailbox store call failed: {exc!r}"))
            raise
        if connection is not self._connection:  # lost while writing: its replies never come
            self._retry_or_fail(batch, StoreUnavailableError("mailbox store connection lost"))
            return
        self._sent.append((connection, batch))
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_all(),
                                                                  name="redis-batch-reader")

    async def _connected(self) -> AbstractConnection:
        if self._connection is None:
            connection = self._client.connection_pool.make_connection()
            await connection.connect()
            self._connection = connection
        return self._connection

    async def _read_all(self) -> None:
        try:
            while self._sent:
                connection, batch = self._sent[0]
                try:
                    replies = [[await self._reply(connection, command) for command in
                                call.commands] for call in batch]
                except (RedisError, OSError, asyncio.TimeoutError) as exc:
                    self._lose_connection(StoreUnavailableError(
                        f"mailbox store unreachable: {exc}"))
                    continue
                except BaseException as exc:
                    self._lose_connection(StoreUnavailableError(
                        f"mailbox store call failed: {exc!r}"))
                    raise
                self._sent.popleft()
                self._room.set()
                self._answer(batch, replies)
        finally:
            self._reader = None

    async def _reply(self, connection: AbstractConnection, command: Command) -> Any:
        try:
            return await self._client.parse_response(connection, command[0])
        except ResponseError as exc:  # this command's own refusal: the connection is fine
            return exc

    def _answer(self, batch: list[_Call], replies: list[list[Any]]) -> None:
        """Hand each call its replies; calls answered NOSCRIPT go first in the queue, behind
        the scripts' loading, and are answered when they come back."""
        refused = [call for call, answer in zip(batch, replies)
                   if any(isinstance(reply, NoScriptError) for reply in answer)]
        for call, answer in zip(batch, replies):
            if call not in refused and not call.future.done():
                call.future.set_result(answer)
        if refused:
            loading = _Call(tuple(("SCRIPT", "LOAD", script) for script in self._scripts),
                            seq=refused[0].seq)
            loading.future.add_done_callback(_ignore)
            self._queue[:0] = [loading, *refused]
            if self._writer is None:
                self._writer = asyncio.get_running_loop().create_task(
                    self._write_all(), name="redis-batch-writer")

    def _lose_connection(self, error: StoreUnavailableError) -> None:
        """Every call written and not answered goes again, in order, on a new connection
        (or fails, after MAX_ATTEMPTS)."""
        lost = [call for _connection, batch in self._sent for call in batch]
        self._sent.clear()
        self._room.set()
        connection, self._connection = self._connection, None
        if connection is not None:
            asyncio.get_running_loop().create_task(connection.disconnect(nowait=True))
        self._retry_or_fail(lost, error)

    def _retry_or_fail(self, calls: list[_Call], error: StoreUnavailableError) -> None:
        again = [call for call in calls if call.attempts < MAX_ATTEMPTS
                 and not call.future.done()]
        _fail([call for call in calls if call.attempts >= MAX_ATTEMPTS], error)
        if again:
            self._queue = sorted([*again, *self._queue], key=lambda call: call.seq)
            if self._writer is None:
                self._writer = asyncio.get_running_loop().create_task(
                    self._write_all(), name="redis-batch-writer")


def _packed(batch: list[_Call]) -> bytes:
    """The batch's commands in the Redis protocol, packed by hiredis: redis-py's own packer
    encodes each argument in Python first, which cost a tenth of the relay's CPU on Redis.
    The store's arguments (bytes, str, int, and the rate, a float) come out byte for byte as
    redis-py writes them (test_redis_batch checks each kind)."""
    return b"".join([hiredis.pack_command(command) for call in batch
                     for command in call.commands])


def _fail(calls: list[_Call], error: StoreUnavailableError) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(error)


def _ignore(future: asyncio.Future[list[Any]]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a failed load shows in the calls resent after it
