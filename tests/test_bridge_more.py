"""Token rotation, bad input, broker loss and Home Assistant discovery, end to end."""

from __future__ import annotations

import base64
import json
import logging
import sys

import pytest
from conftest import make_config, running, wait_store

from waiting_room.model import LinkStatus


def state(watcher, room: str) -> dict:
    return json.loads(watcher.last.get(f"waiting-room/{room}/state") or "{}")


def jwt(exp: float, nonce: str) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part({'exp': exp, 'n': nonce})}.sig"


# -- token rotation: make-before-break -------------------------------------------------------


async def test_token_file_rotation_is_make_before_break(sim, broker, watcher, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("test-token\n")
    upstream = {"url": sim.url, "token_file": str(token_file), "token_check": 0.05,
                "backoff": {"initial": 0.05, "max": 0.3}}
    async with running(make_config(sim.url, broker.port, upstream=upstream)) as app:
        await watcher.wait_topic("waiting-room/upstream", "connected")
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("stale") is False)
        seen = len(watcher.history)
        sim.set_token("rotated-token")  # the server now wants the new token for new sockets
        token_file.write_text("rotated-token\n")
        await sim.wait_until(lambda: sim.connections == 2, timeout=5)
        await sim.wait_until(lambda: sim.active == 1, timeout=5)  # the old one was closed
        assert sim.tokens_seen == ["test-token", "rotated-token"]
        assert sim.close_codes == [1000]
        # The new socket joined every room before the old one went away.
        assert sorted(sim.joins) == ["lab", "lab", "opd-1", "opd-1"]
        sim.set_queue("opd-1", 11)
        await watcher.wait_topic("waiting-room/opd-1/patients", "11")
        # No gap: never disconnected, never stale during the switch.
        after = watcher.history[seen:]
        assert ("waiting-room/upstream", "disconnected") not in after
        assert all(not json.loads(p)["stale"] for t, p in after if t.endswith("/state"))
        assert app.store.link.connects == 1


async def test_jwt_is_renewed_before_it_expires(sim, broker, watcher, tmp_path):
    tokens = tmp_path / "tokens"
    # A token_command that prints a fresh short-lived JWT each time it runs.
    script = tmp_path / "issue-token.py"
    script.write_text(
        "import base64, json, sys, time, pathlib\n"
        "def part(o): return base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b'=').decode()\n"
        f"log = pathlib.Path({str(tokens)!r})\n"
        "n = len(log.read_text().splitlines()) if log.exists() else 0\n"
        "tok = part({'alg': 'none'}) + '.' + part({'exp': time.time() + 1.0, 'n': n}) + '.sig'\n"
        "log.open('a').write(tok + '\\n')\n"
        "print(tok)\n"
    )
    sim.set_token(None)  # this test is about our renewal, not the server's checks
    upstream = {"url": sim.url, "token_command": [sys.executable, str(script)],
                "token_renew_before": 0.5, "backoff": {"initial": 0.05, "max": 0.3}}
    async with running(make_config(sim.url, broker.port, upstream=upstream)):
        await watcher.wait_topic("waiting-room/upstream", "connected")
        await sim.wait_until(lambda: sim.connections >= 2, timeout=5)
        issued = tokens.read_text().splitlines()
        assert sim.tokens_seen[1] == issued[1] != issued[0]
        await sim.wait_until(lambda: sim.active == 1, timeout=5)
    assert 1000 in sim.close_codes


async def test_token_never_reaches_logs_or_mqtt(sim, broker, watcher, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "test-token"
    config = make_config(sim.url, broker.port, upstream__token_in="query")
    async with running(config):
        await watcher.wait_topic("waiting-room/upstream", "connected")
        await sim.close_all(4001)
        sim.refuse(401)
        await watcher.wait_topic("waiting-room/upstream", "disconnected")
        sim.refuse(None)
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=5)
    # The daemon's records (the in-process simulator's server logger is not the daemon).
    ours = [r for r in caplog.records if not r.name.startswith("websockets.server")]
    assert any(r.name.startswith("waiting_room") for r in ours)
    assert all(secret not in r.getMessage() for r in ours)
    assert all(secret not in payload for _, payload in watcher.history)


# -- bad input: dropped, counted, nothing reaches MQTT, valid frames still flow -------------------

BAD_FRAMES = [
    "not json at all",
    "[1, 2, 3]",
    '"a string"',
    "{}",
    '{"type": 7}',
    b"\x00\x01binary",
    '{"type":"queue","room":"opd-1","patients":' + "1" * 70_000 + "}",  # oversized
    '{"type":"queue","room":"opd-1","patients":-1}',
    '{"type":"queue","room":"opd-1","patients":2.5}',
    '{"type":"queue","room":"opd-1","patients":"7"}',
    '{"type":"queue","room":"opd-1","patients":true}',
    '{"type":"queue","room":"opd-1","patients":1e12}',
    '{"type":"queue","room":"opd-1/x","patients":1}',
    '{"type":"queue","room":"opd-1/#","patients":1}',
    '{"type":"queue","room":"+","patients":1}',
    '{"type":"queue","room":"#","patients":1}',
    '{"type":"queue","room":"opd\\u0000","patients":1}',
    '{"type":"queue","room":"../etc","patients":1}',
    '{"type":"queue","room":"not-configured","patients":1}',
    '{"type":"queue","patients":3}',  # unroomed, but two rooms are configured
    '{"type":"joined","room":"a b"}',
    '{"type":"error","room":"zzz","code":"forbidden"}',
]


async def test_bad_frames_are_dropped_counted_and_harmless(sim, broker, watcher):
    async with running(make_config(sim.url, broker.port)) as app:
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        for frame in BAD_FRAMES:
            await sim.send_raw(frame)
        await sim.send_raw('{"type":"zzz-future","x":1}')  # unknown type: ignored, not counted
        sim.set_queue("opd-1", 6)  # the valid frame after them still flows
        await watcher.wait_topic("waiting-room/opd-1/patients", "6")
        assert app.store.dropped_frames == len(BAD_FRAMES)
        assert app.store.link.status is LinkStatus.CONNECTED
        assert sim.connections == 1  # none of it cost the connection
    allowed = {"waiting-room/status", "waiting-room/upstream"} | {
        f"waiting-room/{r}/{k}" for r in ("opd-1", "lab") for k in ("patients", "state")
    }
    ours = {t for t, _ in watcher.history if not t.startswith("homeassistant/")}
    assert ours <= allowed
    assert [p for t, p in watcher.history if t == "waiting-room/opd-1/patients"] == ["5", "6"]


async def test_bad_frame_warnings_are_rate_limited(sim, broker, watcher, caplog):
    caplog.set_level(logging.WARNING, logger="waiting_room.upstream")
    async with running(make_config(sim.url, broker.port)) as app:
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        for _ in range(200):
            await sim.send_raw("garbage")
        sim.set_queue("opd-1", 6)
        await watcher.wait_topic("waiting-room/opd-1/patients", "6")
        assert app.store.dropped_frames == 200
    warnings = [r for r in caplog.records if "bad frame" in r.getMessage()]
    assert 1 <= len(warnings) <= 2


# -- MQTT: broker loss, Home Assistant ------------------------------------------------------


async def read_retained(port: int, topics: set[str], timeout: float = 10.0,
                        retained_only: bool = False) -> dict[str, str]:
    """A fresh subscriber: the latest payload of these topics (retained or arriving)."""
    import asyncio

    import aiomqtt

    seen: dict[str, str] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier="late-reader") as client:
        for topic in topics:
            await client.subscribe(topic)
        async with asyncio.timeout(timeout):
            async for msg in client.messages:
                assert msg.retain or not retained_only, msg.topic.value
                seen[msg.topic.value] = msg.payload.decode()
                if topics <= seen.keys():
                    return seen
    return seen


async def test_broker_restart_republishes_every_retained_topic(sim, broker, watcher):
    async with running(make_config(sim.url, broker.port)) as app:
        await watcher.wait_topic("waiting-room/lab/patients", "2")
        await watcher.wait_topic("homeassistant/sensor/wr-test/lab/config")
        broker.restart()  # persistence off: the retained messages are gone
        await wait_store(app, lambda: app.store.components.get("mqtt") != "connected")
        await wait_store(app, lambda: app.store.components.get("mqtt") == "connected", timeout=10)
        seen = await read_retained(broker.port, {
            "waiting-room/lab/patients", "waiting-room/opd-1/state", "waiting-room/upstream",
            "waiting-room/status", "homeassistant/sensor/wr-test/opd-1/config"})
    assert seen["waiting-room/lab/patients"] == "2"
    assert seen["waiting-room/upstream"] == "connected"
    assert seen["waiting-room/status"] == "online"
    # And it is all retained: a reader arriving after the daemon stopped still sees it.
    later = await read_retained(broker.port, set(seen), retained_only=True)
    assert later["waiting-room/lab/patients"] == "2" and later["waiting-room/status"] == "offline"


async def test_discovery_and_home_assistant_restart(sim, broker, watcher):
    config = make_config(sim.url, broker.port)
    async with running(config) as app:
        app.mqtt._announce_delay = 0.05  # the random spread, shrunk for the test
        topic = "homeassistant/sensor/wr-test/opd-1/config"
        await watcher.wait_topic(topic)
        sensor = json.loads(watcher.last[topic])
        assert sensor["state_topic"] == "waiting-room/opd-1/patients"
        assert sensor["json_attributes_topic"] == "waiting-room/opd-1/state"
        assert sensor["availability_mode"] == "all"
        assert {a["topic"] for a in sensor["availability"]} == {"waiting-room/status", "waiting-room/upstream"}
        assert sensor["state_class"] == "measurement" and sensor["unique_id"]
        binary = json.loads(watcher.last["homeassistant/binary_sensor/wr-test/upstream/config"])
        assert binary["device_class"] == "connectivity"
        # Every entity of every room is announced again when Home Assistant comes back.
        topics = [t for room in ("opd-1", "lab") for t in app.mqtt.discovery.room_topics(room)]
        await watcher.wait_for(lambda: all(t in watcher.last for t in topics))
        before = {t: sum(1 for seen, _ in watcher.history if seen == t) for t in topics}
        await watcher.client.publish("homeassistant/status", "online")
        await watcher.wait_for(
            lambda: all(sum(1 for seen, _ in watcher.history if seen == t) > before[t] for t in topics))


async def test_rooms_are_devices_in_their_areas_and_reloads_follow(sim, broker, watcher):
    rooms = [{"id": "opd-1", "name": "OPD 1", "area": "Outpatients"}, {"id": "lab", "name": "Laboratory"}]
    async with running(make_config(sim.url, broker.port, rooms=rooms)) as app:
        disc = app.mqtt.discovery
        for topic in disc.room_topics("opd-1") + disc.room_topics("lab"):
            await watcher.wait_topic(topic)
        device = json.loads(watcher.last[disc.room_topic("opd-1")])["device"]
        assert device["suggested_area"] == "Outpatients" and device["via_device"] == "wr-test"
        assert "suggested_area" not in json.loads(watcher.last[disc.room_topic("lab")])["device"]
        # A reload adds a room in an area, moves one, and takes one out: all of the removed
        # room's entries are emptied, the others announced with their new area.
        sim.add_room("xray", 4)
        moved = [{"id": "opd-1", "name": "OPD 1", "area": "East wing"}, {"id": "xray", "name": "X-ray", "area": "Imaging"}]
        await app.apply(make_config(sim.url, broker.port, rooms=moved))
        for topic in disc.room_topics("lab"):
            await watcher.wait_topic(topic, "")
        await watcher.wait_topic("waiting-room/lab/state", "")
        await watcher.wait_for(lambda: disc.room_topic("xray") in watcher.last)
        xray = json.loads(watcher.last[disc.room_topic("xray")])["device"]
        assert xray["suggested_area"] == "Imaging"
        for topic in disc.room_topics("opd-1"):
            await watcher.wait_for(
                lambda t=topic: json.loads(watcher.last[t])["device"].get("suggested_area") == "East wing")
        # HA drops the entities before their state topics are emptied.
        order = [t for t, payload in watcher.history if payload == "" and "lab" in t]
        assert order.index(disc.room_topic("lab")) < order.index("waiting-room/lab/state")


async def test_removed_room_loses_its_discovery_entry(sim, broker, watcher):
    async with running(make_config(sim.url, broker.port)) as app:
        disc = app.mqtt.discovery
        for topic in disc.room_topics("lab"):
            await watcher.wait_topic(topic)
    # Restarted with "lab" taken out of the config: every retained entry of it is cleared.
    one_room = make_config(sim.url, broker.port, rooms=[{"id": "opd-1", "name": "OPD 1"}])
    async with running(one_room):
        for topic in disc.room_topics("lab"):
            await watcher.wait_topic(topic, "")
        for topic in disc.room_topics("opd-1"):
            assert watcher.last[topic] != ""


async def test_discovery_off(sim, broker, watcher):
    async with running(make_config(sim.url, broker.port, mqtt__discovery_prefix=False)):
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        await watcher.wait_topic("waiting-room/upstream", "connected")
    assert not any(t.startswith("homeassistant/") for t, _ in watcher.history)


async def test_mqtt_down_at_start_then_up(sim, broker):
    broker.stop()
    async with running(make_config(sim.url, broker.port)) as app:
        await wait_store(app, lambda: app.store.link.status is LinkStatus.CONNECTED)
        assert app.store.components.get("mqtt") in ("connecting", "disconnected")
        broker.start()
        await wait_store(app, lambda: app.store.components.get("mqtt") == "connected", timeout=10)
        seen = await read_retained(broker.port, {"waiting-room/opd-1/patients", "waiting-room/status"})
    assert seen == {"waiting-room/opd-1/patients": "5", "waiting-room/status": "online"}


@pytest.mark.parametrize("room", ["a.b", "x_y-1"])
async def test_room_ids_with_punctuation_make_clean_topics(broker, watcher, room):
    from waiting_room.simulator import Simulator

    async with Simulator(rooms=(room,), token="test-token", initial_patients={room: 4}) as sim:
        config = make_config(sim.url, broker.port, rooms=[{"id": room}])
        async with running(config):
            await watcher.wait_topic(f"waiting-room/{room}/patients", "4")
            entry = [t for t in watcher.last if t.startswith("homeassistant/sensor/")]
            await watcher.wait_for(lambda: any(t.startswith("homeassistant/sensor/") for t in watcher.last))
            entry = [t for t in watcher.last if t.startswith("homeassistant/sensor/")][0]
            assert entry.count("/") == 4 and "." not in entry.split("/")[3]


async def test_server_ts_becomes_updated_at(sim, broker, watcher):
    async with running(make_config(sim.url, broker.port)):
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        for patients, ts in [(6, "2026-01-02T03:04:05Z"), (7, "2026-01-02T03:04:05Z"), (8, "2026-01-02T04:00:00+01:00")]:
            await sim.send_raw(json.dumps({"type": "queue", "room": "opd-1", "patients": patients, "ts": ts}))
            await watcher.wait_for(lambda p=patients: state(watcher, "opd-1").get("patients") == p)
            expected = "2026-01-02T03:00:00.000Z" if patients == 8 else "2026-01-02T03:04:05.000Z"
            assert state(watcher, "opd-1")["updated_at"] == expected
