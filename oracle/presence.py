"""Presence at the oracle: relays' reports applied to each device's connections, and read back.

A relay process reports connections (`proto.presence.PresenceReport`, SPEC
§20); each becomes a row of `presence_history`, named by (device, relay
instance, connected_at_ms) with the connection's cumulative counts, so a
report applied twice changes nothing and the totals in `device_presence`
grow by exactly what is new.  `device_presence` is derived from the
history after every change: online while some connection is open (the one
that began last names the relay), else offline since the last one ended.
Relays may disagree on clocks and reports of different relays interleave,
so nothing depends on the order reports arrive in beyond each instance's
own sequence.

Where the oracle's knowledge ends:

- a relay process that misses its lease (`lease_ms` after its last report;
  a process last heard before the oracle started gets its lease again and a
  minute more from that start, since relays back off while the oracle is
  down) is taken for dead: its open connections end at the time
  it was last heard;
- a snapshot lists every connection an instance holds: once its last part
  arrives, with no part missed, the instance's open connections it did not
  list end at the snapshot's time;
- a report that does not follow the instance's previous one (a gap: a lost
  report, an unknown instance, a restored database) is applied and answered
  with a request for a snapshot;
- a revoked device's connections end when it is revoked (`end_connections`,
  in the revocation's transaction), and reports about it are ignored from then
  on: a relay's access list may lag, and the oracle's own word is the newer.

Writes go in chunks, each its own short transaction, so a 10,000-connection
snapshot never holds the database (or, on SQLite, the event loop) for long.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proto import PublicKey
from proto.presence import ConnectionState, PresenceReport

from .db import Connection, Database

# Connections per write transaction, and keys per IN (…) list.
CHUNK = 500
# Connections kept per device in the history: the newest (a relay cannot hold more open).
HISTORY_PER_DEVICE = 50
# Relay processes heard from and not yet taken for dead, per relay key: replicas share a key,
# but a key reporting this many processes at once is broken or hostile.  As many taken for
# dead are remembered per key, the most recently heard: a key that reported fresh processes
# with a lease of a millisecond (each taken for dead at the next check, making room for
# more) grew that memory by ~34 rows a second, each kept a week.
MAX_INSTANCES_PER_RELAY_KEY = 1024
# After the oracle starts, a relay process has its lease again plus this long to be heard
# before its connections end: while the oracle was down it backed off (at most 60 s).
START_GRACE_MS = 60_000
# Relay processes taken for dead are forgotten after this long.
FORGET_GONE_MS = 7 * 86_400_000


@dataclass(frozen=True)
class PresenceRecord:
    """A device's presence as the relays last reported it."""

    online: bool
    relay_key: str | None
    instance: str | None
    connected_at_ms: int | None
    last_seen_ms: int | None  # None: no relay ever reported it
    sent: int
    received: int
    refused: int

    def to_json(self) -> dict[str, Any]:
        return {"online": self.online, "relay_key": self.relay_key,
                "relay_instance": self.instance, "connected_at_ms": self.connected_at_ms,
                "last_seen_ms": self.last_seen_ms,
                "messages": {"sent": self.sent, "received": self.received,
                             "refused": self.refused}}


NEVER_SEEN = PresenceRecord(False, None, None, None, None, 0, 0, 0)


@dataclass(frozen=True)
class ConnectionRecord:
    """One connection in a device's presence history."""

    relay_key: str
    instance: str
    connected_at_ms: int
    disconnected_at_ms: int | None
    sent: int
    received: int
    refused: int

    def to_json(self) -> dict[str, Any]:
        return {"relay_key": self.relay_key, "relay_instance": self.instance,
                "connected_at_ms": self.connected_at_ms,
                "disconnected_at_ms": self.disconnected_at_ms,
                "messages": {"sent": self.sent, "received": self.received,
                             "refused": self.refused}}


class ReportRefused(Exception):
    """A well-signed report the oracle will not apply, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@functools.lru_cache(maxsize=1 << 16)
def _text(key: PublicKey) -> str:
    """A key's cpk_… text (base32 and a checksum: worth remembering for the devices that
    report every few seconds)."""
    return key.text


class Presence:
    """Every read and write of presence; one per oracle process."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # One report per relay process at a time, in its sequence (a retry could overlap);
        # a lock lives while some report holds or awaits it.
        self._instance_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())

    # -- reports ----------------------------------------------------------------------------

    async def apply(self, report: PresenceReport, now_ms: int) -> bool:
        """Apply a verified report; True if the oracle wants a snapshot from this process next."""
        instance = report.instance.hex()
        lock = self._instance_locks.get(instance)
        if lock is None:
            lock = self._instance_locks[instance] = asyncio.Lock()
        async with lock:
            return await self._apply(report, instance, now_ms)

    async def _apply(self, report: PresenceReport, instance: str, now_ms: int) -> bool:
        row = await self.db.fetchrow(
            "SELECT relay_key, last_sequence, snapshot_from, gone FROM relay_instances"
            " WHERE instance = $1", instance)
        if row is not None and row["relay_key"] != report.relay.text:
            raise ReportRefused(409, f"relay process {instance} reports with another relay key")
        known = row is not None and not row["gone"]
        if not known:
            live = await self.db.fetchval(
                "SELECT COUNT(*) FROM relay_instances WHERE relay_key = $1 AND gone = 0",
                report.relay.text)
            if live >= MAX_INSTANCES_PER_RELAY_KEY:
                raise ReportRefused(429, f"relay key {report.relay.text} already reports {live}"
                                         " live processes")
        if known and report.sequence <= row["last_sequence"]:  # type: ignore[index]
            return False  # applied already (sequences only grow)
        follows = known and report.sequence == row["last_sequence"] + 1  # type: ignore[index]
        starts_snapshot = report.is_snapshot and report.snapshot_from == report.sequence
        snapshot_from = row["snapshot_from"] if known else None  # type: ignore[index]
        if starts_snapshot:
            snapshot_from = report.sequence
        elif not report.is_snapshot or not follows or snapshot_from != report.snapshot_from:
            snapshot_from = None  # not a snapshot, or one with a part this oracle missed
        wants_snapshot = not follows and not starts_snapshot
        relay_key = report.relay.text
        connections = report.connections
        # All but the last chunk in transactions of their own, with requests let in between;
        # the last one commits with the instance's new sequence.
        last = max(0, (len(connections) - 1) // CHUNK * CHUNK)
        for start in range(0, last, CHUNK):
            async with self.db.transaction() as conn:
                await self._apply_chunk(conn, connections[start:start + CHUNK], instance,
                                        relay_key, report.sequence, now_ms)
            await asyncio.sleep(0)
        async with self.db.transaction() as conn:
            await self._apply_chunk(conn, connections[last:], instance, relay_key,
                                    report.sequence, now_ms)
            if report.snapshot_last:
                if snapshot_from == report.snapshot_from:
                    await self._end_unlisted(conn, instance, snapshot_from, report.issued_at_ms)
                else:
                    wants_snapshot = True
                snapshot_from = None
            lease_until = now_ms + report.lease_ms
            if row is None:
                await conn.execute(
                    "INSERT INTO relay_instances (instance, relay_key, first_heard_ms,"
                    " last_heard_ms, lease_until_ms, lease_ms, last_sequence, snapshot_from,"
                    " gone) VALUES ($1, $2, $3, $3, $4, $5, $6, $7, 0)",
                    instance, relay_key, now_ms, lease_until, report.lease_ms, report.sequence,
                    snapshot_from)
            else:
                await conn.execute(
                    "UPDATE relay_instances SET last_heard_ms = $2, lease_until_ms = $3,"
                    " lease_ms = $4, last_sequence = $5, snapshot_from = $6, gone = 0"
                    " WHERE instance = $1",
                    instance, now_ms, lease_until, report.lease_ms, report.sequence,
                    snapshot_from)
        return wants_snapshot

    async def _apply_chunk(self, conn: Connection, chunk: Sequence[ConnectionState],
                           instance: str, relay_key: str, sequence: int, now_ms: int) -> None:
        """Record a chunk of connections, then derive their devices' presence.

        The devices' whole histories (at most HISTORY_PER_DEVICE rows each) are read
        once by primary key and updated in memory, which also gives the rows to prune
        and the presence to derive: no query filters on the instance, which made
        PostgreSQL scan every row of a relay process (its index) once per chunk.
        """
        if not chunk:
            return
        texts = {c.device: _text(c.device) for c in chunk}
        keys = list(set(texts.values()))
        # Deleted since, or revoked (revoking ended its connections here, and a relay's
        # list may lag): forgotten.  A key its device rotated away from is not: it drains
        # its mailbox, and its connection's end is reported when the drain ends.
        reported = {r["key"] for r in await conn.fetch(
            f"SELECT key FROM devices WHERE key IN ({_placeholders(len(keys))})"
            " AND (revoked_at_ms IS NULL OR rotated_to IS NOT NULL)", *keys)}
        chunk = [c for c in chunk if texts[c.device] in reported]
        if not chunk:
            return
        keys = sorted({texts[c.device] for c in chunk})
        histories = await _histories(conn, keys)
        written, totals = [], []
        for c in chunk:
            key = texts[c.device]
            rows = histories.setdefault(key, {})
            before = rows.get((instance, c.connected_at_ms))
            old = (0, 0, 0) if before is None else (before["sent"], before["received"],
                                                    before["refused"])
            counts = (max(old[0], c.sent), max(old[1], c.received), max(old[2], c.refused))
            rows[(instance, c.connected_at_ms)] = {
                "instance": instance, "relay_key": relay_key,
                "connected_at_ms": c.connected_at_ms, "disconnected_at_ms": c.disconnected_at_ms,
                "sent": counts[0], "received": counts[1], "refused": counts[2]}
            written.append((key, instance, c.connected_at_ms, relay_key, c.disconnected_at_ms,
                            *counts, sequence))
            if counts != old:
                totals.append((key, counts[0] - old[0], counts[1] - old[1], counts[2] - old[2]))
        await conn.executemany(
            "INSERT INTO presence_history (device_key, instance, connected_at_ms, relay_key,"
            " disconnected_at_ms, sent, received, refused, confirmed_sequence)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " ON CONFLICT (device_key, instance, connected_at_ms) DO UPDATE SET"
            " disconnected_at_ms = excluded.disconnected_at_ms, sent = excluded.sent,"
            " received = excluded.received, refused = excluded.refused,"
            " confirmed_sequence = excluded.confirmed_sequence", written)
        await conn.executemany(
            "INSERT INTO device_presence (device_key, last_seen_ms) VALUES ($1, $2)"
            " ON CONFLICT (device_key) DO NOTHING", [(key, now_ms) for key in keys])
        await conn.executemany(
            "UPDATE device_presence SET sent = sent + $2, received = received + $3,"
            " refused = refused + $4 WHERE device_key = $1", totals)
        pruned = []
        for key in keys:
            rows = histories[key]
            newest_first = sorted(rows, key=lambda name: rows[name]["connected_at_ms"],
                                  reverse=True)
            for name in newest_first[HISTORY_PER_DEVICE:]:
                pruned.append((key, *name))
                del rows[name]
        await conn.executemany(
            "DELETE FROM presence_history WHERE device_key = $1 AND instance = $2"
            " AND connected_at_ms = $3", pruned)
        await _write_presence(conn, histories, now_ms)

    async def _end_unlisted(self, conn: Connection, instance: str, snapshot_from: int,
                            at_ms: int) -> None:
        """A whole snapshot arrived: the instance's open connections it did not list are over."""
        rows = await conn.fetch(
            "SELECT DISTINCT device_key FROM presence_history WHERE instance = $1"
            " AND disconnected_at_ms IS NULL AND confirmed_sequence < $2", instance, snapshot_from)
        await conn.execute(
            "UPDATE presence_history SET disconnected_at_ms = $3 WHERE instance = $1"
            " AND disconnected_at_ms IS NULL AND confirmed_sequence < $2",
            instance, snapshot_from, at_ms)
        await _derive(conn, [r["device_key"] for r in rows], at_ms)

    async def expire_leases(self, now_ms: int, started_ms: int) -> int:
        """End the connections of relay processes whose lease passed unheard; how many processes.

        A process last heard before the oracle started (`started_ms`) also has its
        lease again and START_GRACE_MS more from that start: relays back off while
        the oracle is down and may not have had their turn yet.
        """
        gone = await self.db.fetch(
            "SELECT instance, relay_key, last_heard_ms FROM relay_instances WHERE gone = 0"
            " AND lease_until_ms < $1 AND (last_heard_ms >= $2 OR $3 + lease_ms < $1)",
            now_ms, started_ms, started_ms + START_GRACE_MS)
        for row in gone:
            async with self.db.transaction() as conn:
                keys = [r["device_key"] for r in await conn.fetch(
                    "SELECT DISTINCT device_key FROM presence_history WHERE instance = $1"
                    " AND disconnected_at_ms IS NULL", row["instance"])]
                await conn.execute(
                    "UPDATE presence_history SET disconnected_at_ms = $2 WHERE instance = $1"
                    " AND disconnected_at_ms IS NULL", row["instance"], row["last_heard_ms"])
                await _derive(conn, keys, now_ms)
                await conn.execute("UPDATE relay_instances SET gone = 1 WHERE instance = $1",
                                   row["instance"])
                await conn.execute(
                    "DELETE FROM relay_instances WHERE relay_key = $1 AND gone = 1 AND instance"
                    " NOT IN (SELECT instance FROM relay_instances WHERE relay_key = $1 AND"
                    " gone = 1 ORDER BY last_heard_ms DESC, instance LIMIT $2)",
                    row["relay_key"], MAX_INSTANCES_PER_RELAY_KEY)
        await self.db.execute("DELETE FROM relay_instances WHERE gone = 1 AND last_heard_ms < $1",
                              now_ms - FORGET_GONE_MS)
        return len(gone)

    # -- reads ------------------------------------------------------------------------------

    async def of_devices(self, keys: Iterable[str]) -> dict[str, PresenceRecord]:
        """Presence of each of `keys` that a relay ever reported (others: NEVER_SEEN)."""
        keys = list(keys)
        found: dict[str, PresenceRecord] = {}
        for start in range(0, len(keys), CHUNK):
            part = keys[start:start + CHUNK]
            for r in await self.db.fetch(
                    "SELECT device_key, online, relay_key, instance, connected_at_ms,"
                    " last_seen_ms, sent, received, refused FROM device_presence"
                    f" WHERE device_key IN ({_placeholders(len(part))})", *part):
                found[r["device_key"]] = PresenceRecord(
                    bool(r["online"]), r["relay_key"], r["instance"], r["connected_at_ms"],
                    r["last_seen_ms"], r["sent"], r["received"], r["refused"])
        return found

    async def of_device(self, key: str) -> PresenceRecord:
        return (await self.of_devices([key])).get(key, NEVER_SEEN)

    async def history(self, key: str, limit: int = 20) -> list[ConnectionRecord]:
        """A device's connections, the newest first."""
        rows = await self.db.fetch(
            "SELECT relay_key, instance, connected_at_ms, disconnected_at_ms, sent, received,"
            " refused FROM presence_history WHERE device_key = $1"
            " ORDER BY connected_at_ms DESC LIMIT $2", key, limit)
        return [ConnectionRecord(**r) for r in rows]

    async def online_count(self) -> int:
        """Devices a relay holds now (an index count: revoking a device ends its connections
        here, `end_connections`, and later reports of it are ignored, so it does not count;
        a key rotated away from counts while it drains)."""
        return int(await self.db.fetchval(
            "SELECT COUNT(*) FROM device_presence WHERE online = 1"))

    async def live_instances(self) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM relay_instances WHERE gone = 0"))


async def end_connections(conn: Connection, key: str, at_ms: int) -> None:
    """The device was revoked: its open connections end now, in the revocation's own
    transaction, and reports about it are ignored from then on (`_apply_chunk`), so no
    relay whose access list lags can show it online again."""
    await conn.execute("UPDATE presence_history SET disconnected_at_ms = $2"
                       " WHERE device_key = $1 AND disconnected_at_ms IS NULL", key, at_ms)
    await _derive(conn, [key], at_ms)


async def _derive(conn: Connection, keys: list[str], now_ms: int) -> None:
    """Recompute `device_presence` of `keys` from their history, a chunk at a time."""
    for start in range(0, len(keys), CHUNK):
        part = keys[start:start + CHUNK]
        await _write_presence(conn, await _histories(conn, part), now_ms)


async def _write_presence(conn: Connection,
                          histories: dict[str, dict[tuple[str, int], dict[str, Any]]],
                          now_ms: int) -> None:
    """Online on the open connection that began last, else offline since the last end."""
    updates = []
    for key, rows in histories.items():
        open_rows = [r for r in rows.values() if r["disconnected_at_ms"] is None]
        if open_rows:
            r = max(open_rows, key=lambda row: row["connected_at_ms"])
            updates.append((key, 1, r["relay_key"], r["instance"], r["connected_at_ms"],
                            now_ms))
        elif rows:
            updates.append((key, 0, None, None, None,
                            max(r["disconnected_at_ms"] for r in rows.values())))
    await conn.executemany(
        "UPDATE device_presence SET online = $2, relay_key = $3, instance = $4,"
        " connected_at_ms = $5, last_seen_ms = $6 WHERE device_key = $1", updates)


async def _histories(conn: Connection, keys: list[str]
                     ) -> dict[str, dict[tuple[str, int], dict[str, Any]]]:
    """Every recorded connection of `keys` (a chunk), by device, then (instance, start)."""
    found: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    if not keys:
        return found
    for r in await conn.fetch(
            "SELECT device_key, instance, relay_key, connected_at_ms, disconnected_at_ms, sent,"
            " received, refused FROM presence_history"
            f" WHERE device_key IN ({_placeholders(len(keys))})", *keys):
        found.setdefault(r["device_key"], {})[(r["instance"], r["connected_at_ms"])] = r
    return found


def _placeholders(count: int, first: int = 1) -> str:
    return ", ".join(f"${n}" for n in range(first, first + count))
