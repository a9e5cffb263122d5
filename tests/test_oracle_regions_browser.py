"""Home regions on the dashboard, in Debian's headless Chromium: enrol into a region, move a
device and a group from their pages, and see each move in the device's history."""

from __future__ import annotations

import asyncio
from pathlib import Path

from oracle_support import oracle_settings
from test_oracle_browser import CHROMIUM, CHROMIUM_ARGS, _require_browser, logged_in_page

from oracle import OracleServer
from proto import Identity


async def test_enrol_into_a_region_and_move_a_device_and_a_group(tmp_path: Path) -> None:
    _require_browser()
    from playwright.async_api import async_playwright

    settings = oracle_settings(tmp_path, region="eu", other_regions=("us", "ap"))
    async with OracleServer(settings) as oracle, async_playwright() as pw:
        registry = oracle.oracle.registry  # type: ignore[union-attr]
        password = await oracle.create_admin("alice")
        members = [Identity.generate().public.text for _ in range(2)]
        group = await registry.create_group("lab")
        for number, key in enumerate(members):
            await registry.enroll(key, f"lab-{number}")
            await registry.add_member(group.id, key)
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await logged_in_page(browser, oracle, "alice", password)

            # Enrol straight into us.
            key = Identity.generate().public.text
            await page.click("summary:has-text('Enroll a device')")
            await page.fill("input[name=key]", key)
            await page.fill("input[name=name]", "roamer")
            await page.select_option("select[aria-label='home region']", "us")
            await page.click("button:has-text('Enroll')")
            await page.wait_for_selector(f"tr[data-key='{key}']")
            assert (await registry.get_device(key)).home_region == "us"

            # Move it to ap from its page; the page then says where from.
            await page.goto(f"{oracle.url}/devices/{key}")
            await page.select_option("select[aria-label='new home region']", "ap")
            await page.click("button:has-text('Move home region')")
            await page.wait_for_selector("dd.home-region:has-text('moved from us')")
            device = await registry.get_device(key)
            assert (device.home_region, device.former_region) == ("ap", "us")
            assert "device.move" in await page.inner_text("section[aria-labelledby=history-heading]")

            # Move the whole group to us from its page.
            await page.goto(f"{oracle.url}/groups/{group.id}")
            await page.select_option("select[aria-label='new home region of every member']",
                                     "us")
            await page.click("button:has-text(\"Move every member's home region\")")
            await page.wait_for_load_state()
            for member in members:
                await _eventually_homed(registry, member, "us")
        finally:
            await browser.close()


async def _eventually_homed(registry, key: str, region: str) -> None:
    async with asyncio.timeout(10):
        while (await registry.get_device(key)).home_region != region:
            await asyncio.sleep(0.05)
