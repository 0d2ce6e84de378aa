"""``bench/chaos``: random faults, together and apart, against the real parts; invariants after each.

The daemon runs as a separate process (as systemd runs it), between the project's simulator
(behind a TCP proxy of ours that can stall, delay and cut), a private mosquitto (restarted with
and without persistence), display clients that read the pages' WebSocket as a kiosk would, and
a state directory on a small tmpfs that can be filled up (root only). A seeded generator picks
each round's faults (one to three, on different parts) and their parameters, so a failing seed
replays the same run.

After every round the surfaces must agree with the simulator's truth within a recovery window:
each room's retained ``patients`` and ``state`` on MQTT, what every screen shows, ``/healthz``
and (after a full disk) the state file. During faults that kill the link, every surface must say
so within the detection bound. Connection attempts stay within the backoff's bound, the daemon's
RSS, descriptors and tasks stay bounded, and its log holds no traceback.

    bench/chaos --seed 7 --faults 40            # CI's short run
    bench/chaos --seed 1 --faults 1000          # the long run
    bench/chaos --seed 2 --duration 3600        # the soak: an hour of traffic with faults
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiomqtt
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from testsupport import ROOT, Broker, Daemon, free_port, http_get, memory_kb, open_fds
from waiting_room.simulator import SNAPSHOT_PATH, WS_PATH, Simulator
from waiting_room.statefile import FILE_NAME
from waiting_room.statefile import load as load_state_file

BASE = "chaos"
ROOMS = ("opd-1", "opd-2", "lab", "xray", "pharmacy", "er")
TOGGLED_ROOM = "er"  # valid reloads take it out of the config and put it back
TOKEN = "chaos-token-0"
# Chaos settings, small so that a fault's recovery takes seconds (the bounds scale with them).
BACKOFF_MAX = 2.0
PING_INTERVAL, PING_TIMEOUT = 1.0, 1.0
KEEPALIVE = 2
DETECTION_BOUND = PING_INTERVAL + PING_TIMEOUT + 1.5  # + one watchdog pass and the publish
# mosquitto 2.0 looks at keepalives every 5-6 s, on top of 1.5 x keepalive.
WILL_BOUND = 1.5 * KEEPALIVE + 6.5
FALLBACK_AFTER, FALLBACK_INTERVAL = 2.0, 1.0  # polling the snapshot while no socket is joined
RECOVERY_LIMIT = 30.0
STATE_FILE_LIMIT = 15.0  # the state file is written at most every 5 s
RSS_LIMIT_KB = 150_000
FDS_LIMIT = 120
TASKS_LIMIT = 150
SCREENS = 3
PER_ADDRESS = 40
BAD_LOG_MARKERS = ("Traceback", "Task exception was never retrieved", "Exception in callback",
                   "exception was never retrieved")


def daemon_config(proxy_port: int, broker_port: int, display_port: int, state_dir: Path,
                  token_file: Path, rooms: tuple[str, ...] = ROOMS) -> dict[str, Any]:
    return {
        "upstream": {
            "url": f"ws://127.0.0.1:{proxy_port}{WS_PATH}",
            "token_file": str(token_file),
            "backoff": {"initial": 0.2, "max": BACKOFF_MAX},
            "stable_after": 2,
            "connect_timeout": 2,
            "ping_interval": PING_INTERVAL,
            "ping_timeout": PING_TIMEOUT,
            "token_check": 0.5,
            "room_retry": 2,
            # Through the proxy too: a dead link starves the polls as well.
            "fallback": {"url": f"http://127.0.0.1:{proxy_port}{SNAPSHOT_PATH}",
                         "interval": FALLBACK_INTERVAL, "after": FALLBACK_AFTER},
        },
        "rooms": [{"id": r, "name": r.upper()} for r in rooms],
        "mqtt": {"port": broker_port, "base_topic": BASE, "client_id": "chaos-daemon",
                 "keepalive": KEEPALIVE, "backoff": {"initial": 0.2, "max": 1}},
        "display": {"listen": f"127.0.0.1:{display_port}", "heartbeat": 1,
                    "max_clients": 100, "max_clients_per_address": PER_ADDRESS},
        "state_dir": str(state_dir),
        "log_level": "info",
    }


# -- the parts between the daemon and the world ---------------------------------------------


class Proxy:
    """A TCP proxy between the daemon and the server that can stall, delay and cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delay = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._cut_mid_frame = False
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self._tg: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            try:
                await asyncio.Future()
            finally:
                self._server.close()
                self.cut()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._tg is not None
        self._tg.create_task(self._serve(reader, writer))

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(2):
                server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except (OSError, TimeoutError):
            client_w.transport.abort()
            return
        pair = (client_w, server_w)
        self._pairs.add(pair)
        try:
            pumps = [asyncio.create_task(self._pump(client_r, server_w, False)),
                     asyncio.create_task(self._pump(server_r, client_w, True))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._pairs.discard(pair)
            client_w.transport.abort()
            server_w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, downstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()  # a stall holds the data: a frozen middlebox
                if self.delay:
                    await asyncio.sleep(self.delay)
                if downstream and self._cut_mid_frame and len(data) > 1:
                    writer.write(data[: len(data) // 2])  # half a frame, then the wire is gone
                    self.cut()
                    return
                writer.write(data)
                await writer.drain()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Every connection dropped without a close frame (1006)."""
        self._cut_mid_frame = False
        for client_w, server_w in list(self._pairs):
            client_w.transport.abort()
            server_w.transport.abort()

    def cut_mid_frame(self) -> None:
        """The next chunk towards the daemon arrives half, then the connection is gone."""
        self._cut_mid_frame = True


class Mirror:
    """What MQTT subscribers (Home Assistant) see: the retained state under the base topic,
    resubscribed after every broker restart, plus a timed history of the link topics."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.last: dict[str, str] = {}
        self.connected = False
        self.changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"chaos-mirror-{os.getpid()}",
                                          timeout=5) as client:
                    self.last.clear()  # what the broker holds now, not what it held before
                    await client.subscribe(f"{BASE}/#")
                    self.connected = True
                    async for message in client.messages:
                        payload = message.payload
                        text = payload.decode() if isinstance(payload, (bytes, bytearray)) else str(payload)
                        if text:
                            self.last[message.topic.value] = text
                        else:
                            self.last.pop(message.topic.value, None)
                        self.changed.set()
            except aiomqtt.MqttError:
                pass
            self.connected = False
            self.last.clear()
            await asyncio.sleep(0.2)

    def room_state(self, room: str) -> dict[str, Any] | None:
        text = self.last.get(f"{BASE}/{room}/state")
        return json.loads(text) if text else None

    def live(self, rooms: list[str]) -> bool:
        """Would Home Assistant show these numbers as live?"""
        if self.last.get(f"{BASE}/status") != "online" or self.last.get(f"{BASE}/upstream") != "connected":
            return False
        return any((s := self.room_state(r)) is not None and not s.get("stale") for r in rooms)


class Screen:
    """A kiosk page, reduced to what it shows: it reads the display's WebSocket like
    display.js does and reconnects by itself."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rooms: dict[str, dict[str, Any]] = {}
        self.link: str | None = None
        self.connected = False
        self.sessions = 0

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(5):
                    ws = await websockets.connect(self.url, open_timeout=3, close_timeout=1, ping_interval=None)
            except (OSError, TimeoutError, InvalidHandshake):
                await asyncio.sleep(0.3)
                continue
            self.sessions += 1
            try:
                while True:
                    # display.js shows "offline" when the heartbeats (1 s here) stop.
                    async with asyncio.timeout(3.5):
                        message = await ws.recv()
                    self.connected = True
                    self._apply(json.loads(message))
            except (ConnectionClosed, TimeoutError, OSError):
                pass
            finally:
                self.connected = False
                self.rooms.clear()
                self.link = None
                await ws.close()
            await asyncio.sleep(0.3)

    def _apply(self, frame: dict[str, Any]) -> None:
        if frame.get("type") != "state":
            return
        if "link" in frame:
            self.link = frame["link"]["status"]
        for room in frame.get("rooms", []):
            self.rooms[room["room"]] = room
        for room in frame.get("removed", []):
            self.rooms.pop(room, None)

    def live(self) -> bool:
        return self.connected and self.link == "connected" and any(not r["stale"] for r in self.rooms.values())


# -- a run ------------------------------------------------------------------------------------


@dataclass
class Round:
    number: int
    faults: list[str]
    details: list[str] = field(default_factory=list)
    recovery: float | None = None
    violations: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FaultKind:
    name: str
    part: str  # faults on the same part never overlap
    weight: int
    act: Callable[["Chaos", random.Random], Awaitable[str]]
    needs_root: bool = False


class Chaos:
    def __init__(self, workdir: Path, seed: int) -> None:
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        self.sim = Simulator(rooms=ROOMS, token=TOKEN, heartbeat=5, tick=0, seed=seed,
                             snapshot_poll=FALLBACK_INTERVAL)
        self.broker = Broker(workdir)
        self.display_port = free_port()
        self.state_dir = workdir / "state"
        self.state_dir.mkdir()
        self.tmpfs = False
        self.token_file = workdir / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        self.tokens = 0
        self.rooms = list(ROOMS)
        self.proxy: Proxy | None = None
        self.daemon: Daemon | None = None
        self.mirror: Mirror | None = None
        self.screens: list[Screen] = []
        self.traffic_on = asyncio.Event()
        self.rounds: list[Round] = []
        self.samples: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self._log_offset = 0
        self.log_lines = 0
        self.kinds = [k for k in FAULTS if not k.needs_root or self._mount_tmpfs()]
        self.current: Round | None = None
        # A stopped daemon cannot say anything but its will: honesty bounds stretch around it.
        self.stopped_at: float | None = None
        self.resumed_at: float | None = None
        self.kills = 0  # a check that needs the daemon up throughout looks at this

    # -- set-up ---------------------------------------------------------------------------

    def _mount_tmpfs(self) -> bool:
        """A 1 MiB tmpfs under the state file, so that a fault can fill the disk (root only)."""
        if self.tmpfs:
            return True
        if os.geteuid() != 0:
            return False
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "chaos-state", str(self.state_dir)],
                              capture_output=True, check=False)
        self.tmpfs = done.returncode == 0
        return self.tmpfs

    def config(self) -> dict[str, Any]:
        assert self.proxy is not None
        return daemon_config(self.proxy.port, self.broker.port, self.display_port, self.state_dir,
                             self.token_file, tuple(self.rooms))

    async def run(self, faults: int | None, duration: float | None) -> dict[str, Any]:
        self.broker.start()
        await self.sim.start()
        self.proxy = Proxy(self.sim.port)  # type: ignore[arg-type]
        try:
            async with asyncio.TaskGroup() as tg:
                self.mirror = Mirror(self.broker.port)
                self.daemon = Daemon(self.workdir, "daemon", self.config())
                self.daemon.start()
                url = f"ws://127.0.0.1:{self.display_port}/ws"
                self.screens = [Screen(url) for _ in range(SCREENS - 1)] + [Screen(f"{url}?room=lab")]
                parts = [self.proxy.run(), self.mirror.run(), self._traffic(), *(s.run() for s in self.screens)]
                background = [tg.create_task(part) for part in parts]
                try:
                    report = await self._rounds(faults, duration)
                finally:
                    for task in background:  # they run until the rounds are over
                        task.cancel()
            return report
        finally:
            if self.daemon is not None:
                self.daemon.stop()
            await self.sim.stop()
            self.broker.stop()
            if self.tmpfs:
                subprocess.run(["umount", "-l", str(self.state_dir)], check=False)

    async def _traffic(self) -> None:
        """Steady updates, ~10 per second; paused while the surfaces are compared."""
        rng = random.Random(self.seed + 1)
        ticket = 0
        while True:
            await self.traffic_on.wait()
            ticket += 1
            room = rng.choice(ROOMS)
            self.sim.set_queue(room, rng.randint(0, 60), f"{room[0].upper()}-{ticket % 1000}")
            await asyncio.sleep(0.1)

    # -- the rounds -----------------------------------------------------------------------

    async def _rounds(self, faults: int | None, duration: float | None) -> dict[str, Any]:
        started = time.monotonic()
        first = await self._settle(RECOVERY_LIMIT * 2, state_file=False)
        if first is None:
            raise RuntimeError(f"the daemon never came up: {self._problems()}\n{self.daemon.log_tail()}")  # type: ignore[union-attr]
        self._sample(0)
        await self.sample_tasks()
        injected = 0
        number = 0
        while (faults is None or injected < faults) and (duration is None or time.monotonic() - started < duration):
            number += 1
            chosen = self._choose()
            round_ = Round(number, [k.name for k in chosen])
            self.current = round_
            handshakes = self._attempts()
            self.traffic_on.set()
            t0 = time.monotonic()
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))  # traffic before the fault
            async with asyncio.TaskGroup() as tg:
                acts = [tg.create_task(k.act(self, random.Random(self.rng.random()))) for k in chosen]
            round_.details = [a.result() for a in acts]
            await asyncio.sleep(self.rng.uniform(0.0, 0.5))  # traffic after it
            round_.recovery = await self._settle(RECOVERY_LIMIT, state_file="disk_full" in round_.faults)
            elapsed = time.monotonic() - t0
            if round_.recovery is None:
                self._violate(f"not recovered within {RECOVERY_LIMIT:.0f} s: {'; '.join(self._problems()[:6])}")
                await self._repair()
            attempts = self._attempts() - handshakes
            allowed = 10 + 2 * elapsed / (BACKOFF_MAX / 2) * len(chosen)
            if attempts > allowed:
                self._violate(f"{attempts} connection attempts in {elapsed:.1f} s (bound {allowed:.0f})")
            self._scan_log()
            self._sample(number)
            await self.sample_tasks()
            injected += len(chosen)
            self.rounds.append(round_)
            mark = "ok" if not round_.violations else "VIOLATION"
            print(f"round {number:4d} {'+'.join(round_.faults):40s} recovered in "
                  f"{round_.recovery if round_.recovery is not None else float('nan'):5.2f} s  {mark}  "
                  f"{'; '.join(round_.details)[:90]}", flush=True)
        self.current = None
        # The end is a fault too: SIGTERM must stop it cleanly (exit 0, within 2 s), and what
        # it logs on the way out (unretrieved exceptions, say) counts like the rest.
        assert self.daemon is not None
        stopping = time.monotonic()
        code = await asyncio.to_thread(self.daemon.stop)
        took = time.monotonic() - stopping
        if code != 0 or took > 2.0:
            self._violate(f"SIGTERM at the end: exit {code} after {took:.1f} s")
        self._scan_log()
        return self._report(time.monotonic() - started)

    def _attempts(self) -> int:
        """Connection attempts the server (or the proxy in front of it) has seen."""
        return self.sim.handshakes + self.sim.upgrades_broken

    def _choose(self) -> list[FaultKind]:
        how_many = self.rng.choice((1, 1, 1, 2, 2, 3))
        chosen: list[FaultKind] = []
        for _ in range(how_many):
            free = [k for k in self.kinds if k.part not in {c.part for c in chosen}]
            if not free:
                break
            chosen.append(self.rng.choices(free, weights=[k.weight for k in free])[0])
        return chosen

    def _violate(self, text: str) -> None:
        where = f"round {self.current.number} ({'+'.join(self.current.faults)})" if self.current else "start or end"
        line = f"seed {self.seed}, {where}: {text}"
        if self.current is not None:
            self.current.violations.append(text)
        self.violations.append(line)
        print("VIOLATION " + line, flush=True)

    async def _repair(self) -> None:
        """After a violation, put the parts back so the run goes on (the daemon as systemd)."""
        assert self.proxy is not None and self.daemon is not None
        self.proxy.resume()
        self.proxy.delay = 0.0
        self.sim.set_silent(False)
        self.sim.refuse(None)
        self.sim.break_upgrades(None)
        with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: it is running
            await self.sim.start(port=self.proxy.target_port)
        if not self.daemon.alive():
            self.daemon.start()
        await self._settle(RECOVERY_LIMIT, state_file=False)

    # -- invariants -------------------------------------------------------------------------

    def _truth(self) -> dict[str, tuple[int, str | None]]:
        return {r: (self.sim.rooms[r].patients, self.sim.rooms[r].now_serving) for r in self.rooms}

    def _problems(self, state_file: bool = False) -> list[str]:
        assert self.mirror is not None and self.daemon is not None
        problems: list[str] = []
        if not self.daemon.alive():
            problems.append(f"daemon not running (exit {self.daemon.proc.returncode if self.daemon.proc else None})")
        last = self.mirror.last
        if last.get(f"{BASE}/status") != "online":
            problems.append(f"mqtt status {last.get(f'{BASE}/status')!r}")
        if last.get(f"{BASE}/upstream") != "connected":
            problems.append(f"mqtt upstream {last.get(f'{BASE}/upstream')!r}")
        truth = self._truth()
        for room, (patients, serving) in truth.items():
            if last.get(f"{BASE}/{room}/patients") != str(patients):
                problems.append(f"mqtt {room}/patients {last.get(f'{BASE}/{room}/patients')!r} != {patients}")
            state = self.mirror.room_state(room) or {}
            if (state.get("patients"), state.get("now_serving"), state.get("stale"), state.get("error")) != (
                patients, serving, False, None
            ):
                problems.append(f"mqtt {room}/state {state} != {patients}/{serving} live")
        for gone in set(ROOMS) - set(self.rooms):
            if f"{BASE}/{gone}/state" in last or f"{BASE}/{gone}/patients" in last:
                problems.append(f"mqtt still holds the removed room {gone}")
        for i, screen in enumerate(self.screens):
            wanted = ["lab"] if screen.url.endswith("room=lab") else self.rooms
            if not screen.connected or screen.link != "connected":
                problems.append(f"screen {i} {'link ' + str(screen.link) if screen.connected else 'offline'}")
                continue
            if sorted(screen.rooms) != sorted(wanted):
                problems.append(f"screen {i} shows rooms {sorted(screen.rooms)}")
                continue
            for room in wanted:
                shown = screen.rooms[room]
                if (shown["patients"], shown["now_serving"], shown["stale"]) != (*truth[room], False):
                    problems.append(f"screen {i} {room} {shown['patients']}/{shown['now_serving']} "
                                    f"stale={shown['stale']} != {truth[room]}")
        if state_file:
            on_disk = {s.room: (s.patients, s.now_serving) for s in load_state_file(self.state_dir / FILE_NAME)}
            if any(on_disk.get(r) != truth[r] for r in self.rooms):
                problems.append(f"state file {on_disk} != {truth}")
        return problems

    async def _healthz(self, source: str = "127.0.0.1") -> dict[str, Any] | None:
        try:
            status, _, body = await http_get(self.display_port, "/healthz", source=source, timeout=2.0)
        except (OSError, TimeoutError, ValueError, IndexError):
            return None
        if status not in (200, 503):
            return None
        with contextlib.suppress(ValueError):
            return {"status_code": status, **json.loads(body)}
        return None

    async def _settle(self, limit: float, *, state_file: bool) -> float | None:
        """Pauses the traffic and waits until every surface shows the truth; how long it took."""
        self.traffic_on.clear()
        started = time.monotonic()
        deadline = started + (max(limit, STATE_FILE_LIMIT) if state_file else limit)
        while time.monotonic() < deadline:
            if not self._problems(state_file):
                health = await self._healthz()
                if health is not None and health["status_code"] == 200:
                    return time.monotonic() - started
            await asyncio.sleep(0.05)
        return None

    async def expect_not_live(self, since: float, bound: float, what: str) -> None:
        """Honesty during a fault: by ``since + bound`` no surface may still show live numbers."""
        assert self.mirror is not None
        while True:
            deadline = since + bound
            if self.stopped_at is not None:  # SIGSTOPped meanwhile: only its will can speak
                deadline = max(deadline, self.stopped_at + WILL_BOUND)
            elif self.resumed_at is not None and self.resumed_at > since - WILL_BOUND:
                deadline = max(deadline, self.resumed_at + bound)  # it notices once it runs again
            liars = []
            if self.mirror.live(self.rooms):
                liars.append("mqtt")
            liars += [f"screen {i}" for i, s in enumerate(self.screens) if s.live()]
            if not liars:
                return
            if time.monotonic() >= deadline:
                self._violate(f"{what}: {', '.join(liars)} still live {bound:.1f} s after the link died")
                return
            await asyncio.sleep(0.05)

    async def expect_fresh_without_socket(self, since: float, bound: float, what: str) -> None:
        """With upgrades broken, a change reaches MQTT through the snapshot within the bound,
        live (``stale: false``), and ``upstream`` says ``degraded`` (or ``connected``, for the
        moments a cut-after-upgrade socket lives)."""
        assert self.mirror is not None
        await asyncio.sleep(FALLBACK_AFTER)  # the socket is given its chance first
        room = self.rooms[0]
        marker = f"FB-{int(since * 1000) % 100000}"
        traffic = self.traffic_on.is_set()
        self.traffic_on.clear()  # the marker must not be overwritten before it is seen
        await asyncio.sleep(0.15)  # the traffic task's last change is out
        self.sim.set_queue(room, self.sim.rooms[room].patients, marker)
        try:
            await self._await_marker(room, marker, since + bound, what)
        finally:
            if traffic:
                self.traffic_on.set()

    async def _await_marker(self, room: str, marker: str, deadline: float, what: str) -> None:
        assert self.mirror is not None
        while True:
            state = self.mirror.room_state(room) or {}
            upstream = self.mirror.last.get(f"{BASE}/upstream")
            if state.get("now_serving") == marker and state.get("stale") is False and upstream in ("degraded", "connected"):
                return
            if time.monotonic() >= deadline:
                self._violate(f"upgrades broken ({what}): {room} not fresh through the snapshot "
                              f"in time (upstream {upstream!r}, state {state})")
                return
            await asyncio.sleep(0.05)

    def _scan_log(self) -> None:
        assert self.daemon is not None
        try:
            with open(self.daemon.log_path, "rb") as f:
                f.seek(self._log_offset)
                new = f.read()
        except OSError:
            return
        self._log_offset += len(new)
        text = new.decode(errors="replace")
        self.log_lines += text.count("\n")
        for marker in BAD_LOG_MARKERS:
            if marker in text:
                at = text.index(marker)
                excerpt = text[max(0, at - 300): at + 600].replace("\n", " | ")
                self._violate(f"log holds {marker!r}: …{excerpt}…")
                break

    def _sample(self, number: int) -> None:
        assert self.daemon is not None
        if not self.daemon.alive():
            return
        try:
            rss = memory_kb(self.daemon.pid)["VmRSS"]
            fds = open_fds(self.daemon.pid)
        except (OSError, KeyError):
            return
        sample = {"t": round(time.monotonic(), 1), "round": number, "rss_kb": rss, "fds": fds}
        self.samples.append(sample)
        if rss > RSS_LIMIT_KB:
            self._violate(f"RSS {rss} kB > {RSS_LIMIT_KB}")
        if fds > FDS_LIMIT:
            self._violate(f"{fds} open descriptors > {FDS_LIMIT}")

    async def sample_tasks(self) -> None:
        health = await self._healthz()
        if health and isinstance(health.get("tasks"), int) and self.samples:
            self.samples[-1]["tasks"] = health["tasks"]
            if health["tasks"] > TASKS_LIMIT:
                self._violate(f"{health['tasks']} asyncio tasks > {TASKS_LIMIT}")

    def _report(self, elapsed: float) -> dict[str, Any]:
        by_kind: dict[str, dict[str, Any]] = defaultdict(lambda: {"faults": 0, "worst_recovery_s": 0.0, "violations": 0})
        for r in self.rounds:
            for kind in r.faults:
                entry = by_kind[kind]
                entry["faults"] += 1
                entry["worst_recovery_s"] = max(entry["worst_recovery_s"], round(r.recovery or RECOVERY_LIMIT, 2))
                entry["violations"] += len(r.violations)
        first, last = (self.samples[0], self.samples[-1]) if self.samples else ({}, {})
        return {
            "seed": self.seed,
            "seconds": round(elapsed, 1),
            "rounds": len(self.rounds),
            "faults": sum(len(r.faults) for r in self.rounds),
            "rounds_with_overlapping_faults": sum(1 for r in self.rounds if len(r.faults) > 1),
            "by_kind": dict(sorted(by_kind.items())),
            "violations": self.violations,
            "rss_kb": {"start": first.get("rss_kb"), "end": last.get("rss_kb"),
                       "max": max((s["rss_kb"] for s in self.samples), default=None)},
            "fds": {"start": first.get("fds"), "end": last.get("fds"),
                    "max": max((s["fds"] for s in self.samples), default=None)},
            "tasks": {"start": first.get("tasks"), "end": last.get("tasks"),
                      "max": max((s.get("tasks", 0) for s in self.samples), default=None)},
            "daemon_log_lines": self.log_lines,
            "skipped_kinds": sorted({k.name for k in FAULTS} - {k.name for k in self.kinds}),
            "samples": self.samples,
        }


# -- the faults ---------------------------------------------------------------------------------
# Each injects, holds and heals its fault, and returns a line saying what it did.

CLOSE_CODES = (1000, 1001, 1008, 1011, 1012, 1013, 4000, 4001, 4003, 4008)


async def close_code(c: Chaos, rng: random.Random) -> str:
    code = rng.choice(CLOSE_CODES)
    await c.sim.close_all(code, "chaos")
    return f"closed {code}"


async def drop(c: Chaos, rng: random.Random) -> str:
    assert c.proxy is not None
    c.proxy.cut()
    return "dropped (1006)"


async def cut_mid_frame(c: Chaos, rng: random.Random) -> str:
    assert c.proxy is not None
    c.proxy.cut_mid_frame()
    c.sim.set_queue("lab", rng.randint(0, 60), "L-cut")  # a frame to cut in half
    await asyncio.sleep(0.5)
    c.proxy.cut()  # if nothing passed meanwhile
    return "cut in the middle of a frame"


async def freeze_server(c: Chaos, rng: random.Random) -> str:
    since = time.monotonic()
    c.sim.set_silent(True)
    await c.expect_not_live(since, DETECTION_BOUND, "frozen server")
    await asyncio.sleep(rng.uniform(0, 1))
    c.sim.set_silent(False)
    return f"server frozen {time.monotonic() - since:.1f} s"


async def stall_proxy(c: Chaos, rng: random.Random) -> str:
    assert c.proxy is not None
    since = time.monotonic()
    c.proxy.stall()
    await c.expect_not_live(since, DETECTION_BOUND, "half-open link")
    await asyncio.sleep(rng.uniform(0, 1))
    c.proxy.resume()
    c.proxy.cut()  # what the stall held is history
    return f"link stalled {time.monotonic() - since:.1f} s"


async def break_upgrades(c: Chaos, rng: random.Random) -> str:
    """A proxy that breaks WebSocket upgrades: the values must stay fresh through the
    snapshot, and every surface say ``degraded``."""
    mode = rng.choice(("426", "400", "200", "403", "cut"))
    c.sim.break_upgrades(mode, cut_after=rng.uniform(0.5, 2))
    await c.sim.close_all(1012)
    since = time.monotonic()
    await c.expect_fresh_without_socket(since, FALLBACK_AFTER + FALLBACK_INTERVAL + 3.0, mode)
    c.sim.break_upgrades(None)
    return f"upgrades broken ({mode}) for {time.monotonic() - since:.1f} s"


async def slow_proxy(c: Chaos, rng: random.Random) -> str:
    assert c.proxy is not None
    c.proxy.delay = rng.uniform(0.05, 0.4)
    hold = rng.uniform(1, 4)
    await asyncio.sleep(hold)
    delay, c.proxy.delay = c.proxy.delay, 0.0
    return f"{delay * 1000:.0f} ms delay for {hold:.1f} s"


async def refuse_handshakes(c: Chaos, rng: random.Random) -> str:
    status = rng.choice((401, 403, 429, 503))
    retry_after = rng.choice((None, 1)) if status in (429, 503) else None
    c.sim.refuse(status, retry_after)
    await c.sim.close_all(1012)
    hold = rng.uniform(0.5, 3)
    await asyncio.sleep(hold)
    c.sim.refuse(None)
    return f"handshakes refused with {status}{' Retry-After 1' if retry_after else ''} for {hold:.1f} s"


async def restart_server(c: Chaos, rng: random.Random) -> str:
    port = c.sim.port
    since = time.monotonic()
    await c.sim.stop()
    hold = rng.uniform(0.2, 4)
    if hold > DETECTION_BOUND:
        # The close (1001) tells at once, unless a stalled link holds it back: the ping's
        # bound is the promise either way.
        await c.expect_not_live(since, DETECTION_BOUND, "server down")
    await asyncio.sleep(max(0.0, since + hold - time.monotonic()))
    await c.sim.start(port=port)
    return f"server down {hold:.1f} s"


async def restart_broker(c: Chaos, rng: random.Random) -> str:
    persistence = rng.random() < 0.5
    c.broker.stop()
    c.broker.persistence = persistence
    hold = rng.uniform(0, 2)
    await asyncio.sleep(hold)
    await asyncio.to_thread(c.broker.start)
    return f"broker restarted after {hold:.1f} s, {'with' if persistence else 'without'} persistence"


async def rotate_token(c: Chaos, rng: random.Random) -> str:
    c.tokens += 1
    token = f"chaos-token-{c.tokens}"
    c.sim.set_token(token)  # the server accepts only the new token from now on
    tmp = c.token_file.with_suffix(".new")
    tmp.write_text(token + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, c.token_file)
    if rng.random() < 0.3:
        await c.sim.close_all(4001)  # the server says so before the daemon noticed the file
        return "token rotated, then 4001"
    return "token rotated"


async def bad_frames(c: Chaos, rng: random.Random) -> str:
    junk = [
        "not json", "[1,2]", '"text"', "{}", '{"type":"queue","room":"lab","patients":-1}',
        '{"type":"queue","room":"lab","patients":2.5}', '{"type":"queue","room":"lab","patients":"3"}',
        '{"type":"queue","room":"lab","patients":true}', '{"type":"queue","room":"lab","patients":1e30}',
        '{"type":"queue","room":"a/b","patients":1}', '{"type":"queue","room":"#","patients":1}',
        '{"type":"queue","room":"lab\\u0000","patients":1}', '{"type":"queue","room":"nowhere","patients":1}',
        b"\x00\x01binary", '{"type":"queue","room":"lab","patients":1,"now_serving":"' + "x" * 70_000 + '"}',
    ]
    count = rng.randint(5, 200)
    for _ in range(count):
        await c.sim.send_raw(rng.choice(junk))
    return f"{count} bad frames"


async def reload_valid(c: Chaos, rng: random.Random) -> str:
    assert c.daemon is not None
    if TOGGLED_ROOM in c.rooms:
        c.rooms.remove(TOGGLED_ROOM)
        what = f"room {TOGGLED_ROOM} removed"
    else:
        c.rooms.append(TOGGLED_ROOM)
        what = f"room {TOGGLED_ROOM} added"
    c.daemon.write_config(c.config())
    c.daemon.signal(signal.SIGHUP)
    return f"reload: {what}"


async def reload_invalid(c: Chaos, rng: random.Random) -> str:
    assert c.daemon is not None
    refusals = c.daemon.log_text().count("reload refused")
    broken = rng.choice(("upstream: {url: 42}\nrooms: []\n", "rooms: [{id: 'a b'}]\n", ":\n  - ][", ""))
    c.daemon.write_config(broken)
    c.daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while c.daemon.alive() and c.daemon.log_text().count("reload refused") == refusals:
        if time.monotonic() > deadline:
            c._violate("an invalid reload was not refused within 5 s")
            break
        await asyncio.sleep(0.05)
    c.daemon.write_config(c.config())  # the operator fixes the file (a restart must work)
    return "invalid reload refused"


async def kill_daemon(c: Chaos, rng: random.Random) -> str:
    assert c.daemon is not None
    since = time.monotonic()
    c.kills += 1
    c.daemon.kill()
    await c.expect_not_live(since, 2.0, "killed daemon")  # the will, as the socket closes
    hold = rng.uniform(0.2, 2)  # systemd's RestartSec
    await asyncio.sleep(max(0.0, since + hold - time.monotonic()))
    c.daemon.start()
    return f"SIGKILL, restarted after {hold:.1f} s"


async def stop_daemon(c: Chaos, rng: random.Random) -> str:
    assert c.daemon is not None
    since = c.stopped_at = time.monotonic()
    c.daemon.signal(signal.SIGSTOP)
    if rng.random() < 0.25:
        await c.expect_not_live(since, WILL_BOUND, "stopped daemon")
        hold = time.monotonic() - since
    else:
        hold = rng.uniform(0.5, 3)
        await asyncio.sleep(hold)
    c.daemon.signal(signal.SIGCONT)
    c.stopped_at, c.resumed_at = None, time.monotonic()
    return f"SIGSTOP for {hold:.1f} s"


async def screen_churn(c: Chaos, rng: random.Random) -> str:
    count = rng.randint(10, 60)
    url = f"ws://127.0.0.1:{c.display_port}/ws"
    for _ in range(count):
        with contextlib.suppress(OSError, TimeoutError, InvalidHandshake, ConnectionClosed):
            async with asyncio.timeout(3):
                async with websockets.connect(url, open_timeout=2, close_timeout=1) as ws:
                    if rng.random() < 0.5:
                        await ws.recv()
                    if rng.random() < 0.3:
                        ws.transport.abort()  # a kiosk that vanished without a close
    return f"{count} screens came and went"


async def screen_flood(c: Chaos, rng: random.Random) -> str:
    count = rng.randint(50, 300)
    kills = c.kills
    opened: list[asyncio.StreamWriter] = []
    try:
        for _ in range(count):
            with contextlib.suppress(OSError, TimeoutError):
                # Someone else on the LAN: other loopback addresses than the monitoring's.
                source = f"127.0.{rng.randint(1, 3)}.{rng.randint(1, 250)}" if rng.random() < 0.8 else "127.0.0.1"
                async with asyncio.timeout(1):
                    _, writer = await asyncio.open_connection("127.0.0.1", c.display_port, local_addr=(source, 0))
                opened.append(writer)
                if rng.random() < 0.5:  # half start a WebSocket handshake, half say nothing
                    writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                 b"Sec-WebSocket-Version: 13\r\n\r\n")
        await asyncio.sleep(rng.uniform(0.5, 2))
        health = await c._healthz(source="127.0.9.9")  # the monitoring box: not a flooder
        running = c.kills == kills and c.stopped_at is None  # not killed or stopped meanwhile
        if health is None and running:
            c._violate(f"/healthz did not answer during a flood of {len(opened)} connections")
    finally:
        for writer in opened:
            writer.transport.abort()
    return f"{len(opened)} connections flooded the display port"


async def fill_disk(c: Chaos, rng: random.Random) -> str:
    filler = c.state_dir / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, b"\0" * 65536)
    finally:
        os.close(fd)
    hold = rng.uniform(1, 6)  # the state file's writes fail meanwhile (traffic goes on)
    await asyncio.sleep(hold)
    with contextlib.suppress(FileNotFoundError):
        filler.unlink()
    return f"state disk full for {hold:.1f} s"


FAULTS: tuple[FaultKind, ...] = (
    FaultKind("close_code", "server", 4, close_code),
    FaultKind("drop_1006", "link", 2, drop),
    FaultKind("cut_mid_frame", "link", 2, cut_mid_frame),
    FaultKind("freeze_server", "server", 1, freeze_server),
    FaultKind("stall_link", "link", 1, stall_proxy),
    FaultKind("slow_link", "link", 1, slow_proxy),
    FaultKind("break_upgrades", "server", 2, break_upgrades),
    FaultKind("refuse_handshake", "server", 2, refuse_handshakes),
    FaultKind("restart_server", "server", 2, restart_server),
    FaultKind("restart_broker", "broker", 2, restart_broker),
    FaultKind("rotate_token", "token", 1, rotate_token),
    FaultKind("bad_frames", "frames", 2, bad_frames),
    FaultKind("reload_valid", "daemon", 1, reload_valid),
    FaultKind("reload_invalid", "daemon", 1, reload_invalid),
    FaultKind("kill_daemon", "daemon", 1, kill_daemon),
    FaultKind("stop_daemon", "daemon", 1, stop_daemon),
    FaultKind("screen_churn", "screens", 1, screen_churn),
    FaultKind("screen_flood", "screens", 1, screen_flood),
    FaultKind("disk_full", "disk", 1, fill_disk, needs_root=True),
)


def print_report(report: dict[str, Any]) -> None:
    print(f"\nseed {report['seed']}: {report['faults']} faults in {report['rounds']} rounds "
          f"({report['rounds_with_overlapping_faults']} with faults together), {report['seconds']:.0f} s")
    print(f"{'fault':18s} {'count':>6s} {'worst recovery':>15s} {'violations':>11s}")
    for kind, entry in report["by_kind"].items():
        print(f"{kind:18s} {entry['faults']:6d} {entry['worst_recovery_s']:13.2f} s {entry['violations']:11d}")
    print(f"RSS {report['rss_kb']['start']} → {report['rss_kb']['end']} kB (max {report['rss_kb']['max']}); "
          f"descriptors {report['fds']['start']} → {report['fds']['end']} (max {report['fds']['max']}); "
          f"tasks {report['tasks']['start']} → {report['tasks']['end']} (max {report['tasks']['max']}); "
          f"daemon log {report['daemon_log_lines']} lines")
    if report["skipped_kinds"]:
        print(f"skipped (need root): {', '.join(report['skipped_kinds'])}")
    print(f"invariant violations: {len(report['violations'])}")
    for line in report["violations"]:
        print(f"  {line[:400]}")


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="wr-chaos-") as tmp:
        chaos = Chaos(Path(tmp), args.seed)
        report = await chaos.run(args.faults, args.duration)
        if args.keep_log:
            Path(args.keep_log).write_bytes((Path(tmp) / "daemon.log").read_bytes())
    print_report(report)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"chaos-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"results: {out}")
    return 1 if report["violations"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", type=int, help="stop after this many faults")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--out", help="JSON results (default bench/results/chaos-seed<N>-<time>.json)")
    parser.add_argument("--keep-log", help="copy the daemon's log here")
    args = parser.parse_args(argv)
    if args.faults is None and args.duration is None:
        args.faults = 40

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that the daemon, broker and mount are cleaned up

    signal.signal(signal.SIGTERM, interrupted)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
