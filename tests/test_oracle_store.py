"""The oracle's registry on both databases: migrations, derived peer lists, versions, outbox."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from oracle_support import fresh_postgres_database, postgres_available

from oracle.db import MIGRATIONS_DIR, Database, open_database
from oracle.errors import Conflict, InvalidInput, NotFound
from oracle.peers import changed_lists, derive_peer_lists, encode_peer_text, peer_count
from oracle.registry import Registry
from proto import Identity
from runtime.clock import now_ms

Opener = Callable[[], Awaitable[Database]]


@pytest.fixture(params=["sqlite", "postgres"])
async def open_db(request, tmp_path) -> AsyncIterator[Opener]:
    """Opens the same database again on each call (to test restarts); closes them all."""
    opened: list[Database] = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'oracle.db'}"

        async def opener() -> Database:
            opened.append(await open_database(url))
            return opened[-1]
        yield opener
    else:
        if not postgres_available():
            pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432")
        async with fresh_postgres_database() as dsn:
            async def opener() -> Database:
                opened.append(await open_database(dsn))
                return opened[-1]
            yield opener
            for db in opened:
                await db.close()
            opened.clear()
    for db in opened:
        await db.close()


def key() -> str:
    return Identity.generate().public.text


def test_peer_lists_are_union_of_groups_minus_revoked() -> None:
    # a in g1 and g2, b in g1, c (revoked) in g2, d alone in g3: members listed active only.
    groups_of = {"a": ["g1", "g2"], "b": ["g1"], "d": ["g3"]}
    lists = derive_peer_lists(groups_of, {"g1": ["a", "b"], "g2": ["a"], "g3": ["d"]})
    assert lists == {"a": "b", "b": "a", "d": ""}
    changes = changed_lists({"a": "b c", "c": "a"}, lists)
    assert changes == {"a": "b", "b": "a"}  # d: never sent, still empty → nothing to say


def test_each_list_is_its_groups_sorted_without_itself() -> None:
    keys = [f"k{n:02d}" for n in range(12)]
    groups_of = {k: ["big", "odd"] if n % 2 else ["big"] for n, k in enumerate(keys)}
    members = {"big": keys[:10], "odd": keys[9:]}
    lists = derive_peer_lists(groups_of, members)
    for n, k in enumerate(keys):
        expected = set(keys[:10]) | (set(keys[9:]) if n % 2 else set())
        assert lists[k] == encode_peer_text(expected - {k})  # first, middle, last cut alike
        assert peer_count(lists[k]) == len(expected - {k})


async def test_migrations_are_numbered_recorded_and_applied_once(open_db: Opener) -> None:
    db = await open_db()
    rows = await db.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    assert rows and rows[0]["version"] == 1 and rows[0]["name"] == "0001_initial"
    assert await db.migrate() == []  # nothing left to apply
    again = await open_db()
    files = sorted(int(p.name.split("_", 1)[0]) for p in MIGRATIONS_DIR.glob("*.sql"))
    assert files[:4] == [1, 2, 3, 4]
    assert await again.fetch("SELECT version FROM schema_migrations ORDER BY version") == [
        {"version": n} for n in files]


async def test_group_changes_issue_versions_only_to_affected_devices(open_db: Opener) -> None:
    registry = Registry(await open_db(), lambda: None)
    a, b, c = key(), key(), key()
    for k in (a, b, c):
        await registry.enroll(k, f"dev-{k[4:8]}", ["t"])
    with pytest.raises(Conflict):
        await registry.enroll(a, "dup")
    with pytest.raises(InvalidInput):
        await registry.enroll("cpk_nope", "bad")
    group = await registry.create_group("g")
    await registry.add_member(group.id, a)
    assert await registry.pending_pushes() == []  # alone in a group: nothing to say yet
    await registry.add_member(group.id, b)
    pending = {p.device_key: p for p in await registry.pending_pushes()}
    assert set(pending) == {a, b} and pending[a].peers == {b} and pending[a].version == 1
    await registry.add_member(group.id, b)  # idempotent: no new version
    assert (await registry.get_device(a)).peer_version == 1
    other = await registry.create_group("h")
    await registry.add_member(other.id, c)
    await registry.add_member(other.id, a)
    assert (await registry.get_device(a)).peer_version == 2
    assert await registry.current_peers(a) == {b, c}
    assert (await registry.get_device(b)).peer_version == 1  # b's list did not change
    await registry.delete_group(other.id)
    assert await registry.current_peers(a) == {b} and await registry.current_peers(c) == frozenset()
    with pytest.raises(NotFound):
        await registry.get_group(other.id)


async def test_revocation_removes_device_from_lists_and_bumps_access_list(open_db: Opener) -> None:
    registry = Registry(await open_db(), lambda: None)
    a, b = key(), key()
    for k in (a, b):
        await registry.enroll(k, "d")
    group = await registry.create_group("g")
    await registry.add_member(group.id, a)
    await registry.add_member(group.id, b)
    before = await registry.access_snapshot()
    await registry.set_revoked(b, True)
    after = await registry.access_snapshot()
    assert after.version == before.version + 1
    assert after.revoked == {b} and after.enrolled == {a}
    assert await registry.current_peers(a) == frozenset()
    assert [p.device_key for p in await registry.pending_pushes()] == [a]  # none to the revoked
    await registry.set_revoked(b, False)
    assert await registry.current_peers(a) == {b}


async def test_outbox_receipts_and_versions_survive_reopening(open_db: Opener) -> None:
    registry = Registry(await open_db(), lambda: None)
    a, b = key(), key()
    for k in (a, b):
        await registry.enroll(k, "d")
    group = await registry.create_group("g")
    await registry.add_member(group.id, a)
    await registry.add_member(group.id, b)
    await registry.remove_member(group.id, b)
    await registry.add_member(group.id, b)  # a is now at v3; v1 and v2 are superseded
    (push_a,) = [p for p in await registry.pending_pushes() if p.device_key == a]
    assert push_a.version == 3
    await registry.record_sealed(push_a, "ZW52ZWxvcGU=", "00" * 16)
    await registry.mark_failed(push_a, "ConnectionError: relay down")

    reopened = Registry(await open_db(), lambda: None)  # an oracle restart
    (again,) = [p for p in await reopened.pending_pushes() if p.device_key == a]
    assert again.version == 3 and again.envelope == "ZW52ZWxvcGU=" and again.attempts == 1
    await reopened.mark_sent(again, 1)
    assert await reopened.record_receipt(a, "00" * 16) == 3
    assert await reopened.record_receipt(a, "ff" * 16) is None  # not a peer change of ours
    device = await reopened.get_device(a)
    assert device.acked_version == 3 and not device.behind and device.last_seen_ms is not None
    await reopened.remove_member(group.id, b)
    assert (await reopened.get_device(a)).peer_version == 4  # never reuses a version
    history = await reopened.push_history(a)
    assert [h.version for h in history] == [4, 3, 2, 1]


async def test_membership_changes_bump_the_access_list_which_carries_groups(
        open_db: Opener) -> None:
    registry = Registry(await open_db(), lambda: None)
    a, b, c = key(), key(), key()
    for k in (a, b, c):
        await registry.enroll(k, "d")
    group, other = await registry.create_group("g"), await registry.create_group("h")
    start = (await registry.access_snapshot()).version
    await registry.add_member(group.id, a)
    await registry.add_member(group.id, b)
    await registry.add_member(other.id, b)
    snapshot = await registry.access_snapshot()
    assert snapshot.version == start + 3  # relays enforce groups, so each change is a new list
    assert snapshot.groups == {a: {group.id}, b: {group.id, other.id}}  # c: in no group
    assert snapshot.enrolled == {a, b, c}
    await registry.remove_member(other.id, b)
    await registry.delete_group(group.id)
    snapshot = await registry.access_snapshot()
    assert snapshot.version == start + 5 and snapshot.groups == {}


async def test_every_start_begins_a_later_epoch_and_peer_changes_carry_it(
        open_db: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(await open_db(), lambda: None)
    first = await registry.begin_epoch()
    assert first >= now_ms() - 60_000
    a, b = key(), key()
    for k in (a, b):
        await registry.enroll(k, "d")
    group = await registry.create_group("g")
    await registry.add_member(group.id, a)
    await registry.add_member(group.id, b)
    assert {p.epoch for p in await registry.pending_pushes()} == {first}
    # The clock went back an hour: the next epoch is still later than the last one recorded.
    monkeypatch.setattr("oracle.registry.now_ms", lambda: first - 3_600_000)
    restarted = Registry(await open_db(), lambda: None)
    second = await restarted.begin_epoch()
    assert second == first + 1 and (await restarted.access_snapshot()).epoch == second
    assert {p.epoch for p in await restarted.pending_pushes()} == {first}  # issued before


async def test_reissue_gives_every_active_device_a_new_version_of_its_list(
        open_db: Opener) -> None:
    registry = Registry(await open_db(), lambda: None)
    await registry.begin_epoch()
    a, b, c, revoked = key(), key(), key(), key()
    for k in (a, b, c, revoked):
        await registry.enroll(k, "d")
    group = await registry.create_group("g")
    for k in (a, b, revoked):
        await registry.add_member(group.id, k)
    await registry.set_revoked(revoked, True)
    versions = {k: (await registry.get_device(k)).peer_version for k in (a, b, c)}
    assert await registry.reissue_peer_lists() == 3
    pending = {p.device_key: p for p in await registry.pending_pushes()}
    assert set(pending) == {a, b, c}
    assert {k: pending[k].version for k in pending} == {k: v + 1 for k, v in versions.items()}
    assert pending[a].peers == {b} and pending[c].peers == frozenset()


async def test_rotation_moves_the_device_to_its_new_key_and_drains_the_old(
        open_db: Opener) -> None:
    registry = Registry(await open_db(), lambda: None)
    old, new, peer, lonely, lonely_new = key(), key(), key(), key(), key()
    for k in (old, peer, lonely):
        await registry.enroll(k, f"dev-{k[4:8]}", ["site-a"])
    group = await registry.create_group("g")
    for k in (old, peer):
        await registry.add_member(group.id, k)
    before = await registry.get_device(old)
    until = now_ms() + 60_000

    record = await registry.rotate_device(old, new, until)
    assert (record.key, record.name, record.tags, record.groups) == (
        new, before.name, before.tags, ("g",))
    assert record.rotated_from == old and record.peer_version == before.peer_version + 1
    retired = await registry.get_device(old)
    assert retired.revoked and retired.rotated_to == new and retired.groups == ()
    assert await registry.current_peers(new) == {peer}
    assert await registry.current_peers(peer) == {new}
    snapshot = await registry.access_snapshot()
    assert dict(snapshot.draining) == {old: until} and old not in snapshot.revoked
    assert new in snapshot.enrolled and old not in snapshot.enrolled

    assert (await registry.rotate_device(old, new, until)).key == new  # again: no change
    for attempt in ((old, key()), (peer, new), (peer, lonely)):
        with pytest.raises(Conflict):  # a retired key; onto a key ever seen
            await registry.rotate_device(*attempt, until)
    with pytest.raises(Conflict):
        await registry.set_revoked(old, False)  # the device is its new key now

    # A device in no group is still told: its new key's first list is how it learns.
    await registry.rotate_device(lonely, lonely_new, until)
    assert any(p.device_key == lonely_new for p in await registry.pending_pushes())


async def test_revoking_a_device_ends_the_drain_of_every_key_it_rotated_from(
        open_db: Opener) -> None:
    changes: list[None] = []
    registry = Registry(await open_db(), lambda: changes.append(None))
    first, second, third, peer = key(), key(), key(), key()
    for k in (first, peer):
        await registry.enroll(k, f"dev-{k[4:8]}")
    group = await registry.create_group("g")
    for k in (first, peer):
        await registry.add_member(group.id, k)
    until = now_ms() + 3_600_000
    await registry.rotate_device(first, second, until)
    await registry.rotate_device(second, third, until)  # both old keys drain
    assert set((await registry.access_snapshot()).draining) == {first, second}
    version, changes[:] = await registry.access_version(), []

    assert (await registry.set_revoked(third, True)).revoked
    snapshot = await registry.access_snapshot()
    assert not snapshot.draining and {first, second, third} <= snapshot.revoked
    assert snapshot.version == version + 1 and changes  # published at once
    assert (await registry.revoke(third)).drains_ended == ()  # all ended already
    for old in (first, second):
        assert (await registry.get_device(old)).drain_until_ms <= now_ms()
        await registry.delete_device(old)  # no drain left to wait for

    # Restoring the device restores its current key only: no drain comes back.
    assert not (await registry.set_revoked(third, False)).revoked
    snapshot = await registry.access_snapshot()
    assert snapshot.enrolled >= {third} and not snapshot.draining


async def test_revoking_a_draining_key_ends_its_drain_and_leaves_the_new_key(
        open_db: Opener) -> None:
    registry = Registry(await open_db(), lambda: None)
    old, new = key(), key()
    await registry.enroll(old, "d")
    await registry.rotate_device(old, new, now_ms() + 3_600_000)
    version = await registry.access_version()

    await registry.set_revoked(old, True)
    snapshot = await registry.access_snapshot()
    assert old in snapshot.revoked and not snapshot.draining and new in snapshot.enrolled
    assert snapshot.version == version + 1
    assert (await registry.get_device(old)).drain_until_ms <= now_ms()
    again = await registry.revoke(old)  # nothing left to end: no change
    assert again.drains_ended == () and await registry.access_version() == version + 1
    with pytest.raises(Conflict):
        await registry.set_revoked(old, False)  # the device is its new key

    # A revoke reports the keys whose drain it ended, newest first.
    older, newer, newest = key(), key(), key()
    await registry.enroll(older, "e")
    await registry.rotate_device(older, newer, now_ms() + 3_600_000)
    await registry.rotate_device(newer, newest, now_ms() + 3_600_000)
    assert (await registry.revoke(newest)).drains_ended == (newer, older)


async def test_an_expired_drain_is_a_plain_revocation(open_db: Opener) -> None:
    registry = Registry(await open_db(), lambda: None)
    old, new = key(), key()
    await registry.enroll(old, "d")
    await registry.rotate_device(old, new, now_ms() - 1)
    snapshot = await registry.access_snapshot()
    assert old in snapshot.revoked and not snapshot.draining
