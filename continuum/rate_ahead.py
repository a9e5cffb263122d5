"""A connection's rate tokens, the next one taken while the device is idle.

Every metered SEND spends one token of its device's bucket before its verify.
On Redis the bucket is a store call: a round trip before a lone message can be
accepted (on an idle machine 0.2-1 ms), and, for a device connected outside its
home region, a WAN round trip (the bucket lives in the sender's home region, SPEC
§19).  A device that sends now and then pays it on every message.

So once a SEND is answered and the connection has nothing else in flight, the
token of its next SEND is taken at once, and that SEND finds it ready.  It is
the same bucket and the same one token per admitted SEND, still taken before the
verify; only earlier.  What it costs:

- a connection that closes holding one has spent a token for nothing: at most one
  per connection (a device's burst is 100 by default);
- a task per token taken ahead, which is why only a SEND that came at least
  `IDLE_GAP_S` after the connection's previous one earns it: a device sending
  back to back keeps SENDs in flight, and its tokens are taken in its pipeline
  as before (measured: saturation throughput unchanged, benchmarks/README.md).

A token taken ahead that was refused (the bucket was empty then), or whose call
failed, is not the answer for a SEND that comes later: that SEND takes its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from runtime.tasks import cancel_and_wait

# A SEND this long after the connection's previous one finds the connection idle: its
# answer takes the next token ahead.
IDLE_GAP_S = 0.002


Take = Callable[[], Awaitable[bool]]


class RateTokens:
    """One connection's tokens.  `take` (given to each call, not kept: a session's bound
    method kept here would put the session in a reference cycle, which only the garbage
    collector frees) spends one of its device's bucket (`store.allow`)."""

    __slots__ = ("_ahead", "_last_send")

    def __init__(self) -> None:
        self._ahead: asyncio.Task[bool] | None = None
        self._last_send: float | None = None  # the event loop's clock

    def arrived(self) -> bool:
        """A metered SEND arrived: True if it came after an idle gap, so that its answer
        should take the next token ahead (`take_ahead`)."""
        now = asyncio.get_running_loop().time()
        last, self._last_send = self._last_send, now
        return last is None or now - last >= IDLE_GAP_S

    async def spend(self, take: Take) -> bool:
        """One token for the SEND at hand: the one taken ahead if it was granted, else a
        fresh one.  Raises what the store raises (StoreUnavailableError)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with contextlib.suppress(Exception):
                if await ahead:
                    return True
        return await take()

    def take_ahead(self, take: Take) -> None:
        """Take the next SEND's token now (one at most)."""
        if self._ahead is None:
            self._ahead = asyncio.ensure_future(take())
            self._ahead.add_done_callback(_retrieved)

    async def close(self) -> None:
        """The connection ended: a token still being taken is not waited for."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not ahead.done():
            with contextlib.suppress(Exception):
                await cancel_and_wait(ahead)


def _retrieved(task: asyncio.Task[bool]) -> None:
    """A failed take ahead is the next SEND's business (it takes its own): never logged
    as an exception nobody retrieved."""
    if not task.cancelled():
        task.exception()
