"""discovery: Home Assistant MQTT discovery, a pure function of (settings, rooms)."""

from __future__ import annotations

import json
import re

import pytest

from waiting_room.discovery import Discovery, Message, safe_id

BASE = "hospital/waiting-room"
ROOMS = [("opd-1", "OPD 1"), ("lab", "Laboratory"), ("ward_3.east", "Ward 3 East")]
TOPIC_ID = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.fixture
def disc() -> Discovery:
    return Discovery.for_client("homeassistant", BASE, "waiting-room-reception")


def payloads(disc: Discovery) -> dict[str, dict]:
    return {m.topic: json.loads(m.payload) for m in disc.messages(ROOMS)}


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


# -- one sensor per room -----------------------------------------------------------------


def test_one_sensor_per_room_plus_the_upstream(disc):
    messages = disc.messages(ROOMS)
    assert len(messages) == len(ROOMS) + 1
    assert all(isinstance(m, Message) and m.retain for m in messages)
    topics = [m.topic for m in messages]
    assert len(set(topics)) == len(topics)
    sensors = [t for t in topics if "/sensor/" in t]
    assert len(sensors) == len(ROOMS)
    assert sum("/binary_sensor/" in t for t in topics) == 1


@pytest.mark.parametrize(("room", "name"), ROOMS)
def test_room_sensor_config(disc, room, name):
    config = payloads(disc)[disc.room_topic(room)]
    assert config["name"] == name
    assert config["state_topic"] == f"{BASE}/{room}/patients"
    assert config["json_attributes_topic"] == f"{BASE}/{room}/state"
    assert config["state_class"] == "measurement"
    assert config["unique_id"]
    assert config["device"]["identifiers"] == [disc.node_id]
    assert config["availability_mode"] == "all"
    availability = {entry["topic"] for entry in config["availability"]}
    assert availability == {f"{BASE}/status", f"{BASE}/upstream"}


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
    jinja2 = pytest.importorskip("jinja2.sandbox")
    env = jinja2.ImmutableSandboxedEnvironment()  # what Home Assistant's templates run in
    room = disc.room_config("opd-1", "OPD 1")
    upstream = next(e for e in room["availability"] if e["topic"] == f"{BASE}/upstream")
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


def test_non_ascii_names_survive(disc):
    message = disc.messages([("opd-1", "বহির্বিভাগ ১")])[1]
    assert json.loads(message.payload)["name"] == "বহির্বিভাগ ১"


def test_removal_is_an_empty_retained_payload(disc):
    message = disc.removal("opd-1")
    assert message == Message(disc.room_topic("opd-1"), "", True)


def test_node_id_is_topic_safe():
    disc = Discovery.for_client("homeassistant", BASE, "waiting room.reception/1")
    assert TOPIC_ID.match(disc.node_id)
    assert disc.subscription == f"homeassistant/+/{disc.node_id}/+/config"


# -- stale entries -----------------------------------------------------------------------


def current(disc: Discovery) -> set[str]:
    return {m.topic for m in disc.messages(ROOMS)}


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
