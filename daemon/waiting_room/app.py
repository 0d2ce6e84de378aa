"""Composition root: builds the store, the upstream client and the consumers, and stops
them in order (upstream socket closed with 1000 first, then MQTT says ``offline``)."""

from __future__ import annotations

import asyncio
import logging
import random

from .config import Config
from .mqtt import MqttPublisher
from .store import RoomStore
from .upstream import Upstream

log = logging.getLogger(__name__)


class App:
    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.store = RoomStore((r.id, r.title) for r in config.rooms)
        self.upstream = Upstream(config.upstream, config.room_ids, self.store, rng=rng)
        self.mqtt = MqttPublisher(config.mqtt, self.store, rng=rng)

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until ``stop`` is set; a crash of any part propagates (systemd restarts us)."""
        async with asyncio.TaskGroup() as tg:
            upstream = tg.create_task(self.upstream.run(), name="upstream")
            mqtt = tg.create_task(self.mqtt.run(), name="mqtt")
            await stop.wait()
            log.info("stopping")
            for task in (upstream, mqtt):
                task.cancel()
                await asyncio.wait({task})
