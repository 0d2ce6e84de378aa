"""Home Assistant MQTT discovery as a pure function from (settings, rooms) to messages.

Kept small and data-driven on purpose, the way zigbee2mqtt splits a bridge: the daemon is one
device (the "bridge", with a connectivity binary sensor for the upstream) and each room is a
device of its own, ``via_device`` the daemon, in its configured ``area`` (sent as
``suggested_area``), with three sensors: the patient count, the ticket now served and the
time of the last update (diagnostic). Every room entity is unavailable unless the daemon is
online *and* the feed is live (by the socket, ``connected``, or by polling the snapshot,
``degraded``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Final, Iterable, Mapping

from . import __version__

_NOT_ID: Final = re.compile(r"[^A-Za-z0-9_-]")
# Home Assistant's availability needs "online"/"offline"; the upstream topic says more.
# Polled values (``degraded``) are fresh: the rooms stay available.
_UPSTREAM_AVAILABLE: Final = "{{ 'online' if value in ('connected', 'degraded') else 'offline' }}"
_UPSTREAM_ON: Final = "{{ 'ON' if value in ('connected', 'degraded') else 'OFF' }}"
# The upstream entity's attributes: the raw status, and where the values come from.
_UPSTREAM_ATTRIBUTES: Final = (
    "{{ {'status': value, 'feed': {'connected': 'socket', 'degraded': 'poll'}.get(value, 'none')} | tojson }}"
)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: str
    retain: bool = True


def safe_id(value: str) -> str:
    """Discovery topic ids allow [A-Za-z0-9_-]; anything rewritten gets a short hash so
    that "a.b" and "a_b" stay distinct."""
    cleaned = _NOT_ID.sub("_", value)
    if cleaned != value:
        cleaned += "_" + hashlib.sha1(value.encode()).hexdigest()[:6]
    return cleaned


# A room's entities: (kind, component). "patients" is the sensor every version has announced:
# its topic and unique_id never change, so existing installations keep its history.
ROOM_ENTITIES: Final = (("patients", "sensor"), ("now_serving", "sensor"), ("last_update", "sensor"))
# Home Assistant shows a null now_serving as the text "None": nobody served shows as blank.
_NOW_SERVING: Final = "{{ value_json.now_serving if value_json.now_serving is not none else '' }}"
_UPDATED_AT: Final = "{{ value_json.updated_at }}"


def object_id(room: str, kind: str) -> str:
    """The topic's object id of one of a room's entities. The patient count keeps the room's
    own id; the others are hashed from ``room/kind`` (a ``/`` no room id contains), so no
    room's entity can take another room's topic, e.g. room ``lab_now_serving``'s count and
    room ``lab``'s now-serving sensor."""
    return safe_id(room) if kind == "patients" else safe_id(f"{room}/{kind}")


@dataclass(frozen=True)
class Discovery:
    prefix: str
    base_topic: str
    node_id: str  # stable per daemon: derived from the MQTT client id

    @classmethod
    def for_client(cls, prefix: str, base_topic: str, client_id: str) -> Discovery:
        return cls(prefix, base_topic, safe_id(client_id))

    def entity_topic(self, room: str, kind: str, component: str = "sensor") -> str:
        return f"{self.prefix}/{component}/{self.node_id}/{object_id(room, kind)}/config"

    def room_topic(self, room: str) -> str:
        """The patient count's entry (the one entry of a room before rooms became devices)."""
        return self.entity_topic(room, "patients")

    def room_topics(self, room: str) -> list[str]:
        """Every entry of a room: announced, and removed, together."""
        return [self.entity_topic(room, kind, component) for kind, component in ROOM_ENTITIES]

    @property
    def upstream_topic(self) -> str:
        return f"{self.prefix}/binary_sensor/{self.node_id}/upstream/config"

    @property
    def subscription(self) -> str:
        """Every retained entry of this daemon, to find those of rooms no longer configured."""
        return f"{self.prefix}/+/{self.node_id}/+/config"

    def _device(self) -> dict[str, object]:
        """The daemon itself: the bridge every room device is connected through."""
        return {
            "identifiers": [self.node_id],
            "name": f"Waiting room ({self.base_topic})",
            "manufacturer": "waiting-room",
            "model": "waiting-room daemon",
            "sw_version": __version__,
        }

    def room_device(self, room: str, name: str, area: str | None = None) -> dict[str, object]:
        device: dict[str, object] = {
            # "/" is in no node id: the identifier of room "b" of daemon "a" is no other's.
            "identifiers": [f"{self.node_id}/{room}"],
            "name": name,
            "manufacturer": "waiting-room",
            "model": "Waiting room",
            "via_device": self.node_id,
        }
        if area:
            device["suggested_area"] = area
        return device

    def _room_common(self, room: str, kind: str, device: dict[str, object]) -> dict[str, object]:
        base = self.base_topic
        return {
            "has_entity_name": True,
            "unique_id": f"{self.node_id}_{object_id(room, kind)}",
            "availability": [
                {"topic": f"{base}/status"},
                {"topic": f"{base}/upstream", "value_template": _UPSTREAM_AVAILABLE},
            ],
            "availability_mode": "all",
            "device": device,
            "origin": {"name": "waiting-room", "sw_version": __version__},
        }

    def room_configs(self, room: str, name: str, area: str | None = None) -> dict[str, dict[str, object]]:
        """kind -> the discovery config of each of a room's entities."""
        base = self.base_topic
        device = self.room_device(room, name, area)
        patients = {
            "name": "Patients",
            "state_topic": f"{base}/{room}/patients",
            "json_attributes_topic": f"{base}/{room}/state",
            "unit_of_measurement": "patients",
            "state_class": "measurement",
            "icon": "mdi:account-clock",
        }
        now_serving = {
            "name": "Now serving",
            "state_topic": f"{base}/{room}/state",
            "value_template": _NOW_SERVING,
            "icon": "mdi:ticket-confirmation-outline",
        }
        last_update = {
            "name": "Last update",
            "state_topic": f"{base}/{room}/state",
            "value_template": _UPDATED_AT,
            "device_class": "timestamp",
            "entity_category": "diagnostic",
        }
        return {
            kind: {**specific, **self._room_common(room, kind, device)}
            for kind, specific in (("patients", patients), ("now_serving", now_serving), ("last_update", last_update))
        }

    def room_config(self, room: str, name: str, area: str | None = None) -> dict[str, object]:
        """The patient count's config."""
        return self.room_configs(room, name, area)["patients"]

    def upstream_config(self) -> dict[str, object]:
        base = self.base_topic
        return {
            "name": "Upstream feed",
            "has_entity_name": True,
            "unique_id": f"{self.node_id}_upstream",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "state_topic": f"{base}/upstream",
            "value_template": _UPSTREAM_ON,
            "json_attributes_topic": f"{base}/upstream",
            "json_attributes_template": _UPSTREAM_ATTRIBUTES,
            "availability_topic": f"{base}/status",
            "device": self._device(),
            "origin": {"name": "waiting-room", "sw_version": __version__},
        }

    def room_messages(self, room: str, name: str, area: str | None = None) -> list[Message]:
        configs = self.room_configs(room, name, area)
        return [
            Message(self.entity_topic(room, kind, component), json.dumps(configs[kind], ensure_ascii=False))
            for kind, component in ROOM_ENTITIES
        ]

    def upstream_message(self) -> Message:
        return Message(self.upstream_topic, json.dumps(self.upstream_config(), ensure_ascii=False))

    def messages(self, rooms: Iterable[tuple[str, str]], areas: Mapping[str, str | None] | None = None) -> list[Message]:
        """The bridge's entry first (the device the rooms are ``via``), then every room's."""
        areas = areas or {}
        out = [self.upstream_message()]
        for room, name in rooms:
            out.extend(self.room_messages(room, name, areas.get(room)))
        return out

    def removals(self, room: str) -> list[Message]:
        """A room taken out of the config: every one of its entries, emptied."""
        return [Message(topic, "") for topic in self.room_topics(room)]

    def is_stale_entry(self, topic: str, current_topics: set[str]) -> bool:
        """A retained discovery entry of this daemon that the current rooms do not explain
        (``current_topics``: every ``room_topics`` of the configured rooms)."""
        head, sep, rest = topic.partition(self.prefix + "/")
        parts = rest.split("/")
        if head or not sep or len(parts) != 4 or parts[1] != self.node_id or parts[3] != "config":
            return False
        return topic != self.upstream_topic and topic not in current_topics
