"""The SQL behind devices, peer groups and the peer-change outbox: every change in one transaction.

Each administrative change re-derives the peer lists it can alter and, in the same
transaction, issues a new version to every device whose list changed (the
outbox row) and bumps the access-list version when enrolment, revocation or
group membership changed (relays enforce groups too).  Both carry the epoch
the running oracle began at start (`begin_epoch`).  So a committed change
always has its pushes recorded: a crash after the commit loses nothing, the
pusher finds the rows on restart.

Input is checked by `validation` before it is stored, and what is read comes
back as the frozen values of `records`.  Every change appends its audit entry
(`audit.record`, naming the `Actor`) in its own transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from runtime.clock import now_ms

from . import audit, configuration, presence
from .audit import SYSTEM, Actor
from .db import Connection, Database
from .device_search import DeviceQuery, like_pattern
from .errors import Conflict, InvalidInput, NotFound
from .pagination import Page, decode_cursor, encode_cursor
from .peers import MAX_PEERS, changed_lists, decode_peer_text, derive_peer_lists, peer_count
from .regions import Regions
from .records import (AccessSnapshot, DeviceCounts, DeviceRecord, GroupRecord, GroupRef,
                      GroupSummary, PendingPush, PushStatus, Revocation)
from .validation import parse_key, parse_name, parse_tags

_DEVICE_COLUMNS = ("d.key, d.name, d.tags, d.enrolled_at_ms, d.revoked_at_ms, d.last_seen_ms,"
                   " d.peer_version, d.acked_version, d.rotated_to, d.rotated_from,"
                   " d.drain_until_ms, d.home_region, d.former_region, d.moved_at_ms,"
                   " d.config_version, d.reported_config_version")
# SQLite allows 32,766 parameters a statement; a page's keys stay far below it.
_MAX_KEYS_PER_QUERY = 1000


class Registry:
    """All reads and writes of the oracle's data; `on_change` wakes the pusher and long-polls."""

    def __init__(self, db: Database, on_change: Callable[[], None],
                 regions: Regions | None = None) -> None:
        self.db = db
        self._on_change = on_change
        self.regions = regions
        # Desired configuration (SPEC §21): re-derived in every change of groups below.
        self.configs = configuration.Configurations(db, on_change)

    async def assign_homes(self) -> int:
        """At start, with regions: home every device that has none (enrolled before regions
        were configured) in the oracle's own region; Conflict if a device is homed in a
        region this oracle does not have (move it, or configure that region).  Returns
        how many were assigned."""
        regions = self.regions
        if regions is None:
            return 0
        rows = await self.db.fetch(
            "SELECT DISTINCT home_region FROM devices WHERE home_region IS NOT NULL"
            " UNION SELECT DISTINCT former_region FROM devices WHERE former_region IS NOT NULL")
        unknown = sorted({row["home_region"] for row in rows} - set(regions.names))
        if unknown:
            raise Conflict(f"devices are homed in (or moving from) region(s)"
                             f" {', '.join(unknown)}, which this oracle does not have: add them"
                             " with --other-region (moving their devices elsewhere first)")
        async with self.db.transaction() as conn:
            assigned = await conn.fetch("UPDATE devices SET home_region = $1"
                                        " WHERE home_region IS NULL RETURNING key",
                                        regions.default)
            if assigned:
                await self._bump_access_list(conn)
                await audit.record(conn, SYSTEM, "devices.home.assign", regions.default,
                                   devices=len(assigned))
        if assigned:
            self._on_change()
        return len(assigned)

    # -- devices ---------------------------------------------------------------

    async def search_devices(self, query: DeviceQuery) -> Page[DeviceRecord]:
        """One page of the devices `query` selects, in its order (see `device_search`)."""
        sql, args = query.sql(_DEVICE_COLUMNS, self.db.fold_function(query.q.lower()))
        rows = await self.db.fetch(sql, *args)
        more = query.limit is not None and len(rows) > query.limit
        rows = rows[:query.limit] if more else rows
        groups = await self._group_names_by_device(
            self.db, [r["key"] for r in rows] if len(rows) <= _MAX_KEYS_PER_QUERY else None)
        return Page([self._device(row, groups) for row in rows],
                    query.cursor_for(rows[-1]) if more else None)

    async def device_counts(self) -> DeviceCounts:
        """How many devices are in each state, in one pass over the table."""
        row = await self.db.fetchrow(
            "SELECT COUNT(*) AS total,"
            " COALESCE(SUM(CASE WHEN revoked_at_ms IS NULL THEN 0 ELSE 1 END), 0) AS revoked,"
            " COALESCE(SUM(CASE WHEN revoked_at_ms IS NULL AND acked_version < peer_version"
            " THEN 1 ELSE 0 END), 0) AS behind,"
            " COALESCE(SUM(CASE WHEN revoked_at_ms IS NULL AND reported_config_version"
            " < config_version THEN 1 ELSE 0 END), 0) AS config_behind FROM devices")
        assert row is not None
        return DeviceCounts(int(row["total"]), int(row["revoked"]), int(row["behind"]),
                            int(row["config_behind"]))

    async def behind_keys(self, limit: int) -> list[str]:
        """The first `limit` active devices, by key, that have not acknowledged their newest
        peer list (all of them are `device_counts().behind`, a page at a time the device
        list's `state=behind`)."""
        rows = await self.db.fetch(
            "SELECT key FROM devices WHERE revoked_at_ms IS NULL AND acked_version < peer_version"
            " ORDER BY key LIMIT $1", limit)
        return [row["key"] for row in rows]

    async def get_device(self, key: str) -> DeviceRecord:
        return await self._device_in(self.db, key)

    async def _device_in(self, conn: Connection, key: str) -> DeviceRecord:
        row = await conn.fetchrow(f"SELECT {_DEVICE_COLUMNS} FROM devices d WHERE d.key = $1", key)
        if row is None:
            raise NotFound(f"no device {key}")
        return self._device(row, await self._group_names_by_device(conn, [key]))

    async def enroll(self, key: object, name: object, tags: object = (),
                     actor: Actor = SYSTEM, region: object = None) -> DeviceRecord:
        """Enroll a key; with regions its home is `region`, else the oracle's own region."""
        key_text, name_text = parse_key(key), parse_name(name, "device name")
        tag_list = parse_tags(list(tags) if isinstance(tags, tuple) else tags)
        home = self._home(region)
        async with self.db.transaction() as conn:
            if await conn.fetchrow("SELECT key FROM devices WHERE key = $1", key_text):
                raise Conflict(f"device {key_text} is already enrolled")
            await conn.execute(
                "INSERT INTO devices (key, name, tags, enrolled_at_ms, home_region)"
                " VALUES ($1, $2, $3, $4, $5)",
                key_text, name_text, " ".join(tag_list), now_ms(), home)
            await self._bump_access_list(conn)
            await audit.record(conn, actor, "device.enroll", key_text, name=name_text,
                               tags=list(tag_list), **({"region": home} if home else {}))
        self._on_change()
        return await self.get_device(key_text)

    async def update_device(self, key: str, name: object = None, tags: object = None,
                            actor: Actor = SYSTEM) -> DeviceRecord:
        before = await self.get_device(key)
        changes: dict[str, object] = {}
        if name is not None and (name_text := parse_name(name, "device name")) != before.name:
            changes["name"] = name_text
        if tags is not None and (tag_list := parse_tags(tags)) != before.tags:
            changes["tags"] = list(tag_list)
        if not changes:
            return before
        async with self.db.transaction() as conn:
            if "name" in changes:
                await conn.execute("UPDATE devices SET name = $1 WHERE key = $2",
                                   changes["name"], key)
            if "tags" in changes:
                await conn.execute("UPDATE devices SET tags = $1 WHERE key = $2",
                                   " ".join(tag_list), key)
            await audit.record(conn, actor, "device.update", key, **changes)
        return await self.get_device(key)

    async def delete_device(self, key: str, actor: Actor = SYSTEM) -> None:
        """Forget a revoked device: its record, groups and peer-list history.

        Only a revoked device, and not while its old key drains after a
        rotation: deleting an active device would drop it from the access list
        without revoking it, and relays that do not require enrollment let an
        unknown key connect.  A deleted key is unknown again, so a relay that
        requires enrollment refuses it as not enrolled.  Revoking a draining key
        ends its drain (`revoke`); it may be deleted then.
        """
        device = await self.get_device(key)
        if not device.revoked:
            raise Conflict(f"device {key} is active: revoke it before deleting it")
        if device.drain_until_ms is not None and device.drain_until_ms > now_ms():
            raise Conflict(f"device {key} rotated to {device.rotated_to} and may drain its"
                           " mailbox until then: delete it after the drain, or revoke it to"
                           " end the drain now")
        async with self.db.transaction() as conn:
            await conn.execute("DELETE FROM peer_changes WHERE device_key = $1", key)
            await conn.execute("DELETE FROM memberships WHERE device_key = $1", key)
            await conn.execute("DELETE FROM devices WHERE key = $1", key)
            await self._bump_access_list(conn)
            await audit.record(conn, actor, "device.delete", key, name=device.name)
        self._on_change()

    async def set_revoked(self, key: str, revoked: bool, actor: Actor = SYSTEM) -> DeviceRecord:
        """`revoke` or `restore`, for callers that need only the record."""
        if revoked:
            return (await self.revoke(key, actor)).device
        return await self.restore(key, actor)

    async def revoke(self, key: str, actor: Actor = SYSTEM) -> Revocation:
        """Revoke a device and end the drain of every key it rotated away from, in one change.

        A rotated-away key may drain its mailbox (SPEC §15), but whoever took the
        device holds that old key too (`identity.key.old`): were it left draining,
        revoking the device would leave the thief its old mailbox at every relay
        for the rest of the drain time.  So each key of the `rotated_from` chain
        still draining gets its drain end set to now; the same access list that
        revokes the device lists them as revoked.  Revoking a key that rotated away
        (revoked already; the device is its new key) ends its drain and its
        predecessors', and leaves the new key as it is.  Nothing to change: no change.
        """
        now = now_ms()
        async with self.db.transaction() as conn:
            device = await self._device_in(conn, key)
            ended = await self._end_drains(conn, key, now)
            if device.revoked and not ended:
                return Revocation(device, ())
            # Conditional: if a rotation committed since the read, `key` rotated away and
            # the device is its new key now.
            if not device.revoked and not await conn.fetch(
                    "UPDATE devices SET revoked_at_ms = $1 WHERE key = $2"
                    " AND revoked_at_ms IS NULL RETURNING key", now, key):
                raise Conflict(f"device {key} rotated to a new key meanwhile: revoke that key")
            await self._bump_access_list(conn)
            if not device.revoked:
                await self._reconcile(conn, await self._sharing_a_group(conn, [key]))
                await configuration.reconcile(conn, only={key})
                await presence.end_connections(conn, key, now)
            await audit.record(conn, actor, "device.revoke", key,
                               **({"drains_ended": ended} if ended else {}))
            record = await self._device_in(conn, key)
        self._on_change()
        return Revocation(record, tuple(ended))

    async def restore(self, key: str, actor: Actor = SYSTEM) -> DeviceRecord:
        """Restore a revoked device: the access list and every affected peer list change at once.

        A key that rotated away is not restored (the device is its new key), and
        restoring the new key gives no drain back: a drain its revocation ended
        stays ended, since the old key may be the very one that was stolen.
        """
        device = await self.get_device(key)
        if not device.revoked:
            return device
        if device.rotated_to is not None:
            raise Conflict(f"device {key} rotated to {device.rotated_to}: that key is the device")
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE devices SET revoked_at_ms = NULL WHERE key = $1", key)
            await self._bump_access_list(conn)
            await self._reconcile(conn, await self._sharing_a_group(conn, [key]))
            await configuration.reconcile(conn, only={key})
            await audit.record(conn, actor, "device.restore", key)
        self._on_change()
        return await self.get_device(key)

    async def _end_drains(self, conn: Connection, key: str, now: int) -> list[str]:
        """End at `now` the drain of `key` and of each key before it in its rotation chain
        (`rotated_from`, newest first); the keys whose drain this ended."""
        ended: list[str] = []
        seen: set[str] = set()
        current: str | None = key
        while current is not None and current not in seen:
            seen.add(current)
            row = await conn.fetchrow("SELECT rotated_from, drain_until_ms FROM devices"
                                      " WHERE key = $1", current)
            if row is None:  # deleted once its own drain was over
                break
            if row["drain_until_ms"] is not None and int(row["drain_until_ms"]) > now:
                await conn.execute("UPDATE devices SET drain_until_ms = $1 WHERE key = $2",
                                   now, current)
                ended.append(current)
            current = row["rotated_from"]
        return ended

    async def rotate_device(self, old: str, new: str, drain_until_ms: int) -> DeviceRecord:
        """Re-point a device to its new key (its verified `KeyRotation`), in one transaction.

        The new key gets the old one's name, tags, groups and peer-list count
        (so its first list outranks the one the device holds), and a list even
        if it has no peers: that list is how the device learns the rotation took
        effect.  The old key is revoked, draining until `drain_until_ms`; every
        peer is issued a list naming the new key.  Applying the same rotation
        again changes nothing; Conflict for any other rotation of a key that
        is not an active device, or to a key this oracle has ever seen.
        """
        async with self.db.transaction() as conn:
            row = await conn.fetchrow(f"SELECT {_DEVICE_COLUMNS} FROM devices d WHERE d.key = $1",
                                      old)
            if row is None:
                raise NotFound(f"no device {old}")
            if row["rotated_to"] == new:
                return await self._device_in(conn, new)
            if row["revoked_at_ms"] is not None:
                raise Conflict(f"device {old} is revoked and cannot rotate")
            if await conn.fetchrow("SELECT key FROM devices WHERE key = $1", new):
                raise Conflict(f"key {new} is already known to this oracle")
            now = now_ms()
            await conn.execute(
                "INSERT INTO devices (key, name, tags, enrolled_at_ms, peer_version,"
                " acked_version, rotated_from, oracle_key, home_region, former_region,"
                " moved_at_ms, config_version, reported_config_epoch, reported_config_version,"
                " reported_config, reported_config_at_ms)"
                " SELECT $1, name, tags, $2, peer_version, acked_version, key, oracle_key,"
                " home_region, former_region, moved_at_ms, config_version,"
                " reported_config_epoch, reported_config_version, reported_config,"
                " reported_config_at_ms FROM devices WHERE key = $3",
                new, now, old)
            await conn.execute(
                "INSERT INTO device_configs (device_key, document, updated_at_ms)"
                " SELECT $1, document, updated_at_ms FROM device_configs WHERE device_key = $2",
                new, old)
            await conn.execute(
                "INSERT INTO memberships (group_id, device_key)"
                " SELECT group_id, $1 FROM memberships WHERE device_key = $2", new, old)
            await conn.execute("DELETE FROM memberships WHERE device_key = $1", old)
            await conn.execute("INSERT INTO device_checkin (device_key, interval_s)"
                               " SELECT $1, interval_s FROM device_checkin WHERE device_key = $2",
                               new, old)
            await conn.execute(
                "UPDATE devices SET revoked_at_ms = $1, rotated_to = $2, drain_until_ms = $3"
                " WHERE key = $4", now, new, drain_until_ms, old)
            await self._bump_access_list(conn)
            await self._reconcile(conn, await self._sharing_a_group(conn, [new]),
                                  include=(new,))
            await configuration.reconcile(conn, only={new})
            await audit.record(conn, Actor(f"device:{old}", "device"), "device.rotate", old,
                               new_key=new, drain_until_ms=drain_until_ms)
            record = await self._device_in(conn, new)
        self._on_change()
        return record

    async def move_device(self, key: str, region: object, actor: Actor = SYSTEM) -> DeviceRecord:
        """Make `region` the home of an active device: its mailbox lives there from the next
        access list on, and relays move what waits in the one it leaves (SPEC §19)."""
        home = self._home(region, required=True)
        device = await self.get_device(key)
        if device.revoked:
            raise Conflict(f"device {key} is revoked: nothing is delivered to it any more")
        if device.home_region == home:
            return device
        async with self.db.transaction() as conn:
            await self._move(conn, [device], home, actor)
            await self._bump_access_list(conn)
        self._on_change()
        return await self.get_device(key)

    async def move_group(self, group_id: str, region: object,
                         actor: Actor = SYSTEM) -> tuple[GroupRecord, int]:
        """Move every active member of a group to `region`, in one change; the group and how
        many devices moved (members already there stay as they are)."""
        home = self._home(region, required=True)
        group = await self.get_group(group_id)
        async with self.db.transaction() as conn:
            rows = await conn.fetch(
                f"SELECT {_DEVICE_COLUMNS} FROM devices d JOIN memberships m"
                " ON m.device_key = d.key WHERE m.group_id = $1 AND d.revoked_at_ms IS NULL"
                " AND (d.home_region IS NULL OR d.home_region <> $2) ORDER BY d.key",
                group_id, home)
            devices = [self._device(row, {}) for row in rows]
            await self._move(conn, devices, home, actor)
            if devices:
                await self._bump_access_list(conn)
            await audit.record(conn, actor, "group.move", group_id, group=group.name,
                               region=home, moved=len(devices))
        if devices:
            self._on_change()
        return await self.get_group(group_id), len(devices)

    async def _move(self, conn: Connection, devices: list[DeviceRecord], home: str,
                    actor: Actor) -> None:
        """Re-home `devices`, each remembering where it came from (and when), audited.

        A device moved again before mail in its former home was moved keeps only the
        latest former home: what waits in an earlier one expires there, its senders told.
        """
        now = now_ms()
        for device in devices:
            await conn.execute(
                "UPDATE devices SET former_region = home_region, home_region = $1,"
                " moved_at_ms = $2 WHERE key = $3", home, now, device.key)
            await audit.record(conn, actor, "device.move", device.key,
                               **{"from": device.home_region, "to": home})

    def _home(self, region: object, required: bool = False) -> str | None:
        """The region named (checked), else the oracle's own; None without regions."""
        if self.regions is None:
            if region is not None or required:
                raise InvalidInput("this oracle has no regions (start it with --region)")
            return None
        if region is None and required:
            raise InvalidInput(f"region is required: one of {', '.join(self.regions.names)}")
        return self.regions.default if region is None else self.regions.parse(region)

    async def unaware_of_oracle_key(self, oracle_key: str, limit: int = 100) -> list[str]:
        """Active devices that have not confirmed following the oracle to `oracle_key`."""
        rows = await self.db.fetch(
            "SELECT key FROM devices WHERE revoked_at_ms IS NULL"
            " AND (oracle_key IS NULL OR oracle_key <> $1) ORDER BY enrolled_at_ms LIMIT $2",
            oracle_key, limit)
        return [row["key"] for row in rows]

    async def record_oracle_key(self, device: str, oracle_key: str) -> bool:
        """`device` confirmed it follows `oracle_key`.  Its newest list goes out again unless
        acknowledged, because its receipt for it may have gone to a key the oracle left:
        True if so (the caller wakes the pusher; nothing the access list says changed).
        A revoked key's confirmation changes nothing (see `record_receipt`)."""
        async with self.db.transaction() as conn:
            if not await conn.fetch("UPDATE devices SET oracle_key = $1, last_seen_ms = $2"
                                    " WHERE key = $3 AND revoked_at_ms IS NULL RETURNING key",
                                    oracle_key, now_ms(), device):
                return False
            again = await conn.fetch(
                "UPDATE peer_changes SET sent_at_ms = NULL WHERE device_key = $1"
                " AND sent_at_ms IS NOT NULL AND acked_at_ms IS NULL AND version ="
                " (SELECT peer_version FROM devices WHERE key = $1) RETURNING version", device)
        return bool(again)

    # -- groups ----------------------------------------------------------------

    async def list_groups(self, q: str = "", limit: int | None = None,
                          cursor: str = "", with_members: bool = True) -> Page[GroupRecord]:
        """Groups by name whose name contains `q` (case-insensitive), a page at a time;
        without members when not `with_members` (the dashboard counts them instead)."""
        where, args = [], []
        if q.strip():
            needle = q.strip().lower()
            args.append(like_pattern(needle))
            where.append(f"{self.db.fold_function(needle)}(name) LIKE ${len(args)} ESCAPE '\\'")
        if cursor:
            name, group_id = decode_cursor(cursor, "groups", (str, str))
            args += [name, group_id]
            where.append(f"(name, id) > (${len(args) - 1}, ${len(args)})")
        sql = "SELECT id, name, created_at_ms FROM peer_groups"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name, id"
        if limit is not None:
            args.append(limit + 1)
            sql += f" LIMIT ${len(args)}"
        rows = await self.db.fetch(sql, *args)
        more = limit is not None and len(rows) > limit
        rows = rows[:limit] if more else rows
        members = {} if not with_members else await self._members_by_group(
            self.db, [r["id"] for r in rows] if len(rows) <= _MAX_KEYS_PER_QUERY else None)
        return Page([GroupRecord(r["id"], r["name"], r["created_at_ms"],
                                 tuple(members.get(r["id"], ()))) for r in rows],
                    encode_cursor("groups", (rows[-1]["name"], rows[-1]["id"])) if more else None)

    async def get_group(self, group_id: str) -> GroupRecord:
        return await self._group_in(self.db, group_id)

    async def _group_in(self, conn: Connection, group_id: str) -> GroupRecord:
        row = await conn.fetchrow(
            "SELECT id, name, created_at_ms FROM peer_groups WHERE id = $1", group_id)
        if row is None:
            raise NotFound(f"no group {group_id}")
        members = await self._members_by_group(conn, [group_id])
        return GroupRecord(row["id"], row["name"], row["created_at_ms"],
                           tuple(members.get(group_id, ())))

    async def group_summaries(self, group_ids: list[str]) -> dict[str, GroupSummary]:
        """Each group's name and member count, one query for a page of groups (no members)."""
        if not group_ids:
            return {}
        rows = await self.db.fetch(
            "SELECT g.id, g.name, g.created_at_ms, COUNT(m.device_key) AS member_count"
            " FROM peer_groups g LEFT JOIN memberships m ON m.group_id = g.id"
            f" WHERE g.id IN ({_placeholders(len(group_ids))})"
            " GROUP BY g.id, g.name, g.created_at_ms", *group_ids)
        return {r["id"]: GroupSummary(r["id"], r["name"], r["created_at_ms"],
                                      int(r["member_count"])) for r in rows}

    async def group_summary(self, group_id: str) -> GroupSummary:
        summary = (await self.group_summaries([group_id])).get(group_id)
        if summary is None:
            raise NotFound(f"no group {group_id}")
        return summary

    async def members_among(self, group_id: str, keys: list[str]) -> set[str]:
        """Which of `keys` (a page's worth) are in the group."""
        if not keys:
            return set()
        rows = await self.db.fetch(
            "SELECT device_key FROM memberships WHERE group_id = $1"
            f" AND device_key IN ({', '.join(f'${n}' for n in range(2, len(keys) + 2))})",
            group_id, *keys)
        return {r["device_key"] for r in rows}

    async def groups_of(self, key: str) -> list[GroupRef]:
        rows = await self.db.fetch(
            "SELECT g.id, g.name FROM memberships m JOIN peer_groups g ON g.id = m.group_id"
            " WHERE m.device_key = $1 ORDER BY g.name", key)
        return [GroupRef(row["id"], row["name"]) for row in rows]

    async def create_group(self, name: object, actor: Actor = SYSTEM) -> GroupRecord:
        name_text = parse_name(name, "group name")
        group_id = uuid.uuid4().hex[:12]
        async with self.db.transaction() as conn:
            await self._refuse_duplicate_group(conn, name_text)
            await conn.execute(
                "INSERT INTO peer_groups (id, name, created_at_ms) VALUES ($1, $2, $3)",
                group_id, name_text, now_ms())
            await audit.record(conn, actor, "group.create", group_id, name=name_text)
        return await self.get_group(group_id)

    async def rename_group(self, group_id: str, name: object, actor: Actor = SYSTEM) -> GroupRecord:
        name_text = parse_name(name, "group name")
        before = await self.get_group(group_id)
        async with self.db.transaction() as conn:
            await self._refuse_duplicate_group(conn, name_text, group_id)
            await conn.execute("UPDATE peer_groups SET name = $1 WHERE id = $2", name_text, group_id)
            # Groups merge in name order (SPEC §21): a new name may change a merged document.
            config_issued = await configuration.reconcile(conn)
            await audit.record(conn, actor, "group.rename", group_id, name=name_text,
                               previous=before.name)
        if config_issued:
            self._on_change()
        return await self.get_group(group_id)

    async def delete_group(self, group_id: str, actor: Actor = SYSTEM) -> None:
        group = await self.get_group(group_id)
        async with self.db.transaction() as conn:
            members = (await self._members_by_group(conn, [group_id])).get(group_id, [])
            await conn.execute("DELETE FROM memberships WHERE group_id = $1", group_id)
            await conn.execute("DELETE FROM peer_groups WHERE id = $1", group_id)
            await self._bump_access_list(conn)
            await self._reconcile(conn, set(members))
            await configuration.reconcile(conn, only=set(members))
            await audit.record(conn, actor, "group.delete", group_id, name=group.name,
                               members=len(group.members))
        self._on_change()

    async def add_member(self, group_id: str, key: object, actor: Actor = SYSTEM) -> GroupRecord:
        key_text = parse_key(key)
        group = await self.get_group(group_id)
        await self.get_device(key_text)
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO memberships (group_id, device_key) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING", group_id, key_text)
            await self._bump_access_list(conn)
            await self._reconcile(conn, await self._sharing_a_group(conn, [key_text]))
            await configuration.reconcile(conn, only={key_text})
            await audit.record(conn, actor, "group.member.add", key_text, group_id=group_id,
                               group=group.name)
        self._on_change()
        return await self.get_group(group_id)

    async def remove_member(self, group_id: str, key: object,
                            actor: Actor = SYSTEM) -> GroupRecord:
        key_text = parse_key(key)
        group = await self.get_group(group_id)
        async with self.db.transaction() as conn:
            touched = await self._sharing_a_group(conn, [key_text])  # before it leaves
            await conn.execute("DELETE FROM memberships WHERE group_id = $1 AND device_key = $2",
                               group_id, key_text)
            await self._bump_access_list(conn)
            await self._reconcile(conn, touched)
            await configuration.reconcile(conn, only={key_text})
            await audit.record(conn, actor, "group.member.remove", key_text, group_id=group_id,
                               group=group.name)
        self._on_change()
        return await self.get_group(group_id)

    # -- pushes ----------------------------------------------------------------

    async def pending_pushes(self, limit: int = 100) -> list[PendingPush]:
        """Newest unsent version per active device; superseded versions are never sent."""
        rows = await self.db.fetch(
            "SELECT pc.device_key, pc.epoch, pc.version, pc.peers, pc.envelope, pc.attempts"
            " FROM peer_changes pc JOIN devices d"
            "  ON d.key = pc.device_key AND d.peer_version = pc.version"
            " WHERE pc.sent_at_ms IS NULL AND d.revoked_at_ms IS NULL"
            # Never tried first: rows that keep failing cannot hold a whole batch back.
            " ORDER BY pc.attempts, pc.created_at_ms LIMIT $1", limit)
        return [PendingPush(r["device_key"], r["epoch"], r["version"],
                            decode_peer_text(r["peers"]), r["envelope"], r["attempts"])
                for r in rows]

    async def push_queue_depth(self) -> int:
        """How many active devices have a newest peer-list version no relay accepted yet."""
        return int(await self.db.fetchval(
            "SELECT COUNT(*) FROM peer_changes pc JOIN devices d"
            "  ON d.key = pc.device_key AND d.peer_version = pc.version"
            " WHERE pc.sent_at_ms IS NULL AND d.revoked_at_ms IS NULL"))

    async def record_sealed(self, push: PendingPush, envelope_b64: str, msg_id_hex: str) -> None:
        """Remember the exact envelope before sending it, so a retry resends the same bytes."""
        await self.db.execute(
            "UPDATE peer_changes SET envelope = $1, msg_id = $2 WHERE device_key = $3 AND version = $4",
            envelope_b64, msg_id_hex, push.device_key, push.version)

    async def mark_sent(self, push: PendingPush, sent_at_ms: int) -> None:
        """`sent_at_ms`: when the send began, so it never follows the device's answer (which
        can arrive before the relay's ACCEPTED does)."""
        await self.db.execute(
            "UPDATE peer_changes SET sent_at_ms = $1, attempts = attempts + 1, last_error = NULL"
            " WHERE device_key = $2 AND version = $3", sent_at_ms, push.device_key, push.version)

    async def mark_failed(self, push: PendingPush, error: str) -> None:
        await self.db.execute(
            "UPDATE peer_changes SET attempts = attempts + 1, last_error = $1"
            " WHERE device_key = $2 AND version = $3", error[:500], push.device_key, push.version)

    async def record_receipt(self, sender: str, msg_id_hex: str) -> int | None:
        """A device's receipt for a peer change: raise its acknowledged version; the version or
        None.  A revoked key's receipt changes nothing: a relay whose access list lags, or one
        that enforces none, still carries it to the oracle."""
        async with self.db.transaction() as conn:
            now = now_ms()
            if not await conn.fetch("UPDATE devices SET last_seen_ms = $1 WHERE key = $2"
                                    " AND revoked_at_ms IS NULL RETURNING key", now, sender):
                return None
            row = await conn.fetchrow(
                "SELECT version FROM peer_changes WHERE msg_id = $1 AND device_key = $2",
                msg_id_hex, sender)
            if row is None:
                return None
            await conn.execute(
                "UPDATE peer_changes SET acked_at_ms = $1 WHERE device_key = $2 AND version = $3"
                " AND acked_at_ms IS NULL", now, sender, row["version"])
            await conn.execute(
                "UPDATE devices SET acked_version = $1 WHERE key = $2 AND acked_version < $1",
                row["version"], sender)
        return int(row["version"])

    async def push_history(self, key: str, limit: int = 20) -> list[PushStatus]:
        rows = await self.db.fetch(
            "SELECT device_key, version, created_at_ms, sent_at_ms, acked_at_ms, attempts,"
            " last_error FROM peer_changes WHERE device_key = $1 ORDER BY version DESC LIMIT $2",
            key, limit)
        return [PushStatus(**row) for row in rows]

    async def current_peers(self, key: str) -> frozenset[str]:
        """The newest list issued to a device (what it has, once it acknowledges)."""
        text = await self.db.fetchval(
            "SELECT pc.peers FROM peer_changes pc JOIN devices d"
            " ON d.key = pc.device_key AND d.peer_version = pc.version WHERE d.key = $1", key)
        return decode_peer_text(text or "")

    # -- access list -----------------------------------------------------------

    async def access_snapshot(self) -> AccessSnapshot:
        """Everything the access list says, read once per change (the publisher caches it)."""
        async with self.db.transaction() as conn:  # one consistent view of stamp, keys and groups
            state = await conn.fetchrow("SELECT epoch, version FROM access_list_state WHERE id = 1")
            rows = await conn.fetch("SELECT key, revoked_at_ms, drain_until_ms, home_region,"
                                    " former_region, moved_at_ms FROM devices")
            memberships = await conn.fetch("SELECT group_id, device_key FROM memberships")
        assert state is not None
        now = now_ms()
        enrolled = frozenset(r["key"] for r in rows if r["revoked_at_ms"] is None)
        draining = {r["key"]: int(r["drain_until_ms"]) for r in rows
                    if r["revoked_at_ms"] is not None and (r["drain_until_ms"] or 0) > now}
        homes: dict[str, str] = {}
        former: dict[str, str] = {}
        if self.regions is not None:
            placed = enrolled | draining.keys()
            homes = {r["key"]: r["home_region"] or self.regions.default for r in rows
                     if r["key"] in placed}
            former = {r["key"]: r["former_region"] for r in rows
                      if r["key"] in enrolled and r["former_region"]
                      and r["former_region"] != homes[r["key"]]
                      and (r["moved_at_ms"] or 0) + self.regions.move_drain_ms > now}
        groups: dict[str, set[str]] = {}
        for row in memberships:
            if row["device_key"] in enrolled:
                groups.setdefault(row["device_key"], set()).add(row["group_id"])
        return AccessSnapshot(
            int(state["epoch"]), int(state["version"]), enrolled,
            frozenset(r["key"] for r in rows
                      if r["revoked_at_ms"] is not None and r["key"] not in draining),
            {key: frozenset(ids) for key, ids in groups.items()}, draining, homes, former)

    async def access_version(self) -> int:
        return int(await self.db.fetchval("SELECT version FROM access_list_state WHERE id = 1"))

    async def begin_epoch(self) -> int:
        """Start this process's epoch: the clock, but never at or below the last one recorded.

        Called once at every start.  After a restore from backup the recorded
        epoch is the snapshot's and the clock has moved on, so the new epoch
        outranks every list issued before the restore; if the clock is behind,
        one more than the recorded epoch still outranks what this database issued.
        """
        async with self.db.transaction() as conn:
            recorded = int(await conn.fetchval("SELECT epoch FROM access_list_state WHERE id = 1"))
            epoch = max(now_ms(), recorded + 1)
            await conn.execute("UPDATE access_list_state SET epoch = $1 WHERE id = 1", epoch)
        return epoch

    async def reissue_peer_lists(self, actor: Actor = SYSTEM) -> int:
        """Issue every active device its current list again, in the current epoch.

        For after a restore: devices may hold lists from changes the backup lost,
        which the restored outbox knows nothing about; these outrank them.
        Returns how many devices were issued a list.
        """
        async with self.db.transaction() as conn:
            issued = await self._reconcile(conn, None)
            await configuration.reconcile(conn, everyone=True)
            await audit.record(conn, actor, "peer_lists.reissue", issued=issued)
        self._on_change()
        return issued

    # -- internals -------------------------------------------------------------

    async def _bump_access_list(self, conn: Connection) -> None:
        await conn.execute("UPDATE access_list_state SET version = version + 1 WHERE id = 1")

    async def _reconcile(self, conn: Connection, scope: set[str] | None,
                         include: tuple[str, ...] = ()) -> int:
        """Issue a new version to every active device of `scope` whose derived list changed
        (`scope` None: to every active device, changed or not), and to those in `include`
        in any case; returns how many were issued one.

        `scope` is every device the change can have given another list (those it touched
        and the devices sharing a group with them, `_sharing_a_group`): the rest keep
        theirs, so one member added to a group costs that group, not the fleet.  Conflict
        (rolling the caller's transaction back) if a device's list would grow beyond the
        `MAX_PEERS` keys a PEER_CHANGE carries (SPEC §6): it could never be delivered.
        """
        keys = None if scope is None else sorted(scope | set(include))
        devices = {row["key"]: row for row in await _fetch_in(
            conn, "SELECT d.key, d.revoked_at_ms, d.peer_version, pc.peers FROM devices d"
            " LEFT JOIN peer_changes pc ON pc.device_key = d.key AND pc.version = d.peer_version",
            "d.key", keys)}
        active = sorted(key for key, row in devices.items() if row["revoked_at_ms"] is None)
        groups_of: dict[str, list[str]] = {key: [] for key in active}
        for row in await _fetch_in(conn, "SELECT group_id, device_key FROM memberships",
                                   "device_key", active if keys is not None else None):
            if row["device_key"] in groups_of:
                groups_of[row["device_key"]].append(row["group_id"])
        group_ids = sorted({g for ids in groups_of.values() for g in ids})
        members: dict[str, list[str]] = {}
        for row in await _fetch_in(
                conn, "SELECT m.group_id, m.device_key FROM memberships m JOIN devices d"
                " ON d.key = m.device_key AND d.revoked_at_ms IS NULL", "m.group_id",
                group_ids if keys is not None else None):
            members.setdefault(row["group_id"], []).append(row["device_key"])
        desired = derive_peer_lists(groups_of, members)
        last = {key: devices[key]["peers"] or "" for key in active}
        changes = desired if scope is None else changed_lists(last, desired)
        changes.update({key: desired[key] for key in include if key in desired})
        for key in sorted(changes):
            count = peer_count(changes[key])
            if count > MAX_PEERS and count > peer_count(last[key]):
                raise Conflict(
                    f"device {key} would have {count} peers: a peer list carries at most"
                    f" {MAX_PEERS} (SPEC §6), so it could not be delivered; make its groups"
                    " smaller (a group of more than 1,025 members is too large)")
        epoch = await conn.fetchval("SELECT epoch FROM access_list_state WHERE id = 1")
        now = now_ms()
        issued = [(key, int(devices[key]["peer_version"]) + 1, changes[key])
                  for key in sorted(changes)]
        await conn.executemany("UPDATE devices SET peer_version = $1 WHERE key = $2",
                               [(version, key) for key, version, _ in issued])
        await conn.executemany(
            "INSERT INTO peer_changes (device_key, epoch, version, peers, created_at_ms)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(key, epoch, version, text, now) for key, version, text in issued])
        return len(issued)

    async def _sharing_a_group(self, conn: Connection, keys: list[str]) -> set[str]:
        """`keys` and every device in a group with one of them: whose lists a change of
        `keys` (a revocation, a membership) can alter."""
        rows = await _fetch_in(conn, "SELECT DISTINCT m2.device_key FROM memberships m1"
                               " JOIN memberships m2 ON m2.group_id = m1.group_id",
                               "m1.device_key", keys)
        return set(keys) | {row["device_key"] for row in rows}

    async def _refuse_duplicate_group(self, conn: Connection, name: str,
                                      except_id: str | None = None) -> None:
        row = await conn.fetchrow("SELECT id FROM peer_groups WHERE name = $1", name)
        if row is not None and row["id"] != except_id:
            raise Conflict(f"a group named {name!r} already exists")

    async def _group_names_by_device(self, conn: Connection, keys: list[str] | None
                                     ) -> dict[str, list[str]]:
        """Group names of each of `keys` (None: of every device), sorted by name."""
        sql = ("SELECT m.device_key, g.name FROM memberships m"
               " JOIN peer_groups g ON g.id = m.group_id")
        if keys is not None:
            if not keys:
                return {}
            sql += f" WHERE m.device_key IN ({_placeholders(len(keys))})"
        result: dict[str, list[str]] = {}
        for row in await conn.fetch(sql + " ORDER BY g.name", *(keys or ())):
            result.setdefault(row["device_key"], []).append(row["name"])
        return result

    async def _members_by_group(self, conn: Connection, group_ids: list[str] | None
                                ) -> dict[str, list[str]]:
        """Member keys of each of `group_ids` (None: of every group), sorted."""
        sql = "SELECT group_id, device_key FROM memberships"
        if group_ids is not None:
            if not group_ids:
                return {}
            sql += f" WHERE group_id IN ({_placeholders(len(group_ids))})"
        result: dict[str, list[str]] = {}
        for row in await conn.fetch(sql + " ORDER BY device_key", *(group_ids or ())):
            result.setdefault(row["group_id"], []).append(row["device_key"])
        return result

    @staticmethod
    def _device(row: dict[str, Any], groups: dict[str, list[str]]) -> DeviceRecord:
        return DeviceRecord(row["key"], row["name"], tuple(row["tags"].split()),
                            row["enrolled_at_ms"], row["revoked_at_ms"], row["last_seen_ms"],
                            row["peer_version"], row["acked_version"],
                            tuple(groups.get(row["key"], ())), row["rotated_to"],
                            row["rotated_from"], row["drain_until_ms"], row["home_region"],
                            row["former_region"], row["moved_at_ms"],
                            int(row["config_version"]), int(row["reported_config_version"]))


def _placeholders(count: int) -> str:
    return ", ".join(f"${n}" for n in range(1, count + 1))


async def _fetch_in(conn: Connection, sql: str, column: str, values: list[str] | None
                    ) -> list[dict[str, Any]]:
    """Rows of `sql` whose `column` is one of `values` (None: every row), a bounded number
    of parameters per query; read off the event loop (`fetch_bulk`: peer lists are large)."""
    if values is None:
        return await conn.fetch_bulk(sql)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(values), _MAX_KEYS_PER_QUERY):
        chunk = values[start:start + _MAX_KEYS_PER_QUERY]
        rows += await conn.fetch_bulk(
            f"{sql} WHERE {column} IN ({_placeholders(len(chunk))})", *chunk)
    return rows
