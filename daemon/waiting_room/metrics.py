"""``/metrics``: the daemon's numbers in the Prometheus text format, read when scraped.

A consumer of the store like MQTT and the displays, but pulled rather than pushed: a
prometheus_client collector that reads the store and the adapters' own plain counters at
scrape time (``Counters``, which the composition root gathers), so there is no second copy of
the state and nothing is done per frame. The composition root builds it and hands the display
a callable that renders it; no other module imports this one.

With 10,000 rooms a scrape is ~20,000 lines, some 60 ms of prometheus_client's formatting
(bench/metrics). ``render_async`` takes the store's values in the event loop (a list copy of
frozen states: no room can change under the formatting) and formats them in a thread, so the
loop goes on serving frames and screens meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Final, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .model import LinkState, LinkStatus, RoomState
from .store import RoomStore

FEED_MODES: Final = ("socket", "poll", "none")
# Connection attempts by outcome (each counted by the upstream; all shown from the start, so
# that rate() sees the first one): the handshake succeeded; it was answered with an HTTP
# status; a lasting TLS problem (an untrusted certificate, an unusable TLS file); anything
# else the network did; no token could be read.
ATTEMPT_OUTCOMES: Final = ("connected", "refused", "tls", "failed", "no_token")


@dataclass(frozen=True)
class Counters:
    """The adapters' own counters at one scrape (plain values, read by app.py)."""

    attempts: Mapping[str, int] = field(default_factory=dict)  # connection attempts by outcome
    close_codes: Mapping[int, int] = field(default_factory=dict)  # ended connections by close code
    mqtt_connects: int = 0
    mqtt_publishes: int = 0
    display_clients: int = 0  # screens (/ws) open now
    display_connections: int = 0  # TCP connections of the display port open now
    display_refusals: Mapping[str, int] = field(default_factory=dict)  # by reason (display/limits.py)
    sign_runs: int = 0
    sign_failures: int = 0
    sign_timeouts: int = 0


def room_age(state: RoomState, link: LinkState, now: float, started: float) -> float:
    """Seconds for which a room's number has not been known to be current: 0 while it is live
    (the socket or the snapshot delivers every change); while it is stale, since it last was:
    when the feed was lost for a number heard before that (as the pages' "last updated"),
    else its last update, or the daemon's start for a room never heard of."""
    if not state.stale:
        return 0.0
    as_of = state.received_at
    lost = not link.status.live and link.connects > 0
    if lost and as_of is not None and as_of <= link.since and state.error is None:
        as_of = link.since
    return max(0.0, now - (as_of if as_of is not None else started))


@dataclass(frozen=True)
class Snapshot:
    """What one scrape shows, taken in the event loop (states are frozen: a list copy is a
    consistent view)."""

    now: float
    link: LinkState
    rooms: Sequence[RoomState]
    mqtt: str | None
    dropped_frames: int
    last_frame_at: float | None
    counters: Counters
    mqtt_node: str | None = None  # "host:port" of the broker node in use (mqtt.hosts)


class StoreCollector(Collector):
    """Every family, built afresh from the store and ``counters()`` at each scrape."""

    def __init__(
        self,
        store: RoomStore,
        counters: Callable[[], Counters],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.counters = counters
        self.clock = clock
        self.started = clock()

    def snapshot(self) -> Snapshot:
        store = self.store
        return Snapshot(self.clock(), store.link, list(store.rooms.values()), store.components.get("mqtt"),
                        store.dropped_frames, store.last_frame_at, self.counters(),
                        store.components.get("mqtt_node"))

    def collect(self) -> Iterator[Metric]:
        return self.families(self.snapshot())

    def families(self, snap: Snapshot) -> Iterator[Metric]:
        yield from self._upstream(snap)
        yield from self._rooms(snap)
        yield from self._consumers(snap)
        info = GaugeMetricFamily("waiting_room_info", "The daemon's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def _upstream(self, snap: Snapshot) -> Iterator[Metric]:
        status, c = snap.link.status, snap.counters
        yield GaugeMetricFamily("waiting_room_upstream_connected",
                                "1 while the queue socket is joined and receiving, else 0.",
                                value=1 if status is LinkStatus.CONNECTED else 0)
        mode = GaugeMetricFamily("waiting_room_feed_mode",
                                 "Where the values come from: the socket, the polled snapshot "
                                 "(degraded) or none (stale); 1 for the current mode.", labels=["mode"])
        current = status.feed or "none"
        for name in FEED_MODES:
            mode.add_metric([name], 1 if name == current else 0)
        yield mode
        states = GaugeMetricFamily("waiting_room_upstream_status",
                                   "The upstream's status, 1 for the current one (MQTT's, plus connecting: "
                                   "not connected yet since start).", labels=["status"])
        for value in LinkStatus:
            states.add_metric([value.value], 1 if value is status else 0)
        yield states
        yield GaugeMetricFamily("waiting_room_upstream_status_since_timestamp_seconds",
                                "When the upstream's status last changed (Unix time).", value=snap.link.since)
        yield CounterMetricFamily("waiting_room_upstream_connects", "Connections joined since start.",
                                  value=snap.link.connects)
        attempts = CounterMetricFamily("waiting_room_upstream_connection_attempts",
                                       "Connection attempts by outcome: connected, refused (an HTTP "
                                       "status), tls, failed (the network), no_token.", labels=["outcome"])
        for outcome, count in (dict.fromkeys(ATTEMPT_OUTCOMES, 0) | dict(c.attempts)).items():
            attempts.add_metric([outcome], count)
        yield attempts
        codes = CounterMetricFamily("waiting_room_upstream_close_codes",
                                    "Connections that ended, by close code (1006: dropped or timed out).",
                                    labels=["code"])
        for code, count in sorted(c.close_codes.items()):
            codes.add_metric([str(code)], count)
        yield codes
        yield CounterMetricFamily("waiting_room_frames_dropped",
                                  "Bad frames and snapshot entries dropped (PROTOCOL.md, Bad input).",
                                  value=snap.dropped_frames)
        if snap.last_frame_at is not None:
            yield GaugeMetricFamily("waiting_room_last_frame_timestamp_seconds",
                                    "When the last queue value arrived (Unix time).",
                                    value=snap.last_frame_at)

    def _rooms(self, snap: Snapshot) -> Iterator[Metric]:
        link, now = snap.link, snap.now
        patients = GaugeMetricFamily("waiting_room_room_patients", "Patients waiting, per room (rooms with a "
                                     "count; stale ones too: see waiting_room_room_age_seconds).", labels=["room"])
        age = GaugeMetricFamily("waiting_room_room_age_seconds",
                                "Seconds for which the room's number has not been known current: 0 while "
                                "live; while stale, since the feed was lost (or its last update, or the "
                                "daemon's start).", labels=["room"])
        refused = GaugeMetricFamily("waiting_room_room_refused",
                                    "1 for each room the server refused, with its error.", labels=["room", "error"])
        stale_rooms = 0
        for state in snap.rooms:
            room = state.room
            if state.patients is not None:
                patients.add_metric([room], state.patients)
            stale_rooms += state.stale
            age.add_metric([room], room_age(state, link, now, self.started))
            if state.error is not None:
                refused.add_metric([room, state.error], 1)
        yield GaugeMetricFamily("waiting_room_rooms", "Rooms configured.", value=len(snap.rooms))
        yield GaugeMetricFamily("waiting_room_rooms_stale", "Rooms whose number is not live.", value=stale_rooms)
        yield patients
        yield age
        yield refused

    def _consumers(self, snap: Snapshot) -> Iterator[Metric]:
        c = snap.counters
        yield GaugeMetricFamily("waiting_room_mqtt_connected", "1 while connected to the MQTT broker, else 0.",
                                value=1 if snap.mqtt == "connected" else 0)
        node = GaugeMetricFamily("waiting_room_mqtt_node", "1 for the broker node in use (host:port), while connected.",
                                 labels=["node"])
        if snap.mqtt == "connected" and snap.mqtt_node not in (None, "none"):
            node.add_metric([snap.mqtt_node], 1)
        yield node
        yield CounterMetricFamily("waiting_room_mqtt_connects", "Broker connections made.", value=c.mqtt_connects)
        yield CounterMetricFamily("waiting_room_mqtt_publishes",
                                  "Messages handed to the broker (states, status, discovery).",
                                  value=c.mqtt_publishes)
        yield GaugeMetricFamily("waiting_room_display_clients", "Screens (/ws) connected.", value=c.display_clients)
        yield GaugeMetricFamily("waiting_room_display_connections", "Open connections to the display port.",
                                value=c.display_connections)
        refusals = CounterMetricFamily("waiting_room_display_refusals",
                                       "Display connections refused (503), by reason.", labels=["reason"])
        for reason, count in sorted(c.display_refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        yield CounterMetricFamily("waiting_room_sign_runs", "Sign command runs (display.command).",
                                  value=c.sign_runs)
        yield CounterMetricFamily("waiting_room_sign_failures",
                                  "Sign command runs that failed (non-zero exit, not startable, timed out).",
                                  value=c.sign_failures)
        yield CounterMetricFamily("waiting_room_sign_timeouts", "Sign command runs killed after command_timeout.",
                                  value=c.sign_timeouts)


class _Scrape:
    """One scrape's families from a snapshot, for ``generate_latest`` (which only calls
    ``collect``): the store's as they were in the loop, the process's as they are now."""

    def __init__(self, metrics: Metrics, snap: Snapshot) -> None:
        self.metrics = metrics
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.collector.families(self.snap)
        if self.metrics.process is not None:
            yield from self.metrics.process.collect()


class Metrics:
    """The registry behind ``/metrics``: the store collector and the process's own figures
    (memory, CPU, descriptors: prometheus_client's ProcessCollector)."""

    def __init__(self, store: RoomStore, counters: Callable[[], Counters], *,
                 clock: Callable[[], float] = time.time, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = StoreCollector(store, counters, clock=clock)
        self.registry.register(self.collector)
        self.process = ProcessCollector(registry=self.registry) if process else None

    def render(self) -> bytes:
        """Everything in the caller's thread."""
        return generate_latest(self.registry)

    async def render_async(self) -> bytes:
        """The values taken now, in the event loop; the text formatted in a thread."""
        scrape = _Scrape(self, self.collector.snapshot())
        return await asyncio.to_thread(generate_latest, scrape)  # type: ignore[arg-type]
