"""/metrics: the Prometheus text format, as Prometheus' own parser reads it.

The collector against a store of the test's own (a fixed clock), then the daemon as App wires
it, scraped over HTTP on the display port while the simulator's feed comes and goes.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_config, running, wait_store
from testsupport import http_get
from waiting_room.metrics import ATTEMPT_OUTCOMES, Counters, Metrics
from waiting_room.model import LinkStatus
from waiting_room.store import RoomStore


class Scrape:
    """One /metrics answer, parsed: ``value(name, **labels)``, ``samples(name)``."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.text = text

    def samples(self, name: str) -> list[Any]:
        family_name = name.removesuffix("_total")
        family = self.families[family_name]
        return [s for s in family.samples if s.name == name]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples(name) if all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (name, labels, self.samples(name))
        return found[0]

    def by(self, name: str, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in self.samples(name)}


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scrape(metrics: Metrics) -> Scrape:
    return Scrape(metrics.render().decode())


# -- the collector ----------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> RoomStore:
    return RoomStore([("opd-1", "OPD 1"), ("lab", "Laboratory"), ("xray", "X-ray")], clock=clock)


def test_live_rooms_are_age_zero_and_carry_their_counts(store, clock):
    metrics = Metrics(store, Counters, clock=clock, process=False)
    store.set_link(LinkStatus.CONNECTED)
    store.apply_queue("opd-1", 5, "A-17")
    store.apply_queue("lab", 0)
    clock.now += 30  # quiet rooms stay current while the feed is live
    m = scrape(metrics)
    assert m.value("waiting_room_upstream_connected") == 1
    assert m.by("waiting_room_feed_mode", "mode") == {"socket": 1, "poll": 0, "none": 0}
    assert m.value("waiting_room_upstream_status", status="connected") == 1
    assert m.by("waiting_room_room_patients", "room") == {"opd-1": 5, "lab": 0}  # xray: none yet
    assert m.by("waiting_room_room_age_seconds", "room") == {"opd-1": 0, "lab": 0, "xray": 30}
    assert m.value("waiting_room_rooms") == 3 and m.value("waiting_room_rooms_stale") == 1
    assert m.value("waiting_room_upstream_connects_total") == 1


def test_a_lost_feed_ages_every_room_from_the_moment_it_was_lost(store, clock):
    metrics = Metrics(store, Counters, clock=clock, process=False)
    store.set_link(LinkStatus.CONNECTED)
    store.apply_queue("opd-1", 5)
    clock.now += 10
    store.set_link(LinkStatus.DISCONNECTED, "lost: closed 1011")
    clock.now += 61
    m = scrape(metrics)
    assert m.value("waiting_room_upstream_connected") == 0
    assert m.by("waiting_room_feed_mode", "mode") == {"socket": 0, "poll": 0, "none": 1}
    assert m.value("waiting_room_room_age_seconds", room="opd-1") == 61  # lost 61 s ago, not 71
    assert m.value("waiting_room_room_patients", room="opd-1") == 5  # the last known, stale
    assert m.value("waiting_room_rooms_stale") == 3
    assert m.value("waiting_room_upstream_status_since_timestamp_seconds") == clock.now - 61


def test_polled_values_are_live_and_say_poll(store, clock):
    metrics = Metrics(store, Counters, clock=clock, process=False)
    store.set_link(LinkStatus.DEGRADED, "handshake refused: HTTP 426", poll_interval=5)
    store.apply_queue("opd-1", 3)
    m = scrape(metrics)
    assert m.value("waiting_room_upstream_connected") == 0
    assert m.by("waiting_room_feed_mode", "mode") == {"socket": 0, "poll": 1, "none": 0}
    assert m.value("waiting_room_upstream_status", status="degraded") == 1
    assert m.value("waiting_room_room_age_seconds", room="opd-1") == 0


def test_refused_rooms_are_named_with_their_error(store, clock):
    metrics = Metrics(store, Counters, clock=clock, process=False)
    store.set_link(LinkStatus.CONNECTED)
    store.set_room_error("xray", "forbidden")
    m = scrape(metrics)
    assert [(s.labels, s.value) for s in m.samples("waiting_room_room_refused")] == [
        ({"room": "xray", "error": "forbidden"}, 1)]


def test_the_parts_counters_pass_through(store, clock):
    counters = Counters(
        attempts={"connected": 3, "refused": 2}, close_codes={1011: 2, 4000: 1}, mqtt_connects=2,
        mqtt_publishes=120, display_clients=4, display_connections=6,
        display_refusals={"clients": 1, "address_clients": 0}, sign_runs=9, sign_failures=2, sign_timeouts=1,
    )
    store.count_dropped()
    m = scrape(Metrics(store, lambda: counters, clock=clock, process=False))
    attempts = m.by("waiting_room_upstream_connection_attempts_total", "outcome")
    assert attempts == {**dict.fromkeys(ATTEMPT_OUTCOMES, 0), "connected": 3, "refused": 2}
    assert m.by("waiting_room_upstream_close_codes_total", "code") == {"1011": 2, "4000": 1}
    assert m.value("waiting_room_frames_dropped_total") == 1
    assert m.value("waiting_room_mqtt_connects_total") == 2
    assert m.value("waiting_room_mqtt_publishes_total") == 120
    assert m.value("waiting_room_display_clients") == 4
    assert m.value("waiting_room_display_connections") == 6
    assert m.by("waiting_room_display_refusals_total", "reason") == {"clients": 1, "address_clients": 0}
    assert (m.value("waiting_room_sign_runs_total"), m.value("waiting_room_sign_failures_total"),
            m.value("waiting_room_sign_timeouts_total")) == (9, 2, 1)


def test_room_ids_are_label_values_as_such(clock):
    store = RoomStore([("ward_3.east", "Ward"), ("a-b", "A")], clock=clock)
    store.apply_queue("ward_3.east", 2)
    m = scrape(Metrics(store, Counters, clock=clock, process=False))
    assert m.value("waiting_room_room_patients", room="ward_3.east") == 2


def test_process_figures_come_along():
    m = scrape(Metrics(RoomStore([("a", "A")]), Counters))
    assert m.value("process_resident_memory_bytes") > 0
    assert m.value("process_open_fds") > 0


# -- the daemon --------------------------------------------------------------------------------


async def metrics_of(port: int) -> Scrape:
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200, body[:200]
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(body.decode())


async def test_metrics_of_a_running_daemon(sim, broker):
    config = make_config(sim.url, broker.port, display={"listen": "127.0.0.1:0", "access_token": "screens-only"})
    async with running(config) as app:
        await wait_store(app, lambda: app.store.link.status is LinkStatus.CONNECTED
                         and app.store.components.get("mqtt") == "connected"
                         and all(not s.stale for s in app.store.rooms.values()))
        port = app.display.port
        # Monitoring needs no token, as /healthz; the pages still do.
        assert (await http_get(port, "/"))[0] == 401
        m = await metrics_of(port)
        assert m.value("waiting_room_upstream_connected") == 1
        assert m.by("waiting_room_feed_mode", "mode") == {"socket": 1, "poll": 0, "none": 0}
        assert m.by("waiting_room_room_patients", "room") == {"opd-1": 5, "lab": 2}
        assert m.by("waiting_room_room_age_seconds", "room") == {"opd-1": 0, "lab": 0}
        assert m.value("waiting_room_upstream_connection_attempts_total", outcome="connected") == 1
        assert m.value("waiting_room_mqtt_connected") == 1
        assert m.by("waiting_room_mqtt_node", "node") == {f"127.0.0.1:{broker.port}": 1}
        assert m.value("waiting_room_mqtt_connects_total") == 1
        assert m.value("waiting_room_mqtt_publishes_total") > 0
        assert m.value("waiting_room_display_clients") == 0
        assert m.value("waiting_room_frames_dropped_total") == 0
        assert "screens-only" not in m.text and "test-token" not in m.text

        # The feed lost with 1011 and handshakes refused: counted; the rooms age.
        sim.refuse(503)
        await sim.close_all(1011)
        await wait_store(app, lambda: app.upstream.attempts["refused"] >= 1)
        m = await metrics_of(port)
        assert m.value("waiting_room_upstream_connected") == 0
        assert m.by("waiting_room_feed_mode", "mode")["none"] == 1
        assert m.value("waiting_room_upstream_close_codes_total", code="1011") == 1
        assert m.value("waiting_room_upstream_connection_attempts_total", outcome="refused") >= 1
        assert m.value("waiting_room_rooms_stale") == 2
        ages = m.by("waiting_room_room_age_seconds", "room")
        assert all(0 < age < 10 for age in ages.values()), ages

        sim.refuse(None)
        await wait_store(app, lambda: all(not s.stale for s in app.store.rooms.values()), timeout=10)
        m = await metrics_of(port)
        assert m.value("waiting_room_upstream_connected") == 1
        assert m.value("waiting_room_upstream_connects_total") == 2
        assert m.by("waiting_room_room_age_seconds", "room") == {"opd-1": 0, "lab": 0}


async def test_metrics_follow_a_reload_of_the_rooms(sim, broker):
    config = make_config(sim.url, broker.port, display={"listen": "127.0.0.1:0"})
    async with running(config) as app:
        await wait_store(app, lambda: all(not s.stale for s in app.store.rooms.values()))
        await app.apply(make_config(sim.url, broker.port, display={"listen": "127.0.0.1:0"},
                                    rooms=[{"id": "opd-1", "name": "OPD 1"}]))
        m = await metrics_of(app.display.port)
        assert set(m.by("waiting_room_room_patients", "room")) == {"opd-1"}
        assert m.value("waiting_room_rooms") == 1
