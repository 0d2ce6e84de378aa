"""The kiosk page in a real headless Chromium while the daemon polls the snapshot (issue 9):
the rooms stay live with fresh values, say where they come from (``data-feed``) and show a
small note that updates arrive every N seconds, in English and in Bengali."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from browser import chromium, require_browser, serving, wait_patients, wait_state
from conftest import make_config, running
from waiting_room.display import PageOptions

FAST = PageOptions(heartbeat=0.5, backoff_initial=0.1, backoff_max=0.5, stable_after=1.0)

pytestmark = pytest.mark.usefixtures("browser_available")


@pytest.fixture
def browser_available() -> None:
    require_browser()


async def feed_of(page, room: str) -> str | None:
    return await page.get_attribute(f'[data-room="{room}"]', "data-feed")


async def test_polled_rooms_stay_live_with_a_note(sim, broker, tmp_path):
    sim.set_snapshot_poll(1)
    sim.break_upgrades("426")
    config = make_config(
        sim.url, broker.port,
        upstream__fallback={"url": sim.snapshot_url, "interval": 1, "after": 0.3},
        display={"enabled": False, "heartbeat": 0.5},
    )
    shown = msgspec.structs.replace(config.display, enabled=True, listen="127.0.0.1:0")
    loop = asyncio.get_running_loop()
    async with running(config) as app, chromium() as browser, \
            serving(shown, config.rooms, app.store, page_options=FAST) as svc:
        page = await browser.new_page(viewport={"width": 1280, "height": 720})
        await page.goto(svc.url + "rooms/opd-1")
        await page.wait_for_selector('[data-room="opd-1"][data-state="live"][data-feed="poll"]', timeout=5000)
        assert await page.inner_text('[data-room="opd-1"] [data-role="patients"]') == "5"
        status = '[data-room="opd-1"] [data-role="status"]'
        assert await page.inner_text(status) == "Updates every 1 s"
        assert await page.is_visible(status)
        opacity = await page.eval_on_selector('[data-role="patients"]', "el => getComputedStyle(el).opacity")
        assert float(opacity) == 1  # live, not dimmed like a paused number
        await page.screenshot(path=tmp_path / "polled-1280x720.png")

        # A change is on the screen within the polling interval.
        started = loop.time()
        sim.set_queue("opd-1", 12)
        await wait_patients(page, "opd-1", "12", timeout=2.5)
        assert loop.time() - started < 2.5

        bengali = await browser.new_page(viewport={"width": 800, "height": 480})
        await bengali.goto(svc.url + "rooms/opd-1?lang=bn")
        await bengali.wait_for_selector('[data-room="opd-1"][data-feed="poll"]', timeout=5000)
        assert await bengali.inner_text(status) == "প্রতি ১ সেকেন্ডে হালনাগাদ"
        assert await bengali.inner_text('[data-room="opd-1"] [data-role="patients"]') == "১২"

        # Upgrades work again: the socket feeds the page, and the note goes.
        sim.break_upgrades(None)
        await page.wait_for_selector('[data-room="opd-1"][data-state="live"][data-feed="socket"]', timeout=5000)
        assert not await page.is_visible(status)

        # Neither socket nor snapshot: paused, and no feed claimed.
        sim.refuse_snapshot(503)
        await sim.close_all(1011)
        sim.break_upgrades("426")
        await wait_state(page, "opd-1", "paused", timeout=5)
        assert await feed_of(page, "opd-1") is None
