"""The daemon as an operator runs it: a real process, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import yaml
from conftest import ROOT, daemon_command


def write_config(tmp_path, sim, broker, **extra) -> str:
    token_file = tmp_path / "token"
    token_file.write_text("test-token\n")
    token_file.chmod(0o600)
    data = {
        "upstream": {"url": sim.url, "token_file": str(token_file), "backoff": {"initial": "50ms", "max": "300ms"}},
        "rooms": [{"id": "opd-1", "name": "OPD 1"}, {"id": "lab", "name": "Laboratory"}],
        "mqtt": {"port": broker.port, "client_id": "wr-proc"},
        "display": {"enabled": False},
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


async def start_daemon(config: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    return await asyncio.create_subprocess_exec(
        *daemon_command("run", "--config", config),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )


async def test_sigterm_stops_cleanly_within_two_seconds(sim, broker, watcher, tmp_path):
    proc = await start_daemon(write_config(tmp_path, sim, broker))
    await watcher.wait_topic("waiting-room/opd-1/patients", "5")
    await watcher.wait_topic("waiting-room/status", "online")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(5):
        _, err = await proc.communicate()
    assert time.monotonic() - started < 2.0
    assert proc.returncode == 0
    assert b"Traceback" not in err
    assert b"test-token" not in err
    await watcher.wait_topic("waiting-room/status", "offline")
    await sim.wait_until(lambda: sim.close_codes == [1000])


async def test_sigint_stops_cleanly(sim, broker, watcher, tmp_path):
    proc = await start_daemon(write_config(tmp_path, sim, broker))
    await watcher.wait_topic("waiting-room/upstream", "connected")
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(5):
        _, err = await proc.communicate()
    assert proc.returncode == 0 and b"Traceback" not in err


async def test_killed_daemon_shows_offline_through_its_will(sim, broker, watcher, tmp_path):
    proc = await start_daemon(write_config(tmp_path, sim, broker, mqtt={"port": broker.port, "client_id": "wr-proc", "keepalive": 5}))
    await watcher.wait_topic("waiting-room/status", "online")
    await watcher.wait_topic("waiting-room/opd-1/patients", "5")
    proc.kill()  # SIGKILL: no chance to say goodbye; the broker publishes the will
    await proc.wait()
    await watcher.wait_topic("waiting-room/status", "offline", timeout=10)


async def test_stopped_daemon_shows_offline_within_15_s_by_default_and_comes_back(sim, broker, watcher, tmp_path):
    # A hung daemon (SIGSTOP, or a loop blocked for good) sends no MQTT keepalive: with the
    # default keepalive (5 s) the broker publishes the will after 1.5 x 5 s (mosquitto 2.0
    # looks every 5-6 s: 13 s at worst).
    proc = await start_daemon(write_config(tmp_path, sim, broker))
    try:
        await watcher.wait_topic("waiting-room/status", "online")
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        proc.send_signal(signal.SIGSTOP)
        await watcher.wait_topic("waiting-room/status", "offline", timeout=15)
        proc.send_signal(signal.SIGCONT)
        await watcher.wait_topic("waiting-room/status", "online", timeout=15)
        sim.set_queue("opd-1", 8)
        await watcher.wait_topic("waiting-room/opd-1/patients", "8")
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        await proc.wait()


async def test_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("upstream:\n  url: ws://x/\n  token: t\n  backoff: {max: ten}\nrooms: [{id: a}]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    done = subprocess.run(daemon_command("run", "--config", str(bad)), capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f'{bad}: upstream.backoff.max: expected a number > 0 (seconds, or a string like "10s" or "500ms"), got "ten"']


async def test_example_config_is_valid():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    done = subprocess.run(daemon_command("check", "--config", str(ROOT / "config" / "example.yaml")),
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr


async def test_status_command_summarises_a_running_daemon(sim, broker, watcher):
    from conftest import make_config, running

    config = make_config(sim.url, broker.port, display={"listen": "127.0.0.1:0"})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    async with running(config) as app:
        await watcher.wait_topic("waiting-room/upstream", "connected")
        await watcher.wait_topic("waiting-room/status", "online")
        url = f"http://127.0.0.1:{app.display.port}"
        proc = await asyncio.create_subprocess_exec(*daemon_command("status", "--url", url), env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out
        text = out.decode()
        assert f"waiting-room at {url}: healthy" in text
        assert "upstream: connected" in text and "mqtt: connected" in text and "rooms: 2" in text
        await sim.stop()
        await watcher.wait_topic("waiting-room/upstream", "disconnected")
        proc = await asyncio.create_subprocess_exec(*daemon_command("status", "--url", url), env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 1 and "UNHEALTHY" in out.decode()
    proc = await asyncio.create_subprocess_exec(*daemon_command("status", "--url", url), env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 3 and b"unreachable" in err


async def test_the_daemon_runs_on_uvloop_and_a_sighup_reloads(sim, broker, watcher, tmp_path):
    # The run command's loop (cli.event_loop_factory): uvloop, a dependency. Its signal
    # handlers, the paho socket's add_reader/add_writer, to_thread and the fast paths work on it.
    config = write_config(tmp_path, sim, broker, rooms=[{"id": "opd-1", "name": "OPD 1"}])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    proc = await asyncio.create_subprocess_exec(
        *daemon_command("run", "--config", config, "--log-level", "debug"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        sim.set_queue("opd-1", 9)
        await watcher.wait_topic("waiting-room/opd-1/patients", "9")
        write_config(tmp_path, sim, broker)  # adds the lab
        proc.send_signal(signal.SIGHUP)
        await watcher.wait_topic("waiting-room/lab/patients", "2")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode()
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]
    assert "event loop: uvloop" in text, text[-3000:]
    assert "reload: rooms added" in text, text[-3000:]


def test_without_uvloop_the_standard_event_loop_runs(monkeypatch, caplog):
    import logging
    import sys

    from waiting_room.cli import event_loop_factory

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    with caplog.at_level(logging.DEBUG, logger="waiting_room.cli"):
        assert event_loop_factory() is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "standard asyncio event loop" in caplog.text
