"""The offline fallback end to end (issue 9): the simulator breaks WebSocket upgrades the way
a proxy does, the daemon polls the HTTP snapshot instead, and every surface says "degraded";
when upgrades work again it is back on the socket within the backoff and polls no more.

The simulator's snapshot announces ``poll: 1`` (its smallest honoured value), the daemon's
interval is 1 s and ``after`` 0.3 s, so each scenario takes a few seconds; every wait is an
awaited condition with a deadline.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_config, running, wait_store

from waiting_room.model import LinkStatus
from waiting_room.simulator import Simulator

INTERVAL = 1.0
AFTER = 0.3


def state(watcher, room: str) -> dict:
    return json.loads(watcher.last.get(f"waiting-room/{room}/state") or "{}")


def fallback_config(sim: Simulator, broker_port: int, **overrides: object):
    fallback = {"url": sim.snapshot_url, "interval": INTERVAL, "after": AFTER}
    return make_config(sim.url, broker_port, upstream__fallback=fallback, **overrides)


def polls(sim: Simulator) -> int:
    return sum(sim.snapshot_requests.values())


@pytest.fixture
def poll_1s(sim: Simulator) -> Simulator:
    sim.set_snapshot_poll(INTERVAL)
    return sim


@pytest.mark.parametrize("mode", ["426", "200", "403"])
async def test_broken_upgrades_fall_back_to_the_snapshot_and_back(poll_1s, broker, watcher, mode):
    sim = poll_1s
    sim.break_upgrades(mode)
    async with running(fallback_config(sim, broker.port)) as app:
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=5)
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        await watcher.wait_for(lambda: state(watcher, "lab").get("stale") is False and
                               state(watcher, "lab").get("patients") == 2)
        assert app.store.link.status is LinkStatus.DEGRADED
        assert app.store.link.poll_interval == INTERVAL
        assert f"HTTP {mode}" in app.store.link.detail
        assert sim.connections == 0 and sim.upgrades_broken >= 1
        assert sim.snapshot_last_rooms == ("opd-1", "lab")
        assert set(sim.snapshot_tokens_seen) == {"test-token"}  # the socket's token, in the header
        # A change reaches MQTT within the polling interval (plus the request).
        sim.set_queue("opd-1", 9, now_serving="A-20")
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("patients") == 9, timeout=INTERVAL + 1.5)
        assert watcher.last["waiting-room/opd-1/patients"] == "9"
        assert state(watcher, "opd-1") | {"updated_at": None} == {
            "patients": 9, "now_serving": "A-20", "updated_at": None, "stale": False, "error": None}
        # Upgrades work again: back on the socket within the backoff (max 0.3 s here).
        sim.break_upgrades(None)
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=3)
        assert sim.connections == 1
        sim.set_queue("lab", 4)
        await watcher.wait_topic("waiting-room/lab/patients", "4", timeout=2)
        # ... and it polls no more: no request within two more intervals.
        seen = polls(sim)
        with pytest.raises(TimeoutError):
            await sim.wait_until(lambda: polls(sim) > seen, timeout=2 * INTERVAL + 0.5)
    upstream = [p for t, p in watcher.history if t == "waiting-room/upstream"]
    assert "degraded" in upstream and upstream[-1] == "connected"


async def test_cut_connections_are_bridged_by_polls(poll_1s, broker, watcher):
    """A proxy that lets the upgrade through and cuts it after a while: between the cuts the
    values come from the snapshot, so the rooms do not stay stale through the backoff."""
    sim = poll_1s
    sim.break_upgrades("cut", cut_after=0.4)
    config = fallback_config(sim, broker.port, upstream__backoff={"initial": 1.5, "max": 2})
    async with running(config) as app:
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=5)
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=5)
        assert sim.upgrades_cut >= 1
        assert not app.store.rooms["opd-1"].stale
        sim.set_queue("opd-1", 11)
        await watcher.wait_topic("waiting-room/opd-1/patients", "11", timeout=4)


async def test_no_fallback_configured_means_no_polling(sim, broker, watcher):
    sim.break_upgrades("426")
    async with running(make_config(sim.url, broker.port)):
        await sim.wait_until(lambda: sim.upgrades_broken >= 3)
        await watcher.wait_topic("waiting-room/upstream", "disconnected")
    assert polls(sim) == 0


async def test_polling_waits_for_after(poll_1s, broker, watcher):
    """``after`` counts from the start (no socket yet) or from the end of the last healthy
    connection: no request before it."""
    sim = poll_1s
    sim.break_upgrades("426")
    config = make_config(sim.url, broker.port, upstream__fallback={"url": sim.snapshot_url, "after": 1.5})
    async with running(config) as app:
        await sim.wait_until(lambda: sim.upgrades_broken >= 2)
        assert polls(sim) == 0
        await wait_store(app, lambda: app.store.link.status is LinkStatus.DEGRADED, timeout=4)
        # The server's poll (1 s) does not lower the configured interval (5 s by default).
        assert app.store.link.poll_interval == 5.0


async def test_failing_polls_make_the_rooms_stale(poll_1s, broker, watcher):
    sim = poll_1s
    sim.break_upgrades("426")
    async with running(fallback_config(sim, broker.port)) as app:
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=5)
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("stale") is False)
        sim.refuse_snapshot(500)
        await watcher.wait_topic("waiting-room/upstream", "disconnected", timeout=4)
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("stale") is True, timeout=2)
        assert "snapshot: HTTP 500" in app.store.link.detail
        assert "HTTP 426" in app.store.link.detail
        sim.refuse_snapshot(None)
        sim.set_queue("opd-1", 3)
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=4)
        await watcher.wait_topic("waiting-room/opd-1/patients", "3", timeout=2)
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("stale") is False)


async def test_bad_snapshot_is_dropped_counted_and_never_shown(poll_1s, broker, watcher):
    sim = poll_1s
    sim.break_upgrades("426")
    sim.set_snapshot_raw('{"rooms": [{"room": "opd-1", "patients": -4}, {"room": "lab", "patients": 77}], "poll": 1}')
    async with running(fallback_config(sim, broker.port)) as app:
        # One bad entry dropped and counted, the good one applied.
        await watcher.wait_topic("waiting-room/lab/patients", "77", timeout=5)
        assert app.store.dropped_frames >= 1
        assert "waiting-room/opd-1/patients" not in watcher.last
        assert app.store.rooms["opd-1"].patients is None
        # A whole body that is not a snapshot: dropped, counted, nothing of it published,
        # and the feed is not "degraded" on its strength.
        sim.set_snapshot_raw(b"<html>proxy login</html>")
        before = app.store.dropped_frames
        await wait_store(app, lambda: app.store.dropped_frames > before, timeout=4)
        await watcher.wait_topic("waiting-room/upstream", "disconnected", timeout=2)
        assert "bad snapshot" in app.store.link.detail
        sim.set_snapshot_raw(b"x" * (1024 * 1024 + 1))
        before = app.store.dropped_frames
        await wait_store(app, lambda: app.store.dropped_frames > before, timeout=4)
        assert "oversized" in app.store.link.detail
    published = {p for t, p in watcher.history if t.endswith("/patients")}
    assert published == {"77"}


async def test_not_modified_keeps_the_values_fresh(poll_1s, broker, watcher):
    sim = poll_1s
    sim.break_upgrades("426")
    async with running(fallback_config(sim, broker.port)) as app:
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=5)
        await sim.wait_until(lambda: sim.snapshot_requests["not_modified"] >= 2, timeout=5)
        assert sim.snapshot_requests["served"] == 1  # If-None-Match with the last ETag
        assert app.store.link.status is LinkStatus.DEGRADED
        assert not app.store.rooms["opd-1"].stale
        sim.set_queue("opd-1", 8)  # a new ETag: a full answer again
        await watcher.wait_topic("waiting-room/opd-1/patients", "8", timeout=3)
        assert sim.snapshot_requests["served"] == 2


async def test_retry_after_is_honoured(poll_1s, broker, watcher):
    sim = poll_1s
    sim.break_upgrades("426")
    sim.refuse_snapshot(503, retry_after=2.5)
    async with running(fallback_config(sim, broker.port)) as app:
        await wait_store(app, lambda: "snapshot: HTTP 503" in app.store.link.detail, timeout=3)
        assert sim.snapshot_requests["refused"] == 1
        # Nothing before Retry-After (2.5 s), though the interval is 1 s.
        with pytest.raises(TimeoutError):
            await sim.wait_until(lambda: sim.snapshot_requests["refused"] >= 2, timeout=2.2)
        sim.refuse_snapshot(None)
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=3)


async def test_unauthorised_poll_reads_the_token_again(poll_1s, broker, watcher, tmp_path):
    sim = poll_1s
    sim.break_upgrades("426")
    token = tmp_path / "token"
    token.write_text("old-token\n")
    sim.set_token("new-token")
    config = make_config(
        sim.url, broker.port,
        upstream={"url": sim.url, "token_file": str(token), "token_in": "query",
                  "backoff": {"initial": 0.05, "max": 0.3}, "connect_timeout": 2,
                  "fallback": {"url": sim.snapshot_url, "interval": INTERVAL, "after": AFTER}},
    )
    async with running(config):
        await sim.wait_until(lambda: sim.snapshot_requests["refused"] >= 1)
        token.write_text("new-token\n")
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=3)
        assert sim.snapshot_tokens_seen[-1] == "new-token"  # in the query, as token_in says


async def test_healthz_and_the_status_line_say_degraded(poll_1s, broker, watcher):
    import asyncio
    import urllib.request

    from waiting_room.systemd import status_text

    sim = poll_1s
    sim.break_upgrades("426")
    config = fallback_config(sim, broker.port, display={"enabled": True, "listen": "127.0.0.1:0"})
    async with running(config) as app:
        await wait_store(app, lambda: app.store.link.status is LinkStatus.DEGRADED
                         and app.store.components.get("mqtt") == "connected", timeout=5)

        def get() -> tuple[int, dict]:
            with urllib.request.urlopen(f"http://127.0.0.1:{app.display.port}/healthz", timeout=5) as response:
                return response.status, json.loads(response.read())

        status, doc = await asyncio.to_thread(get)
        assert status == 200 and doc["status"] == "degraded"
        assert doc["upstream"]["status"] == "degraded" and doc["upstream"]["feed"] == "poll"
        assert doc["upstream"]["poll_interval"] == INTERVAL
        assert doc["rooms"]["opd-1"]["stale"] is False
        assert status_text(app.store).startswith(
            "upstream degraded: polling every 1 s (socket: handshake refused: HTTP 426) · 2 rooms")


async def test_a_reload_adds_and_removes_the_fallback(poll_1s, broker, watcher):
    sim = poll_1s
    sim.break_upgrades("426")
    plain = make_config(sim.url, broker.port)
    async with running(plain) as app:
        await sim.wait_until(lambda: sim.upgrades_broken >= 2)
        assert polls(sim) == 0
        await app.apply(fallback_config(sim, broker.port))
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=5)
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("stale") is False)
        await app.apply(plain)
        await watcher.wait_topic("waiting-room/upstream", "disconnected", timeout=3)
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("stale") is True)
        seen = polls(sim)
        with pytest.raises(TimeoutError):
            await sim.wait_until(lambda: polls(sim) > seen, timeout=2 * INTERVAL + 0.5)



class BlackHole:
    """An HTTP server that reads a request and never answers."""

    def __init__(self) -> None:
        import asyncio

        self.requests: list[bytes] = []
        self.arrived = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader, writer) -> None:
        self.requests.append(await reader.readline())
        self.arrived.set()
        try:
            await reader.read()  # until the client gives up
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        import asyncio

        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/rooms"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_snapshot_that_never_answers_is_bounded_by_connect_timeout(sim, broker, watcher):
    sim.break_upgrades("426")
    hole = BlackHole()
    async with hole as url:
        config = make_config(sim.url, broker.port, upstream__connect_timeout=0.5,
                             upstream__fallback={"url": url, "after": 0.1})
        async with running(config) as app:
            await wait_store(app, lambda: "snapshot: no answer within 0.5 s" in app.store.link.detail, timeout=5)
            assert hole.requests[0].startswith(b"GET /rooms?room=opd-1&room=lab ")


async def test_stopping_in_the_middle_of_a_poll_is_prompt(sim, broker, watcher):
    import asyncio

    sim.break_upgrades("426")
    hole = BlackHole()
    loop = asyncio.get_running_loop()
    async with hole as url:
        config = make_config(sim.url, broker.port, upstream__connect_timeout=10,
                             upstream__fallback={"url": url, "after": 0.1})
        async with running(config):
            async with asyncio.timeout(5):
                await hole.arrived.wait()
            started = loop.time()
        assert loop.time() - started < 2.0


async def test_polls_never_log_the_url_or_token_even_at_debug(broker, watcher, tmp_path):
    # httpx logs every request at INFO with its URL, and the token rides in it with
    # token_in: query. The daemon's own process, at debug level, must show neither.
    from testsupport import Daemon

    secret = "s3cret-poll-token"
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    token_file.chmod(0o600)
    async with Simulator(rooms=("opd-1", "lab"), token=secret, initial_patients={"opd-1": 4}) as sim:
        sim.set_snapshot_poll(INTERVAL)
        sim.break_upgrades("426")
        daemon = Daemon(tmp_path, "daemon", {
            "upstream": {"url": sim.url, "token_file": str(token_file), "token_in": "query",
                         "backoff": {"initial": 0.05, "max": 0.3},
                         "fallback": {"url": sim.snapshot_url, "interval": INTERVAL, "after": AFTER}},
            "rooms": [{"id": "opd-1"}, {"id": "lab"}],
            "mqtt": {"port": broker.port, "client_id": "wr-poll-log"},
            "display": {"enabled": False},
            "log_level": "debug",
        })
        daemon.start()
        try:
            await watcher.wait_topic("waiting-room/upstream", "degraded")
            await watcher.wait_topic("waiting-room/opd-1/patients", "4")  # a poll answered
        finally:
            daemon.stop()
    log = daemon.log_text()
    assert "degraded" in log  # the log is there, and at debug level
    assert secret not in log and "HTTP Request" not in log
