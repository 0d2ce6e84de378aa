"""Helpers for the display tests: Playwright on Debian's Chromium, a display service of the
test's own in its event loop, and raw HTTP.

Playwright only drives the browser here (``executable_path``); ``playwright install`` is never
needed. Without Chromium or Playwright the browser tests skip with the reason, except under
CI (``CI`` set), where a missing browser is a broken set-up and fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from testsupport import http_get  # noqa: F401 (the pages' tests import it from here)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BENGALI_FONT_DIR = Path("/usr/share/fonts/truetype/noto")


def _missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"{CHROMIUM} is missing (run scripts/install-browser-deps)"
    return None


def require_browser() -> None:
    """Skip (fail under CI) when the browser test set-up is missing."""
    missing = _missing()
    if missing is None:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"browser tests cannot run under CI: {missing}", pytrace=False)
    pytest.skip(f"browser tests skipped: {missing}")


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium for one test; closed whatever happens."""
    require_browser()
    from playwright.async_api import async_playwright

    executable = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield browser
        finally:
            await browser.close()


async def room_state(page: Any, room: str) -> str | None:
    return await page.get_attribute(f'[data-room="{room}"]', "data-state")


async def wait_state(page: Any, room: str, state: str, timeout: float = 5.0) -> None:
    """Waits for ``data-state`` on the room's element, with a message that shows what it was."""
    try:
        await page.wait_for_selector(f'[data-room="{room}"][data-state="{state}"]', timeout=timeout * 1000)
    except Exception as exc:
        if type(exc).__name__ != "TimeoutError":
            raise
        now = await room_state(page, room)
        text = await page.inner_text("body")
        raise AssertionError(f"room {room} never became {state!r} within {timeout} s: {now!r}; page: {text!r}") from None


async def patients_text(page: Any, room: str) -> str:
    return await page.inner_text(f'[data-room="{room}"] [data-role="patients"]')


async def wait_patients(page: Any, room: str, text: str, timeout: float = 5.0) -> None:
    try:
        await page.wait_for_function(
            """([room, text]) => {
                const el = document.querySelector(`[data-room="${room}"] [data-role="patients"]`);
                return el !== null && el.textContent === text;
            }""",
            arg=[room, text],
            timeout=timeout * 1000,
        )
    except Exception as exc:
        if type(exc).__name__ != "TimeoutError":
            raise
        raise AssertionError(
            f"room {room} never showed {text!r} within {timeout} s: {await patients_text(page, room)!r}"
        ) from None


async def layout_report(page: Any) -> dict[str, Any]:
    """Where each number is and whether the page would scroll, in CSS pixels."""
    return await page.evaluate(
        """() => {
            const doc = document.scrollingElement || document.documentElement;
            const boxes = [...document.querySelectorAll('[data-role="patients"]')].map(el => {
                const r = el.getBoundingClientRect();
                return {room: el.closest('[data-room]').dataset.room, text: el.textContent,
                        left: r.left, top: r.top, right: r.right, bottom: r.bottom,
                        width: r.width, height: r.height,
                        fontSize: parseFloat(getComputedStyle(el).fontSize),
                        scrollWidth: el.scrollWidth, clientWidth: el.clientWidth};
            });
            const cards = [...document.querySelectorAll('[data-room]')].map(el => ({
                room: el.dataset.room, scrollHeight: el.scrollHeight, clientHeight: el.clientHeight,
                scrollWidth: el.scrollWidth, clientWidth: el.clientWidth}));
            return {width: window.innerWidth, height: window.innerHeight,
                    scrollWidth: doc.scrollWidth, scrollHeight: doc.scrollHeight, boxes, cards};
        }"""
    )


def assert_fits(report: dict[str, Any]) -> None:
    """Every number fully inside the viewport, not clipped, no room's text cut off, and
    nothing to scroll."""
    w, h = report["width"], report["height"]
    assert report["scrollWidth"] <= w and report["scrollHeight"] <= h, f"the page scrolls: {report}"
    assert report["boxes"], "no [data-role=patients] element"
    for box in report["boxes"]:
        assert box["width"] > 0 and box["height"] > 0, f"invisible number: {box}"
        assert box["left"] >= 0 and box["top"] >= 0, f"number outside the viewport: {box} in {w}x{h}"
        assert box["right"] <= w and box["bottom"] <= h, f"number outside the viewport: {box} in {w}x{h}"
        assert box["scrollWidth"] <= box["clientWidth"] + 1, f"number clipped: {box}"
    for card in report["cards"]:
        assert card["scrollHeight"] <= card["clientHeight"] + 1, f"a room's text overflows its cell: {card}"
        assert card["scrollWidth"] <= card["clientWidth"] + 1, f"a room's text overflows its cell: {card}"


async def platform_fonts(page: Any, selector: str) -> list[str]:
    """The fonts Chromium really drew an element's text with (DevTools), e.g. to prove that
    Bengali digits came from a Bengali font and not as empty boxes."""
    cdp = await page.context.new_cdp_session(page)
    try:
        await cdp.send("DOM.enable")
        await cdp.send("CSS.enable")
        root = await cdp.send("DOM.getDocument", {"depth": -1})
        found = await cdp.send("DOM.querySelector", {"nodeId": root["root"]["nodeId"], "selector": selector})
        fonts = await cdp.send("CSS.getPlatformFontsForNode", {"nodeId": found["nodeId"]})
        return [f["familyName"] for f in fonts["fonts"] if f.get("glyphCount", 0) > 0]
    finally:
        await cdp.detach()


# -- the display service and plain HTTP, shared by the display tests ------------------------


@contextlib.asynccontextmanager
async def serving(cfg: Any, rooms: Any, store: Any, **kwargs: Any) -> AsyncIterator[Any]:
    """A DisplayService in this test's loop, as App would run it; stopped (cancelled) after."""
    from waiting_room.display import DisplayService

    service = DisplayService(cfg, rooms, store, **kwargs)
    task = asyncio.create_task(service.run(), name="test-display")
    ready = asyncio.create_task(service.ready.wait())
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises what made it stop
            raise AssertionError("the display service stopped before it was ready")
        if ready not in done:
            raise AssertionError("the display service was not ready within 10 s")
        yield service
    finally:
        ready.cancel()
        task.cancel()
        await asyncio.wait({task, ready})
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
