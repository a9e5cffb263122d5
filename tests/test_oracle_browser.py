"""End to end in a real browser: an admin adds a device to a group on the dashboard, and the
device receives its new peer list through a running relay; a login form another site posts
is refused (login CSRF), with the headers a real browser sends.

Needs Debian's Chromium and the Playwright package (scripts/install-browser installs both).
A missing browser fails the test with that instruction instead of skipping it silently.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from oracle_support import Admin, eventually, oracle_settings
from web_server import serving

from client.device import Device
from oracle import OracleServer
from oracle.auth import SESSION_COOKIE
from proto import Identity

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _require_browser() -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser (apt-get install chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.fail("the playwright package is missing: run scripts/install-browser")


async def logged_in_page(browser, oracle: OracleServer, username: str, password: str):
    """A 1280x900 page logged in to `oracle`'s dashboard as `username`, on the device list,
    accepting every confirm() the dashboard asks."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(10_000)
    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.goto(oracle.url + "/login")
    await page.fill("input[name=username]", username)
    await page.fill("input[name=password]", password)
    await page.click("button:has-text('Log in')")
    await page.wait_for_selector("h2:has-text('Devices')")
    return page


async def test_dashboard_membership_change_reaches_the_device(start_relay, tmp_path) -> None:
    _require_browser()
    from playwright.async_api import async_playwright

    relay = await start_relay()
    sensor, gateway = Identity.generate(), Identity.generate()
    async with OracleServer(oracle_settings(tmp_path, relays=(relay.url,))) as oracle:
        password = await oracle.create_admin("alice")
        setup = await Admin.login(oracle, "setup")
        for identity, name in ((sensor, "sensor"), (gateway, "gateway")):
            await setup.call("POST", "/v1/devices", {"key": identity.public.text, "name": name},
                             expect=201)
        group = await setup.call("POST", "/v1/groups", {"name": "lab"}, expect=201)
        await setup.call("PUT", f"/v1/groups/{group['id']}/members/{gateway.public.text}")
        await setup.close()

        async with Device(sensor, relays=[relay.url], oracle_key=oracle.identity.public) as device, \
                async_playwright() as playwright:
            await device.wait_connected()
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                       args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(10_000)
                await page.goto(oracle.url + "/")
                assert page.url.endswith("/login")
                await page.fill("input[name=username]", "alice")
                await page.fill("input[name=password]", password)
                await page.click("button:has-text('Log in')")
                await page.wait_for_selector("h2:has-text('Devices')")

                # The member picker searches (it lists no device until asked).
                await page.click("a:has-text('Groups')")
                await page.click("a:has-text('lab')")
                assert await page.locator("ul.candidates").count() == 0
                await page.fill("input[name=find]", "sens")
                await page.click("button:has-text('Find devices')")
                await page.get_by_role(
                    "button", name=f"Add sensor ({sensor.public.text[4:12]}) to lab").click()
                await page.wait_for_selector(
                    f"table.devices tr[data-key='{sensor.public.text}'] code"
                    f"[title='{sensor.public.text}']")
                await page.goto(oracle.url + "/")

                await eventually(lambda: _has_peer(device, gateway), timeout=5)
                assert device.peers.version == 1

                async def shows_up_to_date() -> bool:
                    await page.reload()
                    row = page.locator(f"tr[data-key='{sensor.public.text}'] td.sync")
                    return "up to date" in await row.inner_text()
                await eventually(shows_up_to_date, timeout=5, interval=0.2)
                await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            finally:
                await browser.close()


async def _has_peer(device: Device, peer: Identity) -> bool:
    return peer.public in device.peers


@contextlib.asynccontextmanager
async def _other_site(login_url: str, username: str, password: str) -> AsyncIterator[str]:
    """A page on another site whose form posts these credentials to the oracle's /login.

    It listens on 127.0.0.1 but is visited as http://localhost:…, which the browser treats
    as a different site from http://127.0.0.1:….
    """
    page = f"""<!doctype html><title>win a prize</title>
<form method="post" action="{login_url}"><input type="hidden" name="username" value="{username}">
<input type="hidden" name="password" value="{password}"><button>Claim</button></form>"""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", serve)
    async with serving(app) as port:
        yield f"http://localhost:{port}/"


async def test_a_login_form_on_another_site_does_not_log_the_browser_in(tmp_path) -> None:
    _require_browser()
    from playwright.async_api import async_playwright

    async with OracleServer(oracle_settings(tmp_path)) as oracle, async_playwright() as playwright:
        password = await oracle.create_admin("attacker")
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                   args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.set_default_timeout(10_000)
            async with _other_site(oracle.url + "/login", "attacker", password) as other:
                await page.goto(other)
                async with page.expect_response(oracle.url + "/login") as posted:
                    await page.click("button:has-text('Claim')")
                response = await posted.value
                assert response.status == 403
                request_headers = await response.request.all_headers()
                assert request_headers.get("sec-fetch-site") == "cross-site"
            cookies = await page.context.cookies(oracle.url)
            assert SESSION_COOKIE not in {cookie["name"] for cookie in cookies}
            await page.goto(oracle.url + "/")
            assert page.url.endswith("/login")
        finally:
            await browser.close()
