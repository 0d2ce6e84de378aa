"""The scenarios of issue 5, each measured next to its floor in the same run.

One harness process (this one) owns the fast upstream (``upstream.FastUpstream``) and the
pacing; the daemon, mosquitto and the measuring ends (``probe``) are processes of their own.
All times are CLOCK_MONOTONIC nanoseconds, comparable across those processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fleet, fleet_real
from .mqttlite import MqttLite
from .procs import ROOT, Broker, Daemon, Probe, SeedBridge, daemon_config, free_port, install_seed
from .stats import median, ratio, summary_ms
from .upstream import FastUpstream, queue_json, rfc3339_now
from .wsraw import text_frame

MS = 1e6


@dataclass
class Sizes:
    latency_rates: tuple[int, ...] = (100, 500, 1000)
    latency_seconds: float = 6.0
    latency_rooms: int = 10
    latency_repeats: int = 3
    flood_frames: int = 100_000
    flood_rooms: tuple[int, ...] = (1, 10, 1000)
    flood_repeats: int = 3
    display_clients: int = 1000
    display_changes: int = 20
    scale_rooms: int = 10_000
    rest_seconds: float = 60.0
    scale_rest_seconds: float = 10.0
    outage_seconds: float = 30.0
    fleet_daemons: int = 1000
    fleet_downtimes: tuple[float, ...] = (0.0, 2.0, 10.0, 30.0)
    fleet_real_clients: int = 200  # real Upstream loops against one restarting server
    profile: bool = True
    smoke: bool = False
    # The main daemon keeps the shipped backoff (1 s .. 10 s) except in the smoke run, where
    # the recovery must not wait up to 10 s.
    main_backoff: dict[str, float] | None = None
    quiet_window: float = 0.5
    floor_runs: int = 3
    # The seed tutorial's stack (bench/seed, Node) beside the daemon: latency, flood, RSS, CPU.
    seed: bool = True

    @classmethod
    def smoke_sizes(cls) -> Sizes:
        return cls(
            latency_rates=(100, 1000), latency_seconds=0.3, latency_repeats=1, flood_frames=3000, flood_rooms=(1, 10, 50),
            flood_repeats=1, display_clients=20, display_changes=3, scale_rooms=300, rest_seconds=1.0,
            scale_rest_seconds=0.5, outage_seconds=1.5, fleet_daemons=100, fleet_downtimes=(10.0,), fleet_real_clients=20,
            profile=False, smoke=True, main_backoff={"initial": 0.1, "max": 0.3},
            quiet_window=0.2, floor_runs=1,
        )


@dataclass
class Row:
    scenario: str
    metric: str
    value: float | None
    unit: str
    floor: float | None = None
    ratio: float | None = None
    target: str = ""
    status: str = ""  # "met", "MISSED", "" (no target)
    note: str = ""


@dataclass
class Suite:
    sizes: Sizes
    workdir: Path
    variant: str = "stock"  # "stock": python -m waiting_room; "patched": python -m bench.patched
    only: set[str] | None = None
    pinning: bool = True
    rows: list[Row] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", file=sys.stderr, flush=True)

    # -- plumbing ------------------------------------------------------------------------

    @property
    def module(self) -> str:
        return "waiting_room" if self.variant == "stock" else "bench.patched"

    def row(self, *args: Any, **kw: Any) -> Row:
        r = Row(*args, **kw)
        self.rows.append(r)
        return r

    def pin(self, pid: int, role: str) -> None:
        """With ``pin`` on (and 2+ CPUs), whatever is measured (the daemon, or the bare
        client that is its floor) runs alone on the last CPU, everything else on the others,
        so our own processes do not trade places on the cores from one run to the next."""
        cpus = sorted(os.sched_getaffinity(0)) if self.pinning else []
        if len(cpus) < 2:
            return
        wanted = {cpus[-1]} if role == "sut" else set(cpus[:-1])
        try:
            os.sched_setaffinity(pid, wanted)
        except OSError as exc:
            self.log(f"cannot pin {pid}: {exc}")
            return
        self.results.setdefault("affinity", {})[role] = sorted(wanted)

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only

    def seed_wanted(self) -> bool:
        return self.sizes.seed and any(self.wanted(n) for n in ("latency", "flood"))

    async def setup(self) -> None:
        self.seed_skipped: str | None = None
        if self.seed_wanted():
            self.seed_skipped = await asyncio.to_thread(install_seed)
            if self.seed_skipped:
                self.log(f"the seed stack is skipped: {self.seed_skipped}")
        self.results["seed"] = {"skipped": self.seed_skipped} if self.seed_skipped else {
            "stack": "node bench/seed/bridge.mjs: rxjs webSocket + backoff-rxjs retryBackoff + shareReplay, mqtt.js",
            "node": subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout.strip(),
        } if self.seed_wanted() else {"skipped": "not requested"}
        self.broker = Broker(self.workdir)
        self.broker.start()
        self.pin(self.broker.proc.pid, "rest")  # type: ignore[union-attr]
        self.pin(0, "rest")  # this process: the sender and the pacing
        self.up = FastUpstream()
        await self.up.start()
        self.mqtt = Probe("mqtt")
        await self.mqtt.start()
        self.pin(self.mqtt.pid, "rest")
        answer = await self.mqtt.call(
            "connect", host="127.0.0.1", port=self.broker.port, client_id="bench-probe",
            filters=["bench-floor/#"],
        )
        self.results["tcp_nodelay"] = {"mqtt_probe": answer["nodelay"]}
        self.bare = Probe("ws")
        await self.bare.start()
        self.pin(self.bare.pid, "sut")
        answer = await self.bare.call("connect", url=self.up.url, token="bare")
        self.results["tcp_nodelay"]["bare_ws_client"] = answer["nodelay"]
        await self.up.wait_for(lambda: self.up.conn("bare") is not None, 5)
        self.pub = MqttLite("127.0.0.1", self.broker.port, "bench-floor-publisher")
        await self.pub.connect()
        self.results["tcp_nodelay"]["floor_publisher"] = self.pub.nodelay
        sock = self.up.conn("bare").ws.transport.get_extra_info("socket")  # type: ignore[union-attr]
        import socket as _s

        self.results["tcp_nodelay"]["upstream_server_side"] = bool(sock.getsockopt(_s.IPPROTO_TCP, _s.TCP_NODELAY))
        self.results["tcp_nodelay"]["broker"] = "set_tcp_nodelay true (mosquitto.conf)"
        self.results["tcp_nodelay"]["daemon"] = "websockets via asyncio (TCP_NODELAY by default); aiomqtt socket_options"

    async def teardown(self) -> None:
        for daemon in self.daemons:
            if daemon.alive():
                daemon.stop()
        for step in (self.pub.close, self.bare.stop, self.mqtt.stop, self.up.stop):
            with contextlib.suppress(Exception):
                await step()
        self.broker.stop()

    async def subscribe(self, *filters: str) -> None:
        # A second connection of the probe would cost a process; MqttLite can subscribe again.
        await self.mqtt.call("subscribe_more", filters=list(filters))

    @property
    def seed_on(self) -> bool:
        return self.seed_wanted() and not self.seed_skipped

    async def start_daemon(self, name: str, rooms: dict[str, int], *, display: bool = False,
                           wait: bool = True, everything: bool = False, seed: bool = False,
                           **cfg: Any) -> tuple[Daemon, str]:
        """A daemon (or, with ``seed``, the seed stack: token ``seed``) on fresh rooms under a
        fresh base topic; returns once every room's value is on MQTT (``wait``)."""
        base = f"bench-{name}"
        self.up.rooms.update(rooms)
        for r in rooms:
            self.up.seq.setdefault(r, 1)
        display_port = free_port() if display else None
        config = daemon_config(self.up.url, list(rooms), self.broker.port, base,
                               display_port=display_port, **cfg)
        if seed:
            config["upstream"]["token"] = "seed"
            daemon = SeedBridge(self.workdir, name, config)
        else:
            daemon = Daemon(self.workdir, name, config, module=self.module)
        daemon.display_port = display_port  # type: ignore[attr-defined]
        self.daemons.append(daemon)
        await self.subscribe(*([f"{base}/#"] if everything else [f"{base}/+/patients", f"{base}/upstream"]))
        if wait:
            await self.mqtt.call("watch", values={f"{base}/{r}/patients": str(v) for r, v in rooms.items()})
        daemon.start()
        self.pin(daemon.pid, "sut")
        if wait:
            answer = await self.mqtt.call("wait", timeout=60 + len(rooms) / 100)
            if not answer["done"]:
                raise RuntimeError(f"daemon {name}: rooms not on MQTT: {answer}\n{daemon.log_tail()}")
            daemon.all_rooms_t = answer["t"]  # type: ignore[attr-defined]
        return daemon, base

    def stop_daemon(self, daemon: Daemon) -> None:
        code = daemon.stop()
        if code not in (0, None):
            self.log(f"daemon {daemon.name} exited with {code}:\n{daemon.log_tail()}")

    async def published(self, base: str) -> int:
        """Messages under ``base/`` the probe received since the last call (the broker
        drops none: its queues are unlimited), i.e. what the daemon published."""
        return (await self.mqtt.call("count", prefix=base + "/"))["count"]

    # -- scenario: footprint (start, memory, CPU at rest) ----------------------------------

    async def footprint(self) -> Daemon:
        s = self.sizes
        rooms = {f"room-{i:02d}": i + 1 for i in range(s.latency_rooms)}
        await self.mqtt.call("record", on=True)
        extra: dict[str, Any] = {}
        if s.main_backoff:
            extra = {"backoff": s.main_backoff, "stable_after": 0.2}
        daemon, base = await self.start_daemon("main", rooms, display=True, everything=True, **extra)
        samples = (await self.mqtt.call("dump"))["samples"]
        ours = [x for x in samples if x[0].startswith(base + "/")]
        first_any = min(t for _, _, t in ours)
        first_room = min(t for topic, _, t in ours if topic.endswith("/patients"))
        all_rooms = max(t for topic, _, t in ours if topic.endswith("/patients"))
        settle = await daemon.quiet(window=self.sizes.quiet_window, limit=20)
        mem = daemon.memory()
        cpu0, status0, t0 = daemon.cpu(), _ctxt(daemon.pid), time.monotonic()
        await asyncio.sleep(s.rest_seconds)
        cpu1, status1, t1 = daemon.cpu(), _ctxt(daemon.pid), time.monotonic()
        window = t1 - t0
        cpu_pct = (cpu1 - cpu0) / window * 100
        wakeups = (status1 - status0) / window
        result = {
            "rooms": len(rooms),
            "start_to_first_publish_ms": round((first_any - daemon.started_ns) / MS, 1),
            "first_publish_topic": min(ours, key=lambda x: x[2])[0],
            "start_to_first_room_value_ms": round((first_room - daemon.started_ns) / MS, 1),
            "start_to_all_rooms_ms": round((all_rooms - daemon.started_ns) / MS, 1),
            "settle_s": round(settle, 2),
            "rss_kb": mem["VmRSS"], "rss_anon_kb": mem.get("RssAnon"), "rss_file_kb": mem.get("RssFile"),
            "threads": mem.get("Threads"),
            "rest_window_s": round(window, 1),
            "rest_cpu_s": round(cpu1 - cpu0, 3),
            "rest_cpu_percent": round(cpu_pct, 3),
            "rest_context_switches_per_s": round(wakeups, 2),
            "cpu_tick_s": 1 / os.sysconf("SC_CLK_TCK"),
        }
        # The floor of "start": the same interpreter importing nothing, and importing the
        # daemon's dependencies, measured now.
        result["floor_python_start_ms"] = _time_cmd([sys.executable, "-c", "pass"], s.floor_runs)
        result["floor_import_deps_ms"] = _time_cmd(
            [sys.executable, "-c", "import asyncio, websockets.asyncio.client, aiomqtt, msgspec, yaml, backoff, uvloop"], s.floor_runs)
        result["floor_python_rss_kb"] = _rss_of([sys.executable, "-c", "import time; time.sleep(1)"])
        result["floor_deps_rss_kb"] = _rss_of([sys.executable, "-c",
            "import asyncio, websockets.asyncio.client, websockets.asyncio.server, aiomqtt, msgspec, yaml, backoff, uvloop, time; time.sleep(1)"])
        self.results["footprint"] = result
        f = result
        self.row("footprint", "RSS at rest, 10 rooms", f["rss_kb"] / 1024, "MB",
                 floor=f["floor_deps_rss_kb"] / 1024, ratio=ratio(f["rss_kb"], f["floor_deps_rss_kb"]),
                 target="<= 36 MB", status=_met(f["rss_kb"] / 1024 <= 36),
                 note="floor: python + the same libraries imported, idle")
        self.row("footprint", "start -> first MQTT publish", f["start_to_first_publish_ms"], "ms",
                 floor=f["floor_import_deps_ms"], ratio=ratio(f["start_to_first_publish_ms"], f["floor_import_deps_ms"]),
                 target="<= 1000 ms", status=_met(f["start_to_first_publish_ms"] <= 1000),
                 note=f"first topic {f['first_publish_topic'].split('/', 1)[1]}; floor: python importing the libraries")
        self.row("footprint", "start -> every room on MQTT", f["start_to_all_rooms_ms"], "ms")
        self.row("footprint", f"CPU at rest over {f['rest_window_s']:.0f} s", f["rest_cpu_percent"], "%",
                 target="<= 0.5 %", status=_met(f["rest_cpu_percent"] <= 0.5),
                 note=f"{f['rest_cpu_s']} s CPU; {f['rest_context_switches_per_s']} context switches/s")
        self._main_base = base
        self._main_rooms = rooms
        return daemon

    async def start_seed(self) -> Daemon:
        """The seed stack on the main daemon's rooms (for the latency scenario), and its RSS
        at rest beside the daemon's."""
        seed, base = await self.start_daemon("seed-main", dict(self._main_rooms), seed=True)
        self._seed_base = base
        await seed.quiet(window=self.sizes.quiet_window, limit=20)
        await asyncio.sleep(min(2.0, self.sizes.rest_seconds))
        mem = seed.memory()
        self.results["seed"]["rss_at_rest_kb"] = mem["VmRSS"]
        f = self.results.get("footprint")
        if f:
            self.row("footprint", "RSS at rest, 10 rooms: daemon vs seed stack", f["rss_kb"] / 1024, "MB",
                     floor=mem["VmRSS"] / 1024, ratio=ratio(f["rss_kb"], mem["VmRSS"]),
                     note="floor = the seed stack (node, rxjs, ws, mqtt.js) on the same rooms")
        return seed

    # -- scenario: latency -------------------------------------------------------------------

    async def _paced(self, n: int, rate: float, send: Callable[[int], int]) -> list[int]:
        """Calls ``send(i)`` at ``rate`` per second; returns the send times it reports."""
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.02
        times = []
        for i in range(n):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            times.append(send(i))
        return times

    async def _ws_hop(self, rooms: list[str], n: int, rate: float, next_value: Callable[[], int]) -> dict[str, Any]:
        """The WebSocket hop alone: the same sender, a bare websockets client."""
        bare = self.up.conn("bare")
        assert bare is not None
        keys: list[tuple[str, int]] = []

        def send_bare(i: int) -> int:
            room, v = rooms[i % len(rooms)], next_value()
            keys.append((room, v))
            return self.up.send_now(bare, room, v)

        await self.bare.call("record", on=True)
        await self.bare.call("expect", n=n)
        sent = await self._paced(n, rate, send_bare)
        await self.bare.call("wait", timeout=10)
        got = (await self.bare.call("dump"))["samples"]
        await self.bare.call("record", on=False)
        arrival = {}
        for t, msg in got:
            frame = json.loads(msg)
            if frame.get("type") == "queue":
                arrival[(frame["room"], frame["patients"])] = t
        return summary_ms(arrival[k] - t for k, t in zip(keys, sent) if k in arrival)

    async def _mqtt_hop(self, rooms: list[str], n: int, rate: float, next_value: Callable[[], int]) -> dict[str, Any]:
        """The MQTT hop alone: a bare publish -> subscribe through the same broker."""
        keys: list[tuple[str, int]] = []

        def send_mqtt(i: int) -> int:
            room, v = rooms[i % len(rooms)], next_value()
            keys.append((room, v))
            t = time.monotonic_ns()
            self.pub.publish(b"bench-floor/%s/patients" % room.encode(), str(v).encode(), retain=True)
            return t

        await self.mqtt.call("record", on=True)
        sent = await self._paced(n, rate, send_mqtt)
        await self.mqtt.call("watch", values={f"bench-floor/{r}/patients": str(v) for r, v in keys[-len(rooms):]},
                             accept_current=True)
        await self.mqtt.call("wait", timeout=10)
        got = (await self.mqtt.call("dump"))["samples"]
        arrival = {(topic.split("/")[1], int(p)): t for topic, p, t in got if topic.startswith("bench-floor/")}
        return summary_ms(arrival[k] - t for k, t in zip(keys, sent) if k in arrival)

    async def _end_to_end(self, proc: Daemon, label: str, base: str, rooms: list[str], n: int, rate: float,
                          next_value: Callable[[], int]) -> dict[str, Any]:
        """Frame sent by the upstream -> its value on MQTT, through the daemon or the seed stack."""
        conn = self.up.conn(label)
        assert conn is not None
        keys: list[tuple[str, int]] = []

        def send(i: int) -> int:
            room, v = rooms[i % len(rooms)], next_value()
            keys.append((room, v))
            return self.up.send_now(conn, room, v)

        cpu0 = proc.cpu()
        await self.mqtt.call("record", on=True)
        t_start = time.monotonic()
        sent = await self._paced(n, rate, send)
        await self.mqtt.call("watch", values={f"{base}/{r}/patients": str(v) for r, v in keys[-len(rooms):]},
                             accept_current=True)
        done = await self.mqtt.call("wait", timeout=10)
        elapsed = time.monotonic() - t_start
        cpu1 = proc.cpu()
        got = (await self.mqtt.call("dump"))["samples"]
        await self.mqtt.call("record", on=False)
        prefix = base + "/"
        arrival = {}
        for topic, p, t in got:
            if topic.startswith(prefix) and topic.endswith("/patients"):
                arrival[(topic[len(prefix):-len("/patients")], int(p))] = t
        e2e = [arrival[k] - t for k, t in zip(keys, sent) if k in arrival]
        return {"summary": summary_ms(e2e), "delivered": len(e2e), "final_values_correct": done["done"],
                "cpu_percent": round((cpu1 - cpu0) / elapsed * 100, 1)}

    async def latency(self, daemon: Daemon, seed: Daemon | None = None) -> None:
        """Paced updates at each rate, ``latency_repeats`` times; each repetition measures the
        two bare hops, the daemon and the seed stack (in alternating order) one after the
        other, and the figures are the medians of the repetitions' percentiles."""
        s = self.sizes
        base, rooms = self._main_base, list(self._main_rooms)
        counter = [1000]
        out: dict[str, Any] = {"rooms": len(rooms), "seconds_per_phase": s.latency_seconds,
                               "repeats": s.latency_repeats, "rates": {}}

        def next_value() -> int:
            counter[0] = counter[0] + 1 if counter[0] < 99_999 else 1000
            return counter[0]

        subjects: list[tuple[str, Daemon, str, str]] = [("daemon", daemon, "daemon", base)]
        if seed is not None:
            subjects.append(("seed", seed, "seed", self._seed_base))
        for rate in s.latency_rates:
            n = max(20, int(rate * s.latency_seconds))
            reps: list[dict[str, Any]] = []
            for rep in range(s.latency_repeats):
                r: dict[str, Any] = {
                    "ws_hop": await self._ws_hop(rooms, n, rate, next_value),
                    "mqtt_hop": await self._mqtt_hop(rooms, n, rate, next_value),
                }
                for name, proc, label, b in (subjects if rep % 2 == 0 else subjects[::-1]):
                    r[name] = await self._end_to_end(proc, label, b, rooms, n, rate, next_value)
                reps.append(r)
            phase: dict[str, Any] = {"frames": n, "repeats": reps}
            phase["ws_hop"] = _median_summary([r["ws_hop"] for r in reps])
            phase["mqtt_hop"] = _median_summary([r["mqtt_hop"] for r in reps])
            phase["end_to_end"] = _median_summary([r["daemon"]["summary"] for r in reps])
            phase["delivered"] = sum(r["daemon"]["delivered"] for r in reps)
            phase["final_values_correct"] = all(r["daemon"]["final_values_correct"] for r in reps)
            phase["daemon_cpu_percent"] = median([r["daemon"]["cpu_percent"] for r in reps])
            if seed is not None:
                phase["seed"] = _median_summary([r["seed"]["summary"] for r in reps])
                phase["seed_final_values_correct"] = all(r["seed"]["final_values_correct"] for r in reps)
                phase["seed_cpu_percent"] = median([r["seed"]["cpu_percent"] for r in reps])
            floor = {q: _add(phase["ws_hop"][q], phase["mqtt_hop"][q]) for q in ("p50", "p90", "p99", "max")}
            phase["floor_sum"] = floor
            phase["added"] = {q: _sub(phase["end_to_end"][q], floor[q]) for q in ("p50", "p90", "p99", "max")}
            out["rates"][str(rate)] = phase
            e, a = phase["end_to_end"], phase["added"]
            strict = rate >= 500
            self.row("latency", f"{rate}/s end-to-end p50", e["p50"], "ms", floor=floor["p50"],
                     ratio=ratio(e["p50"], floor["p50"]))
            self.row("latency", f"{rate}/s end-to-end p99", e["p99"], "ms", floor=floor["p99"],
                     ratio=ratio(e["p99"], floor["p99"]),
                     note=f"max {e['max']} ms; ws hop p99 {phase['ws_hop']['p99']}, mqtt hop p99 {phase['mqtt_hop']['p99']}; "
                          f"{phase['delivered']}/{n * s.latency_repeats} delivered; medians of {s.latency_repeats}")
            self.row("latency", f"{rate}/s added by the daemon p99", a["p99"], "ms", target="<= 1 ms",
                     status=_met(a["p99"] is not None and a["p99"] <= 1.0),
                     note=f"added p50 {a['p50']} ms; daemon CPU {phase['daemon_cpu_percent']} %")
            if seed is not None:
                sd = phase["seed"]
                for q in ("p50", "p99", "max"):
                    judged = strict and q != "max"
                    self.row("latency", f"{rate}/s {q}: daemon vs seed stack", e[q], "ms", floor=sd[q],
                             ratio=ratio(e[q], sd[q]), target="<= seed" if judged else "",
                             status=_met(e[q] is not None and sd[q] is not None and e[q] <= sd[q]) if judged else "",
                             note=f"floor = the seed stack (rxjs + mqtt.js) in the same repetitions; "
                                  f"seed CPU {phase['seed_cpu_percent']} %" if q == "p50" else "")
            self.log(f"latency {rate}/s: e2e {e} ws {phase['ws_hop']} mqtt {phase['mqtt_hop']}"
                     + (f" seed {phase['seed']}" if seed is not None else ""))
        self.results["latency"] = out

    # -- scenario: display fan-out -----------------------------------------------------------

    async def display(self, daemon: Daemon) -> None:
        s = self.sizes
        probe = Probe("display")
        await probe.start()
        self.pin(probe.pid, "rest")
        out: dict[str, Any] = {"clients": s.display_clients, "changes": s.display_changes}
        try:
            # Floor: a bare websockets server (in the bare client's process, on the measured
            # process's CPU) broadcasting one pre-encoded frame to as many identical clients.
            port = (await self.bare.call("serve"))["port"]
            answer = await probe.call("connect", host="127.0.0.1", port=port, path="/", n=s.display_clients)
            out["floor_connect"] = answer
            floor_last, floor_first = [], []
            for k in range(s.display_changes):
                value = 60000 + k
                frame = json.dumps({"type": "state", "now": time.time(), "rooms": [{
                    "room": "room-00", "name": "room-00", "patients": value, "now_serving": "A-17",
                    "stale": False, "error": None, "as_of": time.time()}]}, separators=(",", ":"))
                await probe.call("arm", marker=f'"patients":{value},')
                t0 = (await self.bare.call("broadcast", frame=frame))["t0"]
                got = await probe.call("wait", timeout=10)
                if got["t_last"] is not None:
                    floor_last.append(got["t_last"] - t0)
                    floor_first.append(got["t_first"] - t0)
                await asyncio.sleep(0.05)
            await probe.call("close")
            await self.bare.call("unserve")
            out["floor_last_client"] = summary_ms(floor_last)
            out["floor_first_client"] = summary_ms(floor_first)

            # The daemon: one upstream change -> the last of the display clients has it.
            handshakes_before = sum(1 for _, label in self.up.handshakes if label == "daemon")
            mem_before = daemon.memory()["VmRSS"]
            answer = await probe.call("connect", host="127.0.0.1", port=daemon.display_port,  # type: ignore[attr-defined]
                                      path="/ws", n=s.display_clients)
            out["connect"] = answer
            await asyncio.sleep(0.5)
            await daemon.quiet(window=self.sizes.quiet_window, limit=10)
            out["rss_with_clients_kb"] = daemon.memory()["VmRSS"]
            out["rss_before_clients_kb"] = mem_before
            dconn = self.up.conn("daemon")
            assert dconn is not None
            rooms = list(self._main_rooms)
            last, first, counts = [], [], []
            cpu0 = daemon.cpu()
            for k in range(s.display_changes):
                value = 50000 + k
                room = rooms[k % len(rooms)]
                await probe.call("arm", marker=f'"patients":{value},')
                t0 = self.up.send_now(dconn, room, value)
                got = await probe.call("wait", timeout=10)
                counts.append(got["count"])
                if got["t_last"] is not None:
                    last.append(got["t_last"] - t0)
                    first.append(got["t_first"] - t0)
                await asyncio.sleep(0.1)
            cpu1 = daemon.cpu()
            out["last_client"] = summary_ms(last)
            out["first_client"] = summary_ms(first)
            out["clients_reached_per_change"] = {"min": min(counts), "max": max(counts)}
            out["daemon_cpu_s_per_change"] = round((cpu1 - cpu0) / s.display_changes, 4)
            out["upstream_connections"] = self.up.active("daemon")
            out["upstream_handshakes_during"] = sum(1 for _, l in self.up.handshakes if l == "daemon") - handshakes_before
            await probe.call("close")
        finally:
            await probe.stop()
        self.results["display"] = out
        d = out
        self.row("display", f"{s.display_clients} clients: change -> last client p50", d["last_client"]["p50"], "ms",
                 floor=d["floor_last_client"]["p50"], ratio=ratio(d["last_client"]["p50"], d["floor_last_client"]["p50"]))
        ok = d["last_client"]["p99"] is not None and d["last_client"]["p99"] <= 50 and d["clients_reached_per_change"]["min"] == d["connect"]["connected"] == s.display_clients
        self.row("display", f"{s.display_clients} clients: change -> last client p99", d["last_client"]["p99"], "ms",
                 floor=d["floor_last_client"]["p99"], ratio=ratio(d["last_client"]["p99"], d["floor_last_client"]["p99"]),
                 target="<= 50 ms", status=_met(ok),
                 note=f"{d['upstream_connections']} upstream connection(s), {d['upstream_handshakes_during']} new; "
                      f"floor: bare websockets broadcast; RSS +{(d['rss_with_clients_kb'] - d['rss_before_clients_kb']) / 1024:.1f} MB with clients")

    # -- scenario: recovery ------------------------------------------------------------------

    async def recovery(self, daemon: Daemon) -> None:
        s = self.sizes
        base = self._main_base
        room = next(iter(self._main_rooms))
        out: dict[str, Any] = {"outage_s": s.outage_seconds}
        await self.mqtt.call("watch", values={f"{base}/upstream": "disconnected"})
        t_down = time.monotonic_ns()
        await self.up.go_down()
        got = await self.mqtt.call("wait", timeout=10)
        out["down_to_mqtt_disconnected_ms"] = round((got["t"] - t_down) / MS, 1) if got["done"] else None
        self.up.rooms[room] = 77777
        await asyncio.sleep(max(0.0, s.outage_seconds - (time.monotonic_ns() - t_down) / 1e9))
        attempts = list(self.up.refused_attempts)
        await self.mqtt.call("watch", values={f"{base}/{room}/patients": "77777"})
        handshakes_before = len(self.up.handshakes)
        t_up = time.monotonic_ns()
        await self.up.go_up()
        got = await self.mqtt.call("wait", timeout=30)
        reconnect = next((t for t, label in self.up.handshakes[handshakes_before:] if label == "daemon"), None)
        # The bare floor client lost its connection too: bring it back for later scenarios.
        await self.bare.call("connect", url=self.up.url, token="bare")
        await self.up.wait_for(lambda: self.up.conn("bare") is not None, 5)
        out["attempts_during_outage"] = len(attempts)
        out["attempt_times_s"] = [round((t - t_down) / 1e9, 2) for t in attempts]
        out["return_to_reconnect_ms"] = round((reconnect - t_up) / MS, 1) if reconnect else None
        out["return_to_fresh_data_ms"] = round((got["t"] - t_up) / MS, 1) if got["done"] else None
        out["reconnect_to_fresh_data_ms"] = (round((got["t"] - reconnect) / MS, 1)
                                             if got["done"] and reconnect else None)
        self.results["recovery"] = out
        r = out
        self.row("recovery", f"attempts during a {s.outage_seconds:.0f} s outage", r["attempts_during_outage"], "",
                 note="at s " + ", ".join(str(x) for x in r["attempt_times_s"]))
        self.row("recovery", "upstream back -> fresh data on MQTT", r["return_to_fresh_data_ms"], "ms",
                 floor=r["reconnect_to_fresh_data_ms"],
                 note=f"waiting out the backoff: {r['return_to_reconnect_ms']} ms; floor = reconnect -> data; "
                      f"down -> 'disconnected' on MQTT {r['down_to_mqtt_disconnected_ms']} ms")

    # -- scenario: flood ---------------------------------------------------------------------

    def _flood_frames(self, rooms: list[str], n: int, ascending: bool) -> tuple[list[bytes], dict[str, int]]:
        """n queue frames round-robin over rooms; each room's values strictly monotonic, so the
        final value of a room differs from every value it had before in this flood. Returned
        as chunks of whole frames: anything else the connection sends (a heartbeat, a pong)
        may only go between frames."""
        per_room = {r: 0 for r in rooms}
        for i in range(n):
            per_room[rooms[i % len(rooms)]] += 1
        seen = {r: 0 for r in rooms}
        ts = rfc3339_now()
        parts = []
        final = {}
        seq = self.up.seq
        for i in range(n):
            room = rooms[i % len(rooms)]
            seen[room] += 1
            value = seen[room] if ascending else per_room[room] - seen[room]
            seq[room] = seq.get(room, 0) + 1
            parts.append(text_frame(queue_json(room, value, seq[room], ts)))
            final[room] = value
        self.up.rooms.update(final)
        chunks, size, start = [], 0, 0
        for i, frame in enumerate(parts):
            size += len(frame)
            if size >= 256 * 1024:
                chunks.append(b"".join(parts[start:i + 1]))
                start, size = i + 1, 0
        if start < len(parts):
            chunks.append(b"".join(parts[start:]))
        return chunks, final

    async def _flood_through(self, proc: Daemon, label: str, base: str, blob: list[bytes],
                             final: dict[str, int]) -> dict[str, Any]:
        """One flood through the daemon (or the seed stack): first frame sent -> every room's
        final value on MQTT, and the CPU it took until the process is quiet again."""
        s = self.sizes
        conn = self.up.conn(label)
        assert conn is not None
        await self.published(base)
        await self.mqtt.call("watch", values={f"{base}/{r}/patients": str(v) for r, v in final.items()})
        cpu0 = proc.cpu()
        first, last_sent = await self.up.flood(conn, blob)
        got = await self.mqtt.call("wait", timeout=120)
        cpu_done = proc.cpu()
        await proc.quiet(window=self.sizes.quiet_window, limit=30)
        cpu_quiet = proc.cpu()
        published = await self.published(base)
        state_ok = await self._check_state(base, final)
        run: dict[str, Any] = {
            "final_values_correct": got["done"] and state_ok["ok"],
            "missing_or_wrong": got["missing"], "examples": got["examples"],
            "state_topics": state_ok,
            "sender_ms": round((last_sent - first) / MS, 1),
        }
        if got["t"] is not None and got["done"]:
            total = (got["t"] - first) / 1e9
            run.update(
                completion_ms=round(total * 1000, 1),
                last_sent_to_final_ms=round((got["t"] - last_sent) / MS, 1),
                ingest_frames_per_s=round(s.flood_frames / total),
                cpu_s_until_final=round(cpu_done - cpu0, 3),
                cpu_s_per_10k_frames=round((cpu_quiet - cpu0) * 10_000 / s.flood_frames, 3),
                mqtt_publishes=published,
                mqtt_publishes_per_s=round(published / total),
            )
        return run

    async def flood(self) -> None:
        s = self.sizes
        out: dict[str, Any] = {"frames": s.flood_frames, "cases": {}}
        for nrooms in s.flood_rooms:
            rooms = {f"f{nrooms}-{i:04d}": 0 for i in range(nrooms)}
            names = list(rooms)
            daemon, base = await self.start_daemon(f"flood{nrooms}", rooms, everything=True)
            await daemon.quiet(window=self.sizes.quiet_window, limit=20)
            seed: Daemon | None = None
            if self.seed_on:
                seed, seed_base = await self.start_daemon(f"seed-flood{nrooms}", rooms, everything=True, seed=True)
                await seed.quiet(window=self.sizes.quiet_window, limit=20)
            bare = self.up.conn("bare")
            assert bare is not None
            runs = []
            for rep in range(s.flood_repeats):
                ascending = rep % 2 == 0
                blob, final = self._flood_frames(names, s.flood_frames, ascending)
                # Floor: a bare websockets client drains the very same bytes.
                await self.bare.call("expect", n=s.flood_frames)
                b_first, b_last_sent = await self.up.flood(bare, blob)
                got = await self.bare.call("wait", timeout=120)
                bare_done = got["t"]
                run: dict[str, Any] = {
                    "bare_drain_ms": round((bare_done - b_first) / MS, 1) if bare_done else None,
                    "bare_tail_ms": round((bare_done - b_last_sent) / MS, 1) if bare_done else None,
                    "bare_frames_per_s": round(s.flood_frames / ((bare_done - b_first) / 1e9)) if bare_done else None,
                }
                # The daemon and the seed stack, the same bytes, in alternating order.
                order = [("daemon", daemon, base)] + ([("seed", seed, seed_base)] if seed is not None else [])
                for who, proc, b in (order if rep % 2 == 0 else order[::-1]):
                    measured = await self._flood_through(proc, who, b, blob, final)
                    if who == "daemon":
                        run.update(measured)
                    else:
                        run["seed"] = measured
                run["completion_vs_bare"] = ratio(run.get("completion_ms"), run["bare_drain_ms"])
                if seed is not None:
                    run["completion_vs_seed"] = ratio(run.get("completion_ms"), run["seed"].get("completion_ms"))
                    run["seed_completion_ms"] = run["seed"].get("completion_ms")
                    run["seed_cpu_s_per_10k_frames"] = run["seed"].get("cpu_s_per_10k_frames")
                    run["seed_completion_vs_bare"] = ratio(run["seed"].get("completion_ms"), run["bare_drain_ms"])
                runs.append(run)
                self.log(f"flood {nrooms} rooms #{rep}: {run}")
            mem = daemon.memory()
            self.stop_daemon(daemon)
            case = {"rooms": nrooms, "runs": runs, "rss_after_kb": mem["VmRSS"], "hwm_kb": mem["VmHWM"]}
            keys = ["ingest_frames_per_s", "completion_ms", "bare_drain_ms", "last_sent_to_final_ms",
                    "bare_tail_ms", "cpu_s_per_10k_frames", "mqtt_publishes_per_s", "mqtt_publishes",
                    "completion_vs_bare", "bare_frames_per_s"]
            if seed is not None:
                smem = seed.memory()
                self.stop_daemon(seed)
                case["seed_rss_after_kb"], case["seed_hwm_kb"] = smem["VmRSS"], smem["VmHWM"]
                case["seed_all_correct"] = all(r["seed"]["final_values_correct"] for r in runs)
                keys += ["completion_vs_seed", "seed_completion_ms", "seed_cpu_s_per_10k_frames",
                         "seed_completion_vs_bare"]
            for key in keys:
                case[f"median_{key}"] = median([r.get(key) for r in runs])
            case["all_correct"] = all(r["final_values_correct"] for r in runs)
            out["cases"][str(nrooms)] = case
            c = case
            strict = nrooms in (1, 1000) or s.smoke
            self.row("flood", f"{nrooms} room(s): ingest", c["median_ingest_frames_per_s"], "frames/s",
                     floor=c["median_bare_frames_per_s"],
                     ratio=ratio(c["median_ingest_frames_per_s"], c["median_bare_frames_per_s"]),
                     target=">= 40,000/s" if strict else "",
                     status=_met((c["median_ingest_frames_per_s"] or 0) >= 40_000 and c["all_correct"]) if strict else "",
                     note=f"final values {'correct' if c['all_correct'] else 'WRONG'} in {len(runs)} run(s); "
                          f"floor: bare websockets client")
            self.row("flood", f"{nrooms} room(s): completion", c["median_completion_ms"], "ms",
                     floor=c["median_bare_drain_ms"], ratio=c["median_completion_vs_bare"],
                     target="<= 1.2x bare", status=_met((c["median_completion_vs_bare"] or 99) <= 1.2),
                     note=f"last frame sent -> final on MQTT {c['median_last_sent_to_final_ms']} ms "
                          f"(bare {c['median_bare_tail_ms']} ms)")
            if seed is not None:
                self.row("flood", f"{nrooms} room(s): completion, daemon vs seed stack", c["median_completion_ms"], "ms",
                         floor=c["median_seed_completion_ms"], ratio=c["median_completion_vs_seed"],
                         target="<= seed", status=_met((c["median_completion_vs_seed"] or 99) <= 1.0),
                         note=f"seed stack {c['median_seed_completion_vs_bare']} x bare; final values "
                              f"{'correct' if c['seed_all_correct'] else 'WRONG'}; seed RSS after "
                              f"{c['seed_rss_after_kb'] / 1024:.1f} MB (peak {c['seed_hwm_kb'] / 1024:.1f}), "
                              f"daemon {c['rss_after_kb'] / 1024:.1f} MB (peak {c['hwm_kb'] / 1024:.1f})")
            self.row("flood", f"{nrooms} room(s): MQTT publishes", c["median_mqtt_publishes_per_s"], "/s",
                     note=f"{c['median_mqtt_publishes']} publishes for {s.flood_frames} frames (coalesced)")
            if seed is not None:
                self.row("flood", f"{nrooms} room(s): CPU per 10,000 frames, daemon vs seed stack",
                         c["median_cpu_s_per_10k_frames"], "s", floor=c["median_seed_cpu_s_per_10k_frames"],
                         ratio=ratio(c["median_cpu_s_per_10k_frames"], c["median_seed_cpu_s_per_10k_frames"]),
                         target="<= seed",
                         status=_met((c["median_cpu_s_per_10k_frames"] or 99)
                                     <= (c["median_seed_cpu_s_per_10k_frames"] or 0)))
            else:
                self.row("flood", f"{nrooms} room(s): CPU per 10,000 frames", c["median_cpu_s_per_10k_frames"], "s")
        self.results["flood"] = out

    async def _check_state(self, base: str, final: dict[str, int]) -> dict[str, Any]:
        """The retained ``state`` topics, read by a fresh subscriber, agree with the finals."""
        got: dict[str, bytes] = {}
        last = [time.monotonic()]

        def on(topic: bytes, payload: bytes, t: int) -> None:
            got[topic.decode()] = payload
            last[0] = time.monotonic()

        client = MqttLite("127.0.0.1", self.broker.port, f"bench-check-{time.monotonic_ns()}", on)
        await client.connect()
        await client.subscribe(f"{base}/+/state")
        deadline = time.monotonic() + 10
        while len(got) < len(final) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await client.close()
        wrong = []
        for room, value in final.items():
            payload = got.get(f"{base}/{room}/state")
            state = json.loads(payload) if payload else None
            if state is None or state.get("patients") != value or state.get("stale"):
                wrong.append(room)
        return {"ok": not wrong, "wrong": len(wrong), "examples": wrong[:3]}

    # -- scenario: scale ---------------------------------------------------------------------

    async def scale(self) -> None:
        s = self.sizes
        rooms = {f"s-{i:05d}": (i * 7) % 1000 + 1 for i in range(s.scale_rooms)}
        handshakes_before = len(self.up.handshakes)
        daemon, _ = await self.start_daemon("scale", rooms)
        connect = next(t for t, label in self.up.handshakes[handshakes_before:] if label == "daemon")
        dconn = self.up.conn("daemon")
        out: dict[str, Any] = {"rooms": s.scale_rooms}
        mem_done = daemon.memory()
        quiet = await daemon.quiet(window=self.sizes.quiet_window, limit=60)
        mem = daemon.memory()
        cpu0, t0 = daemon.cpu(), time.monotonic()
        await asyncio.sleep(s.scale_rest_seconds)
        cpu1, t1 = daemon.cpu(), time.monotonic()
        out.update(
            start_to_connect_ms=round((connect - daemon.started_ns) / MS, 1),
            connect_to_all_on_mqtt_ms=round((daemon.all_rooms_t - connect) / MS, 1),  # type: ignore[attr-defined]
            rss_when_all_on_mqtt_kb=mem_done["VmRSS"],
            rss_at_rest_kb=mem["VmRSS"], hwm_kb=mem["VmHWM"],
            settle_after_all_s=round(quiet, 1),
            rest_cpu_percent=round((cpu1 - cpu0) / (t1 - t0) * 100, 3),
            rest_window_s=round(t1 - t0, 1),
            joins_answered=len(dconn.joined) if dconn else None,
        )
        self.stop_daemon(daemon)
        self.results["scale"] = out
        c = out
        self.row("scale", f"{s.scale_rooms} rooms: connect -> all on MQTT", c["connect_to_all_on_mqtt_ms"], "ms",
                 target="<= 5000 ms", status=_met(c["connect_to_all_on_mqtt_ms"] <= 5000),
                 note=f"process start -> connect {c['start_to_connect_ms']} ms (config load)")
        self.row("scale", f"{s.scale_rooms} rooms: RSS", max(c["rss_at_rest_kb"], c["rss_when_all_on_mqtt_kb"]) / 1024, "MB",
                 target="<= 80 MB", status=_met(max(c["rss_at_rest_kb"], c["rss_when_all_on_mqtt_kb"]) / 1024 <= 80),
                 note=f"peak (VmHWM) {c['hwm_kb'] / 1024:.1f} MB")
        self.row("scale", f"{s.scale_rooms} rooms: CPU at rest", c["rest_cpu_percent"], "%",
                 note=f"over {c['rest_window_s']} s, after {c['settle_after_all_s']} s of settling (discovery)")

    # -- scenario: fleet ---------------------------------------------------------------------

    async def fleet(self) -> None:
        s = self.sizes
        self.results["fleet_real"] = await fleet_real.run(s.fleet_real_clients, 1012, 1.0)
        self.log(f"fleet on real sockets: {self.results['fleet_real']}")
        out = fleet.run(s.fleet_daemons, s.fleet_downtimes)
        out["proposals"] = fleet.proposals(s.fleet_daemons, s.fleet_downtimes)
        self.results["fleet"] = out
        # As the returning server feels it: handshakes per 1-s window once it listens again.
        for case in out["cases"]:  # type: ignore[union-attr]
            code, down = case["code"], case["downtime_s"]
            target = (code, down) in ((1006, 10.0), (1001, 10.0), (1012, 1.0), (1001, 1.0))
            if not target and (code, down) != (1006, 1.0):
                continue
            j, u = case["jittered"], case["unjittered"]
            what = "dropped (1006)" if code == 1006 else f"restart announced ({code})"
            self.row("fleet", f"{s.fleet_daemons} daemons, {what}, server back after {down:g} s: returning peak/s (1 s)",
                     j["returning_peak_1s"], "/s", floor=u["returning_peak_1s"], ratio=case["returning_ratio_1s"],
                     target="<= 1/5 of un-jittered" if target else "",
                     status=_met(case["returning_ratio_1s"] <= 0.2) if target else "",
                     note=f"floor = un-jittered exponential; 100-ms windows {case['returning_ratio_100ms']}; "
                          f"median back {j['median_back_after_s'] - down:.1f} s after the server "
                          f"(all {j['all_back_after_s'] - down:.1f} s); {j['attempts_while_down']} attempts met the closed port")
        if "fleet_real" in self.results:
            r = self.results["fleet_real"]
            self.row("fleet", f"real sockets: {r['clients']} Upstreams, {r['code']}, back after {r['downtime_s']:g} s: "
                     "returning peak/s (1 s)", r["returning_peak_1s"], "/s", floor=r["unjittered_peak_1s"],
                     ratio=r["ratio_1s"], target="<= 1/5 of un-jittered", status=_met(r["ratio_1s"] <= 0.2),
                     note=f"all back after {r['all_back_after_s']} s; model for the same case {r['model_ratio_1s']}")

    # -- profile -----------------------------------------------------------------------------

    async def profile(self, results_dir: Path, stamp: str) -> None:
        """py-spy on the daemon process during the 1-room and 1000-room floods."""
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            self.results["profile"] = {"skipped": "py-spy not installed (.venv/bin/pip install py-spy)"}
            return
        out: dict[str, Any] = {}
        s = self.sizes
        for nrooms in (1, 1000):
            rooms = {f"p{nrooms}-{i:04d}": 0 for i in range(nrooms)}
            daemon, base = await self.start_daemon(f"profile{nrooms}-{self.variant}", rooms, everything=True)
            await daemon.quiet(window=self.sizes.quiet_window, limit=20)
            raw = results_dir / f"profile-{stamp}-flood-{nrooms}rooms.txt"
            argv = [str(spy), "record", "--pid", str(daemon.pid), "--rate", "250",
                    "--format", "raw", "--output", str(raw), "--nonblocking"]
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
            await asyncio.sleep(1.0)
            dconn = self.up.conn("daemon")
            assert dconn is not None
            for rep in range(2):
                blob, final = self._flood_frames(list(rooms), s.flood_frames, rep % 2 == 0)
                await self.mqtt.call("watch", values={f"{base}/{r}/patients": str(v) for r, v in final.items()})
                await self.up.flood(dconn, blob)
                await self.mqtt.call("wait", timeout=120)
                await daemon.quiet(window=self.sizes.quiet_window, limit=30)
            proc.send_signal(signal.SIGINT)
            try:
                _, err = await asyncio.to_thread(proc.communicate, timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                err = b"timeout"
            self.stop_daemon(daemon)
            if not raw.exists():
                out[f"{nrooms}_rooms"] = {"error": err.decode(errors="replace")[-500:]}
                continue
            summary = summarise_profile(raw.read_text())
            (results_dir / f"profile-{stamp}-flood-{nrooms}rooms-summary.txt").write_text(
                format_profile(summary))
            out[f"{nrooms}_rooms"] = {"raw": str(raw.relative_to(ROOT) if raw.is_relative_to(ROOT) else raw), **summary}
        self.results["profile"] = out


# -- helpers -------------------------------------------------------------------------------


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _median_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each percentile over repetitions (n: all samples)."""
    out: dict[str, Any] = {"n": sum(x["n"] for x in summaries)}
    for q in ("p50", "p90", "p99", "max", "mean"):
        out[q] = median([x[q] for x in summaries])
    return out


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a + b, 4)


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _ctxt(pid: int) -> int:
    total = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def _time_cmd(argv: list[str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.monotonic()
        subprocess.run(argv, check=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT / "daemon")})
        times.append((time.monotonic() - t) * 1000)
    return round(sorted(times)[len(times) // 2], 1)


def _rss_of(argv: list[str]) -> int:
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT / "daemon")})
    try:
        time.sleep(0.8)
        from .procs import memory_kb

        return memory_kb(proc.pid)["VmRSS"]
    finally:
        proc.wait(10)


def summarise_profile(raw: str, top: int = 25) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> the functions with the most samples, self and total."""
    self_count: dict[str, int] = {}
    total_count: dict[str, int] = {}
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        frames = [_short_frame(f) for f in frames]
        self_count[frames[-1]] = self_count.get(frames[-1], 0) + n
        for f in set(frames):
            total_count[f] = total_count.get(f, 0) + n

    def table(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(v / samples * 100, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": samples, "self_percent": table(self_count), "total_percent": table(total_count)}


def _short_frame(frame: str) -> str:
    # "publish (aiomqtt/client.py:494)" -> keep function and the last two path parts
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _line = where.rpartition(":")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def format_profile(summary: dict[str, Any]) -> str:
    lines = [f"samples: {summary['samples']}", "", "self time (% of samples):"]
    lines += [f"  {pct:5.1f}  {name}" for name, pct in summary["self_percent"]]
    lines += ["", "total time, callees included (% of samples):"]
    lines += [f"  {pct:5.1f}  {name}" for name, pct in summary["total_percent"]]
    return "\n".join(lines) + "\n"
