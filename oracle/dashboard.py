"""The administrators' dashboard: server-rendered HTML; its forms call the JSON API via dashboard.js.

Rendering is plain functions over the registry's dataclasses with every value
escaped; the page carries the session's CSRF token in a meta tag, which the
script sends as X-CSRF-Token on each change.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from aiohttp import web

from runtime.client_address import client_address
from runtime.clock import now_ms

from .auth import CSRF_FIELD, PRINCIPAL, SESSION_COOKIE, from_own_pages
from .context import ORACLE_KEY
from .records import DeviceRecord, GroupRecord

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"
PUBLIC_PATHS = {"/login"}

e = html.escape
_NO_DEVICES = '<tr><td colspan="8" class="muted">no devices</td></tr>'


def _page(title: str, body: str, csrf: str = "") -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{e(csrf)}">
<title>{e(title)} · Continuum oracle</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head><body>{body}</body></html>"""


def _ago(ms: int | None) -> str:
    if ms is None:
        return "never"
    seconds = max(0, (now_ms() - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _short(key: str) -> str:
    return f'<code title="{e(key)}">{e(key[:14])}…{e(key[-4:])}</code>'


def _device_row(d: DeviceRecord) -> str:
    state = ('<span class="badge revoked">revoked</span>' if d.revoked
             else '<span class="badge active">active</span>')
    if d.revoked:
        sync = '<span class="muted">not pushed while revoked</span>'
    elif d.behind:
        sync = f'<span class="badge behind">behind</span> v{d.acked_version} of v{d.peer_version}'
    elif d.peer_version == 0:
        sync = '<span class="muted">no list yet</span>'
    else:
        sync = f'<span class="badge ok">up to date</span> v{d.peer_version}'
    action, label, css = (("restore", "Restore", "secondary") if d.revoked
                          else ("revoke", "Revoke", "danger"))
    return f"""<tr data-key="{e(d.key)}" class="{'is-revoked' if d.revoked else ''}">
<td>{e(d.name)}</td><td>{_short(d.key)}</td>
<td>{' '.join(f'<span class="tag">{e(t)}</span>' for t in d.tags)}</td>
<td>{e(', '.join(d.groups)) or '<span class="muted">none</span>'}</td>
<td>{state}</td><td class="sync">{sync}</td><td>{_ago(d.last_seen_ms)}</td>
<td><form data-api="/v1/devices/{e(d.key)}/{action}" data-method="POST"
  data-confirm="{label} {e(d.name)}?"><button class="{css}">{label}</button></form></td></tr>"""


def _group_card(g: GroupRecord, devices: list[DeviceRecord]) -> str:
    names = {d.key: d for d in devices}
    members = "".join(
        f"""<li>{e(names[k].name) if k in names else ''} {_short(k)}
<form data-api="/v1/groups/{e(g.id)}/members/{e(k)}" data-method="DELETE" class="inline">
<button class="link" title="remove from group">remove</button></form></li>"""
        for k in g.members) or '<li class="muted">no members</li>'
    candidates = "".join(f'<option value="{e(d.key)}">{e(d.name)}</option>'
                         for d in devices if d.key not in g.members and not d.revoked)
    return f"""<article class="group" data-group="{e(g.name)}">
<header><h3>{e(g.name)}</h3>
<form data-api="/v1/groups/{e(g.id)}" data-method="DELETE" data-confirm="Delete group {e(g.name)}?"
  class="inline"><button class="link danger">delete</button></form></header>
<ul class="members">{members}</ul>
<form data-api="/v1/groups/{e(g.id)}/members/{{key}}" data-method="PUT" class="row">
<select name="key" aria-label="device to add" required>{candidates}</select>
<button>Add member</button></form>
<form data-api="/v1/groups/{e(g.id)}" data-method="PATCH" class="row">
<input name="name" value="{e(g.name)}" aria-label="group name" required>
<button class="secondary">Rename</button></form></article>"""


async def index(request: web.Request) -> web.Response:
    oracle = request.app[ORACLE_KEY]
    query = request.query.get("q", "")
    devices = await oracle.registry.list_devices(query)
    all_devices = await oracle.registry.list_devices() if query else devices
    groups = await oracle.registry.list_groups()
    behind = sum(d.behind for d in all_devices)
    principal = request[PRINCIPAL]
    body = f"""<header class="top"><h1>Continuum oracle</h1>
<div class="who">oracle key {_short(oracle.identity.public.text)} · {e(principal.name)}
<form method="post" action="/logout" class="inline">
<input type="hidden" name="{CSRF_FIELD}" value="{e(principal.csrf_token or '')}">
<button class="link">Log out</button></form></div></header>
<main><div id="flash" role="alert" hidden></div>
<p class="summary">{_count(len(all_devices), "device")} · {_count(len(groups), "group")} ·
<strong class="{'warn' if behind else ''}">{behind} behind</strong></p>
<section><h2>Devices</h2>
<form method="get" action="/" class="row search"><input name="q" value="{e(query)}"
 placeholder="search name, key, tag, group" aria-label="search">
<button class="secondary">Search</button></form>
<table><thead><tr><th>Name</th><th>Key</th><th>Tags</th><th>Groups</th><th>State</th>
<th>Peer list</th><th>Last seen</th><th></th></tr></thead>
<tbody>{''.join(_device_row(d) for d in devices) or _NO_DEVICES}</tbody></table>
<details><summary>Enroll a device</summary>
<form data-api="/v1/devices" data-method="POST" class="row">
<input name="key" placeholder="cpk_…" required size="40" aria-label="device key">
<input name="name" placeholder="name" required aria-label="device name">
<input name="tags" placeholder="tags, comma separated" aria-label="tags">
<button>Enroll</button></form></details></section>
<section><h2>Groups</h2>
<form data-api="/v1/groups" data-method="POST" class="row">
<input name="name" placeholder="new group name" required aria-label="new group name">
<button>Create group</button></form>
<div class="groups">{''.join(_group_card(g, all_devices) for g in groups)}</div></section></main>"""
    return web.Response(text=_page("Dashboard", body, principal.csrf_token or ""),
                        content_type="text/html")


def _login_page(error: str = "") -> str:
    message = f'<p class="error">{e(error)}</p>' if error else ""
    return _page("Log in", f"""<main class="login"><h1>Continuum oracle</h1>{message}
<form method="post" action="/login">
<label>Username <input name="username" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button>Log in</button></form></main>""")


async def login_form(request: web.Request) -> web.Response:
    return web.Response(text=_login_page(), content_type="text/html")


async def login(request: web.Request) -> web.Response:
    """Check a password under the throttle; refuse forms posted from other sites (login CSRF)."""
    oracle = request.app[ORACLE_KEY]
    if not from_own_pages(request.headers, request.host):
        oracle.log.warning("login_cross_site", origin=request.headers.get("Origin", "")[:200],
                           fetch_site=request.headers.get("Sec-Fetch-Site", "")[:40])
        return web.Response(text=_login_page("This form was sent from another site; log in"
                                             " from this page."),
                            content_type="text/html", status=403)
    form = await request.post()
    username = str(form.get("username", ""))
    address = client_address(request.remote or "unknown", request.headers,
                             oracle.settings.trusted_networks)
    throttle = oracle.login_throttle
    wait_s = throttle.begin(username, address)
    if wait_s > 0:
        oracle.log.warning("login_throttled", username=username[:64], address=address)
        return web.Response(text=_login_page(f"Too many login attempts; try again in"
                                             f" {math.ceil(wait_s)} s."),
                            content_type="text/html", status=429,
                            headers={"Retry-After": str(math.ceil(wait_s))})
    try:
        token = await oracle.auth.login(username, str(form.get("password", "")))
    except BaseException:
        throttle.abandoned(username, address)
        raise
    if token is None:
        throttle.failed(username, address)
        oracle.log.warning("login_refused", username=username[:64], address=address)
        return web.Response(text=_login_page("Wrong username or password."),
                            content_type="text/html", status=401)
    throttle.succeeded(username, address)
    response = _redirect("/")
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict", path="/",
                        secure=oracle.settings.secure_cookies,
                        max_age=oracle.settings.session_ttl_s)
    return response


async def logout(request: web.Request) -> web.Response:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        await request.app[ORACLE_KEY].auth.logout(cookie)
    response = _redirect("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def _redirect(location: str) -> web.Response:
    """303 after a POST, so reloading the next page does not repeat the POST."""
    return web.Response(status=303, headers={"Location": location})


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_static(STATIC_PREFIX, STATIC_DIR)
