"""The core bridge end to end: the real simulator upstream, a real mosquitto, the daemon.

Backoff intervals are shrunk through config so that reconnect scenarios take fractions of a
second; every wait is an awaited condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import make_config, running, wait_store

from waiting_room.model import LinkStatus
from waiting_room.policy import Action
from waiting_room.simulator import Simulator


def state(watcher, room: str) -> dict:
    """The room's state JSON as last seen ({} before the first)."""
    return json.loads(watcher.last.get(f"waiting-room/{room}/state") or "{}")


async def test_rooms_reach_mqtt_retained(sim, broker, watcher):
    async with running(make_config(sim.url, broker.port)):
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        await watcher.wait_topic("waiting-room/lab/patients", "2")
        await watcher.wait_topic("waiting-room/status", "online")
        await watcher.wait_topic("waiting-room/upstream", "connected")
        opd = state(watcher, "opd-1")
        assert opd["patients"] == 5 and opd["stale"] is False and opd["error"] is None
        assert opd["updated_at"].endswith("Z")
        sim.set_queue("opd-1", 9, now_serving="A-17")
        await watcher.wait_topic("waiting-room/opd-1/patients", "9")
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("now_serving") == "A-17")
    await watcher.wait_topic("waiting-room/status", "offline")
    # One socket for all rooms, closed normally on stop.
    assert sim.connections == 1
    await sim.wait_until(lambda: sim.active == 0)
    assert sim.close_codes == [1000]
    assert sorted(sim.joins) == ["lab", "opd-1"]


async def test_patients_published_only_when_changed(sim, broker, watcher):
    async with running(make_config(sim.url, broker.port)):
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        sim.set_queue("opd-1", 5, now_serving="A-2")  # same count, new ticket
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("now_serving") == "A-2")
        sim.set_queue("opd-1", 6)
        await watcher.wait_topic("waiting-room/opd-1/patients", "6")
    counts = [p for t, p in watcher.history if t == "waiting-room/opd-1/patients"]
    assert counts == ["5", "6"]


async def test_upstream_loss_is_loud_and_recovers(sim, broker, watcher):
    port = sim.port
    async with running(make_config(sim.url, broker.port)):
        await watcher.wait_topic("waiting-room/upstream", "connected")
        await watcher.wait_for(lambda: state(watcher, "lab").get("stale") is False)
        await sim.stop()  # the server goes away
        await watcher.wait_topic("waiting-room/upstream", "disconnected", timeout=5)
        await watcher.wait_for(lambda: state(watcher, "lab").get("stale") is True, timeout=5)
        assert state(watcher, "lab").get("patients") == 2  # the last value stays, marked stale
        sim.set_queue("lab", 7)
        await sim.start(port=port)  # back
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=5)
        await watcher.wait_topic("waiting-room/lab/patients", "7")
        await watcher.wait_for(lambda: state(watcher, "lab").get("stale") is False)


async def test_silent_server_is_noticed_by_heartbeat_timeout(sim, broker, watcher):
    config = make_config(sim.url, broker.port, upstream__heartbeat_timeout=0.4)
    async with running(config) as app:
        await watcher.wait_topic("waiting-room/upstream", "connected")
        sim.set_silent(True)  # TCP stays open, nothing arrives: a frozen proxy
        await watcher.wait_topic("waiting-room/upstream", "disconnected", timeout=5)
        assert "heartbeat" in app.store.link.detail
        sim.set_silent(False)
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=5)
        assert sim.connections >= 2


async def test_frozen_server_is_noticed_by_client_ping_whatever_its_heartbeat(sim, broker, watcher):
    # The server announces a 15 s heartbeat (so the old bound was 35 s); the client ping
    # finds the frozen application within ping_interval + ping_timeout, although the
    # server's TCP stack still answers RFC 6455 pings.
    config = make_config(sim.url, broker.port, upstream__ping_interval=0.3, upstream__ping_timeout=0.3)
    async with running(config) as app:
        await watcher.wait_topic("waiting-room/upstream", "connected")
        sim.set_silent(True)
        await watcher.wait_topic("waiting-room/upstream", "disconnected", timeout=3)
        await watcher.wait_for(lambda: state(watcher, "lab").get("stale") is True, timeout=1)
        assert "heartbeat" in app.store.link.detail
        sim.set_silent(False)
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=5)


async def test_joins_a_server_dropped_while_frozen_are_sent_again(sim, broker, watcher):
    # Found by bench/chaos: a server frozen while the daemon reconnected dropped its joins;
    # thawed, it answered pings, so the connection looked alive but no room was ever joined.
    config = make_config(sim.url, broker.port, upstream__connect_timeout=0.5, upstream__ping_interval=30)
    async with running(config):
        await watcher.wait_topic("waiting-room/upstream", "connected")
        sim.set_silent(True)
        joins = len(sim.joins)
        await sim.close_all(1012)
        await watcher.wait_topic("waiting-room/upstream", "disconnected")
        await sim.wait_until(lambda: len(sim.joins) >= joins + 2)  # arrived, and dropped
        sim.set_silent(False)
        sim.set_queue("lab", 6)
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=5)
        await watcher.wait_topic("waiting-room/lab/patients", "6")
        assert sim.connections == 2  # the same connection, joined at last


async def test_quiet_server_that_answers_pings_stays_connected(sim, broker, watcher):
    config = make_config(sim.url, broker.port, upstream__ping_interval=0.05, upstream__ping_timeout=0.5)
    async with running(config):
        await watcher.wait_topic("waiting-room/upstream", "connected")
        before = sim.frames_received
        await sim.wait_until(lambda: sim.frames_received >= before + 10, timeout=5)  # our pings
        assert sim.connections == 1 and sim.active == 1


async def test_ping_is_answered_with_pong():
    async with Simulator(rooms=("opd-1",), token="test-token", heartbeat=0.1, pong_timeout=0.5) as sim:
        config = make_config(sim.url, 1, rooms=[{"id": "opd-1"}])
        from waiting_room.store import RoomStore
        from waiting_room.upstream import Upstream

        store = RoomStore([("opd-1", "opd-1")])
        task = asyncio.create_task(Upstream(config.upstream, ["opd-1"], store).run())
        try:
            await sim.wait_until(lambda: sim.pongs >= 5, timeout=5)
            assert sim.connections == 1  # no 4008: the pongs arrived in time
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_refused_room_is_marked_and_retried_slowly(broker, watcher):
    async with Simulator(rooms=("opd-1",), token="test-token", initial_patients={"opd-1": 3}) as sim:
        config = make_config(sim.url, broker.port, upstream__room_retry=0.3)
        async with running(config):
            await watcher.wait_topic("waiting-room/opd-1/patients", "3")
            await watcher.wait_for(lambda: state(watcher, "lab").get("error") == "unknown_room")
            assert state(watcher, "opd-1").get("error") is None
            await sim.wait_until(lambda: sim.joins.count("lab") >= 2, timeout=5)  # asked again
            sim.add_room("lab", 4)  # the server learns the room
            await watcher.wait_for(lambda: state(watcher, "lab").get("patients") == 4, timeout=5)
            assert state(watcher, "lab").get("error") is None
            assert sim.connections == 1  # the other room was never disturbed


async def test_forbidden_room(broker, watcher, sim):
    sim.forbid("lab")
    async with running(make_config(sim.url, broker.port)):
        await watcher.wait_for(lambda: state(watcher, "lab").get("error") == "forbidden")
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")


async def test_single_room_server(broker, watcher):
    async with Simulator(rooms=("opd-1",), token="test-token", single_room=True,
                         initial_patients={"opd-1": 8}) as sim:
        config = make_config(sim.url, broker.port, rooms=[{"id": "opd-1"}])
        async with running(config):
            await watcher.wait_topic("waiting-room/opd-1/patients", "8")
            sim.set_queue("opd-1", 9)
            await watcher.wait_topic("waiting-room/opd-1/patients", "9")
            assert state(watcher, "opd-1").get("error") is None


async def test_token_in_query(sim, broker, watcher):
    config = make_config(sim.url, broker.port, upstream__token_in="query")
    async with running(config):
        await watcher.wait_topic("waiting-room/upstream", "connected")
    assert sim.tokens_seen == ["test-token"]


# -- close codes and refused handshakes (PROTOCOL.md's table), against the real socket ----


async def test_4000_reconnects_promptly(sim, broker):
    config = make_config(sim.url, broker.port, upstream__backoff={"initial": 5, "max": 30})
    async with running(config) as app:
        await wait_store(app, lambda: app.store.link.status is LinkStatus.CONNECTED)
        start = time.monotonic()
        await sim.close_all(4000)
        await sim.wait_until(lambda: sim.connections == 2, timeout=3)  # backoff would be >= 0.5 s
        assert time.monotonic() - start < 1.5


async def test_4001_reads_the_token_file_afresh(sim, broker, watcher, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("test-token\n")
    upstream = {"url": sim.url, "token_file": str(token_file), "backoff": {"initial": 5, "max": 30},
                "token_check": 60}
    async with running(make_config(sim.url, broker.port, upstream=upstream)):
        await watcher.wait_topic("waiting-room/upstream", "connected")
        token_file.write_text("second-token\n")
        sim.set_token("second-token")
        await sim.close_all(4001)
        # A changed token means a prompt reconnect (the backoff would wait >= 0.5 s).
        await sim.wait_until(lambda: sim.connections == 2, timeout=3)
        assert sim.tokens_seen[-1] == "second-token"
        await watcher.wait_topic("waiting-room/upstream", "connected")


async def test_4001_with_unchanged_token_backs_off(sim, broker):
    async with running(make_config(sim.url, broker.port)) as app:
        await wait_store(app, lambda: app.store.link.status is LinkStatus.CONNECTED)
        await sim.close_all(4001)
        await wait_store(app, lambda: app.store.link.status is LinkStatus.DISCONNECTED)
        assert app.store.link.retry_in is not None and app.store.link.retry_in >= 0.005
        assert app.store.link.detail.startswith("lost: closed 4001")


async def test_4003_is_auth_failed_at_the_maximum_interval(sim, broker, watcher):
    config = make_config(sim.url, broker.port, upstream__backoff={"initial": 0.05, "max": 0.6})
    async with running(config) as app:
        await watcher.wait_topic("waiting-room/upstream", "connected")
        await sim.close_all(4003)
        await watcher.wait_topic("waiting-room/upstream", "auth_failed")
        assert app.store.link.retry_in == pytest.approx(0.6)
        await watcher.wait_for(lambda: state(watcher, "opd-1").get("stale") is True)
        # It keeps trying at the maximum interval and recovers when the server lets it in.
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=5)


async def test_1013_waits_at_least_the_maximum(sim, broker):
    config = make_config(sim.url, broker.port, upstream__backoff={"initial": 0.05, "max": 0.5})
    async with running(config):
        await sim.wait_until(lambda: sim.connections == 1)
        await sim.close_all(1013)
        closed = time.monotonic()
        await sim.wait_until(lambda: sim.handshakes == 2, timeout=5)
        assert time.monotonic() - closed >= 0.5


@pytest.mark.parametrize("status,expected", [(401, "disconnected"), (403, "auth_failed")])
async def test_refused_handshake(sim, broker, watcher, status, expected):
    sim.refuse(status)
    async with running(make_config(sim.url, broker.port)) as app:
        await watcher.wait_topic("waiting-room/upstream", expected)
        assert f"HTTP {status}" in app.store.link.detail
        sim.refuse(None)
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=5)


async def test_retry_after_is_honoured(sim, broker):
    sim.refuse(503, retry_after=0.8)  # longer than the configured maximum of 0.3 s
    async with running(make_config(sim.url, broker.port)):
        await sim.wait_until(lambda: sim.handshakes == 1)
        refused = time.monotonic()
        await sim.wait_until(lambda: sim.handshakes == 2, timeout=5)
        assert time.monotonic() - refused >= 0.75


async def test_accept_then_close_never_loops_tightly(broker):
    """A server that upgrades and closes at once must see a growing backoff, not a storm."""
    from websockets.asyncio.server import serve

    accepted: list[float] = []
    enough = asyncio.Event()

    async def close_at_once(ws):
        accepted.append(time.monotonic())
        if len(accepted) >= 8:
            enough.set()
        await ws.close(1011)

    async with serve(close_at_once, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        config = make_config(f"ws://127.0.0.1:{port}/", broker.port,
                             upstream__backoff={"initial": 0.05, "max": 0.4})
        async with running(config):
            async with asyncio.timeout(10):
                await enough.wait()
    # Eight attempts: a tight loop takes milliseconds; the backoff at least the floors.
    assert accepted[7] - accepted[0] >= 0.2
    assert accepted[7] - accepted[4] >= accepted[3] - accepted[0] - 0.05 or accepted[7] - accepted[4] >= 0.1


async def test_backoff_resets_only_after_a_healthy_connection(sim, broker):
    stable_after = 0.2
    config = make_config(sim.url, broker.port, upstream__stable_after=stable_after)
    async with running(config) as app:
        await wait_store(app, lambda: app.store.link.status is LinkStatus.CONNECTED)
        schedule = app.upstream.schedule
        for _ in range(4):  # as if earlier connections had failed
            schedule.next(Action.BACKOFF)
        assert schedule.failures == 4
        # The scenario needs the connection to have lived past stable_after: time must pass.
        await asyncio.sleep(stable_after * 1.5)
        await sim.close_all(1001)
        await sim.wait_until(lambda: sim.connections == 2, timeout=5)
        assert schedule.failures == 1  # reset, then one step for this loss
        await wait_store(app, lambda: app.store.link.status is LinkStatus.CONNECTED)
        await sim.close_all(1001)  # lived less than stable_after: no reset this time
        await sim.wait_until(lambda: sim.connections == 3, timeout=5)
        assert schedule.failures == 2
