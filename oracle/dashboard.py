"""The administrators' dashboard: server-rendered pages; their forms call the JSON API via
dashboard.js.

Every list is a page of at most PAGE_SIZE rows read with the API's own
queries (`DeviceQuery`, the registry's group list, the audit log), so a page
costs the same with 100 devices or 100,000; a group is headed by its member
count, never its member list, and the member picker searches (at most
PICKER_SIZE matches) instead of listing every device.  Each device row shows
its presence (`presence`, `silence`), read for the page's keys only.  Templates are
in oracle/templates (`templating`); each page carries the session's CSRF
token in a meta tag, which the script sends as X-CSRF-Token on each change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from . import audit
from .audit import AuditQuery
from .context import ORACLE_KEY, OracleContext
from .device_search import DeviceQuery
from .errors import InvalidInput, NotFound
from .pagination import parse_limit
from .presence import NEVER_SEEN
from .records import DeviceRecord
from .templating import render
from .validation import parse_key

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"
PAGE_SIZE = 50
PICKER_SIZE = 20
HISTORY_SIZE = 20


def _page_links(request: web.Request, next_cursor: str | None,
                cursor_param: str = "cursor") -> dict[str, str | None]:
    """Links to the next page (if any) and back to the first (if not on it)."""
    url = request.rel_url
    return {"next": str(url.update_query({cursor_param: next_cursor})) if next_cursor else None,
            "first": str(url.without_query_params(cursor_param))
            if url.query.get(cursor_param) else None}


async def _presence_of(oracle: OracleContext, devices: list[DeviceRecord]) -> dict[str, Any]:
    """What the device table shows of a page's devices: presence and silence, by key."""
    keys = [d.key for d in devices]
    return {"presence": await oracle.presence.of_devices(keys),
            "silent": await oracle.silence.of_devices(keys), "never_seen": NEVER_SEEN}


async def devices_page(request: web.Request) -> web.Response:
    oracle = request.app[ORACLE_KEY]
    registry = oracle.registry
    query = DeviceQuery.from_params(request.query, default_limit=PAGE_SIZE)
    group = None
    if query.group:
        try:
            group = await registry.group_summary(query.group)
        except NotFound:
            raise InvalidInput(f"no group {query.group}") from None
    page = await registry.search_devices(query)
    return render("devices.html", request, "Devices", {
        "query": query, "devices": page.items, "counts": await registry.device_counts(),
        "online": await oracle.presence.online_count(),
        "silent_count": await oracle.silence.count(),
        "group": group, "page_links": _page_links(request, page.next_cursor),
        "without_group": str(request.rel_url.without_query_params("group", "cursor")),
        "remove_from": None, **await _presence_of(oracle, page.items)}, section="/")


async def device_page(request: web.Request) -> web.Response:
    oracle = request.app[ORACLE_KEY]
    key = parse_key(request.match_info["key"])
    device = await oracle.registry.get_device(key)
    groups = (await oracle.registry.groups_of(key))
    history = await audit.entries(oracle.registry.db, AuditQuery(target=key, limit=HISTORY_SIZE))
    return render("device.html", request, device.name, {
        "device": device, "groups": groups,
        "peers": len(await oracle.registry.current_peers(key)),
        "pushes": await oracle.registry.push_history(key), "history": history.items,
        "presence": await oracle.presence.of_device(key),
        "connections": await oracle.presence.history(key, HISTORY_SIZE),
        "check_in": await oracle.checkins.of_device(key),
        "silent": (await oracle.silence.of_devices([key])).get(key),
        **await _device_config(oracle, key)}, section="/")


async def _device_config(oracle: OracleContext, key: str) -> dict[str, Any]:
    config = await oracle.registry.configs.device_config(key)
    return {"config": config, "config_text": _shown(config.desired),
            "merged_text": _shown(config.merged), "reported_text": _shown(config.reported)}


def _shown(document: dict[str, Any] | None) -> str:
    """A document as the editor shows it: indented, keys sorted; "" for none."""
    if document is None:
        return ""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False)


async def groups_page(request: web.Request) -> web.Response:
    q = request.query.get("q", "").strip()
    if len(q) > 200:
        raise InvalidInput("q must be at most 200 characters")
    registry = request.app[ORACLE_KEY].registry
    page = await registry.list_groups(q, parse_limit(request.query, PAGE_SIZE),
                                      request.query.get("cursor", ""), with_members=False)
    summaries = await registry.group_summaries([g.id for g in page.items])
    return render("groups.html", request, "Groups", {
        "q": q, "groups": [summaries[g.id] for g in page.items if g.id in summaries],
        "page_links": _page_links(request, page.next_cursor)}, section="/groups")


async def group_page(request: web.Request) -> web.Response:
    """A group's member count, a page of its members, and a search for devices to add:
    never the whole member list, which may be the whole fleet."""
    oracle = request.app[ORACLE_KEY]
    registry = oracle.registry
    group = await registry.group_summary(request.match_info["group_id"])
    params = {k: v for k, v in request.query.items() if k in ("cursor", "limit")}
    members = await registry.search_devices(DeviceQuery.from_params(
        {**params, "group": group.id}, default_limit=PAGE_SIZE))
    find = request.query.get("find", "").strip()
    candidates: list[DeviceRecord] = []
    more = False
    if find:
        found = await registry.search_devices(DeviceQuery.from_params(
            {"q": find, "state": "active"}, default_limit=PICKER_SIZE))
        in_group = await registry.members_among(group.id, [d.key for d in found.items])
        candidates = [d for d in found.items if d.key not in in_group]
        more = found.next_cursor is not None
    return render("group.html", request, group.name, {
        "group": group, "devices": members.items, "find": find, "candidates": candidates,
        "more_candidates": more, "page_links": _page_links(request, members.next_cursor),
        "check_in_s": await oracle.checkins.of_group(group.id),
        "config_text": _shown(await registry.configs.group_config(group.id)),
        **await _presence_of(oracle, members.items)}, section="/groups")


async def audit_page(request: web.Request) -> web.Response:
    query = AuditQuery.from_params(request.query)
    page = await audit.entries(request.app[ORACLE_KEY].registry.db, query)
    return render("audit.html", request, "Audit log", {
        "query": query, "entries": page.items,
        "page_links": _page_links(request, page.next_cursor)}, section="/audit")


async def admins_page(request: web.Request) -> web.Response:
    auth = request.app[ORACLE_KEY].auth
    return render("admins.html", request, "Admins", {
        "admins": await auth.admins(), "tokens": await auth.api_tokens()}, section="/admins")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", devices_page)
    app.router.add_get("/devices/{key}", device_page)
    app.router.add_get("/groups", groups_page)
    app.router.add_get("/groups/{group_id}", group_page)
    app.router.add_get("/audit", audit_page)
    app.router.add_get("/admins", admins_page)
    app.router.add_static(STATIC_PREFIX, STATIC_DIR)
