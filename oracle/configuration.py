"""Desired configuration per peer group and per device, merged, issued and reported (SPEC §21).

An administrator sets a JSON object on a group or a device.  Each device's
**merged** document is its groups' documents in group-name order (ties
broken by group id), then its own, each merged *deep* over the result so
far: where both sides hold an object at a key, they merge key by key;
anything else (a string, a number, an array, null) replaces what was there.
So a device in several groups gets every group's keys, the group later in
name order winning a conflict, and its own document wins over all of them.
Nothing removes a key a group set; a device overrides it (null included).

Every change re-derives the merged documents in the transaction that made it
(`reconcile`) and issues a new version to each active device whose merged
document changed: one row per device in `config_pushes`, the pusher's outbox,
stamped with the oracle's epoch like peer changes.  A device that has never
been issued one holds `{}`, so an empty merged document is not pushed.
A change that would make some device's merged document exceed the bound a
device accepts (`MAX_CONFIG_BYTES`) is refused whole, naming the device.
The device answers each CONFIG with a report (the stamp it applied and its
reported state); a device is **behind** while the newest version issued to
it is above the version it last reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from proto.config import (MAX_CONFIG_BYTES, ConfigReport, JsonObject, document_text, merged,
                          parse_document)
from proto.errors import ProtocolError
from runtime.clock import now_ms

from . import audit
from .audit import SYSTEM, Actor
from .db import Connection, Database
from .errors import InvalidInput, NotFound


def parse_config(text: str, what: str = "configuration") -> JsonObject:
    """An administrator's document (request body, dashboard form), or InvalidInput saying
    what is wrong with it: not JSON, not an object, too large, too deep."""
    try:
        return parse_document(text, what)
    except ProtocolError as exc:
        raise InvalidInput(exc.message) from None


@dataclass(frozen=True)
class PendingConfig:
    """The newest merged document of one device that no relay has stored yet."""

    device_key: str
    epoch: int
    version: int
    document: str
    envelope: str | None


@dataclass(frozen=True)
class DeviceConfig:
    """What the oracle knows of one device's configuration: desired, issued and reported."""

    key: str
    desired: JsonObject | None  # the device's own document (None: none set)
    merged: JsonObject  # what it is issued: its groups' and its own, merged
    version: int  # newest version issued (0: none)
    epoch: int
    sent_at_ms: int | None
    last_error: str | None
    reported_epoch: int
    reported_version: int
    reported: JsonObject | None
    reported_at_ms: int | None
    revoked: bool

    @property
    def behind(self) -> bool:
        return not self.revoked and self.reported_version < self.version

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "desired": self.desired, "merged": self.merged,
                "version": self.version, "epoch": self.epoch, "sent_at_ms": self.sent_at_ms,
                "last_error": self.last_error,
                "reported": {"epoch": self.reported_epoch, "version": self.reported_version,
                             "state": self.reported, "at_ms": self.reported_at_ms},
                "behind": self.behind}


async def reconcile(conn: Connection, everyone: bool = False,
                    only: Collection[str] | None = None) -> int:
    """Issue a new version to every active device whose merged document changed (or, with
    `everyone`, to every active device that has one, after a restore); how many were issued.
    `only`: the devices a change can have altered (a member added, a device's own document),
    so a change to one device merges one document, not the fleet's (0.15 s at 10,000).
    InvalidInput (rolling the caller's transaction back) if a merged document is too large."""
    groups = await conn.fetch(
        "SELECT c.group_id, c.document FROM group_configs c JOIN peer_groups g"
        " ON g.id = c.group_id ORDER BY g.name, g.id")
    order = {row["group_id"]: n for n, row in enumerate(groups)}
    group_docs = {row["group_id"]: json.loads(row["document"]) for row in groups}
    own = {row["device_key"]: json.loads(row["document"])
           for row in await conn.fetch("SELECT device_key, document FROM device_configs")}
    member_of: dict[str, list[str]] = {}
    for row in await conn.fetch("SELECT group_id, device_key FROM memberships"):
        if row["group_id"] in order:
            member_of.setdefault(row["device_key"], []).append(row["group_id"])
    devices = await conn.fetch(
        "SELECT d.key, p.document FROM devices d LEFT JOIN config_pushes p"
        " ON p.device_key = d.key WHERE d.revoked_at_ms IS NULL ORDER BY d.key")
    epoch = await conn.fetchval("SELECT epoch FROM access_list_state WHERE id = 1")
    now, issued = now_ms(), 0
    for device in devices:
        key = device["key"]
        if only is not None and key not in only:
            continue
        ids = sorted(member_of.get(key, ()), key=order.__getitem__)
        text = document_text(merged([*(group_docs[g] for g in ids), own.get(key, {})]))
        last = device["document"]
        if text == (last if last is not None else "{}") and not (everyone and last is not None):
            continue
        size = len(text.encode("utf-8"))
        if size > MAX_CONFIG_BYTES:
            raise InvalidInput(f"the merged configuration of device {key} would be {size}"
                               f" bytes, more than {MAX_CONFIG_BYTES}")
        version = await conn.fetchval(
            "UPDATE devices SET config_version = config_version + 1 WHERE key = $1"
            " RETURNING config_version", key)
        await conn.execute(
            "INSERT INTO config_pushes (device_key, epoch, version, document, created_at_ms)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (device_key) DO UPDATE SET"
            " epoch = excluded.epoch, version = excluded.version, document = excluded.document,"
            " created_at_ms = excluded.created_at_ms, envelope = NULL, sent_at_ms = NULL,"
            " attempts = 0, last_error = NULL", key, epoch, version, text, now)
        issued += 1
    return issued


class Configurations:
    """Desired documents in, merged documents out to the pusher, reports back in."""

    def __init__(self, db: Database, on_change: Callable[[], None]) -> None:
        self.db = db
        self._on_change = on_change

    # -- desired ---------------------------------------------------------------------------

    async def group_config(self, group_id: str) -> JsonObject | None:
        await self._group_exists(self.db, group_id)
        text = await self.db.fetchval(
            "SELECT document FROM group_configs WHERE group_id = $1", group_id)
        return None if text is None else json.loads(text)

    async def set_group_config(self, group_id: str, document: JsonObject | None,
                               actor: Actor = SYSTEM) -> int:
        """Set (None: clear) a group's document; how many devices were issued a new version."""
        async with self.db.transaction() as conn:
            await self._group_exists(conn, group_id)
            await conn.execute("DELETE FROM group_configs WHERE group_id = $1", group_id)
            if document is not None:
                await conn.execute("INSERT INTO group_configs (group_id, document, updated_at_ms)"
                                   " VALUES ($1, $2, $3)", group_id, document_text(document),
                                   now_ms())
            members = {row["device_key"] for row in await conn.fetch(
                "SELECT device_key FROM memberships WHERE group_id = $1", group_id)}
            issued = await reconcile(conn, only=members)
            await audit.record(conn, actor, "group.config.set" if document is not None
                               else "group.config.clear", group_id, issued=issued)
        self._on_change()
        return issued

    async def set_device_config(self, key: str, document: JsonObject | None,
                                actor: Actor = SYSTEM) -> int:
        """Set (None: clear) a device's own document; 1 if it was issued a new version."""
        async with self.db.transaction() as conn:
            if await conn.fetchrow("SELECT key FROM devices WHERE key = $1", key) is None:
                raise NotFound(f"no device {key}")
            await conn.execute("DELETE FROM device_configs WHERE device_key = $1", key)
            if document is not None:
                await conn.execute("INSERT INTO device_configs (device_key, document,"
                                   " updated_at_ms) VALUES ($1, $2, $3)", key,
                                   document_text(document), now_ms())
            issued = await reconcile(conn, only={key})
            await audit.record(conn, actor, "device.config.set" if document is not None
                               else "device.config.clear", key, issued=issued)
        self._on_change()
        return issued

    async def device_config(self, key: str) -> DeviceConfig:
        row = await self.db.fetchrow(
            "SELECT d.key, d.revoked_at_ms, d.config_version, d.reported_config_epoch,"
            " d.reported_config_version, d.reported_config, d.reported_config_at_ms,"
            " c.document AS desired, p.document AS merged, p.epoch, p.sent_at_ms, p.last_error"
            " FROM devices d LEFT JOIN device_configs c ON c.device_key = d.key"
            " LEFT JOIN config_pushes p ON p.device_key = d.key WHERE d.key = $1", key)
        if row is None:
            raise NotFound(f"no device {key}")
        return DeviceConfig(
            row["key"], _loads(row["desired"]), _loads(row["merged"]) or {},
            int(row["config_version"]), int(row["epoch"] or 0), row["sent_at_ms"],
            row["last_error"], int(row["reported_config_epoch"]),
            int(row["reported_config_version"]), _loads(row["reported_config"]),
            row["reported_config_at_ms"], row["revoked_at_ms"] is not None)

    async def behind(self, limit: int = 1000) -> list[str]:
        """Active devices whose newest configuration they have not reported, by key."""
        rows = await self.db.fetch(
            "SELECT key FROM devices WHERE revoked_at_ms IS NULL"
            " AND reported_config_version < config_version ORDER BY key LIMIT $1", limit)
        return [row["key"] for row in rows]

    async def behind_among(self, keys: list[str]) -> set[str]:
        """Which of `keys` (a page's worth) are behind."""
        if not keys:
            return set()
        placeholders = ", ".join(f"${n}" for n in range(1, len(keys) + 1))
        rows = await self.db.fetch(
            "SELECT key FROM devices WHERE revoked_at_ms IS NULL AND reported_config_version"
            f" < config_version AND key IN ({placeholders})", *keys)
        return {row["key"] for row in rows}

    # -- the outbox and the reports --------------------------------------------------------

    async def pending(self, limit: int = 100) -> list[PendingConfig]:
        rows = await self.db.fetch(
            "SELECT p.device_key, p.epoch, p.version, p.document, p.envelope"
            " FROM config_pushes p JOIN devices d ON d.key = p.device_key"
            " WHERE p.sent_at_ms IS NULL AND d.revoked_at_ms IS NULL"
            " ORDER BY p.created_at_ms, p.device_key LIMIT $1", limit)
        return [PendingConfig(r["device_key"], int(r["epoch"]), int(r["version"]),
                              r["document"], r["envelope"]) for r in rows]

    async def record_sealed(self, push: PendingConfig, envelope_b64: str) -> None:
        """The exact envelope, kept before sending so a retry resends the same bytes."""
        await self.db.execute("UPDATE config_pushes SET envelope = $1 WHERE device_key = $2"
                              " AND version = $3", envelope_b64, push.device_key, push.version)

    async def mark_sent(self, push: PendingConfig, sent_at_ms: int) -> None:
        """`sent_at_ms`: when the send began, so the device's report (which can arrive before
        the relay's ACCEPTED does) is never older than the push it answers."""
        await self.db.execute(
            "UPDATE config_pushes SET sent_at_ms = $1, attempts = attempts + 1,"
            " last_error = NULL WHERE device_key = $2 AND version = $3",
            sent_at_ms, push.device_key, push.version)

    async def mark_failed(self, push: PendingConfig, error: str) -> None:
        await self.db.execute(
            "UPDATE config_pushes SET attempts = attempts + 1, last_error = $1"
            " WHERE device_key = $2 AND version = $3", error[:500], push.device_key,
            push.version)

    async def record_report(self, device: str, report: ConfigReport) -> bool:
        """Keep a device's report unless it names an older stamp than the one kept (a
        replayed report, through a relay that never stored the original); an equal stamp
        replaces it (a newer state of the same configuration).  A revoked key's report is
        not kept: a relay whose access list lags, or one enforcing none, still carries it.
        False if not kept."""
        async with self.db.transaction() as conn:
            kept = await conn.fetch(
                "UPDATE devices SET reported_config_epoch = $1, reported_config_version = $2,"
                " reported_config = $3, reported_config_at_ms = $4, last_seen_ms = $4"
                " WHERE key = $5 AND revoked_at_ms IS NULL AND (reported_config_epoch < $1"
                " OR (reported_config_epoch = $1 AND reported_config_version <= $2))"
                " RETURNING key", report.epoch,
                report.version, document_text(report.reported), now_ms(), device)
        return bool(kept)

    @staticmethod
    async def _group_exists(conn: Connection, group_id: str) -> None:
        if await conn.fetchrow("SELECT id FROM peer_groups WHERE id = $1", group_id) is None:
            raise NotFound(f"no group {group_id}")


def _loads(text: str | None) -> JsonObject | None:
    return None if text is None else json.loads(text)
