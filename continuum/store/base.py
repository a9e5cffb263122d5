"""The one interface between a relay and wherever mailboxes live.

Relays are stateless: everything another replica would need (mailboxes, the
replay window, rate-limit buckets) lives behind this interface, so the
embedded SQLite store and the Redis store are interchangeable.  Each method is
one atomic step, because several replicas may call it at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from proto import Envelope, Kind, PublicKey


@dataclass(frozen=True)
class StoredMessage:
    """A mailbox entry; `tag` is opaque, ordered within its mailbox, and acks it."""

    tag: str
    raw: bytes


@dataclass(frozen=True)
class ExpiredMessage:
    """What a sender needs to be told when its message expired unread."""

    recipient: PublicKey
    sender: PublicKey
    msg_id: bytes
    kind: Kind


@dataclass(frozen=True)
class MailboxLimits:
    max_messages: int
    max_bytes: int


class Subscription(ABC):
    """A live interest in one mailbox; `close` stops wake-ups."""

    @abstractmethod
    async def close(self) -> None: ...


class MailboxStore(ABC):
    @abstractmethod
    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits) -> None:
        """Atomically remember (sender, msg_id) and append the envelope to each
        recipient's mailbox, or do nothing and raise.

        Raises ReplayError if (sender, msg_id) is still remembered,
        MailboxFullError if any recipient's mailbox is at its limit,
        StoreUnavailableError if the backend cannot be reached.  Returning
        means every recipient's copy is durable: only then may a relay say ACCEPTED.
        """

    @abstractmethod
    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        """Oldest-first entries of the mailbox with tags after `after` (None: from the start)."""

    @abstractmethod
    async def ack(self, recipient: PublicKey, tag: str) -> bool:
        """Remove one delivered entry; False if it was already gone (acked or expired)."""

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
    async def subscribe(self, recipient: PublicKey,
                        wake: Callable[[], None]) -> Subscription:
        """Call `wake` (from the event loop) whenever the mailbox may have grown.

        Wake-ups may be spurious; a relay re-fetches after each one.
        """

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailableError unless the backend answers (for /healthz)."""

    @abstractmethod
    async def close(self) -> None: ...
