"""Where each piece of Redis state lives, so every script touches one hash slot.

Three kinds of slot, by hash tag:

- a recipient's `{recipient hex}`: its mailbox (stream, byte count, ids, wake channel,
  and the stamp of the newest access list its mail was moved under);
- a sender's `{sender hex}`: its replay keys (one per recipient), rate bucket, the bodies of the
  envelopes it sent, and the bytes those bodies take (its budget);
- the store-wide `{expiry}`: the expiry index and the bytes all bodies take.

(And one key of its own: the highest access-list stamp a relay applied.)

A body record lives in its sender's slot, once, whatever the number of recipients:
one message touches one sender slot, one store-wide slot and a slot per
recipient, and no script ever needs keys from two of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto import PublicKey
from proto.access import Stamp

_BODY_MEMBER = "body:"


def entry_field(sender: PublicKey, msg_id: bytes, nonce: str) -> str:
    """Names one accepted message: its body, and its entry in each recipient's mailbox.

    The accept call's nonce makes it unique even if (sender, msg_id) is
    accepted again after its replay window, while a retry of the same call
    (same nonce) finds and reuses what it already stored.
    """
    return f"{sender.raw.hex()}:{msg_id.hex()}:{nonce}"


def body_member(field: str, size: int) -> str:
    """The body's member in the expiry index; it carries the size the store budget counts,
    so the budget can be released even after the body itself is gone."""
    return f"{_BODY_MEMBER}{size}:{field}"


def parse_body_member(member: str) -> str | None:
    """The field of a body member, or None for a mailbox entry's member."""
    if not member.startswith(_BODY_MEMBER):
        return None
    return member[len(_BODY_MEMBER):].split(":", 1)[1]


@dataclass(frozen=True)
class MailboxKeys:
    """The keys of one recipient's mailbox, all in the slot of `{recipient hex}`."""

    recipient_hex: str
    log: str        # stream of entries; stream ids are the delivery tags
    size: str       # total bytes of the entries (the stream length counts messages)
    ids: str        # entry_field -> stream id, to remove an entry by name
    channel: str    # pub/sub channel woken on every append
    moves: str      # the newest access-list stamp a move of this mailbox ran under (SPEC §19)

    @property
    def slot_keys(self) -> list[str]:
        return [self.log, self.size, self.ids]

    def index_member(self, field: str) -> str:
        """The entry's member in the global expiry index: enough to find it again."""
        return f"{self.recipient_hex}:{field}"


def floor_text(stamp: Stamp) -> str:
    """A stamp as the floor key holds it: both numbers zero-padded to 20 digits, so Lua
    compares stamps as strings, exactly (its numbers are doubles; an epoch need not fit)."""
    return f"{stamp.epoch:020d}.{stamp.version:020d}"


def parse_floor_text(text: bytes | None) -> Stamp:
    if not text:
        return Stamp(0, 0)
    epoch, version = text.split(b".")
    return Stamp(int(epoch), int(version))


class KeySpace:
    """Key names under one prefix, so several deployments or tests can share a Redis."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.expiry_index = f"{prefix}{{expiry}}"
        self.stored_total = f"{prefix}{{expiry}}:stored"  # bytes of all bodies
        self.probe = f"{prefix}probe"
        self.access_floor = f"{prefix}access-floor"  # the highest access-list stamp applied

    @property
    def store_keys(self) -> list[str]:
        """The store-wide slot's keys, as scripts take them: index, total bytes."""
        return [self.expiry_index, self.stored_total]

    def mailbox(self, recipient: PublicKey | str) -> MailboxKeys:
        hexkey = recipient if isinstance(recipient, str) else recipient.raw.hex()
        base = f"{self.prefix}{{{hexkey}}}"
        return MailboxKeys(hexkey, f"{base}:log", f"{base}:size", f"{base}:ids", f"{base}:wake",
                           f"{base}:moves")

    def seen(self, sender: PublicKey, msg_id: bytes, recipient_hex: str) -> str:
        """The replay key of (sender, msg_id) for one recipient: while it lives, this store
        holds that recipient's copy or has consumed it (acked or expired it here).

        Per recipient, not per message, because a copy can leave this store on its
        own: when its recipient's home region moves, the copy and this key go to the
        new home together (`RedisStore.adopt`, `RedisStore.move_out`), so a sender's
        retry finds the key wherever the copy is.  In the sender's slot, next to the
        body, so one script claims every recipient's key of a message."""
        return f"{self.prefix}seen:{{{sender.raw.hex()}}}:{msg_id.hex()}:{recipient_hex}"

    def rate(self, sender: PublicKey) -> str:
        return f"{self.prefix}rate:{{{sender.raw.hex()}}}"

    def body(self, field: str) -> str:
        """A hash in the sender's slot: `n` the envelope's size, `r` the envelope when it
        has several recipients (one recipient's entry carries it inline), and one
        field per recipient whose entry still refers to it."""
        sender_hex, rest = field.split(":", 1)
        return f"{self.prefix}body:{{{sender_hex}}}:{rest}"

    def stored(self, sender_hex: str) -> str:
        """Bytes of the sender's bodies: what its budget counts."""
        return f"{self.prefix}stored:{{{sender_hex}}}"

    def sender_keys(self, field: str) -> list[str]:
        """The sender slot's keys a body's scripts take: body, the sender's stored bytes."""
        return [self.body(field), self.stored(field.split(":", 1)[0])]

    def recipient_of_channel(self, channel: bytes) -> bytes | None:
        """The recipient key a wake channel belongs to, or None for a foreign channel."""
        text = channel.decode("ascii", "replace")
        start, end = len(self.prefix) + 1, text.find("}")
        if not text.startswith(self.prefix + "{") or end < start:
            return None
        try:
            return bytes.fromhex(text[start:end])
        except ValueError:
            return None
