"""Mailbox stores and the URL that picks one: `memory`, `sqlite://:memory:`,
`sqlite:///path`, `redis://…`."""

from __future__ import annotations

from .base import (ExpiredMessage, MailboxLimits, MailboxStore, NewEntry, StoredMessage,
                   Subscription, Wake)


def open_store(url: str) -> MailboxStore:
    """Build the store a settings URL names; ValueError names what was not understood."""
    if url in ("memory", "memory://"):
        from .memory import MemoryStore
        return MemoryStore()
    if url == "sqlite://:memory:":
        from .sqlite import SqliteStore
        return SqliteStore(":memory:")
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore
        return SqliteStore(url[len("sqlite:///"):])  # sqlite:////abs or sqlite:///relative
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore
        return RedisStore.from_url(url)
    raise ValueError(f"unknown store {url!r}: use 'memory', 'sqlite://:memory:',"
                     " 'sqlite:///path' or 'redis://host:port'")


__all__ = ["ExpiredMessage", "MailboxLimits", "MailboxStore", "NewEntry", "StoredMessage",
           "Subscription", "Wake", "open_store"]
