"""Mailboxes in the relay's own memory: the store for one relay whose mail need not outlive it.

The SQLite store's contract, kept in dicts, arrays and bytes.  SQLite's in-memory database
cost a message 30-40 µs of the relay's CPU for its accept, fetch and ack (three INSERTs, a
SELECT with a JOIN, a DELETE and its trigger); here they cost about 7
(benchmarks/README.md, "A store in the relay's memory").  Nothing is written anywhere: what
was accepted is lost when the process stops, as with SQLite's in-memory database
(`sqlite://:memory:`), which stays the default.

No call awaits before it is done, so each one is atomic and calls take effect in the order
issued; an accept checks everything it may refuse for before it changes anything.
"""

from __future__ import annotations

import itertools
import struct
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence

from proto import Envelope, Origin, PublicKey
from proto.access import Stamp
from proto.envelope import MSG_ID_BYTES
from proto.errors import ReplayError
from proto.keys import KEY_BYTES

from .base import (ExpiredMessage, MailboxLimits, MailboxStore, StoredMessage, Subscription,
                   Wake)
from .due_index import DueIndex
from .embedded import EmbeddedWakeups, check_budgets, check_mailbox, parse_tag
from .token_bucket import TokenBuckets

# What the store holds per message is bytes and ints only, in dicts, bytearrays and arrays,
# never a Python object of its own: the garbage collector stops looking into a dict that
# holds nothing else, and never looks into the others, so a store holding millions of
# messages adds nothing to a collection.  (As a class per body, a list of its places and a
# heap entry naming it, a full collection over 200,000 messages held took 144 ms of the
# event loop; the message ids remembered, as tuples in a heap, 82 ms a million.)
_SEQ = struct.Struct(">Q")
_PLACE_BYTES = KEY_BYTES + _SEQ.size  # a recipient's key and the seq of its entry
_SEEN_KEY_BYTES = KEY_BYTES + MSG_ID_BYTES  # sender, msg_id


class _Mailbox:
    """One recipient's entries (seq -> body number), and every seq appended in order: a
    fetch finds its cursor by bisection, and skips the seqs removed since (`seqs` is
    rebuilt from `entries` once more than half of it was removed, so a fetch never skips
    more than it returns plus the mailbox's size)."""

    __slots__ = ("entries", "seqs", "bytes")

    def __init__(self) -> None:
        self.entries: dict[int, int] = {}
        self.seqs = array("Q")
        self.bytes = 0


class MemoryStore(MailboxStore):
    def __init__(self) -> None:
        self._mailboxes: dict[bytes, _Mailbox] = {}
        self._next_seq = itertools.count(1)
        # sender + msg_id -> until when it is refused as a replay, and the same by time.
        self._seen: dict[bytes, int] = {}
        self._seen_until = DueIndex(_SEEN_KEY_BYTES)
        # A body (an envelope stored once for all its recipients), by number: its bytes;
        # its sender + msg_id + origin; the places of its entries (recipient key + seq,
        # each); how many of those entries are still held; and the numbers by expiry.
        self._raws: dict[int, bytes] = {}
        self._heads: dict[int, bytes] = {}
        self._places: dict[int, bytes] = {}
        self._held: dict[int, int] = {}
        self._by_expiry = DueIndex(_SEQ.size)
        # Bodies taken from `_by_expiry` whose entries a sweep has not all taken yet.
        self._expiring: deque[int] = deque()
        self._body_numbers = itertools.count()
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
        remembered = sender + envelope.msg_id
        if remembered in self._seen:
            raise ReplayError("message id already used by this sender")
        keys = [key.raw for key in recipients or envelope.recipient_keys]
        for key in keys:
            mailbox = self._mailboxes.get(key)
            messages, held = (len(mailbox.entries), mailbox.bytes) if mailbox else (0, 0)
            check_mailbox(key, messages, held, size, limits)
        used = self._stored.get(sender, 0)
        check_budgets(sender, used, self._stored_total, size, limits)

        self._seen[remembered] = replay_until_ms
        self._seen_until.add(replay_until_ms, remembered)
        self._stored[sender] = used + size
        self._stored_total += size
        number = next(self._body_numbers)
        places: list[bytes] = []
        woken: list[tuple[bytes, int, bytes | None]] = []  # raw: if the mailbox held none
        for key in keys:
            mailbox = self._mailboxes.get(key)
            if mailbox is None:
                mailbox = self._mailboxes[key] = _Mailbox()
            seq = next(self._next_seq)
            woken.append((key, seq, None if mailbox.entries else envelope.raw))
            mailbox.entries[seq] = number
            mailbox.seqs.append(seq)
            mailbox.bytes += size
            places.append(key + _SEQ.pack(seq))
        self._raws[number] = envelope.raw
        self._heads[number] = remembered + bytes((envelope.origin,))
        self._places[number] = b"".join(places)
        self._held[number] = len(places)
        self._by_expiry.add(envelope.expires_at_ms, _SEQ.pack(number))
        for key, seq, raw in woken:
            self._wakeups.appended(key, seq, raw)

    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        mailbox = self._mailboxes.get(recipient.raw)
        if mailbox is None or limit <= 0:
            return []
        seqs, entries, raws = mailbox.seqs, mailbox.entries, self._raws
        after_seq = (parse_tag(after) or 0) if after is not None else 0
        found: list[StoredMessage] = []
        for index in range(bisect_right(seqs, after_seq), len(seqs)):
            number = entries.get(seqs[index])
            if number is not None:
                found.append(StoredMessage(str(seqs[index]), raws[number]))
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

    def _remove(self, key: bytes, mailbox: _Mailbox, seq: int) -> None:
        """Take one entry out of its mailbox, and its body out of the store with its last."""
        number = mailbox.entries.pop(seq)
        size = len(self._raws[number])
        mailbox.bytes -= size
        if not mailbox.entries:
            del self._mailboxes[key]  # its tags keep growing: seqs are the store's
        elif len(mailbox.seqs) > 2 * len(mailbox.entries):
            mailbox.seqs = array("Q", mailbox.entries)  # in append order, so ascending
        held = self._held[number] - 1
        if held:
            self._held[number] = held
            return
        sender = self._heads[number][:KEY_BYTES]
        del self._held[number], self._raws[number], self._heads[number], self._places[number]
        used = self._stored[sender] - size
        if used:
            self._stored[sender] = used
        else:
            del self._stored[sender]
        self._stored_total -= size

    async def take_expired(self, now_ms: int, limit: int) -> list[ExpiredMessage]:
        """Also forgets every message id whose replay window ended: a relay sweeps each
        second, so that is about one second of accepts (5,500 took 3 ms here).  A body
        acked by everyone left its number in the expiry index, skipped here."""
        seen = self._seen
        for remembered in self._seen_until.take(now_ms, len(seen)):
            del seen[remembered]
        expired: list[ExpiredMessage] = []
        while len(expired) < limit:
            if not self._expiring:
                self._expiring.extend(_SEQ.unpack(number)[0] for number in
                                      self._by_expiry.take(now_ms, limit - len(expired)))
                if not self._expiring:
                    break
            number = self._expiring[0]
            places = self._places.get(number, b"")
            head = self._heads.get(number, b"")
            for at in range(0, len(places), _PLACE_BYTES):
                if len(expired) == limit:
                    break
                key, (seq,) = places[at:at + KEY_BYTES], _SEQ.unpack_from(places, at + KEY_BYTES)
                mailbox = self._mailboxes.get(key)
                if mailbox is not None and mailbox.entries.get(seq) == number:
                    self._remove(key, mailbox, seq)
                    expired.append(ExpiredMessage(
                        PublicKey(key), PublicKey(head[:KEY_BYTES]),
                        head[KEY_BYTES:_SEEN_KEY_BYTES], Origin(head[_SEEN_KEY_BYTES])))
            if number not in self._held:
                self._expiring.popleft()
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
