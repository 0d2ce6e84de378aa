"""The daemon with the changes this suite proposes, applied as monkeypatches.

``python -m bench.patched run --config ...`` is ``python -m waiting_room run`` with the
proposals below switched on, so ``python -m bench --variant patched`` measures them before
anyone edits ``daemon/``. ``BENCH_PATCHES`` (comma-separated names, default all) picks them.
Each patch names the daemon function it stands in for; none is meant to be imported by the
daemon as is (they reach into private attributes that a real change would own).

- ``roomstate_struct``: ``model.RoomState`` as a frozen ``msgspec.Struct`` (its ``__init__``
  runs in C: ~0.1 us instead of ~1.5 us per frame for a frozen slotted dataclass);
  ``store`` then uses ``msgspec.structs.replace`` instead of ``dataclasses.replace``.
  (Skipped when the daemon already has it.)
- ``mqtt_batch``: ``MqttPublisher._publish_states`` takes at most ``BENCH_MQTT_CHUNK`` (64)
  dirty rooms at a time from its subscription, hands their QoS 0 publishes to paho at once
  and awaits only the last one (paho writes in order), instead of one awaited publish (an
  event-loop round trip, a timer and a self-pipe write) per topic. The chunk limit keeps
  the reader first in line during a flood, so coalescing stays as deep as today.
- ``display_fanout``: ``DisplayService._connection``/``_push``: one store subscription per view
  (all rooms, or one room) instead of one per screen; each change is rendered once and
  written to every screen of that view synchronously (``websockets.broadcast``); a screen
  whose send buffer stays above a limit is dropped, as ``send_timeout`` did.
- ``discovery_set``: ``MqttPublisher._incoming`` builds the set of this daemon's discovery
  topics once per room list, not once per incoming message (quadratic with 10,000 rooms).
"""

from __future__ import annotations

import os
import sys

ALL = ("roomstate_struct", "mqtt_batch", "display_fanout", "discovery_set")


def _roomstate_struct() -> None:
    import msgspec
    from waiting_room import model

    if issubclass(model.RoomState, msgspec.Struct):
        return  # the daemon has it already

    class RoomState(msgspec.Struct, frozen=True):
        room: str
        name: str
        patients: int | None = None
        now_serving: str | None = None
        updated_at: float | None = None
        received_at: float | None = None
        seq: int | None = None
        stale: bool = True
        error: str | None = None

    RoomState.__doc__ = model.RoomState.__doc__
    model.RoomState = RoomState  # type: ignore[misc]
    from waiting_room import store

    class _Dataclasses:
        replace = staticmethod(msgspec.structs.replace)

    store.RoomState = RoomState  # type: ignore[misc]
    store.dataclasses = _Dataclasses  # type: ignore[assignment]
    for name in ("waiting_room.statefile", "waiting_room.display.render", "waiting_room.mqtt"):
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        if hasattr(module, "RoomState"):
            module.RoomState = RoomState  # type: ignore[attr-defined]


MQTT_CHUNK = int(os.environ.get("BENCH_MQTT_CHUNK", "64"))


def _mqtt_batch() -> None:
    import itertools

    from waiting_room import mqtt
    from waiting_room.store import Batch

    publish = mqtt.publish

    async def take(sub, limit: int) -> Batch:  # type: ignore[no-untyped-def]
        """store.Subscription.__anext__ with a limit: at most ``limit`` rooms per batch, the
        longest-dirty first; the rest stay dirty (and keep coalescing) for the next take."""
        while True:
            if sub._closed:
                raise StopAsyncIteration
            if sub._dirty or sub._link_dirty:
                break
            sub._wake.clear()
            await sub._wake.wait()
        dirty = sub._dirty
        if len(dirty) <= limit:
            names: object = dirty
            sub._dirty = {}
        else:
            names = list(itertools.islice(dirty, limit))
            for room in names:  # type: ignore[attr-defined]
                del dirty[room]
        store = sub._store
        rooms = store.rooms
        link = store.link if sub._link_dirty else None
        components = dict(store.components) if sub._link_dirty else {}
        sub._link_dirty = False
        return Batch({r: rooms.get(r) for r in names}, link, components)  # type: ignore[attr-defined]

    async def _publish_states(self, client) -> None:  # type: ignore[no-untyped-def]
        """mqtt.MqttPublisher._publish_states: QoS 0 handed to paho a chunk at a time."""
        base = self.base
        published: dict[str, int | None] = {}
        upstream = None
        known = None
        paho = client._client  # aiomqtt 2.x keeps the paho client here
        state_payload = mqtt.state_payload
        with self.store.subscribe() as changes:
            first = True
            while True:
                try:
                    # The first batch is the replay (every room): taken whole, as today.
                    batch = await take(changes, 1 << 30 if first else MQTT_CHUNK)
                except StopAsyncIteration:
                    return
                first = False
                if batch.link is not None:
                    payload = mqtt.upstream_payload(batch.link.status)
                    if payload != upstream:
                        await publish(client, f"{base}/upstream", payload, qos=1, retain=True)
                        upstream = payload
                pending: list[tuple[str, bytes | str]] = []
                for room, state in batch.rooms.items():
                    if state is None:
                        await self._forget(client, room)
                        published.pop(room, None)
                        if known is not None:
                            known.discard(room)
                        continue
                    if known is not None and room not in known:
                        known.add(room)  # O(batch), not set(self.store.rooms) after every batch
                        if self.discovery is not None:
                            message = self.discovery.room_message(room, state.name)
                            await publish(client, message.topic, message.payload, qos=1)
                    if state.patients is not None and published.get(room) != state.patients:
                        pending.append((f"{base}/{room}/patients", str(state.patients)))
                        published[room] = state.patients
                    pending.append((f"{base}/{room}/state", state_payload(state)))
                if known is None:
                    known = set(self.store.rooms)  # after the replay: announced as a whole
                if pending:
                    for topic, payload in pending[:-1]:
                        info = paho.publish(topic, payload, 0, True)
                        if info.rc != 0:
                            raise mqtt.aiomqtt.MqttCodeError(info.rc, "Could not publish message")
                    # The last one is awaited: paho writes in order, so the chunk is out, and
                    # the reader had its turn before the next chunk is taken.
                    await publish(client, *pending[-1])

    mqtt.MqttPublisher._publish_states = _publish_states  # type: ignore[method-assign]


def _display_fanout() -> None:
    import asyncio

    from waiting_room.display import render, server
    from waiting_room.store import Batch
    from websockets.asyncio.server import broadcast
    from websockets.exceptions import ConnectionClosed
    from websockets.protocol import State

    SLOW_BUFFER = 256 * 1024  # a screen this far behind is dropped (it reconnects, gets it all)

    class View:
        def __init__(self, room: str | None) -> None:
            self.room = room
            self.clients: set = set()
            self.task: asyncio.Task[None] | None = None

    def _write(self, view: View, frame: bytes) -> None:  # type: ignore[no-untyped-def]
        text = frame.decode()
        for ws in list(view.clients):
            if ws.state is not State.OPEN:
                view.clients.discard(ws)
            elif ws.transport.get_write_buffer_size() > SLOW_BUFFER:
                self.slow_clients += 1
                self._slow.warning("display: dropped a client that did not keep up")
                view.clients.discard(ws)
                ws.transport.abort()
        broadcast(view.clients, text)

    async def _fanout(self, view: View) -> None:  # type: ignore[no-untyped-def]
        heartbeat = float(self.cfg.heartbeat)
        with self.store.subscribe() as changes:
            it = aiter(changes)
            await anext(it)  # the replay: each screen got the whole state when it joined
            while view.clients:
                try:
                    async with asyncio.timeout(heartbeat):
                        batch = await anext(it)
                except TimeoutError:
                    _write(self, view, render.heartbeat_frame(self.clock()))
                    continue
                frame = render.state_frame(batch, self.store.link, view.room, self.clock())
                if frame is not None:
                    _write(self, view, frame)
        if self._views.get(view.room) is view:
            del self._views[view.room]

    async def _connection(self, ws) -> None:  # type: ignore[no-untyped-def]
        from urllib.parse import parse_qs, urlsplit

        room = parse_qs(urlsplit(ws.request.path).query).get("room", [None])[0]
        self.clients += 1
        views = self.__dict__.setdefault("_views", {})
        view = None
        try:
            await self._send(ws, render.hello_frame(float(self.cfg.heartbeat), self.clock()))
            store = self.store
            full = Batch(dict(store.rooms), store.link, dict(store.components))
            frame = render.state_frame(full, store.link, room, self.clock())
            view = views.get(room)
            if view is None or view.task is None or view.task.done():
                view = View(room)
                views[room] = view
            view.clients.add(ws)
            if frame is not None:
                broadcast([ws], frame.decode())  # same step as joining: no change slips between
            if view.task is None:
                view.task = asyncio.get_running_loop().create_task(_fanout(self, view))
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass
        finally:
            if view is not None:
                view.clients.discard(ws)
            self.clients -= 1

    server.DisplayService._connection = _connection  # type: ignore[method-assign]


def _discovery_set() -> None:
    from waiting_room import mqtt

    async def _incoming(self, client, announce) -> None:  # type: ignore[no-untyped-def]
        """mqtt.MqttPublisher._incoming, with the set of this daemon's discovery topics built
        once per room list instead of once per incoming message (10,000 rooms: 10,000 echoes
        of its own retained entries x 10,000 topics each = a minute of CPU after start)."""
        assert self.discovery is not None
        cached_rooms: frozenset[str] | None = None
        topics: set[str] = set()
        async for message in client.messages:
            topic = message.topic.value
            if topic == mqtt.HA_STATUS_TOPIC:
                if message.payload in (b"online", "online"):
                    mqtt.log.info("Home Assistant is online: announcing the rooms again")
                    announce.set()
                continue
            if not message.payload:
                continue
            rooms = self.store.rooms
            if cached_rooms is None or rooms.keys() != cached_rooms:  # a C-level comparison
                cached_rooms = frozenset(rooms)
                topics = {self.discovery.room_topic(r) for r in cached_rooms}
            if self.discovery.is_stale_entry(topic, topics):
                mqtt.log.info("removing the discovery entry %s of a room no longer configured", topic)
                await mqtt.publish(client, topic, b"", qos=1, retain=True)

    mqtt.MqttPublisher._incoming = _incoming  # type: ignore[method-assign]


PATCHES = {
    "roomstate_struct": _roomstate_struct,
    "mqtt_batch": _mqtt_batch,
    "display_fanout": _display_fanout,
    "discovery_set": _discovery_set,
}


def apply(names: str | None = None) -> list[str]:
    wanted = [n for n in (names if names is not None else os.environ.get("BENCH_PATCHES", ",".join(ALL))).split(",") if n]
    unknown = set(wanted) - set(ALL)
    if unknown:
        raise SystemExit(f"BENCH_PATCHES: unknown {', '.join(sorted(unknown))}; known: {', '.join(ALL)}")
    wanted = [n for n in ALL if n in wanted]  # roomstate_struct must come before any import of it
    for name in wanted:
        PATCHES[name]()
    os.environ["BENCH_PATCHES_APPLIED"] = ",".join(wanted)
    return wanted


def main() -> None:
    applied = apply()
    print(f"bench.patched: {', '.join(applied) or 'no patches'}", file=sys.stderr, flush=True)
    from waiting_room.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
