"""The Redis calls of every session in one event-loop turn, sent as one pipeline.

A message costs a relay a few Redis calls (rate token, accept, fetch, ACK),
each a script of a few microseconds inside Redis, but a round trip and tens of
microseconds of client CPU when sent alone (issue #18: 80 µs sequential, 13-14
µs per command pipelined 32 deep).  `CommandBatcher` takes the calls issued
while the loop runs everyone's callbacks and sends them down one connection as
one non-transactional pipeline, then the calls issued meanwhile, and so on:

- **Order.**  At most one batch is in flight, and a batch holds its calls in
  the order they were made, so calls take effect in Redis in the order they
  were issued (the contract `MailboxStore` states; a connection pipelining its
  SENDs relies on it for per-mailbox order).
- **Isolation.**  Each call gets its own replies: a command Redis refuses (a
  script error, OOM) is that command's reply, an exception the caller turns into
  its own error; the other calls of the batch are unaffected.
- **Outage.**  A batch that fails as a whole (connection lost beyond redis-py's
  retries, timeout) fails every call in it with StoreUnavailableError: a caller
  never hears "done" for a call whose reply was lost.
- **Scripts.**  A call answered NOSCRIPT (a restarted or freshly promoted Redis
  has an empty script cache) is sent again, after every known script is loaded,
  before any later batch.  Every script is safe to run twice.  (Calls of the
  same batch that were not refused are not resent, so a NOSCRIPT call then takes
  effect after them; Redis loses its script cache only all at once, so the calls
  of one script are refused together and keep their order among themselves.)

The first call of an idle batcher starts its task, which runs on the loop's
next turn: whatever the current turn issues, the one after it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from proto.errors import StoreUnavailableError

# Calls per pipeline.  Beyond it the rest waits for the next batch (a batch is a single
# write and read of a few hundred KB at most, well under the socket timeout).
MAX_CALLS_PER_BATCH = 1024

Command = tuple[Any, ...]


@dataclass
class _Call:
    commands: Sequence[Command]
    future: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class CommandBatcher:
    """Pipelines the calls of one loop turn over `client`; `scripts` are the texts of every
    script an EVALSHA may name, loaded again when Redis answers NOSCRIPT."""

    def __init__(self, client: Redis, scripts: Iterable[str]) -> None:
        self._client = client
        self._scripts = list(scripts)
        self._queue: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None

    def call(self, *commands: Command) -> asyncio.Future[list[Any]]:
        """Queue one call: its commands go out back to back in one pipeline (a script and
        the durability wait that must follow it on the same connection).  The future gets
        one reply per command, in order, each an exception where Redis refused that
        command; it fails with StoreUnavailableError if the batch could not be sent."""
        call = _Call(commands)
        self._queue.append(call)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_all(),
                                                                  name="redis-batch")
        return call.future

    async def close(self) -> None:
        """Stop sending; calls not yet answered fail as an outage."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        _fail(self._queue, StoreUnavailableError("mailbox store closed"))
        self._queue = []

    async def _send_all(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:MAX_CALLS_PER_BATCH]
                del self._queue[:MAX_CALLS_PER_BATCH]
                await self._send(batch)
        finally:
            self._sender = None

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._execute(batch)
            refused = [index for index, answer in enumerate(replies)
                       if any(isinstance(reply, NoScriptError) for reply in answer)]
            if refused:
                await self._load_scripts()
                again = await self._execute([batch[index] for index in refused])
                for index, answer in zip(refused, again):
                    replies[index] = answer
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            _fail(batch, StoreUnavailableError(f"mailbox store unreachable: {exc}"))
            return
        except BaseException as exc:  # a bug, or cancelled: no caller may wait forever
            _fail(batch, StoreUnavailableError(f"mailbox store call failed: {exc!r}"))
            raise
        for call, answer in zip(batch, replies):
            if not call.future.done():  # its caller may have gone (cancelled)
                call.future.set_result(answer)

    async def _execute(self, calls: list[_Call]) -> list[list[Any]]:
        """One pipeline round trip; the replies regrouped per call."""
        async with self._client.pipeline(transaction=False) as pipe:
            for call in calls:
                for command in call.commands:
                    pipe.execute_command(*command)
            flat = cast(list[Any], await pipe.execute(raise_on_error=False))
        grouped, start = [], 0
        for call in calls:
            grouped.append(flat[start:start + len(call.commands)])
            start += len(call.commands)
        return grouped

    async def _load_scripts(self) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for script in self._scripts:
                pipe.script_load(script)
            await pipe.execute()


def _fail(calls: list[_Call], error: StoreUnavailableError) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(error)
