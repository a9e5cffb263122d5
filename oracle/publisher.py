"""The signed access list, built once per change and served to relays from memory.

A relay asks `GET /v1/access-list?epoch=E&after=V&valid_until=T`; if the
oracle's list has another stamp, or the same one valid for longer than T, it
answers at once, else it holds the request until a change (revocation,
enrolment, group membership), a refresh or `longpoll_s`, then answers 204.
The relay drives the loop, so a relay that was down simply asks again;
nothing is pushed into the void.

Refresh: every list is valid for `validity_ms` (SPEC §12).  Once half of that
has passed the list is signed again, same stamp and content, valid from then
on, and every waiting long-poll is answered with it: so a relay in touch with
the oracle always holds a list with at least half its validity left, and one
that is cut off finds out by its own clock.  The stamp stays because it names
the content, and counting refreshes in the database would mean a write every
few minutes and versions that grow with time instead of with changes.

Reading the database per request made every poll a full-table read inside
the writers' lock (20 pollers took the admin API median from 1 ms to 437 ms).
Here the database is read once per change: `notify` (called by the registry
after each commit) marks the list stale and starts one rebuild, and
`current()` waits for that rebuild, so an answer never predates a change
that was committed before the request arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog

from proto import Identity
from proto.access import AccessList, Stamp
from proto.rotation import OracleKeyChain
from runtime.clock import now_ms

from .key_cache import KeyCache
from .records import AccessSnapshot
from .regions import Regions
from .registry import Registry


@dataclass(frozen=True)
class Published:
    """One signed list: its stamp, its parsed form and the bytes every relay is sent."""

    access: AccessList
    document: bytes

    @property
    def stamp(self) -> Stamp:
        return self.access.stamp

    @property
    def etag(self) -> str:
        return f'"{self.stamp}"'


class AccessListPublisher:
    def __init__(self, registry: Registry, identity: Identity,
                 log: structlog.typing.FilteringBoundLogger,
                 chain: OracleKeyChain = OracleKeyChain(), *, validity_ms: int,
                 regions: Regions | None = None) -> None:
        self._registry = registry
        # The network's regions (SPEC §19): the list then places every key in its home.
        self._regions = regions
        self._identity = identity
        self._chain = chain
        self._log = log
        self._validity_ms = validity_ms
        self._published: Published | None = None
        self._stale = True
        self._rebuild: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        # Text form → key, kept across rebuilds: parsing 10,000 keys per change is most of one.
        self.keys = KeyCache()

    def notify(self) -> None:
        """A change was committed: rebuild the list once, then wake every waiting long-poll."""
        self._stale = True
        self._start_rebuild()

    async def current(self) -> Published:
        """The list as of the last committed change (waits for a rebuild in progress: one
        that is still reading may already have cleared `_stale`), signed again first if
        half its validity has passed."""
        while self._stale or self._published is None or not self._rebuild_done():
            await asyncio.shield(self._start_rebuild())
        if now_ms() >= self._refresh_due_ms(self._published):
            self._refresh(self._published)
        return self._published

    async def wait_changed(self, held: Stamp, held_until_ms: int,
                           timeout_s: float) -> Published | None:
        """The list once it differs from the relay's: another stamp than `held`, or the
        same one valid for longer than `held_until_ms` (a refresh the relay lacks); None
        if neither happened within `timeout_s`.

        "Another", not "newer": a relay that holds a newer stamp than this
        oracle (one restored with its clock behind) gets this list at once, so
        it refuses it and raises its alarm instead of waiting in silence.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            changed = self._changed  # take it before reading, so no change slips between
            published = await self.current()
            if published.stamp != held:
                if held > published.stamp:
                    self._log.warning("relay_holds_newer_access_list", relay_stamp=str(held),
                                      oracle_stamp=str(published.stamp))
                return published
            if published.access.valid_until_ms > held_until_ms:
                return published
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            # Wake for a change, or when the list is due to be signed again.
            refresh_in = (self._refresh_due_ms(published) - now_ms()) / 1000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(remaining, refresh_in))):
                    await changed.wait()

    def _refresh_due_ms(self, published: Published) -> int:
        return published.access.issued_at_ms + self._validity_ms // 2

    def _refresh(self, published: Published) -> None:
        """Sign the same list again, valid from now; waiting long-polls are answered with it."""
        issued_at = now_ms()
        access = published.access.refreshed(issued_at, issued_at + self._validity_ms)
        self._install(Published(access, access.sign(self._identity)))
        self._log.debug("access_list_refreshed", stamp=str(access.stamp),
                        valid_until_ms=access.valid_until_ms)

    def _rebuild_done(self) -> bool:
        return self._rebuild is None or self._rebuild.done()

    def _start_rebuild(self) -> asyncio.Task[None]:
        if self._rebuild_done():
            self._rebuild = asyncio.create_task(self._rebuild_while_stale(),
                                                name="access-list-rebuild")
            self._rebuild.add_done_callback(self._log_failure)
        return self._rebuild

    async def _rebuild_while_stale(self) -> None:
        while self._stale:
            self._stale = False  # a change committed while we read sets it again
            try:
                snapshot = await self._registry.access_snapshot()
            except BaseException:
                self._stale = True
                raise
            published = self._published
            if published is None or Stamp(snapshot.epoch, snapshot.version) != published.stamp:
                self._publish(snapshot)

    def _publish(self, snapshot: AccessSnapshot) -> None:
        numbers = {group: number for number, group in
                   enumerate(sorted({g for ids in snapshot.groups.values() for g in ids}))}
        issued_at = now_ms()
        regions = self._regions
        access = AccessList(
            snapshot.epoch, snapshot.version, issued_at, issued_at + self._validity_ms,
            self._identity.public,
            {self.keys(text): frozenset(numbers[g] for g in snapshot.groups.get(text, ()))
             for text in snapshot.enrolled},
            frozenset(self.keys(text) for text in snapshot.revoked),
            {self.keys(text): until for text, until in snapshot.draining.items()}, self._chain,
            # Where each mailbox lives (SPEC §19); without regions the list has none.
            regions.names if regions else (),
            {self.keys(text): home for text, home in snapshot.homes.items()},
            {self.keys(text): former for text, former in snapshot.former.items()},
            regions.default if regions else None)
        self._install(Published(access, access.sign(self._identity)))

    def _install(self, published: Published) -> None:
        """Serve `published` from now on, and wake every waiting long-poll."""
        self._published = published
        self._changed.set()
        self._changed = asyncio.Event()

    def _log_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log.error("access_list_rebuild_failed", error=repr(task.exception()))
