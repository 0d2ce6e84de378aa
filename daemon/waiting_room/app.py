"""Composition root: builds the store, the upstream client and the consumers, starts them in
one TaskGroup, applies reloads, and stops them in order (upstream socket closed with 1000
first, then MQTT says ``offline``)."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable, Coroutine, Final, Literal

from . import secretfiles, tls
from .config import Config, ConfigError, load_config
from .display import limits
from .display.server import DisplayService
from .logutil import LoopExceptionLog
from .metrics import Counters, Metrics
from .mqtt import MqttPublisher
from .statefile import StateFile, state_directory
from .store import RoomStore
from .systemd import Notifier, SystemdService
from .upstream import Upstream

log = logging.getLogger(__name__)

Command = Literal["stop", "reload"]
STOP_RETRY: Final = 0.5


class App:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.rng = rng
        self.store = RoomStore((r.id, r.title) for r in config.rooms)
        self.upstream = Upstream(config.upstream, config.room_ids, self.store, rng=rng)
        self.mqtt = MqttPublisher(config.mqtt, self.store, rng=rng, rooms=config.rooms)
        # /metrics: read at scrape time from the store and the parts' own counters.
        self.metrics = Metrics(self.store, self._counters)
        self.display = self._display(config)
        self.notifier = notifier or Notifier()
        self.systemd = SystemdService(self.store, self.notifier)
        directory = state_directory(config.state_dir)
        self.state_file = StateFile(directory, self.store) if directory else None
        self._commands: asyncio.Queue[Command] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None

    def _display(self, config: Config) -> DisplayService | None:
        if not config.display.enabled and not config.display.command:
            return None
        return DisplayService(config.display, config.rooms, self.store, metrics=self.metrics.render_async)

    def _counters(self) -> Counters:
        """The parts' plain counters, as they are now (a reload may have replaced a part);
        copies, as the text is formatted in a thread."""
        display, signs = self.display, self.display.signs if self.display is not None else None
        connections = display.limits if display is not None else None
        return Counters(
            attempts=dict(self.upstream.attempts),
            close_codes=dict(self.upstream.close_codes),
            mqtt_connects=self.mqtt.connects,
            mqtt_publishes=self.mqtt.publishes,
            display_clients=display.clients if display is not None else 0,
            display_connections=connections.open if connections is not None else 0,
            display_refusals=dict.fromkeys(limits.REASON_TEXT, 0) | dict(connections.refused if connections else {}),
            sign_runs=signs.runs if signs is not None else 0,
            sign_failures=signs.failures if signs is not None else 0,
            sign_timeouts=signs.timeouts if signs is not None else 0,
        )

    # -- control (signal handlers and tests) ------------------------------------------------

    def request_stop(self) -> None:
        self._commands.put_nowait("stop")

    def request_reload(self) -> None:
        self._commands.put_nowait("reload")

    # -- running ----------------------------------------------------------------------------

    def _start(self, name: str, factory: Callable[[], Coroutine[object, object, None]]) -> None:
        assert self._tg is not None
        self._tasks[name] = self._tg.create_task(factory(), name=name)

    async def _stop_task(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        while task is not None and not task.done():
            # Asked again if need be: on Python 3.11, asyncio.wait_for (used inside aiomqtt)
            # can swallow a cancellation that races with the awaited result.
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_RETRY)

    async def run(self) -> None:
        """Until request_stop(); a crash of any part propagates (systemd restarts us)."""
        # Errors the event loop reports itself (e.g. asyncio's accept() retried every second
        # when descriptors run out) are logged once per kind and minute, with a count.
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        loop.set_exception_handler(LoopExceptionLog())
        try:
            await self._run()
        finally:
            loop.set_exception_handler(previous)

    def _warn_exposed(self, config: Config) -> None:
        """Secret files other users can read: one warning each, naming the file and the fix."""
        for line in secretfiles.warnings(secretfiles.secret_files(config, self.config_path)):
            log.warning("%s", line)

    def _load(self, path: str) -> Config:
        """A reload's config, its TLS files checked (blocking: in a thread)."""
        config = load_config(path)
        tls.check(config, path)
        self._warn_exposed(config)
        return config

    async def _run(self) -> None:
        await asyncio.to_thread(self._warn_exposed, self.config)
        if self.state_file is not None:
            restored = self.state_file.restore()
            if restored:
                log.info("restored the last known values of %d room%s (stale until fresh data)",
                         restored, "" if restored == 1 else "s")
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._start("mqtt", self.mqtt.run)
            if self.display is not None:
                self._start("display", self.display.run)
                await self._display_ready()
            self._start("upstream", self.upstream.run)
            if self.state_file is not None:
                self._start("statefile", self.state_file.run)
            self._start("systemd", self.systemd.run)
            # Ready: config loaded, MQTT and the display started; the upstream may be down.
            self.notifier.ready(self.systemd.current_status())
            while await self._commands.get() != "stop":
                await self._reload()
            log.info("stopping")
            self.notifier.stopping()
            for name in ("upstream", "display", "statefile", "mqtt", "systemd"):
                await self._stop_task(name)
            self._tg = None

    async def _display_ready(self) -> None:
        assert self.display is not None
        task = self._tasks["display"]
        ready = asyncio.ensure_future(self.display.ready.wait())
        try:
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if task.done():
            task.result()  # a display that cannot listen is a start-up failure: raise it

    # -- reload (SIGHUP) --------------------------------------------------------------------

    async def _reload(self) -> None:
        self.notifier.reloading()
        if self.config_path is None:
            self.notifier.ready(self.systemd.current_status())
            return
        try:
            new = await asyncio.to_thread(self._load, self.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            reason = str(exc).removeprefix(f"{self.config_path}: ")
            self.systemd.note = f"reload refused: {reason[:120]}"
            self.notifier.ready(self.systemd.current_status())
            return
        self.systemd.note = None
        await self.apply(new)
        self.notifier.ready(self.systemd.current_status())

    async def apply(self, new: Config) -> None:
        """Changes only what changed: rooms are joined or left on the live socket, upstream
        settings reconnect make-before-break, MQTT or display settings restart that part."""
        old = self.config
        self.config = new
        # Before the store changes: an added room is announced with its area.
        self.mqtt.update_rooms(new.rooms)
        added, removed = self.store.configure((r.id, r.title) for r in new.rooms)
        await self.upstream.set_rooms(new.room_ids)
        if added or removed:
            log.info("reload: rooms added %s, removed %s", added or "none", removed or "none")
        if new.upstream != old.upstream:
            log.info("reload: new upstream settings, switching connections make-before-break")
            self.upstream.reconfigure(new.upstream)
        if new.mqtt != old.mqtt:
            log.info("reload: new MQTT settings, reconnecting to the broker")
            await self._stop_task("mqtt")
            self.mqtt = MqttPublisher(new.mqtt, self.store, rng=self.rng, rooms=new.rooms)
            self._start("mqtt", self.mqtt.run)
        if new.display != old.display:
            log.info("reload: new display settings, restarting the display service")
            await self._stop_task("display")
            self.display = self._display(new)
            if self.display is not None:
                self._start("display", self.display.run)
        elif self.display is not None:
            if new.rooms != old.rooms:
                self.display.update_rooms(new.rooms)
            # The same file names, perhaps a renewed certificate in them.
            await self.display.reload_certificate()
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level.upper())
        new_dir = state_directory(new.state_dir)
        if new_dir != (self.state_file.path.parent if self.state_file else None):
            await self._stop_task("statefile")
            self.state_file = StateFile(new_dir, self.store) if new_dir else None
            if self.state_file is not None:
                self._start("statefile", self.state_file.run)
