"""The one interface between a relay and wherever mailboxes live.

Relays are stateless: everything another replica would need (mailboxes, the
replay window, rate-limit buckets, byte budgets, the highest access-list stamp
applied) lives behind this interface,
so the embedded SQLite store and the Redis store are interchangeable.  Each
method is one atomic step, because several replicas may call it at once.

An envelope to many recipients is stored once: each mailbox entry refers to
one shared body, which goes away with its last entry (acked or expired).  So
what a message costs the store is its size, not its size times its
recipients, and the byte budgets count each body once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

from proto import Envelope, Origin, PublicKey
from proto.access import Stamp

if TYPE_CHECKING:
    from ..streams.router import RemoteStreams


@dataclass(frozen=True)
class StoredMessage:
    """A mailbox entry; `tag` is opaque, ordered within its mailbox, and acks it."""

    tag: str
    raw: bytes


@dataclass(frozen=True)
class ExpiredMessage:
    """What a sender needs to be told when its message expired unread (`origin`: unless it
    was a relay's own notice)."""

    recipient: PublicKey
    sender: PublicKey
    msg_id: bytes
    origin: Origin


@dataclass(frozen=True)
class NewEntry:
    """What a wake-up may carry: the entry just appended to a mailbox (`tag`, `raw`) and
    `previous`, the tag of the newest entry the mailbox held before it (None: it held none).

    A connection whose cursor is `previous`, with no fetch outstanding, can deliver the
    entry at once: no entry it has not delivered can lie between (`RelayProtocol.pushed`).
    That spares a fetch, and for a device served across a WAN a whole round trip
    (SPEC §19).  `previous` may name an entry removed since, or, after an entry newer
    than the others was removed, the newest still held; either way a cursor that does
    not match only means a fetch, as for a wake-up without an entry.
    """

    tag: str
    previous: str | None
    raw: bytes


# A wake-up carries its entry only up to this size: it goes to every relay watching the
# mailbox (on Redis through pub/sub, whose buffers Redis bounds), and larger envelopes are
# rare and worth a fetch.
WAKE_ENTRY_MAX_BYTES = 16 * 1024

# Called from the event loop: an entry (`NewEntry`), or None for "the mailbox may have grown".
Wake = Callable[[NewEntry | None], None]


# No budget: more bytes than any store holds, and exact in Lua's doubles.
UNBOUNDED_BYTES = 2**53


@dataclass(frozen=True)
class MailboxLimits:
    """What one `accept` must stay within.

    `max_messages` and `max_bytes` bound each recipient's mailbox as its
    device sees it (every entry counts its envelope's full size).  The two
    budgets bound what the store holds, counting each stored body once: all
    bodies of one sender, and all bodies of the whole store.  They are what
    stops a sender (or many made-up ones) from filling the store.
    """

    max_messages: int
    max_bytes: int
    sender_max_bytes: int = UNBOUNDED_BYTES
    store_max_bytes: int = UNBOUNDED_BYTES


class Subscription(ABC):
    """A live interest in one mailbox; `close` stops wake-ups."""

    @abstractmethod
    async def close(self) -> None: ...


class MailboxStore(ABC):
    """Every backend failure (unreachable, full disk, I/O error) raises
    StoreUnavailableError, never the driver's own exception: the relay tells
    the device "retry later" and does not count it as the device's fault.

    Order: calls take effect in the order they were issued, a call being issued
    when its coroutine first runs (tasks first run in the order they were
    created), even while earlier calls are still awaited.  So a connection may
    keep several SENDs in flight, starting each `accept` once the one before it
    was started, and its messages still land in each mailbox in SEND order
    (session.py).  A store that batches calls (redis_batch) sends them in issue
    order, one batch at a time; one that does each call at once keeps it trivially.
    """

    @abstractmethod
    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits,
                     recipients: Sequence[PublicKey] | None = None) -> None:
        """Atomically remember (sender, msg_id) and append the envelope to each
        recipient's mailbox, or do nothing and raise.

        `recipients` (a subset of the envelope's, all of them when None) are those
        whose mailboxes live in this store: an envelope to devices homed in
        several regions is stored once per region, each store taking its own
        (SPEC §19).

        Raises ReplayError if (sender, msg_id) is still remembered,
        MailboxFullError if any recipient's mailbox is at its limit,
        QuotaExceededError if the body would exceed the sender's or the
        store's byte budget, StoreUnavailableError if the backend cannot be
        reached or cannot make the write as durable as configured.  Returning
        means every recipient's entry is durable: only then may a relay say
        ACCEPTED.  A ReplayError is raised only once the remembered message
        is that durable too, since a device takes REPLAY for "already stored".
        """

    @abstractmethod
    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        """Oldest-first entries of the mailbox with tags after `after` (None: from the start)."""

    @abstractmethod
    async def ack(self, recipient: PublicKey, tag: str) -> bool:
        """Remove one delivered entry; False if it was already gone (acked or expired).

        The body goes with its last entry, and its bytes return to the budgets.
        """

    @abstractmethod
    async def take_expired(self, now_ms: int, limit: int) -> list[ExpiredMessage]:
        """Remove and return up to `limit` entries whose TTL has passed.

        Each expired entry is returned to exactly one caller across all
        replicas, so a sender hears about an expiry once.
        """

    @abstractmethod
    async def allow(self, sender: PublicKey, now_ms: int, rate_per_s: float,
                    burst: int) -> bool:
        """Token bucket per sender shared by all replicas: False means refuse."""

    @abstractmethod
    async def depth(self, recipient: PublicKey) -> int:
        """Number of entries waiting in one mailbox."""

    @abstractmethod
    async def subscribe(self, recipient: PublicKey, wake: Wake) -> Subscription:
        """Call `wake` (from the event loop) whenever the mailbox may have grown.

        Wake-ups may be spurious; a relay re-fetches after each one, unless it carries
        the entry appended (`NewEntry`) and the relay can deliver that in place of a fetch.
        A store that passes entries passes every append's, in append order, or a plain
        wake-up (None) in its place.
        """

    @abstractmethod
    async def access_list_floor(self) -> Stamp:
        """The highest access-list stamp a relay on this store applied; (0, 0) if none.

        Kept here so that a restarted relay, or a new replica, refuses a replayed
        list older than one any of them already obeyed (SPEC §12).
        """

    @abstractmethod
    async def raise_access_list_floor(self, stamp: Stamp) -> Stamp:
        """Atomically make the floor `stamp` if that is higher; returns the floor after."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailableError unless the backend can store a message now (for /healthz).

        A backend that answers reads but refuses writes (a full disk, a
        read-only replica) cannot honour ACCEPTED, so the probe writes.
        """

    def stream_bus(self) -> RemoteStreams | None:
        """The path stream frames take to other relays sharing this store (SPEC §16); None:
        this store has no other relays (the embedded one)."""
        return None

    def answers_later(self, recipient: PublicKey) -> bool:
        """Whether calls on this recipient's mailbox are answered only after a network round
        trip (Redis, in this region or homed in another, SPEC §19), not within the loop turn
        that makes them (the embedded store).  The session then applies its ACKs side by
        side, so a device has several acknowledged per round trip; they still take effect
        before the SENDs read after them (calls take effect in the order issued).  For a
        store that answers at once, side-by-side tasks would only let accepts outrun
        deliveries at saturation."""
        return False

    @abstractmethod
    async def close(self) -> None: ...
