"""Streams through the relay (SPEC §16): live, end-to-end encrypted byte streams between
two devices, never stored.

- `table`: the rules of one connection's streams, pure (who may open what, credits,
  bounds, endings), driven by `RelayProtocol`;
- `router`: carries frames between the two halves of each stream, in this process or
  to another replica (the path its store gives: `MailboxStore.stream_bus`);
- `redis_bus`: the path between replicas that share a Redis store (pub/sub).
"""
