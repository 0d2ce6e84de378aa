"""MQTT: every room's retained state, the daemon's availability, Home Assistant discovery.

Each broker connection subscribes to the store afresh, so the store's replay republishes
every retained topic after a reconnect (a restarted broker may have lost them): the current
state, never a backlog. The last will makes a killed daemon show ``offline``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import socket
import ssl
import time
from collections.abc import Coroutine, Iterator
from datetime import datetime, timezone
from typing import Any, Awaitable, Final, Iterable

import aiomqtt
import msgspec
from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTTv5

from . import tls
from .config import MqttConfig, RoomConfig
from .credentials import SecretError, credential_path, read_secret_file
from .discovery import Discovery
from .model import LinkStatus, RoomState
from .policy import Action, NodeRotation, ReconnectSchedule
from .store import RoomStore

log = logging.getLogger(__name__)

HA_STATUS_TOPIC: Final = "homeassistant/status"
NETWORK_TIMEOUT: Final = 10.0
# Rooms per publishing batch (bench: 1,000-room flood 24k -> 85k frames/s with it).
BATCH_ROOMS: Final = 64
STOP_PUBLISH_TIMEOUT: Final = 1.0
# Connected this long counts as healthy: the next loss starts the backoff from the beginning.
STABLE_AFTER: Final = 10.0

_encode = msgspec.json.Encoder().encode


def retained_publish_packet(topic: str, payload: str | bytes, *, mqtt5: bool = False) -> bytes:
    """A retained QoS 0 PUBLISH packet, byte for byte what paho builds (tests/test_mqtt_wire.py
    compares them): the fast path writes it itself, since paho's ``publish`` costs ~6 us a
    message in objects nobody reads for QoS 0 (a third of the daemon's own time per change)."""
    name = topic.encode()
    body = payload.encode() if isinstance(payload, str) else payload
    remaining = 2 + len(name) + len(body) + mqtt5  # MQTT 5: an empty property list, one byte
    head = bytearray(b"\x31")  # PUBLISH, QoS 0, retain
    while True:  # the remaining length, 7 bits a byte
        remaining, digit = divmod(remaining, 128)
        head.append(digit | 0x80 if remaining else digit)
        if not remaining:
            break
    head += len(name).to_bytes(2, "big")
    head += name
    if mqtt5:
        head.append(0)
    return bytes(head) + body


def client_identifier(cfg: MqttConfig) -> str:
    """The configured client id, or one derived from the hostname: stable across restarts."""
    if cfg.client_id:
        return cfg.client_id
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"waiting-room-{host}"


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        moment = datetime.fromtimestamp(ts, timezone.utc)
    except (ValueError, OverflowError, OSError):  # e.g. from a hand-edited state file
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def state_payload(state: RoomState) -> bytes:
    return _encode(
        {
            "patients": state.patients,
            "now_serving": state.now_serving,
            "updated_at": rfc3339(state.updated_at),
            "stale": state.stale,
            "error": state.error,
        }
    )


async def _bounded(client: aiomqtt.Client, awaitable: Awaitable[None], what: str) -> None:
    """Awaits one operation under ``asyncio.timeout``, cut short when the broker is lost.

    aiomqtt's own timeout is ``asyncio.wait_for``, which on Python 3.11 can swallow a
    cancellation that races with the broker's ack; a swallowed cancel leaves a TaskGroup
    waiting forever at shutdown. ``asyncio.timeout`` does not have that flaw. And aiomqtt
    leaves a pending SUBACK or PUBACK waiting when the connection drops: the whole timeout
    (10 s of silence on every surface) unless the loss ends the wait at once.
    """
    lost = client._disconnected
    if lost.done():
        if isinstance(awaitable, Coroutine):
            awaitable.close()  # never started: no "coroutine was never awaited" warning
        raise aiomqtt.MqttError(f"{what}: the broker connection is lost")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(NETWORK_TIMEOUT) as deadline:
            waiting = True

            def cut(_: object) -> None:
                if waiting:
                    deadline.reschedule(loop.time())  # expire now

            lost.add_done_callback(cut)
            try:
                await awaitable
            finally:
                waiting = False
                lost.remove_done_callback(cut)
    except TimeoutError:
        reason = "the broker connection was lost" if lost.done() else "timed out"
        raise aiomqtt.MqttError(f"{what}: {reason}") from None


async def publish(
    client: aiomqtt.Client, topic: str, payload: str | bytes, *, qos: int = 0, retain: bool = True
) -> None:
    await _bounded(client, client.publish(topic, payload, qos=qos, retain=retain, timeout=math.inf),
                   f"publish to {topic}")


def _queue_packets(paho: Any, data: bytes) -> None:
    """Packets we built, queued behind whatever paho holds; its writer sends them in turn.
    Command 0: paho finds no publish of its own to complete when they are written."""
    paho._packet_queue(0, data, 0, 0)


async def publish_retained_batch(client: aiomqtt.Client, messages: list[tuple[str, str | bytes]]) -> None:
    """Retained QoS 0 messages handed to paho at once; only the last one is awaited.

    One awaited ``client.publish`` per topic costs an event-loop round trip each (aiomqtt
    waits for paho's on_publish); in a burst of many rooms that, not the broker, limits the
    rate. All but the last go to paho's queue as one buffer of packets we build
    (``retained_publish_packet``: paho's per-message objects were a third of a flood's MQTT
    time), the last through aiomqtt; paho writes in order, so the last one written means all
    were. Awaiting it is the back-pressure: the next batch waits until this one is on the
    socket. ``client._client`` is aiomqtt 2.x's paho client (the dependency is pinned below 3).
    """
    if not messages:
        return
    paho = client._client
    if len(messages) > 1:
        if not paho.is_connected():
            raise aiomqtt.MqttCodeError(MQTT_ERR_NO_CONN, "Could not publish message")
        mqtt5 = paho._protocol == MQTTv5
        _queue_packets(paho, b"".join(retained_publish_packet(t, p, mqtt5=mqtt5) for t, p in messages[:-1]))
    topic, payload = messages[-1]
    await publish(client, topic, payload)


async def subscribe(client: aiomqtt.Client, topic: str) -> None:
    await _bounded(client, client.subscribe(topic, timeout=math.inf), f"subscribe to {topic}")


def node_name(node: tuple[str, int]) -> str:
    """(host, port) as "host:port", an IPv6 address in brackets."""
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def upstream_payload(status: LinkStatus) -> str:
    # "connecting" (never connected since start) is, for a subscriber, simply not connected.
    return "disconnected" if status is LinkStatus.CONNECTING else status.value


class _Client(aiomqtt.Client):
    """Two mends of aiomqtt 2.x, both found by bench/chaos.

    It hands paho's "socket wants to write" to the loop later, by descriptor number: when the
    broker vanishes in between, the socket is closed by then, and asyncio logs an EBADF
    traceback (or the writer lands on whatever reused the number). Registered here only if
    paho still holds that very socket, open.

    ``write_now`` is the publisher's fast path: paho's socket write in the caller's loop pass.

    A lost broker sets ``MqttCodeError('Unexpected disconnection')`` on a future that nobody
    awaits once the message iteration has reported the loss: "Future exception was never
    retrieved" in the log at every broker restart. Looked at here when the client is done.
    """

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:
            disconnected = self._disconnected
            if disconnected.done() and not disconnected.cancelled():
                disconnected.exception()  # reported already, as the MqttError that ended us

    def can_write_now(self) -> bool:
        """Connected, with nothing queued in paho and no writer pending: a message handed to
        paho now goes out first, and can go out at once (``write_now``)."""
        paho = self._client
        return paho.is_connected() and not paho._out_packet and not paho._registered_write

    def write_now(self, messages: Iterable[tuple[str, str | bytes]]) -> int:
        """Retained QoS 0 messages written to the broker's socket in this loop pass, not on
        the loop's next turns (aiomqtt defers the writer: a ``call_soon`` to register it, then
        a select to call it) and not through paho's per-message objects. Each is sent as soon
        as it is built: ``patients``, the number people read, is on its way while ``state`` is
        formatted (one send for both measured slower at p50, for one syscall less). What the socket does not take is queued in paho, whose writer
        sends it next. Returns how many were written or queued. Call only when
        ``can_write_now()``."""
        paho = self._client
        mqtt5 = paho._protocol == MQTTv5
        sock = paho._sock
        count = 0
        rest: list[bytes] = []
        for topic, payload in messages:
            count += 1
            packet = retained_publish_packet(topic, payload, mqtt5=mqtt5)
            if rest:
                rest.append(packet)
                continue
            try:
                sent = sock.send(packet)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError as exc:  # a broken connection: as aiomqtt's writer does
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)
                return count
            if sent < len(packet):
                rest.append(packet[sent:])
        paho._last_msg_out = time.monotonic()  # paho's keepalive clock (its time_func)
        if rest:
            _queue_packets(paho, b"".join(rest))
        return count

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # a broken connection: aiomqtt's own handling
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            # Not if the data went out meanwhile (write_now): an idle writer would fire on
            # every turn of the loop, and paho, believing none registered, never remove it.
            if client.socket() is sock and sock.fileno() != -1 and client._registered_write:
                self._loop.add_writer(sock.fileno(), write)

        # paho may call this from the executor thread that connects.
        self._loop.call_soon_threadsafe(register)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        # aiomqtt ignores a loss before the CONNACK and waits out its 10 s timeout: a broker
        # that closed on us (restarting, or refusing our certificate) fails the connect now.
        failed = getattr(reason_code, "is_failure", bool(reason_code))  # not our own disconnect
        if failed and not self._connected.done():
            self._connected.set_exception(aiomqtt.MqttCodeError(reason_code, "Connection lost before CONNACK"))
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _tls_refused(self, exc: OSError) -> None:
        """A TLS 1.3 broker refuses a client certificate after the handshake: paho only logs
        the alert and aiomqtt would wait out its timeout for a CONNACK. Fail the connect now,
        with the alert as the cause (``tls.describe_failure`` names it). A reset can swallow
        the alert: that is an EOF to ``describe_failure`` (and ``tls.same_refusal``)."""
        if not isinstance(exc, ssl.SSLError):
            exc = ssl.SSLEOFError(8, f"the server reset the connection: {exc}")
        if not self._connected.done():
            error = aiomqtt.MqttError(f"TLS: {exc.reason or exc}")
            error.__cause__ = exc
            self._connected.set_exception(error)


class _PahoLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """paho's logger (with TLS on); a TLS error or reset it reports from the socket goes to
    ``on_tls_error`` too."""

    def __init__(self, logger: logging.Logger, on_tls_error: Any) -> None:
        super().__init__(logger, {})
        self.on_tls_error = on_tls_error

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        for arg in args:
            if isinstance(arg, (ssl.SSLError, ConnectionResetError)):
                self.on_tls_error(arg)
                level = logging.DEBUG  # the publisher logs it once, in its own words
        super().log(level, msg, *args, **kwargs)


class MqttPublisher:
    def __init__(
        self,
        cfg: MqttConfig,
        store: RoomStore,
        *,
        rng: random.Random | None = None,
        announce_delay: float = 5.0,
        rooms: Iterable[RoomConfig] = (),
    ) -> None:
        self.cfg = cfg
        self.store = store
        self._rng = rng or random.Random()
        self._announce_delay = announce_delay
        # Home Assistant's view of each room (its device's name and area), from the config.
        self._rooms: dict[str, RoomConfig] = {r.id: r for r in rooms}
        self._changed_rooms: set[str] = set()  # announced again (update_rooms)
        self._rooms_changed = asyncio.Event()
        # Plain counters, read by the metrics at scrape time: broker connections made, and
        # messages handed to the broker (states, status, discovery, clearings).
        self.connects = 0
        self.publishes = 0
        self.base = cfg.base_topic
        self.identifier = client_identifier(cfg)
        self.discovery = (
            Discovery.for_client(cfg.discovery, cfg.base_topic, self.identifier) if cfg.discovery else None
        )
        # TLS to the broker (mqtt.ca_file; cert_file + key_file: a client certificate), built
        # again when one of the files changes on disk.
        self._tls = (
            tls.Cached(lambda: tls.client_context(cfg.ca_file, cfg.cert_file, cfg.key_file, section="mqtt"),
                       (cfg.ca_file, cfg.cert_file, cfg.key_file))
            if cfg.ca_file else None
        )

    @property
    def status_topic(self) -> str:
        return f"{self.base}/status"

    def update_rooms(self, rooms: Iterable[RoomConfig]) -> None:
        """A reload: a room whose name or area changed is announced again (rooms added or
        removed reach the publisher through the store)."""
        old, self._rooms = self._rooms, {r.id: r for r in rooms}
        changed = {r for r, c in self._rooms.items() if r in old and (old[r].title, old[r].area) != (c.title, c.area)}
        if changed:
            self._changed_rooms |= changed
            self._rooms_changed.set()

    def _device_of(self, room: str, name: str) -> tuple[str, str, str | None]:
        """(room, name, area) as Home Assistant is told of a room."""
        configured = self._rooms.get(room)
        return (room, configured.title, configured.area) if configured else (room, name, None)

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: str | bytes, *, qos: int = 0,
                       retain: bool = True) -> None:
        await publish(client, topic, payload, qos=qos, retain=retain)
        self.publishes += 1

    def _password(self) -> str | None:
        if self.cfg.password_file:
            return read_secret_file(self.cfg.password_file, "password_file")
        if self.cfg.password_credential:
            return read_secret_file(credential_path(self.cfg.password_credential), "MQTT password credential")
        return None

    def _client(self, password: str | None, context: ssl.SSLContext | None = None,
                node: tuple[str, int] | None = None) -> aiomqtt.Client:
        host, port = node or self.cfg.nodes[0]
        client = _Client(
            host,
            port,
            username=self.cfg.username,
            password=password,
            identifier=self.identifier,
            keepalive=self.cfg.keepalive,
            will=aiomqtt.Will(self.status_topic, "offline", qos=1, retain=True),
            tls_context=context,
            timeout=float(self.cfg.connect_timeout),
            # A fresh connection without it stalls ~40 ms on delayed ACKs for small packets.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            logger=logging.getLogger("waiting_room.mqtt.client"),
        )
        if context is not None:
            client._client.enable_logger(_PahoLog(logging.getLogger("waiting_room.mqtt.client"), client._tls_refused))
        return client

    async def run(self) -> None:
        schedule = ReconnectSchedule(float(self.cfg.backoff.initial), float(self.cfg.backoff.max))
        nodes = self.cfg.nodes
        rotation = NodeRotation(len(nodes))  # mqtt.hosts: which node next (policy.py)
        self.store.set_component("mqtt", "connecting")
        self.store.set_component("mqtt_node", "none")
        last_lasting: str | None = None
        last_failure: tls.Failure | None = None
        while True:
            node = nodes[rotation.current]
            where = node_name(node)
            connected_at: float | None = None
            failure: tls.Failure | None = None
            try:
                password = await asyncio.to_thread(self._password)
                context = await asyncio.to_thread(self._tls.get) if self._tls is not None else None
                async with self._client(password, context, node) as client:
                    connected_at = time.monotonic()
                    last_lasting = None
                    log.info("mqtt connected to %s as %s", where, self.identifier)
                    # The node in use, for /healthz, /metrics and the STATUS line.
                    self.store.set_component("mqtt_node", where)
                    self.store.set_component("mqtt", "connected")
                    await self._connected(client)
            except aiomqtt.MqttError as exc:
                problem = str(exc) or type(exc).__name__
                failure = tls.describe_failure(exc, "mqtt")
            except (SecretError, tls.TlsError) as exc:
                problem = str(exc)
                failure = tls.describe_failure(exc, "mqtt")
            if connected_at is None:
                failure = last_failure = tls.same_refusal(last_failure, failure)
            else:
                last_failure = None
            healthy = connected_at is not None and time.monotonic() - connected_at >= STABLE_AFTER
            lasting = failure is not None and failure.lasting
            # A lasting problem shows in /healthz and `systemctl status` too.
            self.store.set_component("mqtt", f"disconnected ({failure.detail})" if lasting else "disconnected")
            self.store.set_component("mqtt_node", "none")
            wait = rotation.lost() if connected_at is not None else rotation.failed()
            following = f" {node_name(nodes[rotation.current])}" if len(nodes) > 1 else ""
            if failure is not None:
                problem = failure.detail
            if not wait:
                # A node of the cluster refused or did not answer: the next one at once; the
                # backoff comes after a whole round.
                log.warning("mqtt %s: %s; trying%s now", where, problem, following)
                continue
            if failure is not None and failure.lasting:
                # An untrusted broker certificate, a refused client certificate, an unusable
                # TLS file: retried at the backoff's maximum, one ERROR line until it changes.
                delay = schedule.next(Action.AT_LEAST_MAX).delay
                level = logging.DEBUG if failure.detail == last_lasting else logging.ERROR
                last_lasting = failure.detail
                log.log(level, "mqtt %s: %s; retrying%s in %.1f s", where, failure.detail, following, delay)
            else:
                delay = schedule.next(Action.BACKOFF, healthy=healthy).delay
                last_lasting = None
                log.warning("mqtt %s: %s; retrying%s in %.1f s", where, problem, following, delay)
            await asyncio.sleep(delay)

    async def _connected(self, client: aiomqtt.Client) -> None:
        self.connects += 1
        try:
            await self._publish(client, self.status_topic, "online", qos=1, retain=True)
            announce = asyncio.Event()
            if self.discovery is not None:
                await subscribe(client, HA_STATUS_TOPIC)
                await subscribe(client, self.discovery.subscription)
                announce.set()
            await self._serve(client, announce)
        except asyncio.CancelledError:
            # A clean stop: say so, rather than leave the will to a broker that will not fire it.
            try:
                async with asyncio.timeout(STOP_PUBLISH_TIMEOUT):
                    await publish(client, self.status_topic, "offline", qos=1, retain=True)
            except (aiomqtt.MqttError, TimeoutError):
                pass
            raise

    async def _serve(self, client: aiomqtt.Client, announce: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publish_states(client))
                if self.discovery is not None:
                    tg.create_task(self._announcer(client, announce))
                    tg.create_task(self._incoming(client, announce))
                    tg.create_task(self._reannounce_changed(client))
        except ExceptionGroup as group:
            # A lost broker surfaces in whichever task noticed it first: report it plainly.
            lost = group.subgroup(aiomqtt.MqttError)
            if lost is None:
                raise
            first: BaseException = lost
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    async def _publish_states(self, client: aiomqtt.Client) -> None:
        base = self.base
        published: dict[str, int | None] = {}
        upstream: str | None = None
        known = set(self.store.rooms)  # announced as a whole at connect (_announcer)
        rooms = self.store.rooms
        loop = asyncio.get_running_loop()
        in_pass = [False]

        def end_pass() -> None:
            in_pass[0] = False

        def fast(room: str) -> bool:
            """The store's fast path: a change that finds this consumer idle and the socket
            free is written to the broker in the loop pass that read the frame. One per pass:
            the rest of a burst coalesces into the next batch."""
            if in_pass[0] or not isinstance(client, _Client) or not client.can_write_now():
                return False
            state = rooms.get(room)
            if state is None or room not in known:
                return False
            try:
                self.publishes += client.write_now(self._state_messages(room, state, published))
            except Exception:  # noqa: BLE001 - the reader's frame must never fail here
                log.debug("fast publish of %s failed; left to the batch", room, exc_info=True)
                return False
            in_pass[0] = True
            loop.call_soon(end_pass)
            return True

        with self.store.subscribe(limit=BATCH_ROOMS) as changes:
            changes.fast = fast
            async for batch in changes:
                if batch.link is not None:
                    payload = upstream_payload(batch.link.status)
                    if payload != upstream:
                        await self._publish(client, f"{base}/upstream", payload, qos=1, retain=True)
                        upstream = payload
                states: list[tuple[str, str | bytes]] = []
                for room, state in batch.rooms.items():
                    if state is None:
                        await self._forget(client, room)
                        published.pop(room, None)
                        known.discard(room)
                        continue
                    if room not in known:  # a room added by a reload: announce it
                        known.add(room)
                        if self.discovery is not None:
                            for message in self.discovery.room_messages(*self._device_of(room, state.name)):
                                await self._publish(client, message.topic, message.payload, qos=1)
                    states += self._state_messages(room, state, published)
                await publish_retained_batch(client, states)
                self.publishes += len(states)

    def _state_messages(self, room: str, state: RoomState,
                        published: dict[str, int | None]) -> Iterator[tuple[str, str | bytes]]:
        """A room's retained topics for a new state (``patients`` only when it changed), each
        built when asked for: ``write_now`` sends ``patients`` before ``state`` is formatted.
        ``published`` counts ``patients`` once the consumer has taken it."""
        if state.patients is not None and published.get(room) != state.patients:
            yield f"{self.base}/{room}/patients", str(state.patients)
            published[room] = state.patients
        yield f"{self.base}/{room}/state", state_payload(state)

    async def _forget(self, client: aiomqtt.Client, room: str) -> None:
        """A room taken out of the config: its discovery entries (every entity of its device)
        first, so that Home Assistant drops the entities before their topics are cleared, then
        its retained topics."""
        if self.discovery is not None:
            for message in self.discovery.removals(room):
                await self._publish(client, message.topic, message.payload, qos=1, retain=message.retain)
        await self._publish(client, f"{self.base}/{room}/patients", b"", retain=True)
        await self._publish(client, f"{self.base}/{room}/state", b"", retain=True)

    async def _announcer(self, client: aiomqtt.Client, announce: asyncio.Event) -> None:
        assert self.discovery is not None
        first = True
        while True:
            await announce.wait()
            announce.clear()
            if not first:
                # Many daemons hear Home Assistant come back at once: do not all answer at once.
                await asyncio.sleep(self._rng.uniform(0, self._announce_delay))
            first = False
            # The bridge first (the device the rooms are "via"), then room by room: 10,000
            # rooms are 30,000 entries, never all built at once.
            message = self.discovery.upstream_message()
            await self._publish(client, message.topic, message.payload, qos=1, retain=True)
            for room, name in [(r.room, r.name) for r in self.store.rooms.values()]:
                for message in self.discovery.room_messages(*self._device_of(room, name)):
                    await self._publish(client, message.topic, message.payload, qos=1, retain=True)

    async def _reannounce_changed(self, client: aiomqtt.Client) -> None:
        """Rooms renamed or moved to another area by a reload (``update_rooms``)."""
        assert self.discovery is not None
        while True:
            await self._rooms_changed.wait()
            self._rooms_changed.clear()
            changed, self._changed_rooms = self._changed_rooms, set()
            for room in changed:
                state = self.store.rooms.get(room)
                if state is None:
                    continue
                for message in self.discovery.room_messages(*self._device_of(room, state.name)):
                    await self._publish(client, message.topic, message.payload, qos=1, retain=True)

    async def _incoming(self, client: aiomqtt.Client, announce: asyncio.Event) -> None:
        assert self.discovery is not None
        rooms: frozenset[str] | None = None
        current: set[str] = set()
        async for message in client.messages:
            topic = message.topic.value
            if topic == HA_STATUS_TOPIC:
                if message.payload in (b"online", "online"):
                    log.info("Home Assistant is online: announcing the rooms again")
                    announce.set()
                continue
            if not message.payload:
                continue
            if rooms is None or self.store.rooms.keys() != rooms:  # rebuilt per room list only
                rooms = frozenset(self.store.rooms)
                current = {topic for r in rooms for topic in self.discovery.room_topics(r)}
            if self.discovery.is_stale_entry(topic, current):
                log.info("removing the discovery entry %s of a room no longer configured", topic)
                await self._publish(client, topic, b"", qos=1, retain=True)
