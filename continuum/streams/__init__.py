"""Streams through the relay (SPEC §16): live, end-to-end encrypted byte streams between
two devices, never stored.

- `table`: the rules of one connection's streams, pure (who may open what, credits,
  bounds, endings), driven by `RelayProtocol`;
- `router`: carries frames between the two halves of each stream, in this process or
  to another replica;
- `redis_bus`: the path between replicas that share a Redis store (pub/sub).
"""

from __future__ import annotations

from ..store import MailboxStore
from .router import RemoteStreams


def stream_bus(store: MailboxStore) -> RemoteStreams | None:
    """The path to other replicas on this store: Redis pub/sub for the Redis store; none
    for the embedded store, whose relay is the only one."""
    from ..store.redis import RedisStore
    if isinstance(store, RedisStore):
        from .redis_bus import RedisStreamBus
        return RedisStreamBus.for_store(store)
    return None
