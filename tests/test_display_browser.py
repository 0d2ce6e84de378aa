"""The kiosk page in a real headless Chromium, fed by the real daemon and the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from pathlib import Path

import msgspec
import pytest

from browser import (
    BENGALI_FONT_DIR,
    assert_fits,
    chromium,
    layout_report,
    patients_text,
    platform_fonts,
    require_browser,
    serving,
    wait_patients,
    wait_state,
)
from conftest import daemon_command, eventually, make_config, running, wait_store, write_config
from waiting_room.display import PageOptions

# Short page timings so that outages and recoveries take fractions of a second.
FAST = PageOptions(heartbeat=0.5, backoff_initial=0.1, backoff_max=0.5, stable_after=1.0)
EVIL = '<img src=x onerror="alert(document.domain)">'
SIZES = [(1920, 1080), (800, 480), (1080, 1920)]

pytestmark = pytest.mark.usefixtures("browser_available")


@pytest.fixture
def browser_available() -> None:
    require_browser()


def shots_dir(tmp_path: Path) -> Path:
    """Screenshots go to $DISPLAY_SCREENSHOTS when set (to look at them), else to tmp_path."""
    where = Path(os.environ.get("DISPLAY_SCREENSHOTS") or tmp_path / "shots")
    where.mkdir(parents=True, exist_ok=True)
    return where


async def text_of(page, room: str, role: str) -> str:
    return await page.inner_text(f'[data-room="{room}"] [data-role="{role}"]')


async def test_page_follows_the_feed_through_every_state(sim, broker, tmp_path):
    sim_port = sim.port
    await sim.stop()  # first the page must say "Connecting…"
    # App's own display is off: this test stops and restarts a display service of its own.
    config = make_config(sim.url, broker.port, display={"enabled": False, "heartbeat": 0.5})
    shown = msgspec.structs.replace(config.display, enabled=True, listen="127.0.0.1:0")
    loop = asyncio.get_running_loop()
    async with running(config) as app, chromium() as browser, contextlib.AsyncExitStack() as daemon:
        svc = await daemon.enter_async_context(serving(shown, config.rooms, app.store, page_options=FAST))
        display_port = svc.port
        page = await browser.new_page(viewport={"width": 1280, "height": 720})
        loads: list[str] = []
        page.on("load", lambda p: loads.append(p.url))
        sockets: list[float] = []
        page.on("websocket", lambda ws: sockets.append(loop.time()))
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        await page.goto(svc.url + "rooms/opd-1")
        await wait_state(page, "opd-1", "connecting")
        assert await text_of(page, "opd-1", "status") == "Connecting…"
        assert await page.get_attribute("body", "data-state") == "live"  # the daemon is there

        await sim.start(port=sim_port)
        await wait_state(page, "opd-1", "live")
        assert await patients_text(page, "opd-1") == "5"
        assert await text_of(page, "opd-1", "label") == "Waiting patients"
        assert await page.get_attribute('[data-room="opd-1"]', "aria-label") == "OPD 1: Waiting patients: 5"
        assert not await page.is_visible('[data-room="opd-1"] [data-role="status"]')

        # A change upstream is on the screen within a second.
        started = loop.time()
        sim.set_queue("opd-1", 7, now_serving="A-17")
        await wait_patients(page, "opd-1", "7", timeout=1.0)
        assert loop.time() - started < 1.0
        await page.wait_for_function(
            "() => document.querySelector('[data-role=\"now-serving\"]').textContent === 'Now serving A-17'",
            timeout=1000,
        )

        # The upstream is lost: the number stays, dimmed, with the time it was last live.
        await sim.stop()
        await wait_state(page, "opd-1", "paused")
        status = await text_of(page, "opd-1", "status")
        assert re.fullmatch(r"Live updates paused, last updated \d\d:\d\d", status), status
        assert await patients_text(page, "opd-1") == "7"
        opacity = await page.eval_on_selector('[data-role="patients"]', "el => getComputedStyle(el).opacity")
        assert float(opacity) < 0.5
        await page.screenshot(path=shots_dir(tmp_path) / "paused-1280x720.png")

        await sim.start(port=sim_port)
        await wait_state(page, "opd-1", "live")
        assert float(await page.eval_on_selector('[data-role="patients"]', "el => getComputedStyle(el).opacity")) == 1

        # The daemon's display goes away: offline banner, last values kept, paced reconnects.
        await daemon.aclose()
        stopped = loop.time()
        await wait_state(page, "opd-1", "offline", timeout=3)
        assert await page.is_visible('[data-role="banner"]')
        assert "Offline" in await page.inner_text('[data-role="banner"]')
        assert await patients_text(page, "opd-1") == "7"
        assert re.fullmatch(r"Offline, last updated \d\d:\d\d", await text_of(page, "opd-1", "status"))
        await page.screenshot(path=shots_dir(tmp_path) / "offline-1280x720.png")
        await asyncio.sleep(1.5)  # the outage itself: how often does the page knock meanwhile?
        attempts = len([t for t in sockets if t > stopped])
        assert 1 <= attempts <= 25, f"{attempts} reconnect attempts in {loop.time() - stopped:.1f} s"

        restarted = msgspec.structs.replace(shown, listen=f"127.0.0.1:{display_port}")
        async with serving(restarted, config.rooms, app.store, page_options=FAST) as again:
            assert again.port == display_port
            await wait_state(page, "opd-1", "live", timeout=5)
            assert not await page.is_visible('[data-role="banner"]')
            assert await patients_text(page, "opd-1") == "7"
            sim.set_queue("opd-1", 8)
            await wait_patients(page, "opd-1", "8", timeout=1.0)
        assert len(loads) == 1, f"the page reloaded itself: {loads}"
        assert errors == []
        assert sim.connections == 2  # one per simulator start: never one per screen or page load


async def test_a_hung_daemon_is_noticed_by_its_missing_heartbeats(sim, broker, tmp_path):
    """``waiting-room run`` frozen by SIGSTOP keeps its sockets open: only heartbeats can tell."""
    config = {
        "upstream": {"url": sim.url, "token": "test-token", "backoff": {"initial": 0.05, "max": 0.3}},
        "rooms": [{"id": "opd-1", "name": "OPD 1"}],
        "mqtt": {"port": broker.port, "client_id": "wr-hung-test"},
        "display": {"listen": "127.0.0.1:0", "heartbeat": 0.5},
    }
    path = write_config(tmp_path / "config.yaml", config)
    log = tmp_path / "daemon.log"
    with open(log, "wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *daemon_command("run", "--config", str(path)), stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )
    try:
        # The daemon prints where its pages are (listen port 0: the port it got).
        url = re.compile(r"display: pages at (http://127\.0\.0\.1:\d+/)")
        await eventually(lambda: url.search(log.read_text()) or proc.returncode is not None, timeout=15,
                         what="the display URL in the daemon's log")
        found = url.search(log.read_text())
        assert found, log.read_text()
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 800, "height": 480})
            await page.goto(found.group(1) + "rooms/opd-1")
            await wait_state(page, "opd-1", "live")
            proc.send_signal(signal.SIGSTOP)
            try:
                # Two heartbeats and a second of silence, then offline on the page's own timer.
                await wait_state(page, "opd-1", "offline", timeout=5)
                assert await page.is_visible('[data-role="banner"]')
                assert await patients_text(page, "opd-1") == "5"
            finally:
                proc.send_signal(signal.SIGCONT)
            # The page retries with backoff (1 s, then up to 2 s...) and finds it alive again.
            await wait_state(page, "opd-1", "live", timeout=10)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_screens_fit_every_size_in_english_and_bengali(sim, broker, tmp_path):
    rooms = [
        {"id": "opd-1", "name": "OPD 1"},
        {"id": "lab", "name": "Laboratory", "locale": "bn"},
        # Not on the server: refused with unknown_room. Its name tries to inject markup.
        {"id": "x-ray", "name": EVIL, "label": "</script><b>label</b>"},
    ]
    config = make_config(sim.url, broker.port, rooms=rooms, display={"listen": "127.0.0.1:0", "heartbeat": 0.5})
    shots = shots_dir(tmp_path)
    async with running(config) as app, chromium() as browser:
        svc = app.display
        sim.set_queue("opd-1", 128, now_serving="A-17")
        sim.set_queue("lab", 35, now_serving="B-4")
        await wait_store(app, lambda: app.store.rooms["lab"].patients == 35 and app.store.rooms["x-ray"].error)
        dialogs: list[str] = []
        for width, height in SIZES:
            page = await browser.new_page(viewport={"width": width, "height": height})
            page.on("dialog", lambda d: dialogs.append(d.message))
            for target, name in (("", "all"), ("rooms/opd-1", "opd-1"), ("rooms/lab", "lab-bn")):
                await page.goto(svc.url + target)
                if name in ("all", "opd-1"):
                    await wait_patients(page, "opd-1", "128")
                if name in ("all", "lab-bn"):
                    await wait_patients(page, "lab", "৩৫")
                if name == "all":
                    await wait_state(page, "x-ray", "error")
                await page.screenshot(path=shots / f"{name}-{width}x{height}.png")
                report = await layout_report(page)
                assert_fits(report)
                # Very large: the number is at least a fifth of the screen's shorter side.
                biggest = max(box["height"] for box in report["boxes"])
                assert biggest >= min(width, height) / (5 if name == "all" else 3), report
            await page.close()

        page = await browser.new_page(viewport={"width": 1920, "height": 1080})
        page.on("dialog", lambda d: dialogs.append(d.message))
        await page.goto(svc.url)
        await wait_state(page, "x-ray", "error")
        # The refused room: a clear message, and its hostile name shown as plain text.
        assert await text_of(page, "x-ray", "status") == "This room is not available from the hospital system."
        assert await text_of(page, "x-ray", "name") == EVIL
        assert await text_of(page, "x-ray", "label") == "</script><b>label</b>"
        assert await page.evaluate("document.querySelectorAll('img, b, svg').length") == 0
        assert dialogs == []

        # Bengali: its label, its digits (also on the clock), drawn with a Bengali font.
        await page.goto(svc.url + "rooms/lab")
        await wait_patients(page, "lab", "৩৫")
        assert await text_of(page, "lab", "label") == "অপেক্ষমাণ রোগী"
        assert re.fullmatch(r"[০-৯]{2}:[০-৯]{2}", await page.inner_text('[data-role="clock"]'))
        assert await page.get_attribute('[data-room="lab"]', "lang") == "bn"
        for role in ("patients", "label"):
            fonts = await platform_fonts(page, f'[data-room="lab"] [data-role="{role}"]')
            assert any("Bengali" in f for f in fonts), f"{role} drawn with {fonts}: tofu?"
        assert any(BENGALI_FONT_DIR.glob("NotoSansBengali-*.ttf")), "fonts-noto-core is not installed"
        await page.screenshot(path=shots / "lab-bn-clip-1920x1080.png")

        # A per-screen language: the English room page in Bengali.
        await page.goto(svc.url + "rooms/opd-1?lang=bn")
        await wait_patients(page, "opd-1", "১২৮")
        assert await text_of(page, "opd-1", "now-serving") == "এখন সেবা দেওয়া হচ্ছে A-17"
