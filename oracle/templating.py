"""The dashboard's Jinja2 environment: templates in oracle/templates, autoescaped, strict.

Autoescaping makes every value text unless a template says otherwise, so a
device named `<script>` stays a name; StrictUndefined turns a misspelt
variable into an error in the tests instead of an empty cell in production.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import jinja2
from aiohttp import web

from runtime.clock import now_ms

from .auth import PRINCIPAL
from .context import ORACLE_KEY


def ago(ms: int | None) -> str:
    """How long ago, to the largest whole unit ("3 h ago"), or "never"."""
    if ms is None:
        return "never"
    seconds = max(0, (now_ms() - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def every(seconds: int) -> str:
    """An interval in its largest whole unit: "90 s", "15 min", "2 h", "3 d"."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def path_part(text: str) -> str:
    """One URL path segment: every character that is not unreserved is %-encoded."""
    return quote(text, safe="")


def setup(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app, loader=jinja2.PackageLoader("oracle", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(ago=ago, iso=iso, count=count, every=every, path_part=path_part)


def render(name: str, request: web.Request, title: str, context: dict[str, Any],
           status: int = 200, section: str = "", main_class: str = "") -> web.Response:
    """A page: `context` plus what the layout needs (who is logged in, CSRF, oracle key)."""
    principal = request.get(PRINCIPAL)
    return aiohttp_jinja2.render_template(name, request, {
        "title": title, "section": section, "main_class": main_class, "principal": principal,
        "csrf": (principal.csrf_token if principal else None) or "",
        "oracle_key": request.app[ORACLE_KEY].identity.public.text,
        "regions": request.app[ORACLE_KEY].registry.regions, **context}, status=status)
