"""sd_notify against a real NOTIFY_SOCKET made by the test, reload, and the state file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, daemon_command, make_config, running, wait_store

from waiting_room.model import LinkStatus
from waiting_room.simulator import Simulator
from waiting_room.statefile import FILE_NAME, load
from waiting_room.systemd import Notifier, status_text


class NotifyListener:
    """The systemd side of sd_notify: a datagram socket and the messages it received."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._changed = asyncio.Condition()

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))
            async with self._changed:
                self._changed.notify_all()

    def has(self, key: str, value: str | None = None, after: int = 0) -> bool:
        return any(key in m and (value is None or m[key] == value) for _, m in self.messages[after:])

    def statuses(self) -> list[str]:
        return [m["STATUS"] for _, m in self.messages if "STATUS" in m]

    async def wait_for(self, predicate, timeout: float = 10.0, what: str = "") -> None:
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; got {self.messages[-10:]}") from None


@pytest.fixture
async def notify(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    task = asyncio.create_task(listener.pump())
    yield listener
    task.cancel()
    listener.sock.close()


def config_file(tmp_path: Path, sim_url: str, broker_port: int, rooms: list[str], **extra) -> Path:
    token = tmp_path / "token"
    token.write_text("test-token\n")
    data = {
        "upstream": {"url": sim_url, "token_file": str(token), "backoff": {"initial": 0.05, "max": 0.3}},
        "rooms": [{"id": r} for r in rooms],
        "mqtt": {"port": broker_port, "client_id": "wr-notify"},
        "display": {"enabled": False},
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def start(config: Path, tmp_path: Path, notify: NotifyListener, **env: str) -> asyncio.subprocess.Process:
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "daemon"), "NOTIFY_SOCKET": str(notify.path), **env}
    return await asyncio.create_subprocess_exec(
        *daemon_command("run", "--config", str(config)), env=environ,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.log", "wb"),
    )


async def test_notify_protocol_end_to_end(sim, broker, tmp_path, notify):
    port = sim.port
    config = config_file(tmp_path, sim.url, broker.port, ["opd-1", "lab"])
    proc = await start(config, tmp_path, notify, WATCHDOG_USEC="200000")
    try:
        await notify.wait_for(lambda: notify.has("READY", "1"), what="READY=1")
        await notify.wait_for(lambda: any(s.startswith("upstream connected · 2 rooms") and "mqtt connected" in s
                                          for s in notify.statuses()), what="a live STATUS")
        # WATCHDOG=1 at half the configured interval, from the event loop.
        await notify.wait_for(lambda: sum("WATCHDOG" in m for _, m in notify.messages) >= 6, what="watchdog")
        beats = [t for t, m in notify.messages if "WATCHDOG" in m]
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert 0.05 <= sorted(gaps)[len(gaps) // 2] <= 0.2  # median near 0.1 s

        await sim.stop()  # upstream goes down: STATUS says so
        await notify.wait_for(lambda: notify.statuses()[-1].startswith("upstream down"), what="upstream down")
        await sim.start(port=port)
        await notify.wait_for(lambda: notify.statuses()[-1].startswith("upstream connected"), what="back")

        mark = len(notify.messages)
        config.write_text(config.read_text().replace("- id: lab\n", "- id: lab\n- id: xray\n"))
        sim.add_room("xray", 3)
        proc.send_signal(signal.SIGHUP)
        await notify.wait_for(lambda: notify.has("RELOADING", "1", mark), what="RELOADING=1")
        await notify.wait_for(lambda: notify.has("READY", "1", mark + 1), what="READY=1 after reload")
        reloading = next(m for _, m in notify.messages[mark:] if "RELOADING" in m)
        assert "MONOTONIC_USEC" in reloading
        await sim.wait_until(lambda: "xray" in sim.joins)
        assert sim.connections == 2  # joined on the live socket (2: one before the outage)

        proc.send_signal(signal.SIGTERM)
        await notify.wait_for(lambda: notify.has("STOPPING", "1"), what="STOPPING=1")
        async with asyncio.timeout(5):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_invalid_reload_keeps_the_old_config(sim, broker, tmp_path, notify, watcher):
    config = config_file(tmp_path, sim.url, broker.port, ["opd-1", "lab"])
    proc = await start(config, tmp_path, notify)
    try:
        await notify.wait_for(lambda: notify.has("READY", "1"))
        await watcher.wait_topic("waiting-room/lab/patients", "2")
        config.write_text(config.read_text().replace("backoff:", "bakoff:"))
        mark = len(notify.messages)
        proc.send_signal(signal.SIGHUP)
        await notify.wait_for(lambda: notify.has("READY", "1", mark + 1))
        assert "reload refused" in notify.statuses()[-1]
        sim.set_queue("lab", 3)  # still running on the old config
        await watcher.wait_topic("waiting-room/lab/patients", "3")
        assert sim.connections == 1
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            await proc.wait()
        log = (tmp_path / "daemon.log").read_text()
        assert "reload refused" in log and "upstream.bakoff: unknown key" in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_no_notify_socket_means_no_notifications():
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    assert n.notify("READY=1") is False


def test_watchdog_for_another_pid_is_ignored():
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000",
                     "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 0.5


def test_abstract_notify_socket():
    name = f"waiting-room-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert server.recv(100) == b"READY=1"


def test_status_texts():
    from waiting_room.store import RoomStore

    store = RoomStore([("a", "A"), ("b", "B")], clock=lambda: 1000.0)
    assert status_text(store, 1000.0).startswith("upstream connecting · 2 rooms")
    store.set_link(LinkStatus.AUTH_FAILED, "closed 4003", retry_in=10)
    assert status_text(store, 1000.0).startswith("upstream: auth failed (closed 4003), retrying every 10 s")
    store.set_link(LinkStatus.CONNECTED)
    store.apply_queue("a", 3)
    store.set_component("mqtt", "connected")
    assert status_text(store, 1002.0) == "upstream connected · 2 rooms · last update 2 s ago · mqtt connected"
    store.set_link(LinkStatus.DEGRADED, "handshake refused: HTTP 426", retry_in=3, poll_interval=5.0)
    assert status_text(store, 1002.0).startswith(
        "upstream degraded: polling every 5 s (socket: handshake refused: HTTP 426) · 2 rooms")


# -- reload in process: rooms on the live socket, upstream settings make-before-break ----------


async def test_reload_rooms_without_reconnecting(sim, broker, watcher, tmp_path):
    sim.add_room("xray", 6)
    config = make_config(sim.url, broker.port)
    path = tmp_path / "config.yaml"
    async with running(config) as app:
        app.config_path = str(path)
        await watcher.wait_topic("waiting-room/lab/patients", "2")
        await watcher.wait_topic("homeassistant/sensor/wr-test/lab/config")
        data = {"upstream": {"url": sim.url, "token": "test-token", "backoff": {"initial": 0.05, "max": 0.3},
                             "stable_after": 0.5, "connect_timeout": 2},
                "rooms": [{"id": "opd-1", "name": "OPD 1"}, {"id": "xray", "name": "X-Ray"}],
                "mqtt": {"port": broker.port, "client_id": "wr-test", "backoff": {"initial": 0.05, "max": 0.3}},
                "display": {"enabled": False}}
        path.write_text(yaml.safe_dump(data))
        app.request_reload()
        await watcher.wait_topic("waiting-room/xray/patients", "6")
        await watcher.wait_topic("homeassistant/sensor/wr-test/xray/config")
        await watcher.wait_topic("homeassistant/sensor/wr-test/lab/config", "")  # removed
        await watcher.wait_topic("waiting-room/lab/patients", "")  # its retained topics cleared
        await sim.wait_until(lambda: "lab" in sim.leaves)
        assert sim.connections == 1  # no reconnect
        assert set(app.store.rooms) == {"opd-1", "xray"}


async def test_reload_new_upstream_is_make_before_break(broker, watcher, tmp_path):
    async with Simulator(rooms=("opd-1", "lab"), token="test-token", initial_patients={"opd-1": 5, "lab": 2}) as a, \
               Simulator(rooms=("opd-1", "lab"), token="other-token", initial_patients={"opd-1": 7, "lab": 2}) as b:
        config = make_config(a.url, broker.port)
        async with running(config) as app:
            await watcher.wait_topic("waiting-room/opd-1/patients", "5")
            seen = len(watcher.history)
            new = make_config(b.url, broker.port, upstream={"url": b.url, "token": "other-token",
                                                             "backoff": {"initial": 0.05, "max": 0.3}})
            await app.apply(new)
            await watcher.wait_topic("waiting-room/opd-1/patients", "7")
            await a.wait_until(lambda: a.active == 0)
            assert b.connections == 1 and a.close_codes == [1000]
            after = watcher.history[seen:]
            assert ("waiting-room/upstream", "disconnected") not in after
            assert all(not json.loads(p)["stale"] for t, p in after if t.endswith("/state"))


async def test_reload_new_mqtt_settings_reconnects_only_mqtt(sim, broker, tmp_path):
    from conftest import Broker

    other = Broker(tmp_path / "b2")
    (tmp_path / "b2").mkdir()
    other.start()
    try:
        async with running(make_config(sim.url, broker.port)) as app:
            await wait_store(app, lambda: app.store.components.get("mqtt") == "connected")
            new = make_config(sim.url, other.port)
            await app.apply(new)
            await wait_store(app, lambda: app.store.components.get("mqtt") == "connected"
                             and app.mqtt.cfg.port == other.port)
            assert sim.connections == 1
            from test_bridge_more import read_retained

            seen = await read_retained(other.port, {"waiting-room/opd-1/patients"})
            assert seen["waiting-room/opd-1/patients"] == "5"
    finally:
        other.stop()


# -- the state file ------------------------------------------------------------------------------


async def test_restart_shows_last_values_marked_stale(broker, watcher, tmp_path):
    state_dir = tmp_path / "state"
    async with Simulator(rooms=("opd-1", "lab"), token="test-token", initial_patients={"opd-1": 5, "lab": 2}) as sim:
        async with running(make_config(sim.url, broker.port, state_dir=str(state_dir))) as app:
            await watcher.wait_topic("waiting-room/lab/patients", "2")
            await wait_store(app, lambda: app.state_file.writes >= 1)
        saved = {s.room: s.patients for s in load(state_dir / FILE_NAME)}
        assert saved == {"opd-1": 5, "lab": 2}
    # The upstream is gone now: a restart must still show the last values, stale.
    async with running(make_config("ws://127.0.0.1:9/", broker.port, state_dir=str(state_dir))) as app:
        await wait_store(app, lambda: app.store.rooms["lab"].patients == 2)
        assert app.store.rooms["lab"].stale
        await watcher.wait_for(lambda: json.loads(watcher.last["waiting-room/lab/state"])
                               == {**json.loads(watcher.last["waiting-room/lab/state"]), "stale": True,
                                   "patients": 2})


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 1}', b"\x00\xff", b'{"version": 99, "saved_at": 0, "rooms": {}}'])
async def test_corrupt_state_file_is_survived(broker, tmp_path, content, caplog):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / FILE_NAME).write_bytes(content)
    async with running(make_config("ws://127.0.0.1:9/", broker.port, state_dir=str(state_dir))) as app:
        assert app.store.rooms["lab"].patients is None
    assert any("state file" in r.getMessage() for r in caplog.records)


def test_state_directory_from_systemd(monkeypatch):
    from waiting_room.statefile import state_directory

    assert state_directory(None, {"STATE_DIRECTORY": "/var/lib/waiting-room:/other"}) == Path("/var/lib/waiting-room")
    assert state_directory("/srv/x", {"STATE_DIRECTORY": "/var/lib/waiting-room"}) == Path("/srv/x")
    assert state_directory(None, {}) is None


def test_log_handler_follows_journal_stream(monkeypatch):
    import logging
    import sys

    from waiting_room import systemd as sd

    st = os.fstat(sys.stderr.fileno())
    plain = sd.log_handler({})
    assert isinstance(plain, logging.StreamHandler)
    record = logging.LogRecord("waiting_room.upstream", logging.WARNING, __file__, 1, "lost", (), None)
    assert not plain.format(record).startswith("<")
    monkeypatch.setattr(sd, "_sd_journal", None)
    journal = sd.log_handler({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert journal.format(record) == "<4>waiting_room.upstream: lost"  # priority for journald
    other = sd.log_handler({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})  # inherited, not ours
    assert not other.format(record).startswith("<")
