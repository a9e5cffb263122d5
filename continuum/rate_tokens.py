"""A connection's side of its device's rate bucket: the next SEND's token, taken ahead.

Every SEND spends one token of its device's bucket, which lives in the store (on Redis,
in the device's home region, SPEC §19), and spends it before the relay checks the
signature, so a device over its rate costs no verify.  Taken when the SEND arrives, the
token costs that SEND a store round trip before anything else happens.  So a connection
whose store answers a round trip later takes the next SEND's token as soon as one is
spent: that take travels beside the SEND's own accept, and the next SEND usually finds
its token waiting (benchmarks/README.md, "The rate token taken ahead").

What holds, as before: every SEND a relay admits spent one token of its device's bucket,
taken before its verify, so no device gets past its rate through any number of relays.
What it costs: a token taken ahead and never spent (the device stops sending, or its
connection ends) is lost, at most one per connection, and refills at the device's rate.
A take ahead that found the bucket empty is not held against the next SEND: that SEND
takes its own token, at its own time, the bucket having refilled meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proto.errors import ProtocolError


class RateTokens:
    """The token taken ahead for one connection's next SEND (at most one at a time)."""

    __slots__ = ("_take", "_ahead")

    def __init__(self, take: Callable[[], Awaitable[bool]]) -> None:
        """`take`: take one token from the device's bucket now (True) or find it empty
        (False); a store failure raises its ProtocolError."""
        self._take = take
        self._ahead: asyncio.Task[bool] | None = None

    async def spend(self, take_ahead: bool) -> bool:
        """True once one token is this SEND's, False if the bucket is empty; a store that
        cannot answer raises its ProtocolError, as a direct take would.

        `take_ahead`: then take the next SEND's token.  For a connection with other SENDs
        in flight it is False: their tokens are taken in the same round trips as their
        accepts anyway, and a take ahead only added a task per SEND (at saturation on
        Redis, 0.90x the msg/s with it)."""
        ahead, self._ahead = self._ahead, None
        spent = ahead is not None and await ahead
        if not spent:
            spent = await self._take()
        if spent and take_ahead and self._ahead is None:
            self._ahead = asyncio.create_task(self._take_ahead(), name="rate token ahead")
        return spent

    async def _take_ahead(self) -> bool:
        """A failed take ahead holds no token: the SEND that finds none takes its own, and
        that take reports what is wrong with the store then."""
        try:
            return await self._take()
        except ProtocolError:
            return False

    def close(self) -> None:
        """The connection ended: the token held for it (or being taken) is let go."""
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None

