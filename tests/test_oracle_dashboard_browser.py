"""The dashboard at fleet scale, in Debian's headless Chromium: pages of devices with filters,
a device's own page (revoke, delete), the audit log of those changes, API tokens made (with
their scope, shown with their creator) and revoked from the dashboard, and every page usable at 390 px with distinct button names.

The oracle runs on 127.0.0.1 (SQLite; the queries behind these pages are checked on both
databases in test_oracle_fleet_api.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from oracle_support import oracle_settings
from test_oracle_browser import CHROMIUM, CHROMIUM_ARGS, _require_browser, logged_in_page

from oracle import OracleServer
from oracle.dashboard import PAGE_SIZE
from proto import Identity

DEVICES = 2 * PAGE_SIZE + 20

# Every button's accessible name as a screen reader announces it (aria-label, else its text).
_BUTTON_NAMES = """() => [...document.querySelectorAll('button')]
    .filter(b => b.offsetParent !== null)
    .map(b => (b.getAttribute('aria-label') || b.textContent).trim())"""


async def _seed(oracle: OracleServer) -> dict[str, str]:
    """DEVICES devices dev-000…, every tenth tagged `tenth`; one camera; one group `lab`."""
    assert oracle.oracle is not None
    registry = oracle.oracle.registry
    keys = {}
    for number in range(DEVICES):
        name = "front camera" if number == 7 else f"dev-{number:03d}"
        key = Identity.generate().public.text
        await registry.enroll(key, name, ["tenth"] if number % 10 == 0 else [])
        keys[name] = key
    lab = await registry.create_group("lab")
    await registry.add_member(lab.id, keys["dev-001"])
    await registry.add_member(lab.id, keys["dev-002"])
    return keys


async def _rows(page) -> list[str]:
    return await page.locator("table.devices tbody tr[data-key]").evaluate_all(
        "rows => rows.map(r => r.dataset.key)")


async def test_dashboard_pages_filters_device_page_and_audit_log(tmp_path: Path) -> None:
    _require_browser()
    from playwright.async_api import async_playwright

    async with OracleServer(oracle_settings(tmp_path)) as oracle, async_playwright() as pw:
        keys = await _seed(oracle)
        password = await oracle.create_admin("alice")
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await logged_in_page(browser, oracle, "alice", password)
            assert f"{DEVICES} devices" in await page.inner_text("p.summary")

            # Pagination: pages of PAGE_SIZE, in name order, each device exactly once.
            seen: list[str] = []
            for expected in (PAGE_SIZE, PAGE_SIZE, DEVICES - 2 * PAGE_SIZE):
                rows = await _rows(page)
                assert len(rows) == expected
                seen += rows
                if len(seen) < DEVICES:
                    await page.click("a[rel=next]")
                    await page.wait_for_load_state()
            assert await page.locator("a[rel=next]").count() == 0
            assert sorted(seen) == sorted(keys.values()) and len(set(seen)) == DEVICES
            names = {key: name for name, key in keys.items()}
            assert [names[k] for k in seen[:2]] == ["dev-000", "dev-001"]
            await page.click("a:has-text('First page')")
            assert (await _rows(page))[0] == seen[0]

            # Filters: a search, a tag, a sort; they combine.
            await page.fill("input[name=q]", "CAMERA")
            await page.click("button:has-text('Filter')")
            assert await _rows(page) == [keys["front camera"]]
            await page.fill("input[name=q]", "")
            await page.fill("input[name=tag]", "tenth")
            await page.select_option("select[name=sort]", "-name")
            await page.click("button:has-text('Filter')")
            tenth = [names[k] for k in await _rows(page)]
            assert tenth == [f"dev-{n:03d}" for n in range(DEVICES - 10, -1, -10)]

            # The device page: key, tags, groups, peer list; revoke, then delete.
            target = keys["dev-001"]
            await page.goto(oracle.url + "/")
            await page.click(f"tr[data-key='{target}'] a:has-text('dev-001')")
            assert await page.inner_text("code.full-key") == target
            assert "lab" in await page.inner_text("section[aria-labelledby=groups-heading]")
            assert "v1" in await page.inner_text("dd.sync")
            # Its fields are labelled on screen, not only by placeholders or for screen readers.
            assert await page.locator("form.row label:has(input[name=name])").inner_text() == \
                "Name"
            assert await page.locator("form.row label:has(input[name=tags])").inner_text() == \
                "Tags"
            await page.get_by_role("button", name=f"Revoke dev-001 ({target[4:12]})").click()
            await page.wait_for_selector("h2 .badge.revoked")
            await page.get_by_role("button", name=f"Delete dev-001 ({target[4:12]})").click()
            await page.wait_for_url(oracle.url + "/")
            assert target not in await _rows(page)
            await page.goto(oracle.url + f"/devices/{target}")
            assert "no device" in await page.inner_text("body")

            # The audit log shows who did it, from where, newest first.
            await page.goto(oracle.url + "/audit")
            first = page.locator("table.audit tbody tr").first
            assert "device.delete" in await first.inner_text()
            assert "alice" in await first.inner_text() and "127.0.0.1" in await first.inner_text()
            assert await page.locator("form.filters label").all_inner_texts() == [
                "Who", "What", "Target"]
            await page.goto(oracle.url + f"/audit?target={target}")
            actions = await page.locator("table.audit td[data-label=What]").all_inner_texts()
            assert actions == ["device.delete", "device.revoke", "group.member.add",
                               "device.enroll"]

            # 1280 px: the groups table is one table (a stale grid rule once put its header
            # in a narrow box and its rows in a column beside it).
            await page.set_viewport_size({"width": 1280, "height": 800})
            await page.goto(oracle.url + "/groups")
            header = await page.locator("table.groups thead tr").bounding_box()
            row = await page.locator("table.groups tbody tr").first.bounding_box()
            assert header and row and abs(header["x"] - row["x"]) < 1, (header, row)
            assert abs(header["width"] - row["width"]) < 1 and row["y"] >= header["y"]
            await page.screenshot(path=str(tmp_path / "groups-1280.png"), full_page=True)

            # 390 px: no page scrolls sideways, and per-row buttons have distinct names.
            phone = await browser.new_page(viewport={"width": 390, "height": 844})
            await phone.context.add_cookies(await page.context.cookies())
            lab = (await oracle.oracle.registry.list_groups("lab")).items[0]
            for path in ("/", "/?tag=tenth", f"/devices/{keys['dev-002']}", "/groups",
                         f"/groups/{lab.id}?find=dev-01", "/audit", "/admins"):
                await phone.goto(oracle.url + path)
                width = await phone.evaluate("document.documentElement.scrollWidth")
                assert width <= 390, (path, width)
                buttons = await phone.evaluate(_BUTTON_NAMES)
                assert len(buttons) == len(set(buttons)), (path, buttons)
            await phone.goto(oracle.url + f"/groups/{lab.id}?find=dev-01")
            assert await phone.get_by_role(
                "button", name=f"Add dev-010 ({keys['dev-010'][4:12]}) to lab").count() == 1
            await phone.screenshot(path=str(tmp_path / "group-390.png"), full_page=True)
        finally:
            await browser.close()


async def test_api_tokens_are_made_and_revoked_from_the_dashboard(tmp_path: Path) -> None:
    _require_browser()
    from playwright.async_api import async_playwright

    async with OracleServer(oracle_settings(tmp_path)) as oracle, async_playwright() as pw, \
            aiohttp.ClientSession() as http:
        password = await oracle.create_admin("alice")
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.set_default_timeout(10_000)
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await page.goto(oracle.url + "/login")
            await page.fill("input[name=username]", "alice")
            await page.fill("input[name=password]", password)
            await page.click("button:has-text('Log in')")
            await page.click("nav a:has-text('Admins')")
            await page.fill("input[name=name]", "ci")
            assert await page.input_value("select[name=scope]") == "read"  # least by default
            await page.select_option("select[name=scope]", "write")
            await page.click("button:has-text('Create token')")
            token = await page.inner_text("#secret code.secret-value")
            assert token.startswith("cot_")

            async def status_with(bearer: str, method: str = "GET", path: str = "/v1/status",
                                  body: object = None) -> int:
                async with http.request(method, oracle.url + path, json=body, headers={
                        "Authorization": f"Bearer {bearer}"}) as response:
                    return response.status
            assert await status_with(token) == 200
            assert await status_with(token, "POST", "/v1/groups", {"name": "by-ci"}) == 201
            assert await status_with(token, "POST", "/v1/admins", {"username": "m"}) == 403
            await page.click("#secret button:has-text('Done')")
            row = page.locator("tr[data-token=ci]")
            assert "never" not in await row.locator("td[data-label='Last used']").inner_text()
            assert await row.locator("td[data-label='Scope']").inner_text() == "write"
            assert await row.locator("td[data-label='Created by']").inner_text() == "alice"

            await page.fill("input[name=name]", "prometheus")
            await page.click("button:has-text('Create token')")
            scraper = await page.inner_text("#secret code.secret-value")
            await page.click("#secret button:has-text('Done')")
            row = page.locator("tr[data-token=prometheus]")
            assert await row.locator("td[data-label='Scope']").inner_text() == "read"
            assert await status_with(scraper, "GET", "/metrics") == 200
            assert await status_with(scraper, "POST", "/v1/groups", {"name": "x"}) == 403
            await page.get_by_role("button", name="Revoke token ci").click()
            await page.wait_for_selector("tr[data-token=ci]", state="detached")
            assert await status_with(token) == 401
            await page.fill("input[name=username]", "bob")
            await page.click("button:has-text('Create admin')")
            assert len(await page.inner_text("#secret code.secret-value")) >= 16
        finally:
            await browser.close()
