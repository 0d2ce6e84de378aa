"""End to end under a real systemd: a Debian 12 container (tests/nspawn.py), the daemon
installed the way the README tells users (`scripts/install`), talking to a simulator and a
mosquitto on the host's loopback (the container shares the host's network).

What a user would check, in order: the install (user, venv, units, config 0640, token 0600,
enabled, idempotent); `systemctl start` and a live STATUS line in `systemctl status`; the
token handed over as a systemd credential; `systemctl reload` with an edited room list on
the same socket; an invalid config refused on reload; the journal's structured fields;
`kill -STOP` restarted by the watchdog; `waiting-room status`; a clean `systemctl stop`.

Needs root, Linux, systemd-nspawn, debootstrap (scripts/install-systemd-test-deps installs
them) and, once, the network for debootstrap and the dependency wheels. Anything missing
skips with the reason, and fails when CI=true. Python packages are installed in the
container from wheels built on the host (no index); WAITING_ROOM_E2E_FROM_PYPI=1 installs
from PyPI instead, exactly as a connected user's machine does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest
import yaml

import nspawn
from conftest import ROOT, Broker, free_port

pytestmark = pytest.mark.timeout(900)

T = TypeVar("T")
UNIT = "waiting-room.service"
TOKEN = "e2e-token-5f1c"
FROM_PYPI = os.environ.get("WAITING_ROOM_E2E_FROM_PYPI", "") not in ("", "0")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: the end-to-end systemd test must run here)")
    pytest.skip(reason)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = nspawn.requirements()
    if why and os.geteuid() == 0 and sys.platform == "linux":
        subprocess.run([str(ROOT / "scripts" / "install-systemd-test-deps")], check=False,
                       stdout=subprocess.DEVNULL, timeout=900)
        why = nspawn.requirements()
    if why:
        _unavailable(f"no container: {why}")
    log = tmp_path_factory.mktemp("debootstrap") / "debootstrap.log"
    try:
        return nspawn.ensure_root(log)
    except (nspawn.ContainerError, OSError, subprocess.SubprocessError) as exc:
        _unavailable(f"could not build the Debian 12 root: {exc}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def dependency_wheels() -> Path | None:
    """Wheels of the daemon's dependencies and of its build backend, built on the host once
    (cached beside the Debian root): the container installs from them without an index."""
    if FROM_PYPI:
        return None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wants = sorted(project["project"]["dependencies"]) + sorted(project["build-system"]["requires"])
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{os.uname().machine}"
    key = hashlib.sha256(("\n".join(wants) + tag).encode()).hexdigest()[:12]
    dest = nspawn.CACHE / f"wheels-{key}"
    if dest.is_dir():
        return dest
    nspawn.CACHE.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".wheels-", dir=nspawn.CACHE))
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                               "-w", str(build), *wants], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            _unavailable(f"pip wheel of the dependencies failed: {done.stderr[-1500:]}")
        os.rename(build, dest)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return dest


class SimulatorProcess:
    """`waiting-room simulate` on the host's loopback, with its token in a file."""

    def __init__(self, tmp: Path, rooms: str) -> None:
        token_file = tmp / "sim-token"
        token_file.write_text(TOKEN + "\n")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "waiting_room", "simulate", "--host", "127.0.0.1", "--port", str(self.port),
             "--rooms", rooms, "--token-file", str(token_file), "--tick", "1", "--heartbeat", "5", "--seed", "7"],
            stdout=subprocess.PIPE, stderr=open(tmp / "simulator.log", "wb"), text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "daemon")}, start_new_session=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.stop()
            raise AssertionError(f"simulator did not start: {line!r} {(tmp / 'simulator.log').read_text()}")
        self.url = line.split("listening on ", 1)[1].split()[0]

    def control(self, action: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/control/{action}", timeout=5) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def host_services(tmp: Path) -> Iterator[tuple[SimulatorProcess, Broker]]:
    broker = Broker(tmp)
    broker.start()
    try:
        sim = SimulatorProcess(tmp, "opd-1,lab,xray")
        try:
            yield sim, broker
        finally:
            sim.stop()
    finally:
        broker.stop()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def mqtt_retained(broker: Broker, topic: str) -> str | None:
    exe = shutil.which("mosquitto_sub")
    if exe is None:
        pytest.fail("mosquitto_sub is not installed: run scripts/setup, which installs mosquitto-clients")
    done = subprocess.run([exe, "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, "-C", "1", "-W", "3"],
                          capture_output=True, text=True, timeout=10)
    return done.stdout.strip() if done.returncode == 0 else None


def journal(c: nspawn.Container, *args: str) -> list[dict[str, object]]:
    out = c.run(["journalctl", "-u", UNIT, "-o", "json", "--no-pager", *args]).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def config_text(sim: SimulatorProcess, broker: Broker, display_port: int, rooms: list[dict[str, str]]) -> str:
    return yaml.safe_dump({
        "upstream": {"url": sim.url, "token_credential": "upstream-token",
                     "backoff": {"initial": 0.2, "max": 1}, "stable_after": 1},
        "rooms": rooms,
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": "wr-e2e"},
        "display": {"enabled": True, "listen": f"127.0.0.1:{display_port}"},
    }, sort_keys=False)



# ---------------------------------------------------------------------------- the test


def test_service_under_real_systemd(debian_root: Path, dependency_wheels: Path | None, tmp_path: Path):
    started = time.monotonic()
    binds = [(str(ROOT), "/src")]
    if dependency_wheels is not None:
        binds.append((str(dependency_wheels), "/wheels"))
    else:  # a TLS-inspecting proxy's CA, if the host trusts one, as a site would install it
        binds.append(("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs/ca-certificates.crt"))
    display_port = free_port()

    with host_services(tmp_path) as (sim, broker), nspawn.Container(
        debian_root, name=f"wr-e2e-{os.getpid()}", binds=binds, log=tmp_path / "container.log",
    ) as c, nspawn.reporting(c, UNIT, started) as timings:
        # The host's loopback is the container's: the simulator and the broker are there.
        for port in (sim.port, broker.port):
            c.run(["python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 3)"])

        # -- install, as the README says: from the checkout, as root -------------------
        t = time.monotonic()
        env = {"WAITING_ROOM_WHEELS": "/wheels"} if dependency_wheels else {}
        out = c.run(["/src/scripts/install"], env=env, timeout=600).stdout
        timings["install"] = time.monotonic() - t
        assert "with systemd-python" in out, out
        assert c.run(["id", "-u", "waiting-room"]).stdout.strip() != "0"
        stat = c.run(["stat", "-c", "%a %U:%G", "/etc/waiting-room/config.yaml",
                      "/etc/waiting-room/upstream-token", "/etc/waiting-room"]).stdout.split("\n")
        assert stat[:3] == ["640 root:waiting-room", "600 root:root", "750 root:waiting-room"], stat
        assert c.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"
        assert c.run(["waiting-room", "check", "--config", "/etc/waiting-room/config.yaml"]).returncode == 0
        assert c.run(["cmp", "/src/systemd/waiting-room.service",
                      f"/etc/systemd/system/{UNIT}"]).returncode == 0

        # -- configure, as an operator would; the token as a systemd credential --------
        rooms = [{"id": "opd-1", "name": "OPD 1"}, {"id": "lab", "name": "Laboratory"}]
        c.write("/etc/waiting-room/config.yaml", config_text(sim, broker, display_port, rooms),
                mode="0640", owner="root:waiting-room")
        c.write("/etc/waiting-room/upstream-token", TOKEN + "\n", mode="0600")
        # Idempotent: a second run keeps the operator's config and token.
        c.run(["/src/scripts/install"], env=env, timeout=600)
        assert TOKEN in c.run(["cat", "/etc/waiting-room/upstream-token"]).stdout
        assert "token_credential: upstream-token" in c.run(["cat", "/etc/waiting-room/config.yaml"]).stdout
        # The test's only change to the unit: a short watchdog, so kill -STOP is seen fast.
        c.write(f"/etc/systemd/system/{UNIT}.d/e2e.conf", "[Service]\nWatchdogSec=3s\nLimitCORE=0\n")
        c.run(["systemctl", "daemon-reload"])

        # -- start: READY, then a live STATUS line -------------------------------------
        t = time.monotonic()
        c.run(["systemctl", "start", UNIT], timeout=60)  # Type=notify: returns on READY=1
        timings["start"] = time.monotonic() - t
        wait_for("STATUS upstream connected",
                 lambda: "upstream connected" in c.show(UNIT, "StatusText")["StatusText"])
        status = c.run(["systemctl", "status", UNIT, "--no-pager", "-l"]).stdout
        assert "Active: active (running)" in status, status
        assert 'Status: "upstream connected' in status, status
        props = c.show(UNIT, "MainPID", "NRestarts", "User", "StatusText")
        pid = props["MainPID"]
        assert props["User"] == "waiting-room"
        assert "2 rooms" in props["StatusText"], props
        wait_for("opd-1 on MQTT", lambda: mqtt_retained(broker, "waiting-room/opd-1/patients"))
        assert mqtt_retained(broker, "waiting-room/upstream") == "connected"
        # The process runs as the unprivileged service user.
        assert c.run(["ps", "-o", "user=", "-p", pid]).stdout.strip() == "waiting-room"

        # -- reload with an edited room list: same process, same socket ----------------
        before = sim.control("state")
        assert before["active"] == 1, before
        rooms = [{"id": "opd-1", "name": "OPD 1"}, {"id": "xray", "name": "X-ray"}]
        c.write("/etc/waiting-room/config.yaml", config_text(sim, broker, display_port, rooms),
                mode="0640", owner="root:waiting-room")
        c.run(["systemctl", "reload", UNIT], timeout=30)
        after = wait_for("xray joined and lab left",
                         lambda: (s := sim.control("state"))["joins"] > before["joins"]
                         and s["leaves"] > before["leaves"] and s)
        assert after["connections"] == before["connections"], (before, after)
        assert after["handshakes"] == before["handshakes"], (before, after)
        wait_for("xray on MQTT", lambda: mqtt_retained(broker, "waiting-room/xray/patients"))
        props = c.show(UNIT, "MainPID", "NRestarts", "ActiveState")
        assert (props["MainPID"], props["NRestarts"], props["ActiveState"]) == (pid, "0", "active"), props

        # -- an invalid config is refused; the running one stays -----------------------
        good = c.run(["cat", "/etc/waiting-room/config.yaml"]).stdout
        c.write("/etc/waiting-room/config.yaml", good + "bogus_key: 1\n", mode="0640", owner="root:waiting-room")
        c.run(["systemctl", "reload", UNIT], timeout=30)
        refused = wait_for("the refusal in the journal", lambda: [
            e for e in journal(c, "--since=-1min") if "bogus_key" in str(e.get("MESSAGE", ""))])
        assert int(str(refused[-1]["PRIORITY"])) <= 4, refused[-1]  # warning or worse
        props = c.show(UNIT, "MainPID", "ActiveState", "StatusText")
        assert (props["MainPID"], props["ActiveState"]) == (pid, "active"), props
        assert "refused" in props["StatusText"], props
        assert sim.control("state")["connections"] == before["connections"]
        c.write("/etc/waiting-room/config.yaml", good, mode="0640", owner="root:waiting-room")
        c.run(["systemctl", "reload", UNIT], timeout=30)
        wait_for("the refusal cleared from STATUS",
                 lambda: "refused" not in c.show(UNIT, "StatusText")["StatusText"])

        # -- waiting-room status, from the display service's health endpoint ----------
        done = c.run(["waiting-room", "status", "--url", f"http://127.0.0.1:{display_port}"], check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "connected" in done.stdout, done.stdout
        # On the machine, as root, the config says where the display listens.
        done = c.run(["waiting-room", "status", "--config", "/etc/waiting-room/config.yaml"], check=False)
        assert done.returncode == 0 and f"127.0.0.1:{display_port}" in done.stdout, done.stdout + done.stderr
        print(done.stdout)

        # -- the journal has structured fields -----------------------------------------
        sim.control("close?code=4000")
        entries = wait_for("a CLOSE_CODE=4000 journal entry", lambda: [
            e for e in journal(c) if str(e.get("CLOSE_CODE")) == "4000"])
        assert entries[-1].get("SYSLOG_IDENTIFIER") == "waiting-room", entries[-1]
        wait_for("reconnected after 4000", lambda: sim.control("state")["active"] == 1)
        # A room the server does not know is refused: its entry names it with ROOM=.
        c.write("/etc/waiting-room/config.yaml",
                config_text(sim, broker, display_port, [*rooms, {"id": "ghost", "name": "Ghost"}]),
                mode="0640", owner="root:waiting-room")
        c.run(["systemctl", "reload", UNIT], timeout=30)
        ghost = wait_for("a ROOM=ghost journal entry", lambda: [
            e for e in journal(c, "ROOM=ghost")])
        assert ghost[-1].get("SYSLOG_IDENTIFIER") == "waiting-room", ghost[-1]
        c.write("/etc/waiting-room/config.yaml", good, mode="0640", owner="root:waiting-room")
        c.run(["systemctl", "reload", UNIT], timeout=30)

        # -- systemctl status tells the truth when the feed is down, and when it is back -
        sim.control("refuse?status=503")
        sim.control("close?code=1001")
        down = wait_for("STATUS saying the upstream is down", lambda: (
            text := c.show(UNIT, "StatusText")["StatusText"]) and "upstream connected" not in text and text)
        print("STATUS while the feed is down:", down)
        assert "upstream" in down, down
        assert "Status:" in c.run(["systemctl", "status", UNIT, "--no-pager"]).stdout
        sim.control("refuse?status=0")
        wait_for("STATUS upstream connected again",
                 lambda: "upstream connected" in c.show(UNIT, "StatusText")["StatusText"])

        # -- a hung daemon is restarted by the watchdog ---------------------------------
        t = time.monotonic()
        c.run(["kill", "-STOP", pid])
        new = wait_for("a new main PID after the watchdog", lambda: (
            p := c.show(UNIT, "MainPID", "NRestarts", "ActiveState"))["MainPID"] not in ("0", pid)
            and p["ActiveState"] == "active" and p, timeout=40)
        timings["watchdog restart"] = time.monotonic() - t
        assert int(new["NRestarts"]) >= 1, new
        messages = [str(e.get("MESSAGE", "")) for e in journal(c, "--since=-2min")]
        assert any("Watchdog timeout" in m for m in messages), messages[-20:]
        wait_for("STATUS upstream connected after the restart",
                 lambda: "upstream connected" in c.show(UNIT, "StatusText")["StatusText"])
        assert c.run(["sh", "-c", "ls /var/lib/waiting-room"]).stdout.strip(), "no state file"

        # -- a clean stop: STOPPING, the socket closed, offline on MQTT -----------------
        t = time.monotonic()
        c.run(["systemctl", "stop", UNIT], timeout=30)
        timings["stop"] = time.monotonic() - t
        props = c.show(UNIT, "Result", "ExecMainStatus", "ActiveState")
        assert props == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}, props
        assert timings["stop"] < 5, timings
        assert mqtt_retained(broker, "waiting-room/status") == "offline"
        assert not any(TOKEN in json.dumps(e) for e in journal(c)), "the token reached the journal"

        # -- without systemd-python: raw notify datagrams, "<N>"-prefixed journal lines --
        c.run(["dpkg", "--purge", "python3-systemd"])
        assert c.run(["/opt/waiting-room/venv/bin/python", "-c", "import systemd"], check=False).returncode
        since = c.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
        c.run(["systemctl", "start", UNIT], timeout=60)
        wait_for("STATUS upstream connected without systemd-python",
                 lambda: "upstream connected" in c.show(UNIT, "StatusText")["StatusText"])
        sim.control("close?code=4000")
        lines = wait_for("a warning about the close, without systemd-python", lambda: [
            e for e in journal(c, f"--since={since}", "_TRANSPORT=stdout")
            if "4000" in str(e.get("MESSAGE", ""))])
        assert str(lines[-1]["PRIORITY"]) == "4" and not str(lines[-1]["MESSAGE"]).startswith("<"), lines[-1]
        c.run(["systemctl", "stop", UNIT], timeout=30)
        assert c.show(UNIT, "Result")["Result"] == "success"
