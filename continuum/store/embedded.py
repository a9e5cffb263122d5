"""What the two stores in the relay's own process (SQLite, memory) share: tags that are
decimal sequence numbers, the limits an accept is checked against (counted by each in
memory), and wake-ups that carry an entry into an empty mailbox."""

from __future__ import annotations

from collections.abc import Callable

from proto import PublicKey
from proto.errors import MailboxFullError, QuotaExceededError

from .base import WAKE_ENTRY_MAX_BYTES, MailboxLimits, NewEntry, Subscription, Wake
from .wakeups import WakeupHub


def parse_tag(tag: str) -> int | None:
    """Tags are decimal sequence numbers; anything else a device sends matches nothing."""
    if not tag.isascii() or not tag.isdigit() or len(tag) > 19:
        return None
    return int(tag)


def check_mailbox(recipient: bytes, messages: int, held: int, size: int,
                  limits: MailboxLimits) -> None:
    """MailboxFullError unless a mailbox of `messages` entries and `held` bytes takes one
    more of `size`."""
    if messages + 1 > limits.max_messages or held + size > limits.max_bytes:
        raise MailboxFullError(f"mailbox of {PublicKey(recipient).text} is full "
                               f"({messages} messages, {held} bytes)")


def check_budgets(sender: bytes, sender_held: int, store_held: int, size: int,
                  limits: MailboxLimits) -> None:
    """QuotaExceededError unless one more body of `size` fits both byte budgets: the sender's
    bodies take `sender_held` bytes, all bodies `store_held`."""
    if sender_held + size > limits.sender_max_bytes:
        raise QuotaExceededError(f"sender {PublicKey(sender).text} has {sender_held} bytes"
                                 f" stored; its budget is {limits.sender_max_bytes}")
    if store_held + size > limits.store_max_bytes:
        raise QuotaExceededError(f"the relay's store holds {store_held} bytes;"
                                 f" its budget is {limits.store_max_bytes}")


class EmbeddedWakeups:
    """The wake-ups of a store in the relay's own process (SQLite, memory), whose tags are
    decimal sequence numbers.

    A wake-up carries its entry only when the mailbox held nothing before it: then a
    device that keeps up gets it without a fetch.  Otherwise the wake-up is plain, since
    a fetch here is a call in this process and takes every entry a loop turn appended at
    once, which costs less than an entry per wake-up when messages queue
    (benchmarks/README.md, "The embedded store carries the entry into an empty mailbox").
    Only watched mailboxes have their newest sequence number tracked (acked entries
    included): what a wake-up's entry names as the one before it (`NewEntry.previous`).
    """

    def __init__(self) -> None:
        self._hub = WakeupHub()
        self._newest: dict[bytes, int | None] = {}

    def watch(self, key: bytes, wake: Wake,
              newest_held: Callable[[], int | None]) -> Subscription:
        """Call `wake` on appends to `key`'s mailbox; `newest_held()` is asked for the
        newest entry the mailbox holds when nobody watched it yet."""
        if not self._hub.has(key):
            self._newest[key] = newest_held()
        self._hub.add(key, wake)
        return _Watch(self, key, wake)

    def appended(self, key: bytes, seq: int, raw: bytes | None) -> None:
        """Entry `seq` was appended to `key`'s mailbox (`raw`: its envelope, when the
        mailbox held nothing before it): wake the mailbox's connections."""
        if key not in self._newest:
            return
        previous, self._newest[key] = self._newest[key], seq
        if raw is None or len(raw) > WAKE_ENTRY_MAX_BYTES:
            self._hub.wake(key)
        else:
            self._hub.wake(key, NewEntry(str(seq), None if previous is None else str(previous),
                                         raw))

    def unwatch(self, key: bytes, wake: Wake) -> None:
        self._hub.remove(key, wake)
        if not self._hub.has(key):
            self._newest.pop(key, None)


class _Watch(Subscription):
    def __init__(self, wakeups: EmbeddedWakeups, key: bytes, wake: Wake) -> None:
        self._wakeups, self._key, self._wake = wakeups, key, wake

    async def close(self) -> None:
        self._wakeups.unwatch(self._key, self._wake)
