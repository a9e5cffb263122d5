"""Mailbox store in Redis, shared by every relay replica (the scale-out store).

Layout (see redis_keys): per recipient a stream of entries (ids are the
delivery tags), a byte counter and a field->id hash, under the recipient's
`{hex}` hash tag.  Each message has a body record in the sender's `{hex}`
slot (its size, one reference per recipient whose entry still points at it),
next to the sender's replay keys (one per recipient of each message), rate
bucket and stored-bytes counter.  The
envelope itself is stored once: in the body record when it has several
recipients, inline in the entry when it has one (the common case, which
then fetches in one round trip).  The store-wide `{expiry}` slot holds the
expiry index (one member per entry, one per body) and the bytes of all
bodies.  A fetch reads the stream, then any shared bodies in a second,
pipelined step.

Why the sender's slot: one body per message, wherever its recipients are.
Storing it in each recipient's slot (or once per slot involved) would keep
fetch to one step, but 64 recipients are 64 slots on a cluster, so the
amplification this layout removes would come back there.  The price is a
second round trip per fetched batch, and references that live in another
slot than the entries: removing an entry and dropping its reference are two
steps.  If a relay dies between them the body outlives its last entry; its
own index member, due BODY_GRACE_MS after its entries, then drops it and
releases its bytes, so a leak lasts at most the message's TTL.

Budgets: a body counts once against its sender's budget (counter in the
sender's slot, changed in the same script as the body) and the store's
(counter in the `{expiry}` slot, changed with the body's index member, which
carries the size, so each release happens exactly once).

Standalone Redis: `accept` is one Lua script over every key of the message,
so it stores everything or nothing, and publishes the wake-ups; `ack` is one
script too (entry, body reference, index).  The hot calls (allow, accept,
fetch, ack, depth) go through `redis_batch`: every session's calls of one
loop turn in one pipeline, in issue order.  Redis Cluster (`?cluster=true`): no
script may touch two slots, so `accept` checks every mailbox's room, claims the
replay keys, the sender's budget and stores the body (sender slot), reserves
the store budget and indexes the message (`{expiry}` slot), then appends per
recipient; a refusal at any step undoes the steps before it, so refusal
still leaves nothing stored.

Durability (standalone only, see redis_durability): with `min_replicas` or
`wait_aof` the accept script and a WAIT/WAITAOF go down one connection in one
pipeline, and accept returns only once the wait is met.  The same holds for a
REPLAY: a device takes REPLAY for "already stored", so the script that finds
the replay key rewrites it unchanged (a write on this connection), and the
REPLAY is raised only after the wait covering it succeeded; replication is
ordered, so that wait covers the original accept too.  Until then the device
hears STORE_UNAVAILABLE and retries.

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
from collections.abc import Awaitable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proto import Envelope, Origin, PublicKey
from proto.access import Stamp
from proto.errors import MailboxFullError, QuotaExceededError, ReplayError, StoreUnavailableError

from . import redis_scripts as lua
from .base import (ExpiredMessage, MailboxLimits, MailboxStore, StoredMessage, Subscription,
                   Wake)
from .redis_batch import Command, CommandBatcher
from .redis_durability import Durability
from .redis_keys import (KeySpace, MailboxKeys, body_member, entry_field, floor_text,
                         parse_body_member, parse_floor_text)
from .redis_wakeups import PubSubWakeups

if TYPE_CHECKING:
    from ..streams.redis_bus import RedisStreamBus

T = TypeVar("T")

DEFAULT_PREFIX = "continuum:"
# A claimed expiry is retried by another replica after this long, if the
# claimer died before removing it.
CLAIM_LEASE_MS = 30_000
# ping() writes this key; it expires by itself.
_PROBE_TTL_MS = 10_000
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_MAX_STREAM_ID_PART = 2**64 - 1
_TIMEOUTS = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
# Connections to one Redis (`?max_connections=` in the URL to change it).  Calls beyond
# them wait for one to be free (up to the socket timeout) rather than fail: redis-py's
# default pool raised "Too many connections", a store outage to the device, as soon as
# more than 100 calls were in flight at once (many devices, or a roaming device's ACKs).
DEFAULT_MAX_CONNECTIONS = 100
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


class MoveStep(Enum):
    """What one step of moving a copy between region stores did (`adopt`, `move_out`)."""

    DONE = "done"                # adopted here now / removed from here now
    ALREADY = "already"          # held or consumed here already / gone from here already
    SUPERSEDED = "superseded"    # a move under a newer access list touched this mailbox


class _RedisSubscription(Subscription):
    def __init__(self, wakeups: PubSubWakeups, recipient: bytes,
                 wake: Wake) -> None:
        self._wakeups, self._recipient, self._wake = wakeups, recipient, wake

    async def close(self) -> None:
        await self._wakeups.remove(self._recipient, self._wake)


class RedisStore(MailboxStore):
    """`client` serves the data; `pubsub_client` (a plain connection) carries wake-ups."""

    def __init__(self, client: Redis | RedisCluster, pubsub_client: Redis, *,
                 prefix: str = DEFAULT_PREFIX, cluster: bool = False,
                 durability: Durability = Durability()) -> None:
        if cluster and durability.waits:
            raise ValueError("min_replicas and wait_aof need a standalone Redis (with replicas),"
                             " not cluster=true: WAIT covers one node's writes")
        self._client = client
        self._pubsub_client = pubsub_client
        self._keys = KeySpace(prefix)
        self._cluster = cluster
        self._durability = durability
        self._wakeups = PubSubWakeups(pubsub_client, self._keys)
        script = client.register_script
        self._accept_all = script(lua.ACCEPT_ALL)
        self._reserve, self._claim, self._unclaim = (
            script(lua.RESERVE), script(lua.CLAIM), script(lua.UNCLAIM))
        self._append_one = script(lua.APPEND_ONE)
        self._remove_by_field = script(lua.REMOVE_BY_FIELD)
        self._ack, self._ack_all = script(lua.ACK), script(lua.ACK_ALL)
        self._move_stamp = script(lua.MOVE_STAMP)
        self._move_out, self._move_out_all = script(lua.MOVE_OUT), script(lua.MOVE_OUT_ALL)
        self._unref = script(lua.UNREF)
        self._drop_body, self._forget = script(lua.DROP_BODY), script(lua.FORGET)
        self._claim_due = script(lua.CLAIM_DUE)
        self._take_token = script(lua.TAKE_TOKEN)
        self._raise_floor = script(lua.RAISE_FLOOR)
        # Standalone: the hot calls (allow, accept, fetch, ACK, depth) of every session go out
        # together, one pipeline per loop turn (redis_batch).  A cluster spreads keys over
        # nodes, so each call there goes to its slot's node on its own.
        self._batch = None if cluster else CommandBatcher(
            cast(Redis, client), [lua.ACCEPT_ALL, lua.ACK_ALL, lua.MOVE_OUT_ALL, lua.TAKE_TOKEN])

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """`redis://host:port/db`, plus query options: `prefix=` (key prefix),
        `cluster=true`, the durability options of redis_durability, and redis-py's own.

        No connection is made here: the first command connects, so a relay
        starts (and reports 503 on /healthz) while Redis is still coming up.
        ValueError names an option that is not understood.
        """
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        prefix = query.pop("prefix", DEFAULT_PREFIX)
        cluster = query.pop("cluster", "false").lower() in ("1", "true", "yes")
        durability = Durability.from_query(query)
        plain_url = urlunsplit(parts._replace(query=urlencode(query)))
        options: dict[str, Any] = {name: value for name, value in _TIMEOUTS.items()
                                   if name not in query}
        # A reply lost to a broken socket is retried on a new one: every script
        # is safe to run twice (accept carries a nonce, appends are by field).
        options["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), 3)
        options["retry_on_error"] = [RedisConnectionError, RedisTimeoutError]
        try:
            pubsub_client = Redis.from_url(plain_url, **options)
            # Builds a connection object without connecting: an option redis-py does
            # not know fails here, at start, not as a TypeError on every first use.
            pubsub_client.connection_pool.make_connection()
            client = (RedisCluster.from_url(plain_url, **options) if cluster
                      else Redis.from_pool(BlockingConnectionPool.from_url(
                          plain_url, **{"max_connections": DEFAULT_MAX_CONNECTIONS,
                                        "timeout": _TIMEOUTS["socket_timeout"], **options})))
        except TypeError as exc:
            raise ValueError(f"store URL option not understood: {exc}") from None
        return cls(client, pubsub_client, prefix=prefix, cluster=cluster, durability=durability)

    async def accept(self, envelope: Envelope, *, replay_until_ms: int,
                     limits: MailboxLimits,
                     recipients: Sequence[PublicKey] | None = None) -> None:
        await self._store(envelope, recipients or envelope.recipient_keys, replay_until_ms,
                          limits)

    async def adopt(self, recipient: PublicKey, envelope: Envelope, stamp: Stamp, *,
                    limits: MailboxLimits) -> MoveStep:
        """Append `envelope` to `recipient`'s mailbox here, a copy moving in from its former
        home region (SPEC §19), unless this store holds or consumed that recipient's copy.

        The copy's replay key (redis_keys.KeySpace.seen) comes with it, written and
        checked exactly as `accept` does, so a copy is stored at most once per mailbox
        across moves and a sender's retries alike: a mover that dies between adopting
        and `move_out` and runs again appends nothing twice, even after the device
        acknowledged the first copy, and a sender's retry finds the copy's key here.
        It lives until the envelope expires (plus a lease): a retry is refused as
        expired after that, and the former copy is no longer moved.  `stamp` is the
        access list the mover acts on: SUPERSEDED, and nothing stored, when a move under
        a newer one touched this mailbox (see `move_out`).  Counted in the budgets like
        any message; `limits` are the caller's to choose.
        """
        until_ms = envelope.expires_at_ms + CLAIM_LEASE_MS
        moves = self._keys.mailbox(recipient).moves
        if not await self._guard(self._move_stamp(keys=[moves],
                                                  args=[floor_text(stamp), until_ms])):
            return MoveStep.SUPERSEDED
        try:
            await self._store(envelope, (recipient,), until_ms, limits)
        except ReplayError:
            return MoveStep.ALREADY
        return MoveStep.DONE

    async def move_out(self, recipient: PublicKey, tag: str, envelope: Envelope,
                       stamp: Stamp) -> MoveStep:
        """Remove entry `tag` (`envelope`) from `recipient`'s mailbox here, its former home,
        once its new home's `adopt` took it or showed it held it; its replay key goes with
        it, so no key here claims a copy this store no longer holds (a later move back
        here then appends it, rather than finding the key and losing it).

        `stamp` orders movers on different access lists: each step of a move raises the
        mailbox's move stamp in the store it touches, and a step under an older stamp
        than the store's does nothing (SUPERSEDED).  A mover under a newer list raises
        its new home's stamp (adopt) before it removes anything from its former home, so
        a mover still on the older list, moving the other way, cannot also remove its
        copy from there: of two opposite moves at most one removes, and the copy the
        other would have taken stays.  A standalone Redis does it in one script; a
        cluster drops the replay key first, then the entry: a failure between the two
        may later cost a duplicate, never a loss.
        """
        if not _is_stream_id(tag):
            return MoveStep.ALREADY
        mailbox = self._keys.mailbox(recipient)
        seen = self._keys.seen(envelope.sender, envelope.msg_id, mailbox.recipient_hex)
        stamp_args = [floor_text(stamp), envelope.expires_at_ms + CLAIM_LEASE_MS]
        if self._batch is not None:
            outcome = await self._one(_evalsha(
                self._move_out_all,
                [*mailbox.slot_keys, mailbox.moves, *self._keys.store_keys, seen],
                [tag, mailbox.recipient_hex, self._keys.prefix, *stamp_args]))
            return _MOVE_OUTCOMES[int(outcome)]
        await self._guard(self._client.delete(seen))
        outcome, *removed = await self._guard(self._move_out(
            keys=[*mailbox.slot_keys, mailbox.moves], args=[tag, *stamp_args]))
        if outcome == 1:
            await self._release(mailbox, removed[0].decode(), removed[1])
        return _MOVE_OUTCOMES[int(outcome)]

    async def _store(self, envelope: Envelope, recipient_keys: Sequence[PublicKey],
                     replay_until_ms: int, limits: MailboxLimits) -> None:
        """Store `envelope` for those of `recipient_keys` whose replay key is not taken;
        wake their devices.  ReplayError if any was taken (the others are stored)."""
        recipients = [self._keys.mailbox(key) for key in recipient_keys]
        nonce = os.urandom(16).hex()
        field = entry_field(envelope.sender, envelope.msg_id, nonce)
        if self._cluster:
            stored, replayed = await self._guard(self._accept_per_slot(
                envelope, recipients, field, nonce, replay_until_ms, limits))
            for mailbox in stored:
                await self._guard(self._client.publish(mailbox.channel, b""))
            if replayed:
                raise ReplayError("message id already used by this sender")
        else:
            await self._guard(self._accept_in_one_script(envelope, recipients, field,
                                                         nonce, replay_until_ms, limits))

    def _seen_keys(self, envelope: Envelope, recipients: list[MailboxKeys]) -> list[str]:
        return [self._keys.seen(envelope.sender, envelope.msg_id, mailbox.recipient_hex)
                for mailbox in recipients]

    async def _accept_in_one_script(self, envelope: Envelope,
                                    recipients: list[MailboxKeys], field: str, nonce: str,
                                    replay_until_ms: int, limits: MailboxLimits) -> None:
        """The accept script (which also publishes the wake-ups), then the durability wait
        if any, back to back in one batch: one round trip, which across regions is one WAN
        round trip.

        WAIT counts only the writes of the connection it is sent on: the batcher writes a
        call's commands back to back down its one connection.  If the connection breaks,
        the batcher writes the call again, script and wait together, on a new one, where
        the script writes again (scripts are safe to repeat), so the wait never vouches
        for writes it did not follow.
        """
        size = len(envelope.raw)
        keys = [*self._keys.sender_keys(field), *self._keys.store_keys]
        for mailbox, seen in zip(recipients, self._seen_keys(envelope, recipients)):
            keys += [seen, *mailbox.slot_keys]
        args: list[Any] = [nonce, replay_until_ms, envelope.raw, envelope.sender.raw,
                           envelope.msg_id, int(envelope.origin), envelope.expires_at_ms, field,
                           limits.max_messages, limits.max_bytes, limits.sender_max_bytes,
                           limits.store_max_bytes, body_member(field, size)]
        for mailbox in recipients:
            args += [mailbox.recipient_hex, mailbox.index_member(field), mailbox.channel]
        accepting = _evalsha(self._accept_all, keys, args)
        if self._durability.waits:
            replies = await self._batched(accepting, self._durability.command())
            outcome = _answer(replies[0])
            if outcome[0] in (0, 1):  # stored, or stored before: either way, durable?
                self._durability.check(replies[1])
        else:
            outcome = await self._one(accepting)
        if outcome[0] == 1:
            raise ReplayError("message id already used by this sender")
        if outcome[0] == 2:
            raise _full(recipients[outcome[1] - 1])
        if outcome[0] == 3:
            raise _over_sender_budget(envelope.sender, limits)
        if outcome[0] == 4:
            raise _over_store_budget(limits)

    async def _accept_per_slot(self, envelope: Envelope, recipients: list[MailboxKeys],
                               field: str, nonce: str, replay_until_ms: int,
                               limits: MailboxLimits) -> tuple[list[MailboxKeys], bool]:
        """Cluster: room check, replay keys and body, store budget and index, appends;
        each refusal undoes the steps before it.  The mailboxes stored to, and whether
        some recipient's copy was remembered already (a replay)."""
        size = len(envelope.raw)
        for mailbox in recipients:
            if not await self._has_room(mailbox, size, limits):
                raise _full(mailbox)
        seen = self._seen_keys(envelope, recipients)
        sender_keys = self._keys.sender_keys(field)
        status, *claimed = await self._claim(keys=[*sender_keys, *seen], args=[
            nonce, replay_until_ms, envelope.raw, limits.sender_max_bytes,
            *(mailbox.recipient_hex for mailbox in recipients)])
        if status == 3:
            raise _over_sender_budget(envelope.sender, limits)
        fresh = [recipients[index - 1] for index in claimed]
        if not fresh:
            return [], status == 1
        members = [mailbox.index_member(field) for mailbox in fresh]
        own_member = body_member(field, size)
        try:
            if not await self._reserve(keys=self._keys.store_keys, args=[
                    own_member, size, limits.store_max_bytes, envelope.expires_at_ms,
                    *members]):
                raise _over_store_budget(limits)
            try:
                await self._append_each(envelope, fresh, field, limits)
            except MailboxFullError:
                await self._forget(keys=self._keys.store_keys,
                                   args=[len(members), *members, own_member])
                raise
        except (QuotaExceededError, MailboxFullError):
            await self._unclaim(keys=[*sender_keys, *(seen[index - 1] for index in claimed)],
                                args=[nonce])
            raise
        return fresh, status == 1

    async def _append_each(self, envelope: Envelope, recipients: list[MailboxKeys], field: str,
                           limits: MailboxLimits) -> None:
        """Append per recipient; if a mailbox filled meanwhile, remove the entries appended."""
        inline = [envelope.raw] if len(recipients) == 1 else []
        for appended, mailbox in enumerate(recipients):
            tag = await self._append_one(keys=mailbox.slot_keys, args=[
                field, len(envelope.raw), envelope.sender.raw, envelope.msg_id,
                int(envelope.origin), limits.max_messages, limits.max_bytes, *inline])
            if tag is None:
                for done in recipients[:appended]:
                    await self._remove_by_field(keys=done.slot_keys, args=[field])
                raise _full(mailbox)

    async def _has_room(self, mailbox: MailboxKeys, size: int, limits: MailboxLimits) -> bool:
        messages = await self._client.xlen(mailbox.log)
        total = int(await self._client.get(mailbox.size) or 0)
        return messages + 1 <= limits.max_messages and total + size <= limits.max_bytes

    async def fetch(self, recipient: PublicKey, after: str | None,
                    limit: int) -> list[StoredMessage]:
        start = f"({after}" if after is not None and _is_stream_id(after) else "-"
        log = self._keys.mailbox(recipient).log
        found: list[StoredMessage] = []
        while len(found) < limit:
            wanted = limit - len(found)
            entries = cast(_Entries, await self._xrange(log, start, wanted))
            bodies = await self._bodies(entries)
            found += [StoredMessage(tag.decode(), raw)
                      for (tag, _fields), raw in zip(entries, bodies) if raw is not None]
            if len(entries) < wanted or None not in bodies:
                break
            # An entry whose body already expired is skipped, and the batch filled from further on.
            start = f"({entries[-1][0].decode()}"
        return found

    async def _xrange(self, log: str, start: str, count: int) -> _Entries:
        if self._batch is None:
            return cast(_Entries, await self._guard(
                self._client.xrange(log, min=start, max="+", count=count)))
        return cast(_Entries, await self._one(("XRANGE", log, start, "+", "COUNT", count)))

    async def _bodies(self, entries: _Entries) -> list[bytes | None]:
        """Each entry's envelope, in one pipelined round trip; None where the body is gone."""
        shared = [index for index, (_tag, fields) in enumerate(entries) if b"r" not in fields]
        raws: list[bytes | None] = [fields.get(b"r") for _tag, fields in entries]
        if not shared:
            return raws
        reads = [("HGET", self._keys.body(entries[index][1][b"f"].decode()), "r")
                 for index in shared]
        if self._batch is None:
            async with self._client.pipeline() as pipe:
                for read in reads:
                    pipe.execute_command(*read)
                found = await self._guard(pipe.execute())
        else:
            found = [_answer(reply) for reply in await self._batched(*reads)]
        for index, raw in zip(shared, found):
            raws[index] = raw
        return raws

    async def ack(self, recipient: PublicKey, tag: str) -> bool:
        if not _is_stream_id(tag):
            return False
        mailbox = self._keys.mailbox(recipient)
        if self._batch is not None:
            return await self._one(_evalsha(
                self._ack_all, [*mailbox.slot_keys, *self._keys.store_keys],
                [tag, mailbox.recipient_hex, self._keys.prefix])) == 1
        removed = await self._guard(self._ack(keys=mailbox.slot_keys, args=[tag]))
        if removed is None:
            return False
        await self._release(mailbox, removed[0].decode(), removed[1])
        return True

    async def _release(self, mailbox: MailboxKeys, field: str, size: bytes | None) -> None:
        """Cluster, after an entry left its mailbox: its reference in the sender's slot,
        its member in the index (and the body's, with its last reference)."""
        member = mailbox.index_member(field)
        freed = size is not None and await self._guard(self._unref(
            keys=self._keys.sender_keys(field), args=[mailbox.recipient_hex]))
        await self._guard(self._forget(keys=self._keys.store_keys, args=[
            1, member, *([body_member(field, int(size))] if freed else [])]))

    async def take_expired(self, now_ms: int, limit: int) -> list[ExpiredMessage]:
        due = [raw.decode() for raw in await self._guard(self._claim_due(
            keys=[self._keys.expiry_index], args=[now_ms, limit, now_ms + CLAIM_LEASE_MS]))]
        leaked = [member for member in due if parse_body_member(member) is not None]
        entries = [member for member in due if parse_body_member(member) is None]
        # What is left of bodies whose references a dead relay leaked.
        await self._guard(self._each(self._drop_body, [
            (self._keys.sender_keys(cast(str, parse_body_member(member))), [])
            for member in leaked]))
        located = [member.split(":", 1) for member in entries]
        removed = await self._guard(self._each(self._remove_by_field, [
            (self._keys.mailbox(recipient_hex).slot_keys, [field])
            for recipient_hex, field in located]))
        expired: list[ExpiredMessage] = []
        referenced: list[tuple[str, str, int]] = []  # recipient hex, field, body size
        for (recipient_hex, field), entry in zip(located, removed):
            if entry is None:  # gone already (acked), or another replica removed it
                continue
            sender, msg_id, origin, size = entry
            expired.append(ExpiredMessage(PublicKey(bytes.fromhex(recipient_hex)),
                                          PublicKey(sender), msg_id, Origin(int(origin))))
            if size is not None:
                referenced.append((recipient_hex, field, int(size)))
        dropped = await self._guard(self._each(self._unref, [
            (self._keys.sender_keys(field), [recipient_hex])
            for recipient_hex, field, _size in referenced]))
        released = leaked + [body_member(field, size) for (_hex, field, size), gone
                             in zip(referenced, dropped) if gone]
        if due:
            await self._guard(self._forget(keys=self._keys.store_keys,
                                           args=[len(entries), *entries, *released]))
        return expired

    async def _each(self, script: AsyncScript,
                    calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run `script` once per (keys, args): on a standalone Redis in one pipelined round
        trip (a sweep of 500 entries is then a few round trips, not 1,000); on a cluster
        one call at a time, each to its slot's node."""
        if self._cluster or not calls:
            return [await script(keys=keys, args=args) for keys, args in calls]
        results = await self._pipelined(script, calls)
        if any(isinstance(result, NoScriptError) for result in results):
            await self._client.script_load(script.script)  # every script is safe to repeat
            results = await self._pipelined(script, calls)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _pipelined(self, script: AsyncScript,
                         calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return cast(list[Any], await pipe.execute(raise_on_error=False))

    async def allow(self, sender: PublicKey, now_ms: int, rate_per_s: float,
                    burst: int) -> bool:
        keys, args = [self._keys.rate(sender)], [now_ms, rate_per_s, burst]
        if self._batch is None:
            allowed = await self._guard(self._take_token(keys=keys, args=args))
        else:
            allowed = await self._one(_evalsha(self._take_token, keys, args))
        return allowed == 1

    async def depth(self, recipient: PublicKey) -> int:
        log = self._keys.mailbox(recipient).log
        if self._batch is None:
            return int(await self._guard(self._client.xlen(log)))
        return int(await self._one(("XLEN", log)))

    async def subscribe(self, recipient: PublicKey,
                        wake: Wake) -> Subscription:
        await self._wakeups.add(recipient.raw, wake)
        return _RedisSubscription(self._wakeups, recipient.raw, wake)

    async def access_list_floor(self) -> Stamp:
        return parse_floor_text(await self._guard(self._client.get(self._keys.access_floor)))

    async def raise_access_list_floor(self, stamp: Stamp) -> Stamp:
        return parse_floor_text(await self._guard(self._raise_floor(
            keys=[self._keys.access_floor], args=[floor_text(stamp)])))

    async def ping(self) -> None:
        """A probe write (a read-only replica or an out-of-memory primary refuses it),
        followed by the durability wait when one is configured."""
        if not self._durability.waits:
            await self._guard(self._client.set(self._keys.probe, b"", px=_PROBE_TTL_MS))
            return
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(self._keys.probe, b"", px=_PROBE_TTL_MS)
            pipe.execute_command(*self._durability.command())
            written, waited = await self._guard(pipe.execute(raise_on_error=False))
        if isinstance(written, Exception):
            raise StoreUnavailableError(f"mailbox store refuses writes: {written}")
        self._durability.check(waited)

    def answers_later(self, recipient: PublicKey) -> bool:
        return True

    def stream_bus(self) -> RedisStreamBus:
        """Replicas on this Redis carry streams to each other by pub/sub: it publishes with
        the data client; its subscriber connection comes from the plain client."""
        from ..streams.redis_bus import RedisStreamBus
        return RedisStreamBus(self._client, self._pubsub_client, self._keys.prefix)

    async def close(self) -> None:
        if self._batch is not None:
            await self._batch.close()
        await self._wakeups.close()
        await self._client.aclose()
        await self._pubsub_client.aclose()

    async def _batched(self, *commands: Command) -> list[Any]:
        """Standalone: one call through the batcher, its commands back to back; one reply
        per command, an exception where Redis refused that one (see `_answer`)."""
        assert self._batch is not None
        return await self._batch.call(*commands)

    async def _one(self, command: Command) -> Any:
        """Standalone: one command through the batcher; its reply."""
        [reply] = await self._batched(command)
        return _answer(reply)

    @staticmethod
    async def _guard(call: Awaitable[T]) -> T:
        """Await one Redis step, turning any Redis or socket failure into StoreUnavailableError."""
        try:
            return await call
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailableError(f"mailbox store unreachable: {exc}") from None


# MOVE_OUT_ALL's and MOVE_OUT's answers.
_MOVE_OUTCOMES = {1: MoveStep.DONE, 0: MoveStep.ALREADY, 2: MoveStep.SUPERSEDED}


def _evalsha(script: AsyncScript, keys: list[str], args: list[Any]) -> Command:
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _answer(reply: Any) -> Any:
    """A reply of a batched command, or the StoreUnavailableError of this call alone when
    Redis refused it (OOM, a read-only replica, a script error)."""
    if isinstance(reply, Exception):
        raise StoreUnavailableError(f"mailbox store refused a call: {reply}")
    return reply


def _is_stream_id(tag: str) -> bool:
    """A tag Redis can take as a stream id: two numbers below 2^64.  A device's ACK names
    any tag it likes; one Redis refuses must not pass for a store outage."""
    return (_STREAM_ID.match(tag) is not None
            and all(int(part) <= _MAX_STREAM_ID_PART for part in tag.split("-")))


def _full(mailbox: MailboxKeys) -> MailboxFullError:
    return MailboxFullError(f"mailbox of {PublicKey(bytes.fromhex(mailbox.recipient_hex)).text}"
                            " is full")


def _over_sender_budget(sender: PublicKey, limits: MailboxLimits) -> QuotaExceededError:
    return QuotaExceededError(f"sender {sender.text} has its budget of"
                              f" {limits.sender_max_bytes} bytes stored")


def _over_store_budget(limits: MailboxLimits) -> QuotaExceededError:
    return QuotaExceededError(f"the relay's store holds its budget of {limits.store_max_bytes}"
                              " bytes")
