"""Home Assistant MQTT discovery as a pure function from (settings, rooms) to messages.

Kept small and data-driven on purpose: one sensor per room, one connectivity binary sensor
for the upstream, both unavailable unless the daemon is online *and* the feed is live (by
the socket, ``connected``, or by polling the snapshot, ``degraded``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Final, Iterable

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


@dataclass(frozen=True)
class Discovery:
    prefix: str
    base_topic: str
    node_id: str  # stable per daemon: derived from the MQTT client id

    @classmethod
    def for_client(cls, prefix: str, base_topic: str, client_id: str) -> Discovery:
        return cls(prefix, base_topic, safe_id(client_id))

    def room_topic(self, room: str) -> str:
        return f"{self.prefix}/sensor/{self.node_id}/{safe_id(room)}/config"

    @property
    def upstream_topic(self) -> str:
        return f"{self.prefix}/binary_sensor/{self.node_id}/upstream/config"

    @property
    def subscription(self) -> str:
        """Every retained entry of this daemon, to find those of rooms no longer configured."""
        return f"{self.prefix}/+/{self.node_id}/+/config"

    def _device(self) -> dict[str, object]:
        return {
            "identifiers": [self.node_id],
            "name": f"Waiting room ({self.base_topic})",
            "manufacturer": "waiting-room",
            "model": "waiting-room daemon",
            "sw_version": __version__,
        }

    def room_config(self, room: str, name: str) -> dict[str, object]:
        base = self.base_topic
        return {
            "name": name,
            "has_entity_name": True,
            "unique_id": f"{self.node_id}_{safe_id(room)}",
            "state_topic": f"{base}/{room}/patients",
            "json_attributes_topic": f"{base}/{room}/state",
            "unit_of_measurement": "patients",
            "state_class": "measurement",
            "icon": "mdi:account-clock",
            "availability": [
                {"topic": f"{base}/status"},
                {"topic": f"{base}/upstream", "value_template": _UPSTREAM_AVAILABLE},
            ],
            "availability_mode": "all",
            "device": self._device(),
            "origin": {"name": "waiting-room", "sw_version": __version__},
        }

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

    def room_message(self, room: str, name: str) -> Message:
        return Message(self.room_topic(room), json.dumps(self.room_config(room, name), ensure_ascii=False))

    def messages(self, rooms: Iterable[tuple[str, str]]) -> list[Message]:
        out = [Message(self.upstream_topic, json.dumps(self.upstream_config(), ensure_ascii=False))]
        out.extend(self.room_message(room, name) for room, name in rooms)
        return out

    def removal(self, room: str) -> Message:
        return Message(self.room_topic(room), "")

    def is_stale_entry(self, topic: str, current_topics: set[str]) -> bool:
        """A retained discovery entry of this daemon that the current rooms do not explain."""
        head, sep, rest = topic.partition(self.prefix + "/")
        parts = rest.split("/")
        if head or not sep or len(parts) != 4 or parts[1] != self.node_id or parts[3] != "config":
            return False
        return topic != self.upstream_topic and topic not in current_topics
