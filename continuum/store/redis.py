"""Mailbox store in Redis, shared by every relay replica (the scale-out store).

Layout (see redis_keys): per recipient a stream (ids are the delivery tags),
a byte counter and a field->id hash, all under the recipient's `{hex}` hash
tag; a replay key per (sender, msg_id) that Redis expires itself (PXAT); a
token bucket per sender; one expiry index (sorted set) for all mailboxes.

Standalone Redis: `accept` is one Lua script over all recipients, so it
stores everything or nothing.  Redis Cluster (`?cluster=true`): mailboxes of
different recipients live in different slots, so no single script may touch
them; `accept` then claims the replay key (SET NX), checks every mailbox's
room, appends per recipient (one slot each) and rolls back what it appended
if a mailbox filled up in between.  Refusal still leaves nothing stored.

Exactly-once expiry in both modes: a replica claims due index members by
moving them to a lease time, then removes each entry with a script in its
mailbox's slot; only the call that actually removes the entry gets it back,
so two replicas racing (or a claim that outlived its lease) never both
report it.  Every Redis failure surfaces as StoreUnavailableError.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proto import Envelope, Kind, PublicKey
from proto.errors import MailboxFullError, ReplayError, StoreUnavailableError

from . import redis_scripts as lua
from .base import ExpiredMessage, MailboxLimits, MailboxStore, StoredMessage, Subscription
from .redis_keys import KeySpace, MailboxKeys, entry_field
from .redis_wakeups import PubSubWakeups

T = TypeVar("T")

DEFAULT_PREFIX = "continuum:"
# A claimed expiry is retried by another replica after this long, if the
# claimer died before removing it.
CLAIM_LEASE_MS = 30_000
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_TIMEOUTS = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}


class _RedisSubscription(Subscription):
    def __init__(self, wakeups: PubSubWakeups, recipient: bytes,
                 wake: Callable[[], None]) -> None:
        self._wakeups, self._recipient, self._wake = wakeups, recipient, wake

    async def close(self) -> None:
        await self._wakeups.remove(self._recipient, self._wake)


class RedisStore(MailboxStore):
    """`client` serves the data; `pubsub_client` (a plain connection) carries wake-ups."""

    def __init__(self, client: Redis | RedisCluster, pubsub_client: Redis, *,
                 prefix: str = DEFAULT_PREFIX, cluster: bool = False) -> None:
        self._client = client
        self._pubsub_client = pubsub_client
        self._keys = KeySpace(prefix)
        self._cluster = cluster
        self._wakeups = PubSubWakeups(pubsub_client, self._keys)
        self._accept_all = client.register_script(lua.ACCEPT_ALL)
        self._append_one = client.register_script(lua.APPEND_ONE)
        self._remove_by_field = client.register_script(lua.REMOVE_BY_FIELD)
        self._ack = client.register_script(lua.ACK)
        self._claim_due = client.register_script(lua.CLAIM_DUE)
        self._take_token = client.register_script(lua.TAKE_TOKEN)

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """`redis://host:port/db`, plus `prefix=` (key prefix) and `cluster=true` query options.

        No connection is made here: the first command connects, so a relay
        starts (and reports 503 on /healthz) while Redis is still coming up.
        """
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        prefix = query.pop("prefix", DEFAULT_PREFIX)
        cluster = query.pop("cluster", "false").lower() in ("1", "true", "yes")
        plain_url = urlunsplit(parts._replace(query=urlencode(query)))
        options: dict[str, Any] = {name: value for name, value in _TIMEOUTS.items()
                                   if name not in query}
        # A reply lost to a broken socket is retried on a new one: every script
        # is safe to run twice (accept carries a nonce, appends are by field).
        options["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), 3)
        options["retry_on_error"] = [RedisConnectionError, RedisTimeoutError]
        pubsub_client = Redis.from_url(plain_url, **options)
        if cluster:
            return cls(RedisCluster.from_url(plain_url, **options), pubsub_client,
                       prefix=prefix, cluster=True)
        return cls(Redis.from_url(plain_url, **options), pubsub_client, prefix=prefix)

    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits) -> None:
        recipients = [self._keys.mailbox(key) for key in envelope.recipient_keys]
        nonce = os.urandom(16).hex()
        field = entry_field(envelope.sender, envelope.msg_id, nonce)
        if self._cluster:
            await self._guard(self._accept_per_slot(envelope, recipients, field, nonce,
                                                    replay_until_ms, limits))
        else:
            await self._guard(self._accept_in_one_script(envelope, recipients, field, nonce,
                                                         replay_until_ms, limits))
        for mailbox in recipients:
            await self._guard(self._client.publish(mailbox.channel, b""))

    async def _accept_in_one_script(self, envelope: Envelope, recipients: list[MailboxKeys],
                                    field: str, nonce: str, replay_until_ms: int,
                                    limits: MailboxLimits) -> None:
        keys = [self._keys.seen(envelope.sender, envelope.msg_id), self._keys.expiry_index]
        for mailbox in recipients:
            keys += mailbox.slot_keys
        args: list[Any] = [nonce, replay_until_ms, *_entry_args(envelope),
                           field, limits.max_messages, limits.max_bytes]
        args += [mailbox.index_member(field) for mailbox in recipients]
        outcome = await self._accept_all(keys=keys, args=args)
        if outcome[0] == 1:
            raise ReplayError("message id already used by this sender")
        if outcome[0] == 2:
            raise _full(recipients[outcome[1] - 1])

    async def _accept_per_slot(self, envelope: Envelope, recipients: list[MailboxKeys],
                               field: str, nonce: str, replay_until_ms: int,
                               limits: MailboxLimits) -> None:
        """Cluster: replay key, room check, appends, and a rollback if a mailbox filled meanwhile."""
        seen = self._keys.seen(envelope.sender, envelope.msg_id)
        if not await self._client.set(seen, nonce, nx=True, pxat=replay_until_ms):
            if await self._client.get(seen) != nonce.encode():  # else: our retried call
                raise ReplayError("message id already used by this sender")
        members = {mailbox.index_member(field): envelope.expires_at_ms for mailbox in recipients}
        try:
            for mailbox in recipients:
                if not await self._has_room(mailbox, len(envelope.raw), limits):
                    raise _full(mailbox)
            await self._client.zadd(self._keys.expiry_index, members)
            for appended, mailbox in enumerate(recipients):
                tag = await self._append_one(
                    keys=mailbox.slot_keys,
                    args=[field, *_entry_args(envelope), limits.max_messages, limits.max_bytes])
                if tag is None:
                    for done in recipients[:appended]:
                        await self._remove_by_field(keys=done.slot_keys, args=[field])
                    raise _full(mailbox)
        except MailboxFullError:
            await self._client.zrem(self._keys.expiry_index, *members)
            await self._client.delete(seen)
            raise

    async def _has_room(self, mailbox: MailboxKeys, size: int, limits: MailboxLimits) -> bool:
        messages = await self._client.xlen(mailbox.log)
        total = int(await self._client.get(mailbox.size) or 0)
        return messages + 1 <= limits.max_messages and total + size <= limits.max_bytes

    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        start = f"({after}" if after is not None and _STREAM_ID.match(after) else "-"
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await self._guard(
            self._client.xrange(self._keys.mailbox(recipient).log, min=start, max="+",
                                count=limit)))
        return [StoredMessage(tag.decode(), fields[b"r"]) for tag, fields in entries]

    async def ack(self, recipient: PublicKey, tag: str) -> bool:
        if not _STREAM_ID.match(tag):
            return False
        mailbox = self._keys.mailbox(recipient)
        field = await self._guard(self._ack(keys=mailbox.slot_keys, args=[tag]))
        if field is None:
            return False
        await self._guard(self._client.zrem(self._keys.expiry_index,
                                            mailbox.index_member(field.decode())))
        return True

    async def take_expired(self, now_ms: int, limit: int) -> list[ExpiredMessage]:
        due: list[bytes] = await self._guard(self._claim_due(
            keys=[self._keys.expiry_index], args=[now_ms, limit, now_ms + CLAIM_LEASE_MS]))
        expired: list[ExpiredMessage] = []
        for member in due:
            recipient_hex, field = member.decode().split(":", 1)
            mailbox = self._keys.mailbox(recipient_hex)
            entry = await self._guard(self._remove_by_field(keys=mailbox.slot_keys,
                                                             args=[field]))
            if entry is not None:
                sender, msg_id, kind = entry
                expired.append(ExpiredMessage(PublicKey(bytes.fromhex(recipient_hex)),
                                              PublicKey(sender), msg_id, Kind(int(kind))))
        if due:
            await self._guard(self._client.zrem(self._keys.expiry_index, *due))
        return expired

    async def allow(self, sender: PublicKey, now_ms: int, rate_per_s: float,
                    burst: int) -> bool:
        allowed = await self._guard(self._take_token(keys=[self._keys.rate(sender)],
                                                     args=[now_ms, rate_per_s, burst]))
        return allowed == 1

    async def depth(self, recipient: PublicKey) -> int:
        return int(await self._guard(self._client.xlen(self._keys.mailbox(recipient).log)))

    async def subscribe(self, recipient: PublicKey,
                        wake: Callable[[], None]) -> Subscription:
        await self._wakeups.add(recipient.raw, wake)
        return _RedisSubscription(self._wakeups, recipient.raw, wake)

    async def ping(self) -> None:
        await self._guard(self._client.ping())

    async def close(self) -> None:
        await self._wakeups.close()
        await self._client.aclose()
        await self._pubsub_client.aclose()

    @staticmethod
    async def _guard(call: Awaitable[T]) -> T:
        """Await one Redis step, turning any Redis or socket failure into StoreUnavailableError."""
        try:
            return await call
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailableError(f"mailbox store unreachable: {exc}") from None


def _entry_args(envelope: Envelope) -> list[Any]:
    """raw, sender, msg_id, kind, expires_at_ms: what a mailbox entry records."""
    return [envelope.raw, envelope.sender.raw, envelope.msg_id, int(envelope.kind),
            envelope.expires_at_ms]


def _full(mailbox: MailboxKeys) -> MailboxFullError:
    return MailboxFullError(f"mailbox of {PublicKey(bytes.fromhex(mailbox.recipient_hex)).text}"
                            " is full")
