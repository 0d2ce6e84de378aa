"""discovery: Home Assistant MQTT discovery, a pure function of (settings, rooms).

The daemon is one device (the bridge); each room is a device of its own, via the bridge, in
its configured area, with three entities: patients, now serving, last update.
tests/test_home_assistant.py checks the same against a real Home Assistant."""

from __future__ import annotations

import json
import re

import pytest

from waiting_room.discovery import ROOM_ENTITIES, Discovery, Message, object_id, safe_id

BASE = "hospital/waiting-room"
ROOMS = [("opd-1", "OPD 1"), ("lab", "Laboratory"), ("ward_3.east", "Ward 3 East")]
AREAS = {"opd-1": "Outpatients", "lab": "Ground floor"}  # ward_3.east: no area
TOPIC_ID = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.fixture
def disc() -> Discovery:
    return Discovery.for_client("homeassistant", BASE, "waiting-room-reception")


def payloads(disc: Discovery) -> dict[str, dict]:
    return {m.topic: json.loads(m.payload) for m in disc.messages(ROOMS, AREAS)}


def entities(disc: Discovery, room: str) -> dict[str, dict]:
    """kind -> config of one room's entities, as published."""
    published = payloads(disc)
    return {kind: published[disc.entity_topic(room, kind, component)] for kind, component in ROOM_ENTITIES}


def sandbox():
    jinja2 = pytest.importorskip("jinja2.sandbox")
    return jinja2.ImmutableSandboxedEnvironment()  # what Home Assistant's templates run in


def render(template: str, payload: dict) -> str:
    """A value template as Home Assistant renders it on a JSON payload (value and value_json)."""
    return sandbox().from_string(template).render(value=json.dumps(payload), value_json=payload)


# -- safe_id -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["opd-1", "lab", "a_b", "ABC-09_x"])
def test_safe_id_keeps_safe_values(value):
    assert safe_id(value) == value


@pytest.mark.parametrize("value", ["a.b", "ward_3.east", "host name", "a/b", "a+b", "a#b", "ü", "a\x00b", ""])
def test_safe_id_only_allows_topic_safe_characters(value):
    result = safe_id(value)
    if value:
        assert TOPIC_ID.match(result), result


def test_safe_id_keeps_similar_ids_distinct():
    ids = ["a.b", "a_b", "a-b", "a b", "a/b", "a+b"]
    assert len({safe_id(v) for v in ids}) == len(ids)


def test_safe_id_is_stable():
    assert safe_id("ward_3.east") == safe_id("ward_3.east")


# -- a device per room, three entities each -------------------------------------------------


def test_three_entities_per_room_plus_the_upstream(disc):
    messages = disc.messages(ROOMS, AREAS)
    assert len(messages) == 3 * len(ROOMS) + 1
    assert all(isinstance(m, Message) and m.retain for m in messages)
    topics = [m.topic for m in messages]
    assert len(set(topics)) == len(topics)
    assert sum("/sensor/" in t for t in topics) == 3 * len(ROOMS)
    assert sum("/binary_sensor/" in t for t in topics) == 1
    # The bridge first: the device the rooms are "via" exists before them.
    assert topics[0] == disc.upstream_topic
    for room, _ in ROOMS:
        assert set(disc.room_topics(room)) <= set(topics)


def test_the_patient_count_keeps_its_topic_and_unique_id():
    """Installations from before rooms were devices keep the entity, and with it its history."""
    disc = Discovery.for_client("homeassistant", "waiting-room", "waiting-room-reception")
    assert disc.room_topic("opd-1") == "homeassistant/sensor/waiting-room-reception/opd-1/config"
    assert disc.room_config("opd-1", "OPD 1")["unique_id"] == "waiting-room-reception_opd-1"
    assert disc.room_config("a.b", "A")["unique_id"] == f"waiting-room-reception_{safe_id('a.b')}"
    assert disc.room_topics("opd-1")[0] == disc.room_topic("opd-1")


@pytest.mark.parametrize(("room", "name"), ROOMS)
def test_each_room_is_a_device_via_the_daemon_in_its_area(disc, room, name):
    configs = entities(disc, room)
    devices = [c["device"] for c in configs.values()]
    assert all(d == devices[0] for d in devices), "one device for all of a room's entities"
    device = devices[0]
    assert device["name"] == name
    assert device["identifiers"] == [f"{disc.node_id}/{room}"]
    assert device["via_device"] == disc.node_id == disc.upstream_config()["device"]["identifiers"][0]
    if room in AREAS:
        assert device["suggested_area"] == AREAS[room]
    else:
        assert "suggested_area" not in device
    assert {c["unique_id"] for c in configs.values()}.isdisjoint({disc.node_id})


def test_the_daemon_is_the_bridge_device(disc):
    bridge = disc.upstream_config()["device"]
    assert bridge["identifiers"] == [disc.node_id]
    assert "via_device" not in bridge and "suggested_area" not in bridge


@pytest.mark.parametrize(("room", "name"), ROOMS)
def test_patients_sensor(disc, room, name):
    config = entities(disc, room)["patients"]
    assert config["name"] == "Patients" and config["has_entity_name"] is True
    assert config["state_topic"] == f"{BASE}/{room}/patients"
    assert config["json_attributes_topic"] == f"{BASE}/{room}/state"
    assert config["state_class"] == "measurement"
    assert config["unique_id"] == f"{disc.node_id}_{safe_id(room)}"


@pytest.mark.parametrize(("room", "name"), ROOMS)
def test_every_entity_of_a_room_shares_its_availability(disc, room, name):
    configs = entities(disc, room)
    for kind, config in configs.items():
        assert config["availability_mode"] == "all", kind
        assert config["availability"] == configs["patients"]["availability"], kind
    availability = {entry["topic"] for entry in configs["patients"]["availability"]}
    assert availability == {f"{BASE}/status", f"{BASE}/upstream"}


def test_now_serving_sensor(disc):
    config = entities(disc, "lab")["now_serving"]
    assert config["name"] == "Now serving"
    assert config["state_topic"] == f"{BASE}/lab/state"
    assert "device_class" not in config and "state_class" not in config  # text: a ticket
    state = {"patients": 3, "now_serving": "A-17", "updated_at": "2026-11-25T19:43:20.472Z",
             "stale": False, "error": None}
    assert render(config["value_template"], state) == "A-17"
    # Nobody served yet: blank, not Home Assistant's "None".
    assert render(config["value_template"], {**state, "now_serving": None}) == ""


def test_last_update_sensor(disc):
    config = entities(disc, "lab")["last_update"]
    assert config["name"] == "Last update"
    assert config["device_class"] == "timestamp"
    assert config["entity_category"] == "diagnostic"
    assert config["state_topic"] == f"{BASE}/lab/state"
    state = {"patients": 3, "now_serving": "A-17", "updated_at": "2026-11-25T19:43:20.472Z",
             "stale": False, "error": None}
    assert render(config["value_template"], state) == "2026-11-25T19:43:20.472Z"


def test_entities_of_similar_rooms_never_share_a_topic(disc):
    """Room "lab_now_serving"'s count and room "lab"'s now-serving sensor are different entries."""
    rooms = [("lab", "Lab"), ("lab_now_serving", "X"), ("lab_last_update", "Y"), ("lab.now_serving", "Z")]
    messages = disc.messages(rooms)
    assert len({m.topic for m in messages}) == len(messages) == 3 * len(rooms) + 1
    ids = [json.loads(m.payload)["unique_id"] for m in messages]
    assert len(set(ids)) == len(ids)
    assert object_id("lab", "patients") == "lab"
    assert TOPIC_ID.match(object_id("ward_3.east", "now_serving"))


def test_room_topic_shape(disc):
    for room, _ in ROOMS:
        prefix, component, node, object_id, last = disc.room_topic(room).split("/")
        assert (prefix, component, node, last) == ("homeassistant", "sensor", disc.node_id, "config")
        assert TOPIC_ID.match(object_id)
        assert TOPIC_ID.match(node)


def test_unique_ids_are_unique_even_for_similar_rooms(disc):
    similar = [("a.b", "A dot B"), ("a_b", "A underscore B"), ("a-b", "A dash B")]
    messages = disc.messages(similar)
    unique_ids = [json.loads(m.payload)["unique_id"] for m in messages]
    assert len(set(unique_ids)) == len(unique_ids)
    assert len({m.topic for m in messages}) == len(messages)


def test_unique_ids_differ_between_daemons():
    a = Discovery.for_client("homeassistant", BASE, "daemon-a").room_config("opd-1", "OPD 1")
    b = Discovery.for_client("homeassistant", BASE, "daemon-b").room_config("opd-1", "OPD 1")
    assert a["unique_id"] != b["unique_id"]


def test_the_upstream_availability_maps_connected_to_online(disc):
    config = disc.room_config("opd-1", "OPD 1")
    upstream = next(e for e in config["availability"] if e["topic"] == f"{BASE}/upstream")
    assert "connected" in upstream["value_template"] and "online" in upstream["value_template"]


@pytest.mark.parametrize(
    ("payload", "available", "on", "feed"),
    [
        ("connected", "online", "ON", "socket"),
        ("degraded", "online", "ON", "poll"),  # polled values are fresh: rooms stay available
        ("disconnected", "offline", "OFF", "none"),
        ("auth_failed", "offline", "OFF", "none"),
    ],
)
def test_upstream_templates_as_home_assistant_renders_them(disc, payload, available, on, feed):
    env = sandbox()
    for config in disc.room_configs("opd-1", "OPD 1").values():
        upstream = next(e for e in config["availability"] if e["topic"] == f"{BASE}/upstream")
        assert env.from_string(upstream["value_template"]).render(value=payload) == available
    sensor = disc.upstream_config()
    assert env.from_string(sensor["value_template"]).render(value=payload) == on
    attributes = json.loads(env.from_string(sensor["json_attributes_template"]).render(value=payload))
    assert attributes == {"status": payload, "feed": feed}
    assert sensor["json_attributes_topic"] == f"{BASE}/upstream"


def test_upstream_connectivity_binary_sensor(disc):
    topic = disc.upstream_topic
    assert topic == f"homeassistant/binary_sensor/{disc.node_id}/upstream/config"
    config = payloads(disc)[topic]
    assert config["device_class"] == "connectivity"
    assert config["state_topic"] == f"{BASE}/upstream"
    assert config["availability_topic"] == f"{BASE}/status"
    assert config["unique_id"]
    assert config["device"]["identifiers"] == [disc.node_id]


def test_non_ascii_names_and_areas_survive(disc):
    message = disc.messages([("opd-1", "বহির্বিভাগ ১")], {"opd-1": "নিচতলা"})[1]
    assert "বহির্বিভাগ" in message.payload  # UTF-8 as such, not \u escapes
    device = json.loads(message.payload)["device"]
    assert (device["name"], device["suggested_area"]) == ("বহির্বিভাগ ১", "নিচতলা")


def test_removal_empties_every_entry_of_the_room_and_no_other(disc):
    removals = disc.removals("opd-1")
    assert removals == [Message(topic, "", True) for topic in disc.room_topics("opd-1")]
    assert len(removals) == len(ROOM_ENTITIES)
    others = {t for room, _ in ROOMS if room != "opd-1" for t in disc.room_topics(room)}
    assert not {m.topic for m in removals} & (others | {disc.upstream_topic})


def test_node_id_is_topic_safe():
    disc = Discovery.for_client("homeassistant", BASE, "waiting room.reception/1")
    assert TOPIC_ID.match(disc.node_id)
    assert disc.subscription == f"homeassistant/+/{disc.node_id}/+/config"


# -- stale entries -----------------------------------------------------------------------


def current(disc: Discovery) -> set[str]:
    return {m.topic for m in disc.messages(ROOMS)}


def test_current_topics_are_the_rooms_topics(disc):
    assert current(disc) == {t for room, _ in ROOMS for t in disc.room_topics(room)} | {disc.upstream_topic}


def test_every_entry_of_a_removed_room_is_stale(disc):
    remaining = {t for room, _ in ROOMS if room != "lab" for t in disc.room_topics(room)}
    for topic in disc.room_topics("lab"):
        assert disc.is_stale_entry(topic, remaining), topic


def test_is_stale_entry_recognises_removed_rooms_of_this_node(disc):
    assert disc.is_stale_entry(disc.room_topic("old-room"), current(disc))
    assert disc.is_stale_entry(f"homeassistant/sensor/{disc.node_id}/xray/config", current(disc))
    # this node's entry of another component for a removed room, too
    assert disc.is_stale_entry(f"homeassistant/number/{disc.node_id}/xray/config", current(disc))


def test_current_rooms_and_the_upstream_are_not_stale(disc):
    topics = current(disc)
    for topic in topics:
        assert not disc.is_stale_entry(topic, topics)
    assert not disc.is_stale_entry(disc.upstream_topic, set())


@pytest.mark.parametrize(
    "topic",
    [
        "homeassistant/sensor/some-other-node/opd-9/config",  # another daemon
        "homeassistant/sensor/waiting-room-reception-2/opd-9/config",
        "otherprefix/sensor/waiting-room-reception/opd-9/config",  # another prefix
        "homeassistant2/sensor/waiting-room-reception/opd-9/config",
        "x/homeassistant/sensor/waiting-room-reception/opd-9/config",
        "homeassistant/sensor/waiting-room-reception/opd-9/state",  # not a config
        "homeassistant/sensor/waiting-room-reception/config",  # too short
        "homeassistant/sensor/waiting-room-reception/a/b/config",  # too long
        "homeassistant/waiting-room-reception/opd-9/config",
        "homeassistant",
        "",
    ],
)
def test_is_stale_entry_ignores_everything_else(disc, topic):
    assert not disc.is_stale_entry(topic, current(disc))


def test_is_stale_entry_with_a_prefix_containing_a_slash():
    disc = Discovery.for_client("site/ha", BASE, "node-1")
    topics = {m.topic for m in disc.messages(ROOMS)}
    assert disc.room_topic("opd-1").startswith("site/ha/sensor/node-1/")
    assert disc.is_stale_entry("site/ha/sensor/node-1/old/config", topics)
    assert not disc.is_stale_entry(disc.room_topic("opd-1"), topics)
    assert not disc.is_stale_entry(disc.upstream_topic, topics)
    assert not disc.is_stale_entry("site/sensor/node-1/old/config", topics)
    assert not disc.is_stale_entry("ha/sensor/node-1/old/config", topics)
    assert not disc.is_stale_entry("other/site/ha/sensor/node-1/old/config", topics)


def test_a_plain_prefix_does_not_claim_a_slashed_one():
    disc = Discovery.for_client("ha", BASE, "node-1")
    assert not disc.is_stale_entry("site/ha/sensor/node-1/old/config", set())
    assert disc.is_stale_entry("ha/sensor/node-1/old/config", set())
