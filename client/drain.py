"""Fetch what still waits for a key the device rotated away from, then let that key go.

After a rotation the relays still let the old key connect, until its drain
deadline, to fetch its mailbox and nothing else (SPEC §15): from the moment
they apply the list that enrolls the new key, nothing more can be stored for
the old one (senders hear REVOKED), so its mailbox only shrinks.  `Drain`
keeps one connection as the old key and hands every event to the device,
which decides each delivery with the old identity and ACKs it as usual (a DATA
message when the application takes it).  The relay pushes a mailbox's content
as soon as a connection opens, so the mailbox is drained once the rotation is
in force (`ready`), nothing taken from it waits for the application, and no
delivery came for `quiet_s`.  A relay that refuses the old key outright
(REVOKED, NOT_ENROLLED: its deadline passed) leaves nothing to fetch either;
whatever it held expires there and its senders get expiry notices.

Those ends depend on the relay; a drain also ends `deadline_s` after it began by
the device's own clock (by default the relays' drain time and the clock skew),
since a hostile relay could otherwise keep it going without end (a delivery of
junk every half second, or a handshake never finished), and with it the old
secret on disk, which stops the next rotation.  A restart begins it anew.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Collection

from proto import Identity, PublicKey
from proto.errors import NotEnrolledError, RevokedError
from runtime.logs import library_logger

from .backoff import Backoff
from .connection import RelayConnection, connect
from .manager import CONNECT_ERRORS, describe
from .protocol import Event, SendRefused

log = library_logger("continuum.client")

DEFAULT_QUIET_S = 1.0
# The relays' default drain time (7 days: the longest TTL they accept) and the clock skew:
# past it an honest relay refuses the old key, so nothing is left to fetch.
DEFAULT_DEADLINE_S = 7 * 24 * 3600 + 300
_REFUSED = (RevokedError, NotEnrolledError)


class Drain:
    """Runs (`run()`) until the old key's mailbox is drained; `done` is set then."""

    def __init__(self, identity: Identity, relays: list[str], *, max_envelope_bytes: int,
                 handshake_timeout_s: float, pinned_relay_keys: Collection[PublicKey] | None,
                 tls: ssl.SSLContext | None, backoff: Backoff,
                 on_connected: Callable[[RelayConnection], Awaitable[None]],
                 on_event: Callable[[Event, RelayConnection], Awaitable[None]],
                 on_disconnected: Callable[[RelayConnection], None],
                 waiting: Callable[[RelayConnection], int],
                 quiet_s: float = DEFAULT_QUIET_S,
                 deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self.identity = identity
        self._relays = relays
        self._max_envelope_bytes = max_envelope_bytes
        self._handshake_timeout_s = handshake_timeout_s
        self._pinned_relay_keys = pinned_relay_keys
        self._tls = tls
        self._backoff = backoff
        self._on_connected = on_connected
        self._on_event = on_event
        self._on_disconnected = on_disconnected
        self._waiting = waiting  # deliveries of this connection the application has not taken
        self._quiet_s = quiet_s
        self._deadline_s = deadline_s
        # Set once the rotation is in force: only then can nothing more arrive for the old key.
        self.ready = asyncio.Event()
        self.done = asyncio.Event()
        self._activity = asyncio.Event()

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._drain()
        except TimeoutError:
            log.warning("drain_deadline", key=self.identity.public.text,
                        deadline_s=self._deadline_s, detail="given up: relays kept it going")
        finally:
            self.done.set()
            log.info("drain_finished", key=self.identity.public.text)

    async def _drain(self) -> None:
        attempt = 0
        while True:
            url = self._relays[attempt % len(self._relays)]
            attempt += 1
            try:
                async with connect(url, self.identity,
                                   max_envelope_bytes=self._max_envelope_bytes,
                                   handshake_timeout_s=self._handshake_timeout_s,
                                   pinned_relay_keys=self._pinned_relay_keys,
                                   tls=self._tls) as connection:
                    self._backoff.reset()
                    if await self._serve(connection):
                        return
            except _REFUSED as exc:
                log.info("drain_refused", key=self.identity.public.text, relay=url,
                         detail=describe(exc))
                return
            except CONNECT_ERRORS as exc:
                log.warning("drain_connection_failed", relay=url, error=describe(exc))
            await asyncio.sleep(self._backoff.next_delay())

    async def _serve(self, connection: RelayConnection) -> bool:
        """True once drained (or refused from now on); False if the connection dropped."""
        await self._on_connected(connection)
        reader = asyncio.create_task(self._read(connection), name="drain-read")
        try:
            while not reader.done():
                self._activity.clear()
                if await self._wait_activity(reader):
                    continue
                # quiet for a whole quiet_s: drained, unless not yet in force or still in use
                if self.ready.is_set() and not self._waiting(connection):
                    return True
            return reader.result()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self._on_disconnected(connection)

    async def _wait_activity(self, reader: asyncio.Task[bool]) -> bool:
        """Wait up to quiet_s for a delivery, readiness or the reader's end; False if none."""
        waits = {reader, asyncio.ensure_future(self._activity.wait())}
        if not self.ready.is_set():  # the rotation taking effect starts a new quiet window
            waits.add(asyncio.ensure_future(self.ready.wait()))
        done, pending = await asyncio.wait(waits, timeout=self._quiet_s,
                                           return_when=asyncio.FIRST_COMPLETED)
        for future in pending - {reader}:
            future.cancel()
        return bool(done)

    async def _read(self, connection: RelayConnection) -> bool:
        """Hand events on; True if the relay refused the old key (nothing more to fetch)."""
        async for event in connection.events():
            await self._on_event(event, connection)
            self._activity.set()
            if (isinstance(event, SendRefused) and event.msg_id is None
                    and isinstance(event.error, _REFUSED)):
                return True
        return False
