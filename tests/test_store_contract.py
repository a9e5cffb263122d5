"""The MailboxStore contract, proved against every implementation with the same tests.

The memory store, SQLite (in memory and in a file) and Redis (standalone and a one-node
cluster, where a script touching two slots fails) must agree on ordering,
cursors, acks, replay, limits, atomic refusal, exactly-once expiry, rate
limits, wake-ups, and bodies stored once: counted once against the byte
budgets and released with their last reference (acked or expired).  Tests that need two store instances sharing one backend
(two replicas) run where that exists: a SQLite file and Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from continuum.store import MailboxLimits, MailboxStore, NewEntry, open_store
from continuum.store.base import WAKE_ENTRY_MAX_BYTES
from continuum.store.redis_scripts import BODY_GRACE_MS
from proto import Envelope, Identity, Kind, Origin, seal_envelope
from proto.access import Stamp
from proto.errors import MailboxFullError, QuotaExceededError, ReplayError, StoreUnavailableError
from redis_server import RedisServer
from relay_process import free_port

ROOMY = MailboxLimits(max_messages=1000, max_bytes=10_000_000)
BACKENDS = ["memory", "sqlite-memory", "sqlite-file",
            pytest.param("redis", marks=pytest.mark.redis),
            pytest.param("redis-cluster", marks=pytest.mark.redis)]
SHARED_BACKENDS = ["sqlite-file",
                   pytest.param("redis", marks=pytest.mark.redis),
                   pytest.param("redis-cluster", marks=pytest.mark.redis)]
REDIS_BACKENDS = [pytest.param("redis", marks=pytest.mark.redis),
                  pytest.param("redis-cluster", marks=pytest.mark.redis)]

OpenStore = Callable[[], Awaitable[MailboxStore]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def envelope(sender: Identity, recipients: list[Identity], text: bytes = b"hi", *,
             ttl_s: int = 60, created_at_ms: int | None = None) -> Envelope:
    return seal_envelope(sender, Kind.DATA, [r.public for r in recipients], text, ttl_s=ttl_s,
                         now_ms=now_ms() if created_at_ms is None else created_at_ms)


async def put(store: MailboxStore, env: Envelope, limits: MailboxLimits = ROOMY,
              replay_ms: int = 60_000) -> None:
    await store.accept(env, replay_until_ms=now_ms() + replay_ms, limits=limits)


@pytest.fixture
async def open_backend(request: pytest.FixtureRequest,
                       tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens store instances on one backend (several = several replicas); closes them all."""
    backend = request.param
    url = {"memory": "memory", "sqlite-memory": "sqlite://:memory:",
           "sqlite-file": f"sqlite:///{tmp_path / 'mailboxes.db'}"}.get(backend)
    if url is None:
        fixture = "redis_url" if backend == "redis" else "redis_cluster_url"
        url = request.getfixturevalue(fixture)
    opened: list[MailboxStore] = []

    async def open_one() -> MailboxStore:
        store = open_store(url)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_backend: OpenStore) -> MailboxStore:
    return await open_backend()


def backends(which: list) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("open_backend", which, indirect=True)


@backends(BACKENDS)
async def test_fetch_is_oldest_first_and_strictly_after_the_cursor(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    sent = [envelope(alice, [bob], bytes([i])) for i in range(6)]
    for env in sent:
        await put(store, env)
    entries = await store.fetch(bob.public, None, 100)
    assert [e.raw for e in entries] == [e.raw for e in sent]
    assert all(isinstance(e.tag, str) and 0 < len(e.tag) <= 64 for e in entries)
    assert len({e.tag for e in entries}) == 6
    after = await store.fetch(bob.public, entries[2].tag, 100)
    assert [e.raw for e in after] == [e.raw for e in sent[3:]]
    assert [e.raw for e in await store.fetch(bob.public, entries[0].tag, 2)] == \
        [sent[1].raw, sent[2].raw]
    assert await store.fetch(bob.public, entries[-1].tag, 100) == []
    assert await store.fetch(alice.public, None, 100) == []
    assert await store.depth(bob.public) == 6


@backends(BACKENDS)
async def test_tags_keep_growing_after_a_mailbox_was_emptied(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    await put(store, envelope(alice, [bob], b"first"))
    [first] = await store.fetch(bob.public, None, 10)
    assert await store.ack(bob.public, first.tag)
    await put(store, envelope(alice, [bob], b"second"))
    assert [e.raw for e in await store.fetch(bob.public, first.tag, 10)] != []


@backends(BACKENDS)
async def test_ack_removes_exactly_one_entry_once(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    for i in range(3):
        await put(store, envelope(alice, [bob], bytes([i])))
    first, second, third = await store.fetch(bob.public, None, 10)
    assert await store.ack(bob.public, second.tag) is True
    assert await store.ack(bob.public, second.tag) is False
    assert await store.ack(alice.public, first.tag) is False  # another device's tag
    assert await store.ack(bob.public, "not-a-tag") is False
    # Shaped like a Redis stream id but beyond 64 bits: refused as no entry, not as a store
    # outage (a device names any tag it likes in an ACK).
    assert await store.ack(bob.public, "9" * 20 + "-" + "9" * 20) is False
    assert [e.tag for e in await store.fetch(bob.public, None, 10)] == [first.tag, third.tag]
    assert await store.depth(bob.public) == 2


@backends(BACKENDS)
async def test_replayed_message_id_is_refused_until_its_window_ends(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    env = envelope(alice, [bob])
    # A window long enough that the replay lands inside it on a machine whose every core is
    # busy (300 ms was not: the second accept came after the window and was taken).
    await store.accept(env, replay_until_ms=now_ms() + 1500, limits=ROOMY)
    with pytest.raises(ReplayError):
        await store.accept(env, replay_until_ms=now_ms() + 1500, limits=ROOMY)
    assert await store.depth(bob.public) == 1
    await asyncio.sleep(1.7)
    await store.take_expired(now_ms(), 100)  # the embedded store forgets ids while sweeping
    await store.accept(env, replay_until_ms=now_ms() + 300, limits=ROOMY)
    assert await store.depth(bob.public) == 2


@backends(BACKENDS)
async def test_full_mailbox_refuses_and_stores_nothing(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    by_count = MailboxLimits(max_messages=2, max_bytes=10_000_000)
    await put(store, envelope(alice, [bob]), by_count)
    await put(store, envelope(alice, [bob]), by_count)
    refused = envelope(alice, [bob])
    with pytest.raises(MailboxFullError):
        await put(store, refused, by_count)
    assert await store.depth(bob.public) == 2
    entries = await store.fetch(bob.public, None, 10)
    assert await store.ack(bob.public, entries[0].tag)
    await put(store, refused, by_count)  # its msg_id was not remembered
    assert await store.depth(bob.public) == 2

    carol = Identity.generate()
    big = envelope(alice, [carol], b"x" * 300)
    by_bytes = MailboxLimits(max_messages=100, max_bytes=2 * len(big.raw) + 10)
    await put(store, big, by_bytes)
    await put(store, envelope(alice, [carol], b"x" * 300), by_bytes)
    with pytest.raises(MailboxFullError):
        await put(store, envelope(alice, [carol], b"x" * 300), by_bytes)
    assert await store.depth(carol.public) == 2


@backends(BACKENDS)
async def test_multi_recipient_accept_is_all_or_nothing(store: MailboxStore) -> None:
    alice, bob, carol, dave = (Identity.generate() for _ in range(4))
    limits = MailboxLimits(max_messages=1, max_bytes=10_000_000)
    await put(store, envelope(alice, [carol]), limits)  # carol is now full
    shared = envelope(alice, [bob, carol, dave])  # carol in the middle: bob is tried first
    with pytest.raises(MailboxFullError):
        await put(store, shared, limits)
    assert await store.depth(bob.public) == 0
    assert await store.depth(dave.public) == 0
    assert await store.fetch(bob.public, None, 10) == []
    assert await store.take_expired(shared.expires_at_ms + 1, 100) != []  # carol's first
    await put(store, shared, limits)  # room again, and the id was never remembered
    for reader in (bob, carol, dave):
        assert [e.raw for e in await store.fetch(reader.public, None, 10)] == [shared.raw]


def sender_budget(env: Envelope) -> MailboxLimits:
    """Room for one body about the size of `env` per sender, not two: a probe of what is counted."""
    return replace(ROOMY, sender_max_bytes=len(env.raw) + 100)


@backends(BACKENDS)
async def test_a_body_counts_once_and_until_its_last_recipient_acked(store: MailboxStore) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    shared = envelope(alice, [bob, carol], b"x" * 1000)
    limits = sender_budget(shared)
    await put(store, shared, limits)  # two recipients, one body: within a one-body budget
    later = envelope(alice, [bob], b"y" * 1000)
    with pytest.raises(QuotaExceededError):
        await put(store, later, limits)
    [bobs] = await store.fetch(bob.public, None, 10)
    assert await store.ack(bob.public, bobs.tag)
    assert [e.raw for e in await store.fetch(carol.public, None, 10)] == [shared.raw]
    with pytest.raises(QuotaExceededError):  # carol still refers to the body
        await put(store, later, limits)
    [carols] = await store.fetch(carol.public, None, 10)
    assert await store.ack(carol.public, carols.tag)
    assert not await store.ack(carol.public, carols.tag)  # a repeated ack releases nothing twice
    await put(store, later, limits)  # the body went with its last reference
    with pytest.raises(QuotaExceededError):
        await put(store, envelope(alice, [carol], b"z" * 1000), limits)


@backends(BACKENDS)
async def test_an_expired_body_returns_its_bytes(store: MailboxStore) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    short = envelope(alice, [bob, carol], b"x" * 500, ttl_s=1)
    limits = sender_budget(short)
    await put(store, short, limits)
    [bobs] = await store.fetch(bob.public, None, 10)
    assert await store.ack(bob.public, bobs.tag)
    expired = await store.take_expired(short.expires_at_ms + 1, 100)
    assert [(m.recipient, m.msg_id) for m in expired] == [(carol.public, short.msg_id)]
    await put(store, envelope(alice, [bob, carol], b"y" * 500), limits)


@backends(BACKENDS)
async def test_the_store_budget_counts_every_sender_and_refusal_stores_nothing(
        store: MailboxStore) -> None:
    alice, bob, reader = (Identity.generate() for _ in range(3))
    first = envelope(alice, [reader], b"x" * 800)
    refused = envelope(bob, [reader, alice], b"y" * 800)
    limits = replace(ROOMY, store_max_bytes=max(len(first.raw), len(refused.raw)) + 100)
    await put(store, first, limits)
    with pytest.raises(QuotaExceededError):
        await put(store, refused, limits)
    assert await store.depth(reader.public) == 1 and await store.depth(alice.public) == 0
    [entry] = await store.fetch(reader.public, None, 10)
    assert await store.ack(reader.public, entry.tag)
    await put(store, refused, limits)  # room again, and its msg_id was never remembered
    assert [e.raw for e in await store.fetch(alice.public, None, 10)] == [refused.raw]


@backends(BACKENDS)
async def test_a_replay_is_refused_as_replay_even_over_budget(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    env = envelope(alice, [bob], b"x" * 500)
    await put(store, env, sender_budget(env))
    with pytest.raises(ReplayError):  # "already stored" is the answer a retrying device needs
        await put(store, env, sender_budget(env))


@backends(BACKENDS)
async def test_take_expired_returns_due_entries_once_and_removes_them(store: MailboxStore) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    created = now_ms()
    short = envelope(alice, [bob, carol], b"short", ttl_s=1, created_at_ms=created)
    acked = envelope(alice, [bob], b"acked", ttl_s=1, created_at_ms=created)
    long = envelope(alice, [bob], b"long", ttl_s=600, created_at_ms=created)
    for env in (short, acked, long):
        await put(store, env)
    entries = await store.fetch(bob.public, None, 10)
    assert await store.ack(bob.public, entries[1].tag)
    assert await store.take_expired(short.expires_at_ms - 1, 100) == []
    expired = await store.take_expired(short.expires_at_ms + 1, 100)
    assert sorted((m.recipient.raw, m.sender.raw, m.msg_id, m.origin) for m in expired) == sorted(
        (r.public.raw, alice.public.raw, short.msg_id, Origin.DEVICE) for r in (bob, carol))
    assert await store.take_expired(short.expires_at_ms + 1, 100) == []
    assert [e.raw for e in await store.fetch(bob.public, None, 10)] == [long.raw]
    assert await store.depth(carol.public) == 0


@backends(BACKENDS)
async def test_take_expired_honours_its_limit(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    created = now_ms()
    for i in range(5):
        await put(store, envelope(alice, [bob], bytes([i]), ttl_s=1, created_at_ms=created))
    later = created + 5_000
    assert len(await store.take_expired(later, 3)) == 3
    assert len(await store.take_expired(later, 3)) == 2
    assert await store.depth(bob.public) == 0


@backends(SHARED_BACKENDS)
async def test_two_replicas_racing_take_each_expired_entry_exactly_once(
        open_backend: OpenStore) -> None:
    first, second = await open_backend(), await open_backend()
    alice = Identity.generate()
    readers = [Identity.generate() for _ in range(5)]
    created = now_ms()
    sent = [envelope(alice, readers, bytes([i]), ttl_s=1, created_at_ms=created)
            for i in range(20)]
    for env in sent:
        await put(first, env)

    async def drain(store: MailboxStore) -> list[tuple[bytes, bytes]]:
        taken: list[tuple[bytes, bytes]] = []
        while batch := await store.take_expired(created + 5_000, 7):
            taken += [(m.recipient.raw, m.msg_id) for m in batch]
            await asyncio.sleep(0)
        return taken

    results = await asyncio.gather(*(drain(s) for s in (first, second, first, second)))
    taken = [item for result in results for item in result]
    assert len(taken) == len(set(taken)) == 100
    assert set(taken) == {(r.public.raw, e.msg_id) for r in readers for e in sent}


@backends(BACKENDS)
async def test_rate_limit_is_a_token_bucket_per_sender(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    start = now_ms()
    assert [await store.allow(alice.public, start, 10.0, 3) for _ in range(4)] == \
        [True, True, True, False]
    assert await store.allow(bob.public, start, 10.0, 3) is True
    assert await store.allow(alice.public, start + 50, 10.0, 3) is False
    assert await store.allow(alice.public, start + 110, 10.0, 3) is True
    assert await store.allow(alice.public, start + 120, 10.0, 3) is False


@backends(REDIS_BACKENDS)
async def test_rate_limit_is_shared_by_replicas(open_backend: OpenStore) -> None:
    first, second = await open_backend(), await open_backend()
    alice = Identity.generate()
    start = now_ms()
    allowed = [await store.allow(alice.public, start, 1.0, 4) for store in (first, second) * 3]
    assert allowed == [True] * 4 + [False] * 2


@backends(BACKENDS)
async def test_subscribe_wakes_on_accept_until_closed(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    woken = asyncio.Event()
    subscription = await store.subscribe(bob.public, lambda _entry: woken.set())
    await asyncio.sleep(0.1)
    woken.clear()  # a store may wake once on subscribing
    await put(store, envelope(alice, [bob]))
    await asyncio.wait_for(woken.wait(), 5)
    await subscription.close()
    await asyncio.sleep(0.1)
    woken.clear()
    await put(store, envelope(alice, [bob]))
    await asyncio.sleep(0.3)
    assert not woken.is_set()


@backends(REDIS_BACKENDS)
async def test_subscribe_wakes_when_another_replica_appends(open_backend: OpenStore) -> None:
    listening, accepting = await open_backend(), await open_backend()
    alice, bob, carol = (Identity.generate() for _ in range(3))
    bob_woken, carol_woken = asyncio.Event(), asyncio.Event()
    bob_sub = await listening.subscribe(bob.public, lambda _entry: bob_woken.set())
    carol_sub = await listening.subscribe(carol.public, lambda _entry: carol_woken.set())
    await asyncio.sleep(0.1)
    bob_woken.clear()
    carol_woken.clear()
    started = time.monotonic()
    await put(accepting, envelope(alice, [bob]))
    await asyncio.wait_for(bob_woken.wait(), 5)
    assert time.monotonic() - started < 1.0
    assert not carol_woken.is_set()
    await bob_sub.close()
    await carol_sub.close()


@backends(BACKENDS)
async def test_concurrent_first_subscriptions_all_wake(store: MailboxStore) -> None:
    """Devices connect at once on a fresh relay: every one of them must hear of its mail.

    Regression: concurrent first SUBSCRIBEs each opened a pub/sub connection of
    their own and all but the last went unread, so 15 of 16 devices got nothing.
    """
    sender = Identity.generate()
    readers = [Identity.generate() for _ in range(16)]
    woken = [asyncio.Event() for _ in readers]
    subscriptions = await asyncio.gather(*(store.subscribe(r.public, _setter(w))
                                           for r, w in zip(readers, woken)))
    await asyncio.sleep(0.1)
    for event in woken:
        event.clear()  # a store may wake once on subscribing
    for reader in readers:
        await put(store, envelope(sender, [reader]))
    await asyncio.wait_for(asyncio.gather(*(w.wait() for w in woken)), 5)
    for subscription in subscriptions:
        await subscription.close()


def _setter(event: asyncio.Event) -> Callable[[NewEntry | None], None]:
    return lambda _entry: event.set()


# Stores whose wake-ups carry the entry appended.  The contract allows plain ones: SQLite's
# (a fetch is a call in the relay's process) and a Redis Cluster's (its accept spans slots).
ENTRY_BACKENDS = [pytest.param("redis", marks=pytest.mark.redis)]


async def _wakes(store: MailboxStore, recipient: Identity, count: int,
                 entries: list[NewEntry | None], act: Callable[[], Awaitable[None]]) -> None:
    """Run `act`; wait until `count` wake-ups with entries came (ignoring plain ones)."""
    await act()
    deadline = asyncio.get_running_loop().time() + 5
    while sum(entry is not None for entry in entries) < count:
        assert asyncio.get_running_loop().time() < deadline, entries
        await asyncio.sleep(0.01)


@backends(ENTRY_BACKENDS)
async def test_wake_ups_carry_each_entry_and_the_one_before_it(open_backend: OpenStore) -> None:
    """What lets a relay deliver without a fetch (`RelayProtocol.pushed`): each wake-up names
    the entry just appended, as `fetch` returns it, and the mailbox's newest entry before
    it, also once the mailbox was emptied by acks; another replica's accepts too."""
    listening, accepting = await open_backend(), await open_backend()
    alice, bob = Identity.generate(), Identity.generate()
    await put(accepting, envelope(alice, [bob], b"before"))
    entries: list[NewEntry | None] = []
    subscription = await listening.subscribe(bob.public, entries.append)
    await asyncio.sleep(0.1)
    entries.clear()  # a store may wake once on subscribing
    (waiting,) = await listening.fetch(bob.public, None, 10)
    sent = [envelope(alice, [bob], f"m{n}".encode()) for n in range(3)]

    async def put_all() -> None:
        for env in sent:
            await put(accepting, env)
    await _wakes(listening, bob, 3, entries, put_all)
    stored = await listening.fetch(bob.public, waiting.tag, 10)
    got = [entry for entry in entries if entry is not None]
    assert [e.raw for e in got] == [e.raw for e in stored] == [e.raw for e in sent]
    assert [e.tag for e in got] == [e.tag for e in stored]
    assert [e.previous for e in got] == [waiting.tag, stored[0].tag, stored[1].tag]
    for entry in [waiting, *stored]:
        assert await listening.ack(bob.public, entry.tag)
    entries.clear()
    again = envelope(alice, [bob], b"after the mailbox emptied")
    await _wakes(listening, bob, 1, entries, lambda: put(accepting, again))
    (entry,) = [entry for entry in entries if entry is not None]
    (fetched,) = await listening.fetch(bob.public, stored[-1].tag, 10)
    assert (entry.tag, entry.previous, entry.raw) == (fetched.tag, stored[-1].tag, again.raw)
    await subscription.close()


@backends(ENTRY_BACKENDS)
async def test_a_large_envelope_wakes_without_its_entry(store: MailboxStore) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    entries: list[NewEntry | None] = []
    subscription = await store.subscribe(bob.public, entries.append)
    await asyncio.sleep(0.1)
    entries.clear()
    await put(store, envelope(alice, [bob], b"x" * WAKE_ENTRY_MAX_BYTES))
    await asyncio.wait_for(_until(lambda: bool(entries)), 5)
    assert entries == [None]
    await subscription.close()


EMBEDDED_BACKENDS = ["memory", "sqlite-memory", "sqlite-file"]


@backends(EMBEDDED_BACKENDS)
async def test_an_embedded_wake_up_carries_its_entry_only_into_a_mailbox_that_held_none(
        store: MailboxStore) -> None:
    """A device that keeps up (its mailbox empty when mail comes) is served without a fetch;
    mail that queues behind unacked entries wakes plainly, and one fetch takes it all.
    Each entry names the newest the mailbox held before it, acked ones included."""
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    entries: list[NewEntry | None] = []
    subscription = await store.subscribe(bob.public, entries.append)
    first, second, third = (envelope(alice, [bob], f"m{n}".encode()) for n in range(3))
    await put(store, first)
    await put(store, second)  # behind `first`, not acked yet
    stored = await store.fetch(bob.public, None, 10)
    assert entries == [NewEntry(stored[0].tag, None, first.raw), None]
    for entry in stored:
        assert await store.ack(bob.public, entry.tag)
    entries.clear()
    await put(store, third)
    (fetched,) = await store.fetch(bob.public, stored[-1].tag, 10)
    assert entries == [NewEntry(fetched.tag, stored[-1].tag, third.raw)]
    assert await store.ack(bob.public, fetched.tag)
    entries.clear()
    await put(store, envelope(alice, [bob], b"x" * WAKE_ENTRY_MAX_BYTES))
    await put(store, envelope(alice, [carol]))  # nobody watches carol's mailbox
    assert entries == [None]
    await subscription.close()


@backends(EMBEDDED_BACKENDS)
async def test_an_embedded_wake_up_names_the_newest_entry_held_when_the_device_subscribed(
        store: MailboxStore) -> None:
    """A connection that subscribes to a mailbox holding mail starts from its newest entry;
    the last subscription closed, the mailbox is not tracked any more, and a new one starts
    again from what the mailbox holds."""
    alice, bob = Identity.generate(), Identity.generate()
    await put(store, envelope(alice, [bob], b"waiting"))
    (waiting,) = await store.fetch(bob.public, None, 10)
    entries: list[NewEntry | None] = []
    subscription = await store.subscribe(bob.public, entries.append)
    assert await store.ack(bob.public, waiting.tag)
    later = envelope(alice, [bob], b"later")
    await put(store, later)
    (fetched,) = await store.fetch(bob.public, waiting.tag, 10)
    assert entries == [NewEntry(fetched.tag, waiting.tag, later.raw)]
    await subscription.close()
    assert await store.ack(bob.public, fetched.tag)
    entries.clear()
    subscription = await store.subscribe(bob.public, entries.append)
    last = envelope(alice, [bob], b"after a new subscription")
    await put(store, last)
    (fetched,) = await store.fetch(bob.public, fetched.tag, 10)
    assert entries == [NewEntry(fetched.tag, None, last.raw)]
    await subscription.close()


async def test_a_file_batch_carries_the_entry_of_its_first_append_into_an_empty_mailbox(
        tmp_path: Path) -> None:
    """On a file, the accepts of one loop turn share a transaction: of two into one empty
    mailbox, the first carries its entry and the second wakes plainly."""
    store = open_store(f"sqlite:///{tmp_path / 'mailboxes.db'}")
    alice, bob = Identity.generate(), Identity.generate()
    entries: list[NewEntry | None] = []
    subscription = await store.subscribe(bob.public, entries.append)
    sent = [envelope(alice, [bob], f"m{n}".encode()) for n in range(2)]
    await asyncio.gather(*(put(store, env) for env in sent))
    stored = await store.fetch(bob.public, None, 10)
    assert [e.raw for e in stored] == [e.raw for e in sent]
    assert entries == [NewEntry(stored[0].tag, None, sent[0].raw), None]
    await subscription.close()
    await store.close()


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.01)


@backends(BACKENDS)
async def test_ping_answers_when_the_backend_is_up(store: MailboxStore) -> None:
    await store.ping()


@pytest.mark.redis
async def test_unreachable_redis_raises_store_unavailable() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0")
    alice, bob = Identity.generate(), Identity.generate()
    try:
        with pytest.raises(StoreUnavailableError):
            await store.ping()
        with pytest.raises(StoreUnavailableError):
            await put(store, envelope(alice, [bob]))
        with pytest.raises(StoreUnavailableError):
            await store.fetch(bob.public, None, 10)
    finally:
        await store.close()


async def body_keys(store: MailboxStore) -> list[bytes]:
    """The body hashes a Redis store holds (white box: the layout of redis_keys)."""
    client, prefix = store._client, store._keys.prefix  # type: ignore[attr-defined]
    return [key async for key in client.scan_iter(match=f"{prefix}body:*")]


@backends(REDIS_BACKENDS)
async def test_redis_keeps_no_body_or_count_after_the_last_reference(store: MailboxStore) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    acked = envelope(alice, [bob, carol], b"x" * 2000)
    expiring = envelope(alice, [bob, carol], b"y" * 2000, ttl_s=1)
    await put(store, acked)
    await put(store, expiring)
    assert len(await body_keys(store)) == 2  # one body per message, not per recipient
    for reader in (bob, carol):
        first = (await store.fetch(reader.public, None, 10))[0]
        assert await store.ack(reader.public, first.tag)
    assert len(await store.take_expired(expiring.expires_at_ms + 1, 100)) == 2
    client, keys = store._client, store._keys  # type: ignore[attr-defined]
    assert await body_keys(store) == []
    assert await client.zcard(keys.expiry_index) == 0
    assert int(await client.get(keys.stored_total) or 0) == 0
    assert await client.get(keys.stored(alice.public.raw.hex())) is None


@backends(REDIS_BACKENDS)
async def test_a_reference_left_by_a_dead_relay_is_freed_after_the_ttl(store: MailboxStore) -> None:
    """A relay killed between removing an entry and dropping its reference leaks
    the body only until its own index member falls due."""
    alice, bob = Identity.generate(), Identity.generate()
    env = envelope(alice, [bob], b"x" * 1000, ttl_s=1)
    await put(store, env, sender_budget(env))
    [entry] = await store.fetch(bob.public, None, 10)
    mailbox = store._keys.mailbox(bob.public)  # type: ignore[attr-defined]
    assert await store._ack(keys=mailbox.slot_keys, args=[entry.tag])  # type: ignore[attr-defined]
    assert await store.take_expired(env.expires_at_ms + 1, 100) == []  # the entry is gone
    assert len(await body_keys(store)) == 1
    assert await store.take_expired(env.expires_at_ms + BODY_GRACE_MS + 1, 100) == []
    assert await body_keys(store) == []
    await put(store, envelope(alice, [bob], b"y" * 1000), sender_budget(env))  # budget released


@backends(REDIS_BACKENDS)
async def test_fetch_skips_an_entry_whose_body_is_gone_and_fills_the_batch(
        store: MailboxStore) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    sent = [envelope(alice, [bob, carol], bytes([i])) for i in range(3)]  # shared bodies
    for env in sent:
        await put(store, env)
    client, prefix = store._client, store._keys.prefix  # type: ignore[attr-defined]
    [gone] = [key async for key in client.scan_iter(
        match=f"{prefix}body:*:{sent[1].msg_id.hex()}:*")]
    await client.delete(gone)
    assert [e.raw for e in await store.fetch(bob.public, None, 2)] == [sent[0].raw, sent[2].raw]


@backends(REDIS_BACKENDS)
async def test_redis_entries_that_kept_kinds_expire_with_their_origin(store: MailboxStore) -> None:
    """Entries written while envelopes showed their kind carry it ('k'), not the origin:
    only an EXPIRY (3) was a relay's notice, about which no notice is sent."""
    alice, bob = Identity.generate(), Identity.generate()
    client, mailbox = store._client, store._keys.mailbox(bob.public)  # type: ignore[attr-defined]
    by_kind = {kind: envelope(alice, [bob], kind.name.encode(), ttl_s=1) for kind in Kind}
    for kind, env in by_kind.items():
        await put(store, env)
        [(tag, fields)] = await client.xrevrange(mailbox.log, count=1)  # the entry just added
        legacy = {name: value for name, value in fields.items() if name != b"o"}
        legacy[b"k"] = str(int(kind)).encode()
        await client.xdel(mailbox.log, tag)  # replaced by the entry the old layout wrote
        await client.hset(mailbox.ids, fields[b"f"], await client.xadd(mailbox.log, legacy))
    expired = await store.take_expired(max(e.expires_at_ms for e in by_kind.values()) + 1, 100)
    assert {m.msg_id: m.origin for m in expired} == {
        env.msg_id: Origin.RELAY if kind is Kind.EXPIRY else Origin.DEVICE
        for kind, env in by_kind.items()}


@pytest.mark.redis
async def test_a_sweep_reloads_scripts_a_restarted_or_promoted_redis_forgot() -> None:
    """A standalone sweep runs its scripts in pipelines, where redis-py does not reload
    them by itself; a private server, since SCRIPT FLUSH would touch everyone's."""
    server = RedisServer("--appendonly", "no").start()
    store = open_store(f"{server.url}/0")
    alice, bob, carol = (Identity.generate() for _ in range(3))
    try:
        env = envelope(alice, [bob, carol], ttl_s=1)
        await put(store, env)
        await store._client.script_flush()  # type: ignore[attr-defined]
        expired = await store.take_expired(env.expires_at_ms + 1, 100)
        assert sorted(m.recipient.raw for m in expired) == sorted([bob.public.raw,
                                                                   carol.public.raw])
        assert await body_keys(store) == []
    finally:
        await store.close()
        server.remove()


@backends(BACKENDS)
async def test_the_access_list_floor_only_rises(store: MailboxStore) -> None:
    assert await store.access_list_floor() == Stamp(0, 0)
    assert await store.raise_access_list_floor(Stamp(5, 7)) == Stamp(5, 7)
    assert await store.raise_access_list_floor(Stamp(5, 6)) == Stamp(5, 7)  # lower: kept
    assert await store.raise_access_list_floor(Stamp(4, 10**9)) == Stamp(5, 7)  # epoch first
    # An epoch is the oracle's clock in ms, a version any count: beyond Lua's exact doubles.
    big = Stamp(2**63 - 1, 2**63 - 2)
    assert await store.raise_access_list_floor(big) == big
    assert await store.access_list_floor() == big


@backends(SHARED_BACKENDS)
async def test_the_access_list_floor_is_shared_by_replicas(open_backend: OpenStore) -> None:
    first, second = await open_backend(), await open_backend()
    await first.raise_access_list_floor(Stamp(1_700_000_000_000, 3))
    assert await second.access_list_floor() == Stamp(1_700_000_000_000, 3)
    assert await second.raise_access_list_floor(Stamp(1_700_000_000_000, 2)) == Stamp(
        1_700_000_000_000, 3)


async def test_more_calls_in_flight_than_connections_wait_their_turn(redis_url: str) -> None:
    """redis-py's default pool raised "Too many connections" (a store outage for the device)
    beyond 100 calls in flight at once; they now wait for a free connection."""
    store = open_store(redis_url + "&max_connections=4")
    try:
        alice, bob = Identity.generate(), Identity.generate()
        await put(store, envelope(alice, [bob], b"x"))
        depths = await asyncio.gather(*(store.depth(bob.public) for _ in range(300)))
        assert depths == [1] * 300
    finally:
        await store.close()
