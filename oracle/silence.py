"""Silence: devices that have not been connected for longer than they are expected to check in.

An administrator sets an expected check-in interval on a device, or on a
group (for each of its members); a device's own interval wins, else the
shortest of its groups'.  A device is **silent** when it is active, no
relay holds it now, and its last contact (the last time a relay held it, or
a receipt reached the oracle; its enrolment if neither ever happened) is
older than that interval.

`SilenceWatch.check` looks for them every `silence_check_s`, a slice of
SLICE devices (a range of keys) per query, with the event loop let in
between (SQLite's queries run on it: one pass over 100,000 devices must not
be one long pause), and keeps the set in `silent_devices`, so the dashboard's list, the `silent` filter and the
metric are reads of one small table, and each device becomes silent (and
recovers) once per episode: that change is what the webhook is told.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import audit
from .audit import SYSTEM, Actor
from .db import Database
from .errors import InvalidInput, NotFound

MIN_INTERVAL_S = 1
MAX_INTERVAL_S = 366 * 86_400
# Devices per query of a silence pass, and silent-set changes per write transaction.
SLICE = 500
_CHUNK = 500


def parse_interval(value: object) -> int | None:
    """An interval in whole seconds, or None (no expectation); InvalidInput otherwise."""
    if value is None:
        return None
    if type(value) is not int or not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:
        raise InvalidInput(f"interval_s must be null or an integer {MIN_INTERVAL_S}.."
                           f"{MAX_INTERVAL_S} (seconds)")
    return value


@dataclass(frozen=True)
class CheckIn:
    """A device's expected check-in: its own interval, the shortest of its groups', and the
    one in force."""

    own_s: int | None
    groups_s: int | None

    @property
    def interval_s(self) -> int | None:
        return self.own_s if self.own_s is not None else self.groups_s

    def to_json(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "own_interval_s": self.own_s,
                "group_interval_s": self.groups_s}


@dataclass(frozen=True)
class SilentDevice:
    key: str
    name: str
    since_ms: int
    last_seen_ms: int | None
    interval_s: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "silent_since_ms": self.since_ms,
                "last_seen_ms": self.last_seen_ms, "interval_s": self.interval_s}


@dataclass(frozen=True)
class SilenceChange:
    """What one check found: devices that fell silent, and devices heard from again."""

    silent: list[SilentDevice]
    recovered: list[SilentDevice]


# Every active, offline device with a key in ($1, $2] ($2: through the last key when the
# upper-bound clauses are dropped), with its own interval, the shortest of its groups', and
# its last contact; the caller keeps those past their interval (at most a slice of rows).
# The groups' interval is looked up per device (memberships_by_device, then the group's
# row) and presence is joined within the range: both engines then read the key range only,
# where joins on whole tables made PostgreSQL hash every group and every presence row for
# each slice.
_CANDIDATES = """
SELECT d.key, d.name, dc.interval_s AS own_s,
       (SELECT MIN(gc.interval_s) FROM memberships m
        JOIN group_checkin gc ON gc.group_id = m.group_id WHERE m.device_key = d.key) AS groups_s,
       CASE WHEN p.last_seen_ms IS NULL THEN d.last_seen_ms
            WHEN d.last_seen_ms IS NULL OR p.last_seen_ms > d.last_seen_ms THEN p.last_seen_ms
            ELSE d.last_seen_ms END AS last_seen_ms,
       d.enrolled_at_ms
FROM devices d
LEFT JOIN device_checkin dc ON dc.device_key = d.key
LEFT JOIN device_presence p ON p.device_key = d.key
    AND p.device_key > $1 AND p.device_key <= $2
WHERE d.key > $1 AND d.key <= $2 AND d.revoked_at_ms IS NULL
  AND (p.online IS NULL OR p.online = 0)
"""


class CheckIns:
    """Reading and setting expected check-in intervals (each change is audited)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def of_device(self, key: str) -> CheckIn:
        own = await self.db.fetchval("SELECT interval_s FROM device_checkin WHERE device_key = $1",
                                     key)
        groups = await self.db.fetchval(
            "SELECT MIN(gc.interval_s) FROM memberships m JOIN group_checkin gc"
            " ON gc.group_id = m.group_id WHERE m.device_key = $1", key)
        return CheckIn(own, groups)

    async def of_group(self, group_id: str) -> int | None:
        return await self.db.fetchval("SELECT interval_s FROM group_checkin WHERE group_id = $1",
                                      group_id)

    async def set_device(self, key: str, interval_s: int | None, actor: Actor = SYSTEM) -> None:
        await self._set("device_checkin", "device_key", "devices", "key", key, interval_s,
                        actor, "device.checkin")

    async def set_group(self, group_id: str, interval_s: int | None,
                        actor: Actor = SYSTEM) -> None:
        await self._set("group_checkin", "group_id", "peer_groups", "id", group_id, interval_s,
                        actor, "group.checkin")

    async def _set(self, table: str, column: str, owner: str, owner_key: str, subject: str,
                   interval_s: int | None, actor: Actor, action: str) -> None:
        async with self.db.transaction() as conn:
            if await conn.fetchrow(f"SELECT {owner_key} FROM {owner} WHERE {owner_key} = $1",
                                   subject) is None:
                raise NotFound(f"no {owner.rstrip('s').replace('peer_', '')} {subject}")
            before = await conn.fetchval(f"SELECT interval_s FROM {table} WHERE {column} = $1",
                                         subject)
            if before == interval_s:
                return
            await conn.execute(f"DELETE FROM {table} WHERE {column} = $1", subject)
            if interval_s is not None:
                await conn.execute(f"INSERT INTO {table} ({column}, interval_s) VALUES ($1, $2)",
                                   subject, interval_s)
            await audit.record(conn, actor, action, subject, interval_s=interval_s,
                               previous=before)


class SilenceWatch:
    """Finds silent devices and keeps `silent_devices` in step; one per oracle process."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def check(self, now_ms: int) -> SilenceChange:
        """One pass over the fleet, SLICE devices at a time; what changed since the last."""
        change = SilenceChange([], [])
        low = ""
        while True:
            high = await self.db.fetchval(
                f"SELECT key FROM devices WHERE key > $1 ORDER BY key LIMIT 1 OFFSET {SLICE - 1}",
                low)
            part = await self._check_keys(now_ms, low, high)
            change.silent.extend(part.silent)
            change.recovered.extend(part.recovered)
            if high is None:
                return change
            low = high
            await asyncio.sleep(0)  # let requests in between slices

    async def _check_keys(self, now_ms: int, low: str, high: str | None) -> SilenceChange:
        """Keys in (low, high] (None: every key after low): find the silent, and write down
        what changed.  Bounds are keys in the database's own order (no sentinel that a
        PostgreSQL collation might sort elsewhere)."""
        candidates, held_sql = _CANDIDATES, (
            "SELECT s.device_key, s.since_ms, s.last_seen_ms, s.interval_s, d.name,"
            " d.revoked_at_ms FROM silent_devices s JOIN devices d ON d.key = s.device_key"
            " WHERE s.device_key > $1 AND s.device_key <= $2")
        bounds: tuple[str, ...] = (low, high) if high is not None else (low,)
        if high is None:
            candidates = candidates.replace(" AND p.device_key <= $2", "").replace(
                " AND d.key <= $2", "")
            held_sql = held_sql.replace(" AND s.device_key <= $2", "")
        found = {}
        for r in await self.db.fetch(candidates, *bounds):
            interval_s = r["own_s"] if r["own_s"] is not None else r["groups_s"]
            contact = r["last_seen_ms"] if r["last_seen_ms"] is not None else r["enrolled_at_ms"]
            if interval_s is not None and contact + 1000 * interval_s < now_ms:
                found[r["key"]] = r
        held = {r["device_key"]: r for r in await self.db.fetch(held_sql, *bounds)}
        fell = [SilentDevice(key, r["name"], now_ms, r["last_seen_ms"],
                             r["own_s"] if r["own_s"] is not None else r["groups_s"])
                for key, r in sorted(found.items()) if key not in held]
        gone = [key for key in held if key not in found]
        # Heard from again, or its interval was lifted; a revoked device is not "back".
        back = [SilentDevice(key, held[key]["name"], held[key]["since_ms"],
                             held[key]["last_seen_ms"], held[key]["interval_s"])
                for key in sorted(gone) if held[key]["revoked_at_ms"] is None]
        for start in range(0, max(len(fell), len(gone)), _CHUNK):
            async with self.db.transaction() as conn:
                await conn.executemany(
                    "INSERT INTO silent_devices (device_key, since_ms, last_seen_ms, interval_s)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (device_key) DO NOTHING",
                    [(d.key, d.since_ms, d.last_seen_ms, d.interval_s)
                     for d in fell[start:start + _CHUNK]])
                await conn.executemany("DELETE FROM silent_devices WHERE device_key = $1",
                                       [(key,) for key in gone[start:start + _CHUNK]])
        return SilenceChange(fell, back)

    async def count(self) -> int:
        """Silent devices as of the last check (which drops revoked ones)."""
        return int(await self.db.fetchval("SELECT COUNT(*) FROM silent_devices"))

    async def of_devices(self, keys: list[str]) -> Mapping[str, SilentDevice]:
        if not keys:
            return {}
        marks = ", ".join(f"${n}" for n in range(1, len(keys) + 1))
        rows = await self.db.fetch(
            "SELECT s.device_key, d.name, s.since_ms, s.last_seen_ms, s.interval_s"
            " FROM silent_devices s JOIN devices d ON d.key = s.device_key"
            f" WHERE s.device_key IN ({marks})", *keys)
        return {r["device_key"]: SilentDevice(r["device_key"], r["name"], r["since_ms"],
                                              r["last_seen_ms"], r["interval_s"]) for r in rows}
