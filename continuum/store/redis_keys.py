"""Where each piece of Redis state lives, so every script touches one hash slot.

Each mailbox's keys carry the recipient's `{hex}` hash tag: on Redis Cluster
they share a slot and one Lua script can change them together.  The replay
key is tagged by sender and the expiry index has its own tag, so no script
ever needs keys from two slots.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto import PublicKey


def entry_field(sender: PublicKey, msg_id: bytes, nonce: str) -> str:
    """Names one stored copy within a mailbox.

    The accept call's nonce makes it unique even if (sender, msg_id) is
    accepted again after its replay window, while a retry of the same call
    (same nonce) finds and reuses the copy it already appended.
    """
    return f"{sender.raw.hex()}:{msg_id.hex()}:{nonce}"


@dataclass(frozen=True)
class MailboxKeys:
    """The keys of one recipient's mailbox, all in the slot of `{recipient hex}`."""

    recipient_hex: str
    log: str        # stream of entries; stream ids are the delivery tags
    size: str       # total bytes of the entries (the stream length counts messages)
    ids: str        # entry_field -> stream id, to remove an entry by name
    channel: str    # pub/sub channel woken on every append

    @property
    def slot_keys(self) -> list[str]:
        return [self.log, self.size, self.ids]

    def index_member(self, field: str) -> str:
        """The entry's member in the global expiry index: enough to find it again."""
        return f"{self.recipient_hex}:{field}"


class KeySpace:
    """Key names under one prefix, so several deployments or tests can share a Redis."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.expiry_index = f"{prefix}{{expiry}}"

    def mailbox(self, recipient: PublicKey | str) -> MailboxKeys:
        hexkey = recipient if isinstance(recipient, str) else recipient.raw.hex()
        base = f"{self.prefix}{{{hexkey}}}"
        return MailboxKeys(hexkey, f"{base}:log", f"{base}:size", f"{base}:ids", f"{base}:wake")

    def seen(self, sender: PublicKey, msg_id: bytes) -> str:
        return f"{self.prefix}seen:{{{sender.raw.hex()}}}:{msg_id.hex()}"

    def rate(self, sender: PublicKey) -> str:
        return f"{self.prefix}rate:{{{sender.raw.hex()}}}"

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
