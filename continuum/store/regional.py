"""One worldwide network: each call goes to the store of the region where the mailbox lives.

Every device has a home region, named in the oracle's signed access list
(SPEC §19), and its mailbox lives in that region's store, whichever relay it
talks to.  A relay is configured with its own region's store and the store of
every other region, and this layer routes each `MailboxStore` call to the
right one, so the session, the protocol and the expiry sweep stay exactly
as they are for one region.  Redis is the engine in every region; nothing
here replicates anything:

- `accept` groups the recipients by home region and stores each group in its
  region's store (the stores of several regions at once, concurrently).
  Each region takes all of its recipients or none (its own atomic accept).
  Every region took it: returning is ACCEPTED.  Otherwise the refusal that is
  raised names, per refused region, the recipients and why, and keeps the
  code of the first refusal, which is always a "retry later" one (the
  relay's own checks refused anything permanent before any store was
  touched).  Regions that took it keep it: the sender sends the same bytes
  again, those regions answer REPLAY (which counts as stored), the others
  store it.  So every recipient gets one copy, or the sender is told who
  did not.
- the replay window lives with each recipient's copy: one replay key per
  (sender, msg_id, recipient) in the store that holds the copy (or consumed
  it), moved with the copy when the home moves, so the same (sender, msg_id)
  is stored at most once per mailbox, through whichever relay it is sent,
  across moves and retries.
- `fetch`, `ack`, `depth` and `subscribe` (pub/sub on that store) use the
  device's home store; tags carry the region (`eu/1733…-0`), so an ACK goes
  to the store that delivered the entry even if the home moved meanwhile.
- `allow` takes the token from the sender's bucket in its home store, so the
  rate limit holds worldwide; while that store is unreachable, from this
  region's (a per-region bound, for as long as the outage lasts).
- expiry sweeps, the access-list floor and the health probe use the local
  store: every region runs relays, which sweep their own store; a notice is
  an `accept`, so it goes to the sender's home.
- a device whose home moved has mail waiting in its former home: while the
  list names that former home, a relay serving the device moves it (`adopt`
  into the home store, then `move_out` of the former), on connect and on every
  wake-up from the former store (a relay that still held the older list may
  write there for a moment).  A copy leaves its former home only once the new
  home took it or holds (or consumed) it already, and its replay key leaves
  with it, so a key always means "held or consumed here": a mover that dies
  halfway and runs again neither loses nor duplicates anything, and a device
  moved back and forth gets its mail however often it moves.  Every step
  carries the stamp of the list the mover acts on, and a store that saw a
  move under a newer list refuses it: two relays on different lists cannot
  move one device's mail against each other (the older one stops).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import structlog

from proto import Envelope, PublicKey, decode_envelope
from proto.access import Stamp
from proto.errors import ProtocolError, ReplayError, StoreUnavailableError
from proto.limits import Limits
from runtime.clock import now_ms as clock_ms
from runtime.tasks import cancel_all_and_wait

from .base import (UNBOUNDED_BYTES, ExpiredMessage, MailboxLimits, MailboxStore, NewEntry,
                   StoredMessage, Subscription, Wake)
from .redis import MoveStep, RedisStore

if TYPE_CHECKING:
    from ..streams.router import RemoteStreams

# Entries moved from a former home per round trip.
MOVE_BATCH = 100
# An entry this close to its expiry is left where it is: its own store expires it and tells
# the sender once, rather than both stores racing to.
MOVE_MARGIN_MS = 5_000
# What a moved envelope may be: the largest a relay can be configured to take.
_MOVED_LIMITS = Limits(max_envelope_bytes=16 * 1024 * 1024)
# A move re-appends mail already admitted once under these same limits: never refuse it.
_MOVE_LIMITS = MailboxLimits(UNBOUNDED_BYTES, UNBOUNDED_BYTES)
_TAG_SEPARATOR = "/"
# How often every region's store is probed, and how long a probe may take.
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 2.0
_MAX_REFUSAL_CHARS = 480

_log = structlog.get_logger("continuum.regions")
T = TypeVar("T")


class Homes(Protocol):
    """Where each key's mailbox lives, as the access list in force says (`AccessControl`)."""

    def home_of(self, key: PublicKey) -> str: ...

    def former_home_of(self, key: PublicKey) -> str | None: ...

    def list_stamp(self) -> Stamp:
        """The stamp of the list in force (Stamp(0, 0) without one)."""
        ...


class RegionHealth(Protocol):
    """Where this layer reports each region store's state (the relay's metrics)."""

    def region_failed(self, region: str) -> None: ...

    def region_answered(self, region: str) -> None: ...


@dataclass(frozen=True)
class RegionState:
    """One region store as the last probe found it."""

    region: str
    reachable: bool
    detail: str = ""


class RegionalStore(MailboxStore):
    """Routes every call to the store of the region it concerns; see the module docstring."""

    def __init__(self, local: str, stores: dict[str, RedisStore], homes: Homes,
                 health: RegionHealth) -> None:
        if local not in stores:
            raise ValueError(f"no store for this relay's own region {local!r}")
        self.local = local
        self.stores = stores
        self._homes = homes
        self._health = health
        self._moves: dict[PublicKey, asyncio.Task[None]] = {}
        # Devices served here whose former home is being watched: moves run only for them.
        self._moving: Counter[PublicKey] = Counter()
        # Devices whose move under way is to be followed by one more (`_start_move`).
        self._move_again: set[PublicKey] = set()

    # -- where things live ---------------------------------------------------------------

    def _store_of(self, region: str) -> RedisStore:
        store = self.stores.get(region)
        if store is None:
            self._health.region_failed(region)
            raise StoreUnavailableError(f"region {region} has no store configured on this relay"
                                        " (--region-store)")
        return store

    def _home_store(self, key: PublicKey) -> tuple[str, RedisStore]:
        region = self._homes.home_of(key)
        return region, self._store_of(region)

    def answers_later(self, recipient: PublicKey) -> bool:
        """Every region's store is a Redis, which answers a round trip later (this region's
        a LAN one, another's a WAN one), so a connection keeps SENDs in flight and ACKs
        side by side whatever the recipient's home, as on a plain RedisStore.

        This region's mailboxes were served inline for a while: paced regions.py runs had
        shown SEND -> DELIVER tails of 150-500 ms at p90 in the one-region case with them
        pipelined.  Measured again (the code they were seen on, and this one alternated
        with inline, 3 runs each) they did not come back: p90 3.5-9.0 ms pipelined, 3.8-9.1
        inline, and pipelined takes 1.4-1.8x the msg/s at saturation (benchmarks/README.md,
        "The own region pipelined too").  Inline also cost a relay whose own Redis is a
        round trip away two round trips per SEND."""
        return True

    async def _in(self, region: str, call: Callable[[RedisStore], Awaitable[T]]) -> T:
        """Await `call` on the region's store, reporting the region's state to `health`."""
        store = self._store_of(region)
        try:
            result = await call(store)
        except StoreUnavailableError:
            self._health.region_failed(region)
            raise
        self._health.region_answered(region)
        return result

    # -- sending -------------------------------------------------------------------------

    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits,
                     recipients: Sequence[PublicKey] | None = None) -> None:
        by_region: dict[str, list[PublicKey]] = {}
        for key in recipients or envelope.recipient_keys:
            by_region.setdefault(self._homes.home_of(key), []).append(key)
        if len(by_region) == 1:
            [(region, keys)] = by_region.items()
            await self._in(region, lambda store: store.accept(
                envelope, replay_until_ms=replay_until_ms, limits=limits, recipients=keys))
            return
        outcomes = await asyncio.gather(*(
            self._in(region, lambda store, keys=keys: store.accept(
                envelope, replay_until_ms=replay_until_ms, limits=limits, recipients=keys))
            for region, keys in by_region.items()), return_exceptions=True)
        refused: list[tuple[str, list[PublicKey], ProtocolError]] = []
        replayed = False
        for (region, keys), outcome in zip(by_region.items(), outcomes):
            if isinstance(outcome, ReplayError):
                replayed = True
            elif isinstance(outcome, ProtocolError):
                refused.append((region, keys, outcome))
            elif isinstance(outcome, BaseException):
                raise outcome  # a bug, not a refusal
        if refused:
            raise _partial_refusal(refused, by_region)
        if replayed:  # every region holds it: stored now or before
            raise ReplayError("message id already used by this sender (stored in every"
                              " recipient's region)")

    async def allow(self, sender: PublicKey, now_ms: int, rate_per_s: float,
                    burst: int) -> bool:
        region = self._homes.home_of(sender)
        if region != self.local and region in self.stores:
            try:
                return await self._in(region, lambda store: store.allow(
                    sender, now_ms, rate_per_s, burst))
            except StoreUnavailableError:
                pass  # the sender's home is unreachable: its bucket in this region instead
        return await self._in(self.local, lambda store: store.allow(
            sender, now_ms, rate_per_s, burst))

    # -- delivering ----------------------------------------------------------------------

    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        region = self._homes.home_of(recipient)
        tag_region, local_tag = _split_tag(after)
        entries = await self._in(region, lambda store: store.fetch(
            recipient, local_tag if tag_region == region else None, limit))
        return [StoredMessage(_tag(region, entry.tag), entry.raw)
                for entry in entries]

    async def ack(self, recipient: PublicKey, tag: str) -> bool:
        region, local_tag = _split_tag(tag)
        if region is None or local_tag is None or region not in self.stores:
            return False
        return await self._in(region, lambda store: store.ack(recipient, local_tag))

    async def depth(self, recipient: PublicKey) -> int:
        region = self._homes.home_of(recipient)
        return await self._in(region, lambda store: store.depth(recipient))

    async def subscribe(self, recipient: PublicKey,
                        wake: Wake) -> Subscription:
        region, store = self._home_store(recipient)
        former = self._homes.former_home_of(recipient)  # read with the home, by one list
        home = await store.subscribe(recipient, _tagging(region, wake))
        if former is None or former == region:
            return home
        if former not in self.stores:
            _log.warning("mailbox_move_impossible", device=recipient.text, former=former,
                         detail="no store configured for the former home region: its mail"
                                " there is not moved (--region-store)")
            return home

        def moved_mail_may_wait(_entry: NewEntry | None) -> None:
            self._start_move(recipient, former, region)

        self._moving[recipient] += 1
        try:
            subscription = await self.stores[former].subscribe(recipient, moved_mail_may_wait)
        except BaseException:
            self._stop_move(recipient)
            await home.close()
            raise
        self._start_move(recipient, former, region)
        return _Both(home, subscription, lambda: self._stop_move(recipient))

    # -- moving mail from a former home --------------------------------------------------

    def _start_move(self, recipient: PublicKey, former: str, home: str) -> None:
        """Move `recipient`'s mail now, or once right after the move under way: one at a time
        per device, and only while a session here watches its former home.  However many
        wake-ups come during a move, one more move takes what they announced (before, each
        queued a move of its own: a former home written fast queued them without end)."""
        if not self._moving[recipient]:
            return
        running = self._moves.get(recipient)
        if running is not None and not running.done():
            if recipient not in self._move_again:
                self._move_again.add(recipient)
                running.add_done_callback(lambda _task: self._move_once_more(recipient, former,
                                                                             home))
            return
        self._moves[recipient] = asyncio.create_task(
            self._move_safely(recipient, former, home), name="move-mailbox")

    def _move_once_more(self, recipient: PublicKey, former: str, home: str) -> None:
        self._move_again.discard(recipient)
        self._start_move(recipient, former, home)

    def _stop_move(self, recipient: PublicKey) -> None:
        """A session watching `recipient`'s former home ended; the last one stops the move."""
        self._moving[recipient] -= 1
        if self._moving[recipient] > 0:
            return
        del self._moving[recipient]
        self._move_again.discard(recipient)
        task = self._moves.pop(recipient, None)
        if task is not None:
            task.cancel()

    async def _move_safely(self, recipient: PublicKey, former: str, home: str) -> None:
        """Move under the list in force, if it still places the device as the session
        found it (a newer one that moved the home also ends the session)."""
        if (self._homes.home_of(recipient), self._homes.former_home_of(recipient)) != (
                home, former):
            return
        try:
            moved = await self.move_mailbox(recipient, former, home, self._homes.list_stamp())
        except ProtocolError as exc:  # retried at the next wake-up or connection
            _log.warning("mailbox_move_failed", device=recipient.text, former=former, home=home,
                         error=exc.message)
        else:
            if moved:
                _log.info("mailbox_moved", device=recipient.text, former=former, home=home,
                          messages=moved)

    async def move_mailbox(self, recipient: PublicKey, former: str, home: str, stamp: Stamp,
                           now_ms: Callable[[], int] = clock_ms) -> int:
        """Move what waits for `recipient` in `former`'s store into `home`'s, as the list of
        `stamp` says; how many left `former`.

        Each entry is adopted by the home store, then moved out of the former one
        only if the home took it or holds (or consumed) it already: never removed
        on the strength of anything else.  An entry about to expire stays to be
        expired where it is.  Once a store answers that a move under a newer list
        touched this mailbox, the move stops: that list's movers take over.  Safe
        to run anywhere, at any time, any number of times at once.
        """
        self._store_of(home)  # an unknown region fails before anything is read
        moved, after = 0, None
        while True:
            batch = await self._in(former, lambda store: store.fetch(recipient, after, MOVE_BATCH))
            movable = [(entry, envelope) for entry in batch
                       if (envelope := decode_envelope(entry.raw, _MOVED_LIMITS)).expires_at_ms
                       - now_ms() > MOVE_MARGIN_MS]
            adopted = await asyncio.gather(*(self._in(home, lambda store, e=envelope: store.adopt(
                recipient, e, stamp, limits=_MOVE_LIMITS)) for _entry, envelope in movable))
            held = [(entry, envelope) for (entry, envelope), step in zip(movable, adopted)
                    if step is not MoveStep.SUPERSEDED]
            removed = await asyncio.gather(*(self._in(
                former, lambda store, t=entry.tag, e=envelope: store.move_out(
                    recipient, t, e, stamp)) for entry, envelope in held))
            moved += removed.count(MoveStep.DONE)
            if MoveStep.SUPERSEDED in (*adopted, *removed):
                _log.info("mailbox_move_superseded", device=recipient.text, former=former,
                          home=home, stamp=str(stamp),
                          detail="a move under a newer access list touched this mailbox")
                return moved
            if len(batch) < MOVE_BATCH:
                return moved
            after = batch[-1].tag

    # -- the local region's own business -------------------------------------------------

    async def take_expired(self, now_ms: int, limit: int) -> list[ExpiredMessage]:
        return await self._in(self.local, lambda store: store.take_expired(now_ms, limit))

    async def access_list_floor(self) -> Stamp:
        return await self.stores[self.local].access_list_floor()

    async def raise_access_list_floor(self, stamp: Stamp) -> Stamp:
        return await self.stores[self.local].raise_access_list_floor(stamp)

    async def ping(self) -> None:
        """This region's store only: another region's outage must not take this relay out
        of service (its devices' mail and everyone else's traffic still flow)."""
        await self._in(self.local, lambda store: store.ping())

    async def probe(self, timeout_s: float) -> list[RegionState]:
        """Every region's store, probed at once (a write, as `ping` does)."""

        async def one(region: str) -> RegionState:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._in(region, lambda store: store.ping())
            except TimeoutError:
                self._health.region_failed(region)
                return RegionState(region, False, f"no answer within {timeout_s:g}s")
            except ProtocolError as exc:
                return RegionState(region, False, exc.message)
            return RegionState(region, True)

        return list(await asyncio.gather(*(one(region) for region in sorted(self.stores))))

    async def probe_forever(self, interval_s: float = PROBE_INTERVAL_S,
                            timeout_s: float = PROBE_TIMEOUT_S) -> None:
        """Keep `continuum_region_store_up` true between calls: a region nobody sent to
        lately is still known to be up or down.  An outage is logged once, and its end."""
        down: set[str] = set()
        while True:
            for state in await self.probe(timeout_s):
                if not state.reachable and state.region not in down:
                    _log.warning("region_store_unreachable", region=state.region,
                                 detail=state.detail)
                    down.add(state.region)
                elif state.reachable and state.region in down:
                    _log.warning("region_store_reachable_again", region=state.region)
                    down.discard(state.region)
            await asyncio.sleep(interval_s)

    def stream_bus(self) -> RemoteStreams | None:
        """Streams are live and cross the relays of this region only, through its own store's
        pub/sub: an open to a device connected in another region finds nobody there
        (PEER_UNREACHABLE, SPEC §16)."""
        return self.stores[self.local].stream_bus()

    async def close(self) -> None:
        # As before the helper: a move that failed (its task kept in `_moves`) must not keep
        # the stores below open; every move has ended when this raises.
        with contextlib.suppress(Exception):
            await cancel_all_and_wait(self._moves.values())
        self._moves.clear()
        for store in self.stores.values():
            with contextlib.suppress(Exception):
                await store.close()


class _Both(Subscription):
    """A device's home mailbox and its former one, while mail may still wait there."""

    def __init__(self, home: Subscription, former: Subscription,
                 on_close: Callable[[], None]) -> None:
        self._home, self._former, self._on_close = home, former, on_close

    async def close(self) -> None:
        self._on_close()
        await self._former.close()
        await self._home.close()


def _tag(region: str, local_tag: str) -> str:
    """The tag this layer hands out for a region store's own."""
    return f"{region}{_TAG_SEPARATOR}{local_tag}"


def _tagging(region: str, wake: Wake) -> Wake:
    """`wake`, with the tags of a wake-up's entry as `fetch` hands them out: a connection
    compares them with its cursor (`RelayProtocol.pushed`)."""
    def tagged(entry: NewEntry | None) -> None:
        if entry is not None:
            previous = None if entry.previous is None else _tag(region, entry.previous)
            entry = NewEntry(_tag(region, entry.tag), previous, entry.raw)
        wake(entry)
    return tagged


def _split_tag(tag: str | None) -> tuple[str | None, str | None]:
    """(region, the region store's own tag) of a tag this layer handed out; (None, None)
    for anything else."""
    if tag is None:
        return None, None
    region, separator, local_tag = tag.partition(_TAG_SEPARATOR)
    if not separator or not region or not local_tag:
        return None, None
    return region, local_tag


def _partial_refusal(refused: list[tuple[str, list[PublicKey], ProtocolError]],
                     by_region: dict[str, list[PublicKey]]) -> ProtocolError:
    """The refusal a sender hears when some regions took the envelope and others did not:
    the first refusal's type (a "retry later" code), naming what was refused and why."""
    stored = [region for region in by_region if region not in {r for r, _k, _e in refused}]
    parts = [f"{region} {error.code.name} ({error.message}): "
             + " ".join(key.text for key in keys) for region, keys, error in refused]
    text = (f"not stored for {sum(len(keys) for _r, keys, _e in refused)} of"
            f" {sum(len(keys) for keys in by_region.values())} recipients;"
            f" stored in {', '.join(stored) or 'no region'}: send the same envelope again"
            " (regions that hold it answer REPLAY); refused in " + "; ".join(parts))
    if len(text) > _MAX_REFUSAL_CHARS:
        text = text[:_MAX_REFUSAL_CHARS - 1] + "…"
    return type(refused[0][2])(text)


def open_regional_store(settings: RegionSettings, homes: Homes,
                        health: RegionHealth) -> RegionalStore | None:
    """The store of a relay with a region (`--region`, `--region-store`); None without one.

    No connection is made here (each region's Redis may still be coming up);
    ValueError names a URL that is not understood.
    """
    urls = settings.region_store_urls()
    if not urls:
        return None
    stores = {}
    for region, url in urls.items():
        try:
            stores[region] = RedisStore.from_url(url)
        except ValueError as exc:
            raise ValueError(f"store of region {region}: {exc}") from None
    return RegionalStore(settings.region, stores, homes, health)


class RegionSettings(Protocol):
    """What `open_regional_store` reads of the relay's settings."""

    region: str

    def region_store_urls(self) -> dict[str, str]: ...
