"""Which devices a listing shows: filters, sort order and cursor, turned into one SQL query.

The dashboard and the API list devices the same way, from the same query
parameters (`DeviceQuery.from_params`): `q` (a case-insensitive substring of
the name, key, a tag or a group's name), `state` (active, revoked, or behind:
active but not acknowledging its newest peer list), `group` (a group id),
`tag` (one exact tag), `online` (true: a relay holds it now; false: none
does), `silent` (true: offline past its expected check-in, `silence`), `sort` (name, -name, enrolled, -enrolled) and `limit`
with `cursor`.  Every filter is a WHERE clause and every sort an index walk
(migration 0004), so a page costs its own rows, not the fleet's; a substring
search still reads every name, which is the price of matching inside names
(about 70 ms per 100,000 devices on SQLite), so it skips what cannot match:
keys and tags hold only a few characters, and group names are matched once
each, not once per member.  `online` and `silent` read the small presence
tables the relays' reports and the silence watch keep (migration 0005).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput
from .pagination import decode_cursor, encode_cursor, parse_limit
from .validation import parse_tags

STATES = ("active", "revoked", "behind", "config_behind")
# sort name → (column, cursor value type); "-name" walks the same index backwards.
SORTS: dict[str, tuple[str, type]] = {"name": ("d.name", str), "enrolled": ("d.enrolled_at_ms", int)}
MAX_QUERY_CHARS = 200
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz234567_")  # cpk_ + lower-case base32
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._:-")
_STATE_SQL = {
    "active": "d.revoked_at_ms IS NULL",
    "revoked": "d.revoked_at_ms IS NOT NULL",
    "behind": "d.revoked_at_ms IS NULL AND d.acked_version < d.peer_version",
    # Issued a configuration it has not reported applying (SPEC §21).
    "config_behind": "d.revoked_at_ms IS NULL AND d.reported_config_version < d.config_version",
}


def like_pattern(needle: str) -> str:
    """`%needle%` for LIKE … ESCAPE '\\', with the needle's own wildcards taken literally."""
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@dataclass(frozen=True)
class DeviceQuery:
    q: str = ""
    state: str = ""
    group: str = ""
    tag: str = ""
    online: bool | None = None
    silent: bool = False
    sort: str = "name"
    limit: int | None = None  # None: every match (the API's answer to clients without `limit`)
    cursor: str = ""

    @classmethod
    def from_params(cls, params: Mapping[str, str], default_limit: int | None) -> DeviceQuery:
        """Parse and check query-string parameters; InvalidInput names what is wrong."""
        q = params.get("q", "").strip()
        if len(q) > MAX_QUERY_CHARS:
            raise InvalidInput(f"q must be at most {MAX_QUERY_CHARS} characters")
        state = params.get("state", "")
        if state not in ("", *STATES):
            raise InvalidInput(f"state must be one of {', '.join(STATES)}")
        sort = params.get("sort", "") or "name"
        if sort.removeprefix("-") not in SORTS:
            raise InvalidInput("sort must be one of name, -name, enrolled, -enrolled")
        tag = params.get("tag", "").strip()
        if tag:
            parsed = parse_tags([tag])
            tag = parsed[0]
        group = params.get("group", "")
        if len(group) > 64:
            raise InvalidInput("group must be a group id")
        online = params.get("online", "")
        if online not in ("", "true", "false"):
            raise InvalidInput("online must be true or false")
        silent = params.get("silent", "")
        if silent not in ("", "true", "false"):
            raise InvalidInput("silent must be true or false")
        query = cls(q, state, group, tag, None if not online else online == "true",
                    silent == "true", sort, parse_limit(params, default_limit),
                    params.get("cursor", ""))
        query.after()  # a bad cursor is refused here, not when the page is read
        return query

    @property
    def descending(self) -> bool:
        return self.sort.startswith("-")

    @property
    def _listing(self) -> str:
        return "devices:" + self.sort

    def after(self) -> list[Any] | None:
        """The cursor's (sort value, key), or None on the first page."""
        if not self.cursor:
            return None
        column_type = SORTS[self.sort.removeprefix("-")][1]
        return decode_cursor(self.cursor, self._listing, (column_type, str))

    def cursor_for(self, row: Mapping[str, Any]) -> str:
        """The cursor of the page after the one ending at `row`."""
        column = SORTS[self.sort.removeprefix("-")][0].removeprefix("d.")
        return encode_cursor(self._listing, (row[column], row["key"]))

    def sql(self, columns: str, fold: str = "lower") -> tuple[str, list[Any]]:
        """SELECT `columns` of this page's devices (one row more than `limit`, to tell if
        another page follows), and its arguments; `fold` is the SQL function that lower-cases
        names for `q` (`Database.fold_function`)."""
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if self.state:
            where.append(_STATE_SQL[self.state])
        if self.group:
            where.append(f"d.key IN (SELECT device_key FROM memberships WHERE group_id = {arg(self.group)})")
        # EXISTS, not IN: a look-up per row of the sort's index walk, which stops at the
        # page's end, where SQLite would read every online key first and sort them
        # (181 ms instead of a few for half of 100,000 devices online).
        if self.online is not None:
            where.append(("EXISTS" if self.online else "NOT EXISTS")
                         + " (SELECT 1 FROM device_presence p WHERE p.device_key = d.key"
                           " AND p.online = 1)")
        if self.silent:
            where.append("EXISTS (SELECT 1 FROM silent_devices s WHERE s.device_key = d.key)")
        if self.tag:
            where.append(f"(' ' || d.tags || ' ') LIKE {arg(f'% {self.tag} %')}")
        if self.q:
            needle = self.q.lower()
            pattern = arg(like_pattern(needle))
            matches = [f"{fold}(d.name) LIKE {pattern} ESCAPE '\\'",
                       f"d.key IN (SELECT device_key FROM memberships WHERE group_id IN"
                       f" (SELECT id FROM peer_groups WHERE {fold}(name) LIKE {pattern}"
                       f" ESCAPE '\\'))"]
            if set(needle) <= _KEY_CHARS:
                matches.append(f"d.key LIKE {pattern} ESCAPE '\\'")
            if set(needle) <= _TAG_CHARS:
                matches.append(f"d.tags LIKE {pattern} ESCAPE '\\'")
            where.append("(" + " OR ".join(matches) + ")")
        column = SORTS[self.sort.removeprefix("-")][0]
        direction, compare = ("DESC", "<") if self.descending else ("ASC", ">")
        after = self.after()
        if after is not None:
            where.append(f"({column}, d.key) {compare} ({arg(after[0])}, {arg(after[1])})")
        sql = f"SELECT {columns} FROM devices d"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {column} {direction}, d.key {direction}"
        if self.limit is not None:
            sql += f" LIMIT {arg(self.limit + 1)}"
        return sql, args
