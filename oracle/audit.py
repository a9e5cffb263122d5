"""The audit log: who changed what, when and from where; appended, never edited.

Every administrative change appends its entry inside the transaction that
makes the change (`record`), so an entry exists exactly when the change
committed: a crash cannot leave a change without its entry or an entry for
a change that rolled back.  This module holds the only SQL that touches the
table, an INSERT and SELECTs; no API route updates or deletes an entry.

Failed logins are not entries: anyone can cause them, so they would let an
unauthenticated client grow an append-only table without bound (they go to
the log and the login throttle instead).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime.clock import now_ms

from .db import Connection
from .errors import InvalidInput
from .pagination import Page, decode_cursor, encode_cursor, parse_limit

_LISTING = "audit"
DEFAULT_LIMIT = 50


@dataclass(frozen=True)
class Actor:
    """Who makes a change: an admin's session, an API token, a device, or the oracle itself."""

    name: str
    via: str
    address: str = ""


# Changes no request asked for: the CLI, the demo, tests that drive the registry directly.
SYSTEM = Actor("oracle", "internal")


def names_another_kind(username: str) -> bool:
    """Whether an administrator with this username would read, in the log and its `actor`
    filter, as another kind of actor: those are `kind:…` (`token:NAME`, `cli:USER`,
    `device:cpk_…`) or SYSTEM's name, and an admin is their bare username.  Only ASCII is
    taken: `cli：root` (a fullwidth colon) or `оracle` (a Cyrillic о) read the same."""
    return (not username.isascii() or ":" in username
            or username.casefold() == SYSTEM.name.casefold())


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at_ms: int
    actor: str
    via: str
    address: str
    action: str
    target: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "at_ms": self.at_ms, "actor": self.actor, "via": self.via,
                "address": self.address, "action": self.action, "target": self.target,
                "detail": self.detail}


async def record(conn: Connection, actor: Actor, action: str, target: str = "",
                 **detail: Any) -> None:
    """Append one entry; call inside the change's own transaction (it serialises writers,
    which makes max(id) + 1 safe)."""
    await conn.execute(
        "INSERT INTO audit_log (id, at_ms, actor, via, address, action, target, detail)"
        " SELECT COALESCE(MAX(id), 0) + 1, $1, $2, $3, $4, $5, $6, $7 FROM audit_log",
        now_ms(), actor.name, actor.via, actor.address, action, target,
        json.dumps(detail, sort_keys=True, separators=(",", ":")))


@dataclass(frozen=True)
class AuditQuery:
    """Newest first; optionally only one actor's entries, or one target's, or one action's."""

    actor: str = ""
    target: str = ""
    action: str = ""
    limit: int = DEFAULT_LIMIT
    cursor: str = ""

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> AuditQuery:
        fields = {name: params.get(name, "").strip() for name in ("actor", "target", "action")}
        if any(len(value) > 200 for value in fields.values()):
            raise InvalidInput("actor, target and action must be at most 200 characters")
        query = cls(**fields, limit=parse_limit(params, DEFAULT_LIMIT) or DEFAULT_LIMIT,
                    cursor=params.get("cursor", ""))
        query.before()
        return query

    def before(self) -> int | None:
        if not self.cursor:
            return None
        return int(decode_cursor(self.cursor, _LISTING, (int,))[0])


async def entries(conn: Connection, query: AuditQuery) -> Page[AuditEntry]:
    where, args = [], []
    for column in ("actor", "target", "action"):
        if getattr(query, column):
            args.append(getattr(query, column))
            where.append(f"{column} = ${len(args)}")
    before = query.before()
    if before is not None:
        args.append(before)
        where.append(f"id < ${len(args)}")
    args.append(query.limit + 1)
    rows = await conn.fetch(
        "SELECT id, at_ms, actor, via, address, action, target, detail FROM audit_log"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY id DESC LIMIT ${len(args)}", *args)
    items = [AuditEntry(**{**row, "detail": json.loads(row["detail"])})
             for row in rows[:query.limit]]
    more = len(rows) > query.limit
    return Page(items, encode_cursor(_LISTING, (items[-1].id,)) if more else None)
