"""The oracle's aiohttp application: metrics, authentication, CSRF and error middlewares
around the routes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import api, dashboard, login, metrics, presence_web, templating
from .auth import (ACTOR, CSRF_FIELD, CSRF_HEADER, PRINCIPAL, SESSION_COOKIE, Principal,
                   csrf_ok, refusal)
from .context import ORACLE_KEY, OracleContext, address_of
from .errors import OracleError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def _is_public(request: web.Request) -> bool:
    path = request.path
    return (path in api.PUBLIC_PATHS or path in login.PUBLIC_PATHS
            or path == presence_web.PRESENCE_PATH  # relays sign their reports
            or path.startswith(dashboard.STATIC_PREFIX))


def _is_api(request: web.Request) -> bool:
    """Answered for programs (JSON errors, 401 instead of a redirect to the login page)."""
    return request.path.startswith("/v1/") or request.path == metrics.METRICS_PATH


async def _principal(request: web.Request) -> Principal | None:
    auth = request.app[ORACLE_KEY].auth
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return await auth.by_bearer(header[7:].strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    return await auth.by_session(cookie) if cookie else None


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read every body in full within request_timeout_s before any handler runs.

    aiohttp's keep-alive timer only bounds the headers: once they are in, a
    client trickling its body would hold the handler, and the socket, for as
    long as it likes (slowloris on the body).  Reading here, before
    authentication, bounds every request whoever sends it; handlers then read
    the buffered body (at most aiohttp's client_max_size, 1 MiB).
    """
    if request.body_exists:
        try:
            async with asyncio.timeout(request.app[ORACLE_KEY].settings.request_timeout_s):
                await request.read()
        except TimeoutError:
            return web.Response(status=408, text="request body not received in time",
                                headers={"Connection": "close"})
    return await handler(request)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OracleError → its status, as JSON for the API and as a short page elsewhere."""
    try:
        return await handler(request)
    except OracleError as exc:
        if _is_api(request):
            return web.json_response({"error": exc.message}, status=exc.status)
        return web.Response(text=exc.message, status=exc.status)


def _route_path(request: web.Request) -> str:
    """The matched route's template ("/v1/admins/{username}"), else the path: what the
    scope rule is checked against, so it judges the route that will answer, however the
    path was spelt."""
    resource = request.match_info.route.resource
    return request.path if resource is None else resource.canonical


def _forbidden(request: web.Request, message: str) -> web.Response:
    if _is_api(request):
        return web.json_response({"error": message}, status=403)
    return web.Response(text=message, status=403)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every non-public route needs an admin's session or an API token whose scope allows
    it (`auth.refusal`: tokens never manage admins or tokens, `read` ones only read);
    every cookie-authenticated change needs CSRF."""
    if _is_public(request):
        return await handler(request)
    principal = await _principal(request)
    if principal is None:
        if _is_api(request):
            return web.json_response({"error": "authentication required"}, status=401)
        raise web.HTTPSeeOther("/login")
    refused = refusal(principal, request.method, _route_path(request))
    if refused is not None:
        return _forbidden(request, refused)
    if request.method not in _SAFE_METHODS:
        presented = request.headers.get(CSRF_HEADER)
        if presented is None and request.content_type == "application/x-www-form-urlencoded":
            presented = (await request.post()).get(CSRF_FIELD)  # type: ignore[assignment]
        if not csrf_ok(principal, presented if isinstance(presented, str) else None):
            return _forbidden(request, "missing or wrong CSRF token")
    request[PRINCIPAL] = principal
    request[ACTOR] = principal.actor(address_of(request))
    return await handler(request)



@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.content_type == "text/html":
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'")
    return response


def create_app(oracle: OracleContext) -> web.Application:
    app = web.Application(middlewares=[metrics.metrics_middleware, security_headers,
                                       body_deadline, errors_middleware, auth_middleware])
    app[ORACLE_KEY] = oracle
    api.add_routes(app)
    metrics.add_routes(app)
    presence_web.add_routes(app)
    templating.setup(app)
    login.add_routes(app)
    dashboard.add_routes(app)
    return app
