"""Mailboxes in the relay's own memory: the store for one relay whose mail need not outlive it.

The same contract as the SQLite store, kept in dicts and lists: SQLite's in-memory database
cost a message about 45 µs of the relay's CPU for its accept, fetch and ack (three INSERTs,
a SELECT with a JOIN, a DELETE and its trigger), a third of what the relay spent on it;
here they cost a few (benchmarks/README.md, "A store in the relay's memory").  Nothing is
written anywhere: what was accepted is lost when the process stops, as with SQLite's
in-memory database (`sqlite://:memory:`), which stays the default.

No call awaits before it is done, so each one is atomic and calls take effect in the order
issued; an accept checks everything it may refuse for before it changes anything.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_right
from collections.abc import Sequence

from proto import Envelope, PublicKey
from proto.access import Stamp
from proto.errors import MailboxFullError, QuotaExceededError, ReplayError

from .base import (ExpiredMessage, MailboxLimits, MailboxStore, StoredMessage, Subscription,
                   Wake)
from .embedded import EmbeddedWakeups, parse_tag
from .token_bucket import TokenBuckets

# Index entries of bodies already gone (acked) that the expiry index may hold before it is
# rebuilt without them; beyond this, rebuilt once they are half of it (amortised O(1)).
_STALE_BEFORE_REBUILD = 1024


class _Body:
    """An envelope stored once for all its recipients (`places`: the (mailbox, seq) of each
    entry made for it), with how many of those entries are still held."""

    __slots__ = ("sender", "msg_id", "origin", "expires_at_ms", "raw", "size", "places", "held")

    def __init__(self, envelope: Envelope) -> None:
        self.sender, self.msg_id = envelope.sender.raw, envelope.msg_id
        self.origin, self.expires_at_ms = envelope.origin, envelope.expires_at_ms
        self.raw, self.size = envelope.raw, len(envelope.raw)
        self.places: list[tuple[bytes, int]] = []
        self.held = 0


class _Mailbox:
    """One recipient's entries by seq, and every seq appended in order: a fetch finds its
    cursor by bisection, and skips the seqs removed since (`seqs` is rebuilt from `entries`
    once those are more than half of it, so a fetch never skips more than it returns
    plus the mailbox's size)."""

    __slots__ = ("entries", "seqs", "bytes")

    def __init__(self) -> None:
        self.entries: dict[int, _Body] = {}
        self.seqs: list[int] = []
        self.bytes = 0


class MemoryStore(MailboxStore):
    def __init__(self) -> None:
        self._mailboxes: dict[bytes, _Mailbox] = {}
        self._next_seq = itertools.count(1)
        # (sender, msg_id) -> until when it is refused as a replay, and the same by time.
        self._seen: dict[tuple[bytes, bytes], int] = {}
        self._seen_until: list[tuple[int, tuple[bytes, bytes]]] = []
        # Bodies by expiry (the middle number only keeps two bodies from being compared);
        # a body acked by everyone stays until it is popped or the index is rebuilt.
        self._by_expiry: list[tuple[int, int, _Body]] = []
        self._body_numbers = itertools.count()
        self._stale = 0
        # sender -> bytes of its bodies held, and their sum: what the budgets count.
        self._stored: dict[bytes, int] = {}
        self._stored_total = 0
        self._buckets = TokenBuckets()
        self._wakeups = EmbeddedWakeups()
        self._floor = Stamp(0, 0)

    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits,
                     recipients: Sequence[PublicKey] | None = None) -> None:
        sender, size = envelope.sender.raw, len(envelope.raw)
        remembered = (sender, envelope.msg_id)
        if remembered in self._seen:
            raise ReplayError("message id already used by this sender")
        keys = [key.raw for key in recipients or envelope.recipient_keys]
        for key in keys:
            mailbox = self._mailboxes.get(key)
            messages, held = (len(mailbox.entries), mailbox.bytes) if mailbox else (0, 0)
            if messages + 1 > limits.max_messages or held + size > limits.max_bytes:
                raise MailboxFullError(f"mailbox of {PublicKey(key).text} is full "
                                       f"({messages} messages, {held} bytes)")
        used = self._stored.get(sender, 0)
        if used + size > limits.sender_max_bytes:
            raise QuotaExceededError(f"sender {envelope.sender.text} has {used} bytes stored;"
                                     f" its budget is {limits.sender_max_bytes}")
        if self._stored_total + size > limits.store_max_bytes:
            raise QuotaExceededError(f"the relay's store holds {self._stored_total} bytes;"
                                     f" its budget is {limits.store_max_bytes}")

        self._seen[remembered] = replay_until_ms
        heapq.heappush(self._seen_until, (replay_until_ms, remembered))
        body = _Body(envelope)
        heapq.heappush(self._by_expiry, (body.expires_at_ms, next(self._body_numbers), body))
        self._stored[sender] = used + size
        self._stored_total += size
        appended: list[tuple[bytes, int, bool]] = []  # (mailbox, seq, it held nothing before)
        for key in keys:
            mailbox = self._mailboxes.get(key)
            if mailbox is None:
                mailbox = self._mailboxes[key] = _Mailbox()
            seq = next(self._next_seq)
            appended.append((key, seq, not mailbox.entries))
            mailbox.entries[seq] = body
            mailbox.seqs.append(seq)
            mailbox.bytes += size
            body.places.append((key, seq))
        body.held = len(keys)
        for key, seq, was_empty in appended:
            self._wakeups.appended(key, seq, envelope.raw if was_empty else None)

    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        mailbox = self._mailboxes.get(recipient.raw)
        if mailbox is None or limit <= 0:
            return []
        seqs, entries = mailbox.seqs, mailbox.entries
        after_seq = (parse_tag(after) or 0) if after is not None else 0
        found: list[StoredMessage] = []
        for index in range(bisect_right(seqs, after_seq), len(seqs)):
            body = entries.get(seqs[index])
            if body is not None:
                found.append(StoredMessage(str(seqs[index]), body.raw))
                if len(found) == limit:
                    break
        return found

    async def ack(self, recipient: PublicKey, tag: str) -> bool:
        seq = parse_tag(tag)
        mailbox = self._mailboxes.get(recipient.raw)
        if seq is None or mailbox is None or seq not in mailbox.entries:
            return False
        self._remove(recipient.raw, mailbox, seq)
        return True

    def _remove(self, key: bytes, mailbox: _Mailbox, seq: int) -> _Body:
        """Take one entry out of its mailbox, and its body out of the budgets with its last."""
        body = mailbox.entries.pop(seq)
        mailbox.bytes -= body.size
        if not mailbox.entries:
            del self._mailboxes[key]  # its tags keep growing: seqs are the store's
        elif len(mailbox.seqs) > 2 * len(mailbox.entries):
            mailbox.seqs = list(mailbox.entries)  # in append order, so ascending
        body.held -= 1
        if body.held == 0:
            used = self._stored[body.sender] - body.size
            if used:
                self._stored[body.sender] = used
            else:
                del self._stored[body.sender]
            self._stored_total -= body.size
            body.raw = b""  # its index entry may outlive it until expiry; the bytes must not
            self._stale += 1
            if self._stale > _STALE_BEFORE_REBUILD and 2 * self._stale > len(self._by_expiry):
                self._by_expiry = [item for item in self._by_expiry if item[2].held]
                heapq.heapify(self._by_expiry)
                self._stale = 0
        return body

    async def take_expired(self, now_ms: int, limit: int) -> list[ExpiredMessage]:
        """Also forgets every message id whose replay window ended: a relay sweeps each
        second, so that is about one second of accepts (~3 ms at 10,000 a second)."""
        seen, seen_until = self._seen, self._seen_until
        while seen_until and seen_until[0][0] <= now_ms:
            del seen[heapq.heappop(seen_until)[1]]
        expired: list[ExpiredMessage] = []
        by_expiry = self._by_expiry
        while by_expiry and by_expiry[0][0] <= now_ms and len(expired) < limit:
            body = by_expiry[0][2]
            for key, seq in body.places:
                if not body.held or len(expired) == limit:
                    break
                mailbox = self._mailboxes.get(key)
                if mailbox is not None and mailbox.entries.get(seq) is body:
                    self._remove(key, mailbox, seq)
                    expired.append(ExpiredMessage(PublicKey(key), PublicKey(body.sender),
                                                  body.msg_id, body.origin))
            if not body.held and by_expiry is self._by_expiry and by_expiry[0][2] is body:
                heapq.heappop(by_expiry)
                self._stale -= 1
            by_expiry = self._by_expiry  # _remove may have rebuilt it
        return expired

    async def allow(self, sender: PublicKey, now_ms: int, rate_per_s: float,
                    burst: int) -> bool:
        return self._buckets.take(sender.raw, now_ms, rate_per_s, burst)

    async def depth(self, recipient: PublicKey) -> int:
        mailbox = self._mailboxes.get(recipient.raw)
        return 0 if mailbox is None else len(mailbox.entries)

    async def subscribe(self, recipient: PublicKey, wake: Wake) -> Subscription:
        def newest_held() -> int | None:
            mailbox = self._mailboxes.get(recipient.raw)
            return next(reversed(mailbox.entries)) if mailbox is not None else None

        return self._wakeups.watch(recipient.raw, wake, newest_held)

    async def access_list_floor(self) -> Stamp:
        return self._floor

    async def raise_access_list_floor(self, stamp: Stamp) -> Stamp:
        self._floor = max(self._floor, stamp)
        return self._floor

    async def ping(self) -> None:
        """Memory the process cannot get ends it; nothing short of that stops an accept."""

    async def close(self) -> None:
        """Nothing to release: the mail goes with the process."""
