"""Logging in and out of the dashboard: the password form under the login throttle, refusing
forms that other sites post (login CSRF), and the session cookie."""

from __future__ import annotations

import math

from aiohttp import web

from .auth import SESSION_COOKIE, from_own_pages
from .context import ORACLE_KEY, address_of
from .templating import render

PUBLIC_PATHS = {"/login"}


def _login_page(request: web.Request, error: str = "", status: int = 200,
                headers: dict[str, str] | None = None) -> web.Response:
    response = render("login.html", request, "Log in", {"error": error}, status=status,
                      main_class="login")
    response.headers.update(headers or {})
    return response


async def login_form(request: web.Request) -> web.Response:
    return _login_page(request)


async def login(request: web.Request) -> web.Response:
    """Check a password under the throttle; refuse forms posted from other sites (login CSRF)."""
    oracle = request.app[ORACLE_KEY]
    if not from_own_pages(request.headers, request.host):
        oracle.log.warning("login_cross_site", origin=request.headers.get("Origin", "")[:200],
                           fetch_site=request.headers.get("Sec-Fetch-Site", "")[:40])
        return _login_page(request, "This form was sent from another site; log in from this"
                           " page.", status=403)
    form = await request.post()
    username = str(form.get("username", ""))
    address = address_of(request)
    throttle = oracle.login_throttle
    # A locked-out attempt is refused before it costs a database read; one that may go on
    # waits for a check among its kind, known usernames or not (oracle/login_throttle.py).
    wait_s = throttle.retry_after(username, address)
    if wait_s <= 0:
        wait_s = await throttle.begin(username, address, await oracle.auth.is_admin(username))
    if wait_s > 0:
        oracle.log.warning("login_throttled", username=username[:64], address=address)
        return _login_page(request, f"Too many login attempts; try again in"
                           f" {math.ceil(wait_s)} s.", status=429,
                           headers={"Retry-After": str(math.ceil(wait_s))})
    try:
        token = await oracle.auth.login(username, str(form.get("password", "")), address)
    except BaseException:
        throttle.abandoned(username, address)
        raise
    if token is None:
        throttle.failed(username, address)
        oracle.log.warning("login_refused", username=username[:64], address=address)
        return _login_page(request, "Wrong username or password.", status=401)
    throttle.succeeded(username, address)
    response = _redirect("/")
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict", path="/",
                        secure=oracle.settings.secure_cookies,
                        max_age=oracle.settings.session_ttl_s)
    return response


async def logout(request: web.Request) -> web.Response:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        await request.app[ORACLE_KEY].auth.logout(cookie, address_of(request))
    response = _redirect("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def _redirect(location: str) -> web.Response:
    """303 after a POST, so reloading the next page does not repeat the POST."""
    return web.Response(status=303, headers={"Location": location})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
