"""The ``display.command`` driver with real programs: a slow sign, a failing one, a hung one."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from browser import http_get, serving
from conftest import eventually, make_config, running, wait_store
from waiting_room.config import DisplayConfig, RoomConfig
from waiting_room.display.signs import SignValues, command_argv
from waiting_room.model import LinkStatus
from waiting_room.store import RoomStore

SLOW_SIGN = """\
import os, sys, time
out, room, patients, serving, state = sys.argv[1:6]
lock = os.path.join(out, room + ".lock")
try:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)
except FileExistsError:
    open(os.path.join(out, "OVERLAP"), "a").write(room + "\\n")
    raise
time.sleep(0.15)
with open(os.path.join(out, room + ".log"), "a") as log:
    log.write(f"{patients}|{serving}|{state}\\n")
os.close(fd)
os.remove(lock)
"""

FAILING_SIGN = """\
import sys
print("sign: serial port /dev/ttyUSB0 not found", file=sys.stderr)
sys.exit(3)
"""

HUNG_SIGN = """\
import os, subprocess, sys, time
out = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(os.path.join(out, "pids"), "a") as f:
    f.write(f"{os.getpid()} {child.pid}\\n")
time.sleep(60)
"""


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_arguments_are_substituted_one_by_one_without_a_shell():
    values = SignValues(name="OPD 1", patients="7", now_serving="$(reboot); A-1", state="live")
    argv = command_argv(["/bin/sign", "--room={room}", "{patients}", "{now_serving}", "{state}", "{other}", "{name}"],
                        "opd-1", values)
    assert argv == ["/bin/sign", "--room=opd-1", "7", "$(reboot); A-1", "live", "{other}", "OPD 1"]


async def test_slow_sign_gets_the_latest_value_never_a_backlog(sim, broker, tmp_path):
    out = tmp_path / "sign"
    out.mkdir()
    command = [sys.executable, script(tmp_path, "sign.py", SLOW_SIGN), str(out), "{room}", "{patients}",
               "{now_serving}", "{state}"]
    config = make_config(sim.url, broker.port, display={"enabled": False, "command": command, "command_timeout": 5})
    async with running(config) as app:
        svc = app.display  # signs only: App runs the display service for its command
        await eventually(lambda: lines(out / "opd-1.log")[-1:] and lines(out / "opd-1.log")[-1].startswith("5|"),
                         what="the first value on the sign")
        updates = 40
        for n in range(1, updates + 1):
            sim.set_queue("opd-1", 100 + n, now_serving=f"A-{n}")
            await wait_store(app, lambda n=n: app.store.rooms["opd-1"].patients == 100 + n)
        await eventually(lambda: lines(out / "opd-1.log")[-1:] == [f"{100 + updates}|A-{updates}|live"],
                         what="the sign to show the last value")
        shown = lines(out / "opd-1.log")
        # Every run showed a value the room really had, in order, and far fewer runs than updates.
        counts = [int(line.split("|")[0]) for line in shown if line.split("|")[0]]
        assert counts == sorted(counts)
        assert len([c for c in counts if c > 100]) <= updates // 3, shown
        assert not (out / "OVERLAP").exists()
        assert lines(out / "lab.log")[-1].startswith("2|")
        assert svc.signs.failures == 0 and svc.signs.runs == len(shown) + len(lines(out / "lab.log"))

        # Upstream lost: the sign is told "paused" (and keeps its number).
        await sim.stop()
        await eventually(lambda: lines(out / "opd-1.log")[-1].endswith("|paused"), what="paused on the sign")
        assert lines(out / "opd-1.log")[-1] == f"{100 + updates}|A-{updates}|paused"


async def test_failing_and_hung_signs_are_counted_and_never_hold_the_daemon(sim, broker, watcher, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="waiting_room.display.signs")
    failing = [sys.executable, script(tmp_path, "fail.py", FAILING_SIGN), "{room}", "{patients}"]
    rooms = [{"id": "opd-1", "name": "OPD 1"}, {"id": "lab", "name": "Laboratory"}]
    config = make_config(sim.url, broker.port, rooms=rooms,
                         display={"listen": "127.0.0.1:0", "command": failing, "command_timeout": 2})
    async with running(config) as app:
        svc = app.display
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        for n in range(1, 9):
            sim.set_queue("opd-1", n)
            await watcher.wait_topic("waiting-room/opd-1/patients", str(n))  # MQTT unaffected
        await eventually(lambda: svc.signs.failures >= 6 and svc.signs.running == 0, what="failures counted")
        status, _, body = await http_get(svc.port, "/healthz")
        doc = json.loads(body)
        assert status == 200, doc
        assert doc["signs"]["failures"] == svc.signs.failures and doc["signs"]["runs"] == svc.signs.runs
        warnings = [r for r in caplog.records if r.name == "waiting_room.display.signs"]
        # Logged, but rate-limited: one line now, a summary later, not one per failure.
        assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]
        assert "exited with status 3: sign: serial port /dev/ttyUSB0 not found" in warnings[0].getMessage()

    # A sign that hangs is killed at the timeout, with everything it started.
    out = tmp_path / "hung"
    out.mkdir()
    hung = [sys.executable, script(tmp_path, "hung.py", HUNG_SIGN), str(out)]
    config = make_config(sim.url, broker.port, rooms=rooms[:1],
                         display={"enabled": False, "command": hung, "command_timeout": 0.3})
    async with running(config) as app:
        svc = app.display
        await eventually(lambda: svc.signs.timeouts >= 1 and svc.signs.running == 0, what="a timeout")
        pids = [int(p) for p in lines(out / "pids")[0].split()]
        await eventually(lambda: not any(alive(p) for p in pids), timeout=5, what="the hung sign killed")
        sim.set_queue("opd-1", 77)
        await wait_store(app, lambda: app.store.rooms["opd-1"].patients == 77)
        await eventually(lambda: svc.signs.timeouts >= 2, what="the next value tried too")
        assert app.store.link.status is LinkStatus.CONNECTED


async def test_missing_sign_program_is_counted_not_fatal():
    store = RoomStore([("opd-1", "OPD 1")])
    cfg = DisplayConfig(enabled=False, command=["/nonexistent/sign", "{patients}"], command_timeout=1)
    async with serving(cfg, [RoomConfig(id="opd-1")], store, required_components=()) as svc:
        await eventually(lambda: svc.signs.failures == 1, what="the first failure")
        store.apply_queue("opd-1", 4)
        await eventually(lambda: svc.signs.failures == 2, what="the next change tried again")
        assert svc.port is None and svc.ready.is_set()


async def test_stopping_the_daemon_kills_a_running_sign(tmp_path):
    out = tmp_path / "hung"
    out.mkdir()
    store = RoomStore([("opd-1", "OPD 1")])
    cfg = DisplayConfig(enabled=False, command=[sys.executable, script(tmp_path, "hung.py", HUNG_SIGN), str(out)],
                        command_timeout=60)
    async with serving(cfg, [RoomConfig(id="opd-1")], store) as svc:
        await eventually(lambda: lines(out / "pids"), what="the sign started")
        assert svc.signs.running == 1
    pids = [int(p) for p in lines(out / "pids")[0].split()]
    await eventually(lambda: not any(alive(p) for p in pids), timeout=5, what="the sign killed on stop")
