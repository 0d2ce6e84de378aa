"""Against a real Home Assistant (2024.3, the newest on Python 3.11): what a user sees when a
fresh Home Assistant is connected to the broker, without a line of YAML for the rooms.

Home Assistant lives in a venv of its own, built once by ``scripts/install-ha-test-deps``
(about a minute; cached in /var/cache/waiting-room-tests). Without that venv these tests are
skipped with the reason, unless ``WAITING_ROOM_HA_TEST=1`` asks for them: then the venv is
built first. ``WAITING_ROOM_HA_SCREENSHOT=docs/home-assistant.png`` also saves the dashboard
(headless Chromium) where the README shows it.
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from conftest import ROOT, eventually, make_config, running
from testsupport import HomeAssistant, home_assistant_venv
from waiting_room.simulator import Simulator

pytestmark = pytest.mark.timeout(300)

NODE = "wr-test"  # make_config's mqtt.client_id: the bridge device's identifier
ROOMS = [
    {"id": "opd-1", "name": "OPD 1", "area": "Outpatients"},
    {"id": "lab", "name": "Laboratory", "area": "Laboratory wing"},
    {"id": "xray", "name": "X-ray"},  # no area
]


def _asked() -> bool:
    return os.environ.get("WAITING_ROOM_HA_TEST", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def ha_venv() -> Path:
    venv = home_assistant_venv()
    if venv is None and _asked():
        done = subprocess.run([str(ROOT / "scripts" / "install-ha-test-deps")], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"scripts/install-ha-test-deps failed: {done.stderr[-2000:]}")
        venv = home_assistant_venv()
    if venv is None:
        pytest.skip("no Home Assistant venv: run scripts/install-ha-test-deps once "
                    "(or set WAITING_ROOM_HA_TEST=1 to build it on the way)")
    return venv


@pytest.fixture
async def home_assistant(tmp_path: Path, broker: Any, ha_venv: Path) -> AsyncIterator[HomeAssistant]:
    ha = HomeAssistant(tmp_path, ha_venv)
    try:
        ha.start()
        await ha.add_mqtt(broker.port)
    except (RuntimeError, OSError) as exc:
        ha.stop()
        pytest.fail(f"Home Assistant did not start: {exc}\n{ha.log_text()[-3000:]}")
    try:
        yield ha
    finally:
        ha.stop()


@pytest.fixture
async def sim3() -> AsyncIterator[Simulator]:
    s = Simulator(rooms=[r["id"] for r in ROOMS], token="test-token", heartbeat=15, tick=0, seed=1,
                  initial_patients={"opd-1": 5, "lab": 2, "xray": 7})
    await s.start()
    s.set_queue("opd-1", 5, "A-17")
    s.set_queue("lab", 2, "L-4")
    try:
        yield s
    finally:
        await s.stop()


def in_home_assistant(check: Any, what: str) -> Any:
    """Home Assistant has no event a test could await from outside short of its websocket
    subscriptions; its REST answers are cheap: asked every 0.2 s, for up to 20 s."""
    return eventually(check, timeout=20, what=what, interval=0.2)


class View:
    """Home Assistant's registries and states, read in one go."""

    def __init__(self, devices: list[dict], areas: list[dict], entities: list[dict], states: list[dict]) -> None:
        self.devices = devices
        self.areas = {a["area_id"]: a["name"] for a in areas}
        self.entities = entities
        self.states = {s["entity_id"]: s for s in states}

    def device(self, identifier: str) -> dict | None:
        return next((d for d in self.devices if ["mqtt", identifier] in d["identifiers"]), None)

    def room(self, room: str) -> dict | None:
        return self.device(f"{NODE}/{room}")

    def entities_of(self, device: dict) -> dict[str, dict]:
        """unique_id -> entity registry entry, for one device."""
        return {e["unique_id"]: e for e in self.entities if e["device_id"] == device["id"]}

    def state(self, unique_id: str) -> dict | None:
        entry = next((e for e in self.entities if e["unique_id"] == unique_id and e["platform"] == "mqtt"), None)
        return None if entry is None else self.states.get(entry["entity_id"])


async def view(ha: HomeAssistant) -> View:
    devices, areas, entities = await ha.ws({"type": "config/device_registry/list"},
                                           {"type": "config/area_registry/list"},
                                           {"type": "config/entity_registry/list"})
    status, states = await ha.rest("GET", "/api/states")
    assert status == 200, states
    return View(devices, areas, entities, states)


def unique_ids(disc: Any, room: str) -> dict[str, str]:
    """kind -> unique_id of a room's entities, as discovery announces them."""
    return {kind: config["unique_id"] for kind, config in disc.room_configs(room, "x").items()}


async def test_each_room_is_a_device_in_its_area_with_its_entities(sim3, broker, home_assistant, tmp_path):
    ha = home_assistant
    config = make_config(sim3.url, broker.port, rooms=ROOMS)
    async with running(config) as app:
        disc = app.mqtt.discovery
        ids = {r["id"]: unique_ids(disc, r["id"]) for r in ROOMS}

        async def all_there() -> View | None:
            v = await view(ha)
            ok = all(v.room(r["id"]) is not None and len(v.entities_of(v.room(r["id"]))) == 3 for r in ROOMS)
            ok = ok and all(v.state(uid) is not None and v.state(uid)["state"] not in ("unknown", "unavailable")
                            for room in ids.values() for uid in room.values())
            return v if ok else None

        v = await in_home_assistant(all_there, "every room's device, entities and values in Home Assistant")

        # One device for the daemon (the bridge), one per room via it, in its suggested area.
        bridge = v.device(NODE)
        assert bridge is not None and bridge["via_device_id"] is None
        for room in ROOMS:
            device = v.room(room["id"])
            assert device["name"] == room["name"]
            assert device["via_device_id"] == bridge["id"]
            assert v.areas.get(device["area_id"]) == room.get("area"), (room, device["area_id"], v.areas)
            entities = v.entities_of(device)
            assert set(entities) == set(ids[room["id"]].values())
            assert entities[ids[room["id"]]["last_update"]]["entity_category"] == "diagnostic"
            assert all(e["entity_category"] is None for uid, e in entities.items()
                       if uid != ids[room["id"]]["last_update"])
        assert v.areas.keys() >= {v.room("opd-1")["area_id"], v.room("lab")["area_id"]}

        # The values, as a dashboard shows them.
        patients = v.state(ids["opd-1"]["patients"])
        assert patients["state"] == "5"
        assert patients["attributes"]["unit_of_measurement"] == "patients"
        assert patients["attributes"]["friendly_name"] == "OPD 1 Patients"
        assert patients["attributes"]["now_serving"] == "A-17"  # the state topic's attributes, as before
        serving = v.state(ids["opd-1"]["now_serving"])
        assert (serving["state"], serving["attributes"]["friendly_name"]) == ("A-17", "OPD 1 Now serving")
        updated = v.state(ids["opd-1"]["last_update"])
        assert updated["attributes"]["device_class"] == "timestamp"
        shown = datetime.fromisoformat(updated["state"])
        expected = datetime.fromtimestamp(app.store.rooms["opd-1"].updated_at, timezone.utc)
        assert abs((shown - expected).total_seconds()) < 1, (shown, expected)
        assert v.state(ids["xray"]["patients"])["state"] == "7"

        # A change reaches Home Assistant.
        sim3.set_queue("lab", 9, "L-5")

        async def lab_changed() -> bool:
            v = await view(ha)
            return (v.state(ids["lab"]["patients"])["state"], v.state(ids["lab"]["now_serving"])["state"]) == ("9", "L-5")

        await in_home_assistant(lab_changed, "lab: 9 patients, now serving L-5")

        # The feed is lost: every entity of every room is unavailable, never a frozen number;
        # the daemon's own connectivity sensor stays available and says off.
        sim3.refuse(503)
        await sim3.close_all(1011)

        async def all_unavailable() -> bool:
            v = await view(ha)
            rooms_down = all(v.state(uid)["state"] == "unavailable" for room in ids.values() for uid in room.values())
            return rooms_down and v.state(f"{NODE}_upstream")["state"] == "off"

        await in_home_assistant(all_unavailable, "every room entity unavailable while the feed is down")
        await shoot(ha, tmp_path, "feed-down")
        sim3.refuse(None)

        async def back() -> bool:
            v = await view(ha)
            live = all(v.state(uid)["state"] not in ("unavailable", "unknown") for room in ids.values()
                       for uid in room.values())
            return live and v.state(ids["lab"]["patients"])["state"] == "9"

        await in_home_assistant(back, "the rooms available again with their values")
        await shoot(ha, tmp_path, "dashboard", os.environ.get("WAITING_ROOM_HA_SCREENSHOT"))

        # A room taken out of the config: its device and every one of its entities go.
        await app.apply(make_config(sim3.url, broker.port, rooms=ROOMS[:2]))

        async def xray_gone() -> bool:
            v = await view(ha)
            gone = v.room("xray") is None and not any(e["unique_id"] in ids["xray"].values() for e in v.entities)
            kept = v.room("opd-1") is not None and v.state(ids["opd-1"]["patients"])["state"] == "5"
            return gone and kept

        await in_home_assistant(xray_gone, "the removed room's device gone from Home Assistant")

    problems = [line for line in ha.log_text().splitlines()
                if (" ERROR " in line or "Invalid state" in line or "Template" in line) and "mqtt" in line.lower()]
    assert not problems, "\n".join(problems[:10])


async def shoot(ha: HomeAssistant, tmp_path: Path, name: str, keep: str | None = None) -> None:
    """The default dashboard (rooms grouped by area, as Home Assistant builds it from the
    registries) in headless Chromium, signed in with the test's token; kept at ``keep``
    (relative to the repository) when given. Skipped without Chromium."""
    from browser import _missing, chromium

    if _missing() is not None:
        return
    path = tmp_path / f"{name}.png"
    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": 720}, device_scale_factor=1)
        tokens = {"access_token": ha.token, "token_type": "Bearer", "expires_in": 86400, "hassUrl": ha.url,
                  "clientId": f"{ha.url}/", "expires": 4102444800000, "refresh_token": ""}
        await context.add_init_script(
            f"localStorage.setItem('hassTokens', JSON.stringify({__import__('json').dumps(tokens)}));"
            "localStorage.setItem('selectedTheme', JSON.stringify({theme: 'default', dark: false}));")
        page = await context.new_page()
        await page.goto(f"{ha.url}/lovelace/0", wait_until="networkidle")
        await page.wait_for_selector("text=Outpatients", timeout=30_000)
        await page.wait_for_timeout(1500)  # icons and fonts settle
        await page.screenshot(path=str(path))
        await context.close()
    if keep:
        target = ROOT / keep
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
