"""Configuration in the dashboard (SPEC §21), in Debian's headless Chromium: an administrator
edits a group's configuration (a bad document is refused saying why), a device connected
through a real relay applies it and reports, and the dashboard shows the report and which
devices are behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from oracle_support import eventually, oracle_settings
from test_oracle_browser import CHROMIUM, CHROMIUM_ARGS, _require_browser, logged_in_page

from client.config import ConfigUpdate
from client.device import Device
from oracle import OracleServer
from proto import Identity

pytestmark = pytest.mark.timeout(120)


async def test_editing_a_group_configuration_reaches_a_device_that_reports_it(
        tmp_path: Path, start_relay) -> None:
    _require_browser()
    from playwright.async_api import async_playwright

    relay = await start_relay()
    online, offline = Identity.generate(), Identity.generate()
    async with OracleServer(oracle_settings(tmp_path, relays=(relay.url,))) as oracle, \
            async_playwright() as pw:
        assert oracle.oracle is not None
        registry = oracle.oracle.registry
        await registry.enroll(online.public.text, "thermostat")
        await registry.enroll(offline.public.text, "boiler")
        group = await registry.create_group("heating")
        for identity in (online, offline):
            await registry.add_member(group.id, identity.public.text)

        def apply(update: ConfigUpdate) -> dict:
            return {"target_c": update.document["target_c"], "status": "holding"}

        device = Device(online, [relay.url], oracle_key=oracle.identity.public)
        device.on_config(apply)
        password = await oracle.create_admin("alice")
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            async with device:
                await device.wait_connected(10)
                page = await logged_in_page(browser, oracle, "alice", password)
                await page.goto(f"{oracle.url}/groups/{group.id}")
                editor = page.get_by_label("configuration of heating")
                assert await editor.input_value() == ""

                # A bad document: the API's reason is shown, nothing is stored.
                await editor.fill('{"target_c": 21,}')
                await page.click("button:has-text('Save configuration')")
                flash = page.locator("#flash")
                await flash.wait_for(state="visible")
                assert "not valid JSON" in await flash.inner_text()
                assert await registry.configs.group_config(group.id) is None

                await editor.fill('{"target_c": 21, "schedule": {"night_c": 17}}')
                # The dashboard reloads the page itself once the save is answered: wait for
                # that navigation, or a reload of ours can cross it (CI: "Not attached to
                # an active page").
                async with page.expect_navigation():
                    await page.click("button:has-text('Save configuration')")
                await eventually(lambda: _reload_shows(page, '"night_c": 17'), timeout=15)
                await eventually(lambda: _applied(device, 21), timeout=15)

                # The device's page: the report, what was sent, and no longer behind.
                await page.goto(f"{oracle.url}/devices/{online.public.text}")
                await eventually(lambda: _reload_shows(page, '"status": "holding"'), timeout=15)
                assert "applied v1" in await page.inner_text("dd.config-sync")
                assert '"target_c": 21' in await page.inner_text("pre.merged-config")

                # The offline member is behind: the summary counts it, the filter finds it.
                await page.goto(oracle.url + "/")
                assert "1 configuration behind" in await page.inner_text("p.summary")
                await page.click("a.config-behind")
                await page.wait_for_load_state()
                rows = await page.locator("table.devices tbody tr[data-key]").evaluate_all(
                    "rows => rows.map(r => r.dataset.key)")
                assert rows == [offline.public.text]
                assert "behind v0 of v1" in await page.inner_text("td.config-sync")
        finally:
            await browser.close()


async def _reload_shows(page, text: str) -> bool:
    """Reload and look for `text`.  The dashboard reloads the page itself after a save; a
    reload of ours that crosses it is aborted by the browser, which only means: look again."""
    from playwright.async_api import Error as PlaywrightError
    try:
        await page.reload()
    except PlaywrightError as exc:
        if "ERR_ABORTED" not in exc.message:
            raise
        return False
    return text in await page.content()


async def _applied(device: Device, target_c: int) -> bool:
    return device.config.document.get("target_c") == target_c
