"""Presence and silence on the dashboard, in Debian's headless Chromium, from a real relay.

A relay reports to the oracle as in production (SPEC §20); devices connect to it over real
WebSockets.  The admin sees who is online in the device list, filters on it, reads a
device's presence (relay, since when, messages, its connections) on its page, sets an
expected check-in interval there and on a group's page, and finds the silent devices
from the summary's link.  Every page stays usable at 390 px.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from oracle_support import eventually
from test_oracle_browser import CHROMIUM, CHROMIUM_ARGS, _require_browser
from test_oracle_dashboard_browser import _BUTTON_NAMES, _rows
from test_peer_groups import StartRelay, caught_up, deployment, enroll, group_of
from test_presence import FAST
from wire import RawDevice, error_code, sealed

from proto import Identity
from proto.frames import Accepted


async def test_presence_and_silence_on_the_dashboard(tmp_path: Path,
                                                     start_relay: StartRelay) -> None:
    _require_browser()
    from playwright.async_api import async_playwright

    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    async with deployment(tmp_path, start_relay, **FAST) as (relay, oracle, admin), \
            async_playwright() as pw:
        assert oracle.oracle is not None and oracle._runner is not None
        await enroll(admin, alice, bob, carol)  # names d0, d1, d2
        group = await group_of(admin, alice, bob)
        await caught_up(relay, admin)
        device = await RawDevice.connect(relay.url, alice)
        for text in (b"a", b"b"):
            assert isinstance(await device.send(sealed(alice, [bob.public], text)), Accepted)
        assert error_code(await device.send(sealed(alice, [carol.public]))) == "NOT_PEER"

        async def reported() -> bool:
            p = (await admin.call("GET", f"/v1/devices/{alice.public.text}"))["presence"]
            return p["online"] and p["messages"]["sent"] == 2 and p["messages"]["refused"] == 1
        await eventually(reported, timeout=10)
        # carol is expected every minute and has never connected: silent once checked.
        await admin.call("PUT", f"/v1/devices/{carol.public.text}/check-in", {"interval_s": 1})
        await asyncio.sleep(1.1)
        from oracle.presence_web import watch_once
        await watch_once(oracle._runner.app)

        password = await oracle.create_admin("ops")
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(10_000)
            await page.goto(oracle.url + "/login")
            await page.fill("input[name=username]", "ops")
            await page.fill("input[name=password]", password)
            await page.click("button:has-text('Log in')")
            await page.wait_for_selector("h2:has-text('Devices')")
            summary = await page.inner_text("p.summary")
            assert "1 online" in summary and "1 silent" in summary, summary

            def cell(identity: Identity):
                return page.locator(f"tr[data-key='{identity.public.text}'] td.presence")
            assert (await cell(alice).inner_text()).startswith("online since")
            assert "never connected" in await cell(bob).inner_text()
            assert "silent" in await cell(carol).inner_text()

            await page.select_option("select[name=online]", "true")
            await page.click("button:has-text('Filter')")
            assert await _rows(page) == [alice.public.text]
            await page.select_option("select[name=online]", "false")
            await page.click("button:has-text('Filter')")
            assert sorted(await _rows(page)) == sorted([bob.public.text, carol.public.text])
            await page.click("p.summary a:has-text('silent')")
            assert await _rows(page) == [carol.public.text]
            assert await page.is_checked("input[name=silent]")

            # alice's page: where she is, since when, what she sent, her connections.
            await page.goto(oracle.url + f"/devices/{alice.public.text}")
            presence = page.locator("section.presence")
            assert (await presence.locator("dd.now").inner_text()).startswith("online since")
            assert relay.relay is not None
            assert relay.relay.identity.public.text[:14] in await presence.inner_text()
            assert await presence.locator("dd.messages").inner_text() == \
                "sent 2 · received 0 · refused 1"
            rows = await presence.locator("table.connections tbody tr").all_inner_texts()
            assert len(rows) == 1 and "still connected" in rows[0]
            # Her expected check-in, set from her page in minutes.
            await page.fill("section.presence input[name=interval_s]", "5")
            await page.get_by_role("button", name="Set check-in interval").click()
            await page.wait_for_selector("dd.check-in:has-text('every 5 min (its own)')")
            own = (await admin.call("GET", f"/v1/devices/{alice.public.text}"))["check_in"]
            assert own["own_interval_s"] == 300

            # She leaves: offline, last seen, and her connection ended.
            await device.close()

            async def left() -> bool:
                p = (await admin.call("GET", f"/v1/devices/{alice.public.text}"))["presence"]
                return not p["online"]
            await eventually(left, timeout=10)
            await page.reload()
            assert (await page.inner_text("section.presence dd.now")).startswith(
                "offline last seen")
            rows = await page.locator("table.connections tbody tr").all_inner_texts()
            assert "still connected" not in rows[0]

            # A group's interval, set from its page; bob has none of his own.
            await page.goto(oracle.url + f"/groups/{group}")
            assert "2 members" in await page.inner_text("#group-heading")
            await page.fill("input[name=interval_s]", "60")
            await page.get_by_role("button", name="Set check-in interval").click()
            await page.wait_for_selector("p:has-text('Expected check-in: every 1 h')")
            bob_check_in = (await admin.call("GET", f"/v1/devices/{bob.public.text}"))["check_in"]
            assert bob_check_in == {"interval_s": 3600, "own_interval_s": None,
                                    "group_interval_s": 3600}
            await page.screenshot(path=str(tmp_path / "group.png"), full_page=True)

            # 390 px: nothing scrolls sideways, and buttons keep distinct names.
            phone = await browser.new_page(viewport={"width": 390, "height": 844})
            await phone.context.add_cookies(await page.context.cookies())
            for path in ("/", "/?silent=true", f"/devices/{alice.public.text}",
                         f"/groups/{group}"):
                await phone.goto(oracle.url + path)
                width = await phone.evaluate("document.documentElement.scrollWidth")
                assert width <= 390, (path, width)
                buttons = await phone.evaluate(_BUTTON_NAMES)
                assert len(buttons) == len(set(buttons)), (path, buttons)
            await phone.goto(oracle.url + f"/devices/{alice.public.text}")
            await phone.screenshot(path=str(tmp_path / "device-390.png"), full_page=True)
        finally:
            await browser.close()
