"""``bench/run capacity`` (or ``python -m bench.capacity``): many sites on one broker (issue 14).

``SITES`` daemons (each its own process, its own upstream connection, ``ROOMS`` rooms, its own
``base_topic`` and ``client_id``, discovery on, the display on a free port as shipped) on

- a three-node NATS cluster (``testsupport.NatsCluster``: JetStream, MQTT gateway, MQTT
  streams replicated on all three), each daemon's ``mqtt.hosts`` rotated so that daemon *i*
  uses node *i* mod 3 first, and its measuring subscriber on node *i* + 1 mod 3;
- one mosquitto (``testsupport.Broker``, tuned as the rest of ``bench/``: no Nagle).

One sender (this process: ``upstream.FastUpstream``, the bench's PROTOCOL.md server, serving
every daemon's socket) changes a room picked at random at Poisson times, ``RATE`` changes/s in
all (300/s: each of the 1,000 rooms changes every 3.3 s on average; a busy outpatient
department at its peak, not its average). Every change is a new count (the room's own
counter), so each value names its send: the end-to-end latency is from the sender's write to
the subscriber's receipt of ``<base>/<room>/patients`` (CLOCK_MONOTONIC in both processes).

Measured per broker: the fleet's start (every socket joined; every site ``online`` with every
room's value on the subscribers; every discovery entry), CPU of everything at rest and over
the steady period (each daemon, each broker node, the sender, the subscribers, the whole
machine from ``/proc/stat``), RSS, the latency (p50/p99/max), values never received, and the
final values: the live subscribers' last and a fresh subscriber's retained copy on every node,
against the sender's last. Prints a table and writes JSON to ``bench/results/``.

    bench/run capacity                       # both brokers, 50 x 20, 300/s, 60 s steady (~6 min)
    bench/run capacity --broker nats --sites 5 --rooms 4 --rate 30 --steady 10
    bench/run capacity --smoke               # seconds: 3 x 4 rooms, both brokers
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from testsupport import Broker, Daemon, NatsCluster, cpu_seconds, free_port, http_get, memory_kb

from .mqttlite import MqttLite
from .procs import ROOT, Probe, machine_load
from .stats import machine, median, percentile, source_fingerprint, summary_ms
from .upstream import FastUpstream
from .wsraw import text_frame

RESULTS = ROOT / "bench" / "results"
MS = 1e6
SUBSCRIBERS = 3  # measuring subscribers (one per NATS node; all on the one mosquitto)


@dataclass
class Plan:
    sites: int = 50
    rooms: int = 20
    rate: float = 300.0  # changes/s, all rooms together
    rest: float = 15.0  # the fleet at rest (no changes) before the traffic, measured
    warmup: float = 15.0
    steady: float = 60.0
    drain: float = 3.0
    ready_timeout: float = 300.0
    seed: int = 14
    smoke: bool = False

    @classmethod
    def smoke_plan(cls) -> Plan:
        return cls(sites=3, rooms=4, rate=20.0, rest=0.5, warmup=0.5, steady=2.0, drain=0.5,
                   ready_timeout=60.0, smoke=True)


def site(i: int) -> str:
    return f"site-{i:02d}"


def room_id(i: int, j: int) -> str:
    return f"s{i:02d}-r{j:02d}"


def base_topic(i: int) -> str:
    return f"cap/{site(i)}"


def client_id(i: int) -> str:
    return f"cap-{site(i)}"


# -- /proc ----------------------------------------------------------------------------------


def machine_cpu() -> dict[str, int]:
    """The first line of /proc/stat, in clock ticks, all CPUs together."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: int(v) for n, v in zip(names, parts[1:9])}


def machine_busy_percent(a: dict[str, int], b: dict[str, int]) -> dict[str, float]:
    """Busy share of the whole machine between two readings (100 % = every core busy), and
    what it was made of."""
    total = sum(b.values()) - sum(a.values())
    if total <= 0:
        return {"busy": 0.0}
    d = {k: b[k] - a[k] for k in a}
    idle = d["idle"] + d["iowait"]
    out = {"busy": round((total - idle) / total * 100, 1)}
    out.update({k: round(v / total * 100, 1) for k, v in d.items() if k not in ("idle",)})
    return out


class Procs:
    """Every process of a run by role, and their CPU seconds between readings."""

    def __init__(self) -> None:
        self.roles: dict[str, dict[str, int]] = {}  # role -> name -> pid

    def add(self, role: str, name: str, pid: int) -> None:
        self.roles.setdefault(role, {})[name] = pid

    def reading(self) -> dict[str, Any]:
        cpu: dict[str, float | None] = {}
        for names in self.roles.values():
            for name, pid in names.items():
                try:
                    cpu[name] = cpu_seconds(pid)
                except OSError:
                    cpu[name] = None
        return {"t": time.monotonic(), "cpu": cpu, "machine": machine_cpu()}

    def window(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """CPU % of each process (100 % = one core) and of the machine between two readings."""
        wall = b["t"] - a["t"]
        per: dict[str, float | None] = {}
        for name, before in a["cpu"].items():
            after = b["cpu"].get(name)
            per[name] = None if before is None or after is None else round((after - before) / wall * 100, 2)
        out: dict[str, Any] = {"seconds": round(wall, 1), "machine": machine_busy_percent(a["machine"], b["machine"])}
        ours = 0.0
        for role, names in self.roles.items():
            values = [per[n] for n in names if per.get(n) is not None]
            ours += sum(values)
            out[role] = {"per_process": {n: per.get(n) for n in names}, "sum": round(sum(values), 1),
                         **spread(values)}
        # The run's own processes as a share of the machine, and whatever else ran beside them.
        cores = os.cpu_count() or 1
        out["machine"]["ours"] = round(ours / cores, 1)
        out["machine"]["others"] = round(out["machine"]["busy"] - ours / cores, 1)
        return out

    def memory(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, names in self.roles.items():
            per: dict[str, dict[str, int]] = {}
            for name, pid in names.items():
                with contextlib.suppress(OSError):
                    per[name] = memory_kb(pid)
            rss = [m["VmRSS"] / 1024 for m in per.values()]
            hwm = [m["VmHWM"] / 1024 for m in per.values()]
            out[role] = {"rss_mb": {n: round(m["VmRSS"] / 1024, 1) for n, m in per.items()},
                         "rss_mb_sum": round(sum(rss), 1), **{f"rss_{k}": v for k, v in spread(rss).items()},
                         **{f"hwm_{k}": v for k, v in spread(hwm).items()}}
        return out


def dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body (nats-server's monitoring port answers so) as plain bytes."""
    out, rest = bytearray(), body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            return body  # not chunked after all
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    med = median(values)
    return {"min": round(min(values), 2), "median": None if med is None else round(med, 2),
            "max": round(max(values), 2)}


async def connect_probe(probe: Probe, port: int, name: str, filters: list[str], tries: int = 6) -> None:
    """A fresh NATS cluster creates its MQTT streams (replicated on three nodes) at the first
    MQTT connect, which may take longer than the probe's 5 s for CONNACK: tried again."""
    for attempt in range(tries):
        try:
            await probe.call("connect", host="127.0.0.1", port=port, client_id=name, filters=filters)
            return
        except RuntimeError:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(1)


# -- one broker's run ---------------------------------------------------------------------------


class Run:
    def __init__(self, kind: str, plan: Plan, workdir: Path) -> None:
        self.kind = kind
        self.plan = plan
        self.workdir = workdir
        self.started = time.monotonic()
        self.procs = Procs()
        self.daemons: list[Daemon] = []
        self.display_ports: list[int] = []
        self.probes: list[Probe] = []
        self.cluster: NatsCluster | None = None
        self.broker: Broker | None = None
        self.up: FastUpstream | None = None
        self.result: dict[str, Any] = {"broker": kind}
        self.counter: dict[str, int] = {}
        self.sends: list[tuple[str, int, int]] = []  # (room, value, monotonic_ns before the write)
        self.unsendable = 0

    def log(self, text: str) -> None:
        print(f"[{self.kind} {time.monotonic() - self.started:6.1f} s] {text}", file=sys.stderr, flush=True)

    # -- parts -------------------------------------------------------------------------

    def start_broker(self) -> None:
        if self.kind == "nats":
            self.cluster = NatsCluster(self.workdir, size=3, name="waiting-room-capacity")
            self.cluster.start(timeout=60)
            self.nodes = list(self.cluster.mqtt_ports)
            for i, proc in enumerate(self.cluster.procs):
                assert proc is not None
                self.procs.add("broker", f"nats-n{i}", proc.pid)
            self.result["broker_version"] = self.cluster.version()
            self.result["broker_config"] = {f"n{i}": self.cluster._conf(i) for i in range(3)}
        else:
            self.broker = Broker(self.workdir, tuned=True)
            self.broker.start()
            assert self.broker.proc is not None
            self.nodes = [self.broker.port]
            self.procs.add("broker", "mosquitto", self.broker.proc.pid)
            self.result["broker_version"] = self.broker.version()
            self.result["broker_config"] = self.broker._conf()

    def first_node(self, i: int) -> int:
        return i % len(self.nodes)

    def subscriber_of(self, i: int) -> int:
        """The measuring subscriber (and, on NATS, the node) that watches daemon ``i``: the
        next node after the daemon's first one."""
        return (i + 1) % SUBSCRIBERS

    def daemon_config(self, i: int) -> dict[str, Any]:
        p = self.plan
        nodes = [f"127.0.0.1:{port}" for port in self.nodes]
        k = self.first_node(i)
        mqtt: dict[str, Any] = {"base_topic": base_topic(i), "client_id": client_id(i)}
        if len(nodes) > 1:
            mqtt["hosts"] = nodes[k:] + nodes[:k]
        else:
            mqtt["port"] = self.nodes[0]
        port = free_port()
        self.display_ports.append(port)
        assert self.up is not None
        return {
            "upstream": {"url": self.up.url, "token": "daemon"},
            "rooms": [{"id": room_id(i, j), "name": f"Room {j + 1}"} for j in range(p.rooms)],
            "mqtt": mqtt,
            "display": {"listen": f"127.0.0.1:{port}"},
            "log_level": "info",
        }

    async def start_probes(self) -> None:
        for k in range(SUBSCRIBERS):
            probe = Probe("mqtt")
            await probe.start()
            port = self.nodes[k % len(self.nodes)]
            sites = [i for i in range(self.plan.sites) if self.subscriber_of(i) == k]
            filters = [f"{base_topic(i)}/+/patients" for i in sites] + [f"{base_topic(i)}/status" for i in sites]
            await connect_probe(probe, port, f"cap-probe-{k}", filters or ["cap/none"])
            await probe.call("record", on=True)
            self.probes.append(probe)
            self.procs.add("subscribers", f"probe-{k}", probe.pid)
        # Discovery is watched on the last node (never the first node of a third of the fleet).
        self.discovery = Probe("mqtt")
        await self.discovery.start()
        await connect_probe(self.discovery, self.nodes[-1], "cap-probe-discovery", ["homeassistant/#"])
        self.procs.add("subscribers", "probe-discovery", self.discovery.pid)

    # -- the fleet's start -----------------------------------------------------------------

    async def start_fleet(self) -> None:
        from waiting_room.discovery import Discovery

        p = self.plan
        assert self.up is not None
        watches: list[dict[str, str]] = [{} for _ in range(SUBSCRIBERS)]
        expected_discovery: dict[str, str] = {}
        for i in range(p.sites):
            w = watches[self.subscriber_of(i)]
            w[f"{base_topic(i)}/status"] = "online"
            for j in range(p.rooms):
                w[f"{base_topic(i)}/{room_id(i, j)}/patients"] = "0"
            d = Discovery.for_client("homeassistant", base_topic(i), client_id(i))
            for m in d.messages([(room_id(i, j), f"Room {j + 1}") for j in range(p.rooms)]):
                expected_discovery[m.topic] = m.payload
        for probe, w in zip(self.probes, watches):
            await probe.call("watch", values=w, accept_current=True)
        await self.discovery.call("watch", values=expected_discovery, accept_current=True)
        self.daemons = [Daemon(self.workdir, site(i), self.daemon_config(i)) for i in range(p.sites)]
        for d in self.daemons:
            d.config_path.chmod(0o600)  # as installed: no warning about a config others can read
        t0 = time.monotonic_ns()
        for d in self.daemons:
            d.start()
        self.log(f"{p.sites} daemons started in {(time.monotonic_ns() - t0) / MS:.0f} ms (Popen)")
        for d in self.daemons:
            self.procs.add("daemons", d.name, d.pid)

        def all_joined() -> bool:
            return sum(1 for c in self.up.conns if len(c.joined) >= p.rooms) >= p.sites  # type: ignore[union-attr]

        async def joined() -> int:
            # Polled: FastUpstream only signals a connection that joined every room it serves.
            async with asyncio.timeout(p.ready_timeout):
                while not all_joined():
                    await asyncio.sleep(0.02)
            return time.monotonic_ns()

        joined_task = asyncio.create_task(joined())
        waits = [probe.call("wait", timeout=p.ready_timeout, limit=p.ready_timeout + 30) for probe in self.probes]
        waits.append(self.discovery.call("wait", timeout=p.ready_timeout, limit=p.ready_timeout + 30))
        answers = await asyncio.gather(*waits)
        try:
            t_joined = await joined_task
        except TimeoutError:
            t_joined = None
        values, disc = answers[:-1], answers[-1]
        handshakes = sorted(t for t, label in self.up.handshakes if label == "daemon")
        ready = {
            "daemons": p.sites,
            "rooms": p.sites * p.rooms,
            "first_upstream_handshake_s": round((handshakes[0] - t0) / 1e9, 2) if handshakes else None,
            "last_upstream_handshake_s": round((handshakes[-1] - t0) / 1e9, 2) if handshakes else None,
            "upstream_handshakes": len(handshakes),
            "all_sockets_joined_s": round((t_joined - t0) / 1e9, 2) if t_joined else None,
            "all_online_with_values_s": round((max(a["t"] for a in values) - t0) / 1e9, 2)
            if all(a["done"] for a in values) else None,
            "values_missing": sum(a["missing"] for a in values),
            "values_examples": [a["examples"] for a in values if a["missing"]][:2],
            "discovery_entries": len(expected_discovery),
            "all_discovery_s": round((disc["t"] - t0) / 1e9, 2) if disc["done"] else None,
            "discovery_missing": disc["missing"],
            "discovery_examples": disc["examples"] if disc["missing"] else {},
        }
        self.result["ready"] = ready
        self.log(f"fleet: {json.dumps(ready)}")
        if ready["all_online_with_values_s"] is None or ready["all_sockets_joined_s"] is None:
            dead = [d.name for d in self.daemons if not d.alive()]
            raise RuntimeError(f"the fleet did not come up: {json.dumps(ready)}; dead daemons: {dead}; "
                               f"{self.daemons[0].log_tail(10)}")
        self.counter = {room_id(i, j): 0 for i in range(p.sites) for j in range(p.rooms)}

    async def nodes_in_use(self) -> dict[str, Any]:
        """Each daemon's /healthz: the node it is on (mqtt_node), and whether that is the one
        its measuring subscriber is on."""
        on: dict[str, str | None] = {}
        same = 0
        for i, port in enumerate(self.display_ports):
            node = None
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                _, _, body = await http_get(port, "/healthz", timeout=5)
                node = json.loads(body).get("components", {}).get("mqtt_node")
            on[site(i)] = node
            sub_port = self.nodes[self.subscriber_of(i) % len(self.nodes)]
            if len(self.nodes) > 1 and node == f"127.0.0.1:{sub_port}":
                same += 1
        tally: dict[str, int] = {}
        for node in on.values():
            tally[str(node)] = tally.get(str(node), 0) + 1
        return {"per_node": tally, "daemons_on_their_subscribers_node": same}

    # -- traffic ---------------------------------------------------------------------------

    async def send(self, duration: float, rng: random.Random) -> None:
        """Poisson changes at ``plan.rate``, each a new count of a random room, written to the
        socket of the daemon that joined it."""
        assert self.up is not None
        rooms = list(self.counter)
        conn_of: dict[str, Any] = {}

        def lookup(room: str) -> Any:
            conn = conn_of.get(room)
            if conn is None or conn.ws.transport.is_closing():
                conn_of.clear()
                for c in self.up.conns:  # type: ignore[union-attr]
                    for r in c.joined:
                        conn_of[r] = c
                conn = conn_of.get(room)
            return conn

        loop_start = time.monotonic()
        end = loop_start + duration
        t_next = loop_start + rng.expovariate(self.plan.rate)
        while t_next < end:
            now = time.monotonic()
            while t_next <= now and t_next < end:
                room = rng.choice(rooms)
                conn = lookup(room)
                if conn is None:
                    self.unsendable += 1
                else:
                    value = self.counter[room] + 1
                    self.counter[room] = value
                    payload, _ = self.up.set_room(room, value)
                    frame = text_frame(payload)
                    t = time.monotonic_ns()
                    conn.ws.transport.write(frame)
                    self.sends.append((room, value, t))
                t_next += rng.expovariate(self.plan.rate)
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def sample_while(self, task: asyncio.Task[Any], every: float = 5.0) -> list[dict[str, Any]]:
        """Machine CPU % in windows of ``every`` seconds while ``task`` runs."""
        series = []
        last = {"t": time.monotonic(), "machine": machine_cpu()}
        while not task.done():
            await asyncio.wait({task}, timeout=every)
            now = {"t": time.monotonic(), "machine": machine_cpu()}
            series.append({"seconds": round(now["t"] - last["t"], 1),
                           **machine_busy_percent(last["machine"], now["machine"])})
            last = now
        return series

    async def nats_stats(self) -> dict[str, Any] | None:
        if self.cluster is None:
            return None
        out: dict[str, Any] = {}
        for i, port in enumerate(self.cluster.http_ports):
            node: dict[str, Any] = {}
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                _, headers, body = await http_get(port, "/varz", timeout=5)
                v = json.loads(dechunk(body) if "chunked" in headers.get("transfer-encoding", "") else body)
                node["varz"] = {k: v.get(k) for k in ("connections", "total_connections", "in_msgs", "out_msgs",
                                                      "in_bytes", "out_bytes", "mem", "cpu", "slow_consumers",
                                                      "subscriptions")}
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                _, headers, body = await http_get(port, "/jsz?accounts=true&streams=true", timeout=5)
                j = json.loads(dechunk(body) if "chunked" in headers.get("transfer-encoding", "") else body)
                streams = []
                for acc in j.get("account_details") or []:
                    for s in acc.get("stream_detail") or []:
                        state = s.get("state", {})
                        streams.append({"name": s.get("name"), "leader": (s.get("cluster") or {}).get("leader"),
                                        "messages": state.get("messages"), "bytes": state.get("bytes"),
                                        "first_seq": state.get("first_seq"), "last_seq": state.get("last_seq"),
                                        "num_deleted": state.get("num_deleted")})
                node["jetstream"] = {k: j.get(k) for k in ("memory", "storage", "streams", "messages", "bytes")}
                node["streams"] = streams
            out[f"n{i}"] = node
        return out

    # -- the checks --------------------------------------------------------------------------

    async def retained(self, port: int, topic_filter: str, want: int, quiet: float = 1.5,
                       limit: float = 20.0) -> dict[str, bytes]:
        """What a fresh subscriber on this node is given for one filter (one client per filter:
        nats-server 2.9.10 may give a client with two filters the retained messages of one)."""
        got: dict[str, bytes] = {}
        last = [time.monotonic()]

        def on(topic: bytes, payload: bytes, t: int) -> None:
            got[topic.decode()] = payload
            last[0] = time.monotonic()

        client = MqttLite("127.0.0.1", port, f"cap-check-{time.monotonic_ns()}", on)
        await client.connect()
        await client.subscribe(topic_filter)
        deadline = time.monotonic() + limit
        while len(got) < want and time.monotonic() < deadline and time.monotonic() - last[0] < max(quiet, 5.0):
            await asyncio.sleep(0.05)
        await client.close()
        return got

    async def check_finals(self, live: dict[str, str]) -> dict[str, Any]:
        """Each room's last value: the live subscribers' and every node's retained copy (a
        fresh subscriber; three tries per node and filter) against the sender's last."""
        finals = {room: value for room, value in self.counter.items()}
        site_of = {room_id(i, j): i for i in range(self.plan.sites) for j in range(self.plan.rooms)}
        topic = {room: f"{base_topic(site_of[room])}/{room}" for room in finals}
        live_wrong = [r for r, v in finals.items() if live.get(f"{topic[r]}/patients") != str(v)]
        out: dict[str, Any] = {"rooms": len(finals), "live_wrong": len(live_wrong),
                               "live_examples": {r: (live.get(f"{topic[r]}/patients"), finals[r]) for r in live_wrong[:3]},
                               "retained": {}}
        for n, port in enumerate(self.nodes):
            node: dict[str, Any] = {}
            for kind in ("patients", "state"):
                tries = []
                for _attempt in range(3):
                    got = await self.retained(port, f"cap/+/+/{kind}", len(finals))
                    wrong, missing = [], []
                    for room, value in finals.items():
                        payload = got.get(f"{topic[room]}/{kind}")
                        if payload is None:
                            missing.append(room)
                            continue
                        if kind == "patients":
                            ok = payload == str(value).encode()
                        else:
                            state = json.loads(payload)
                            ok = state.get("patients") == value and not state.get("stale")
                        if not ok:
                            wrong.append(room)
                    tries.append({"received": len(got), "missing": len(missing), "wrong": len(wrong),
                                  "examples": {r: (got.get(f"{topic[r]}/{kind}", b"").decode()[:80], finals[r])
                                               for r in (wrong + missing)[:3]}})
                    if not wrong and not missing:
                        break
                node[kind] = {"tries": len(tries), "final": tries[-1], "all": tries}
            out["retained"][f"node{n}"] = node
        out["retained_wrong_any_node"] = sum(n[k]["final"]["wrong"] for n in out["retained"].values()
                                             for k in ("patients", "state"))
        out["retained_missing_any_node"] = sum(n[k]["final"]["missing"] for n in out["retained"].values()
                                               for k in ("patients", "state"))
        out["retained_first_try_misses"] = sum(n[k]["all"][0]["missing"] for n in out["retained"].values()
                                               for k in ("patients", "state"))
        return out

    # -- the whole run -------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        p = self.plan
        rng = random.Random(p.seed)
        try:
            self.start_broker()
            self.procs.add("sender", "sender (this harness)", os.getpid())
            self.up = FastUpstream({room_id(i, j): 0 for i in range(p.sites) for j in range(p.rooms)})
            await self.up.start()
            await self.start_probes()
            self.log(f"broker {self.result['broker_version']} on {self.nodes}; starting {p.sites} daemons")
            self.result["rest_before_start"] = self.procs.memory()
            await self.start_fleet()
            self.result["nodes_in_use"] = await self.nodes_in_use()
            self.log(f"nodes in use: {self.result['nodes_in_use']}")

            # The fleet at rest: keepalives, heartbeats and pings only.
            await asyncio.sleep(min(5.0, p.rest))
            a = self.procs.reading()
            await asyncio.sleep(p.rest)
            b = self.procs.reading()
            self.result["rest"] = {"cpu": self.procs.window(a, b), "memory": self.procs.memory()}
            self.log(f"rest: machine {self.result['rest']['cpu']['machine']}")

            self.log(f"warm-up: {p.rate:g} changes/s for {p.warmup:g} s")
            await self.send(p.warmup, rng)
            stats_before = await self.nats_stats()
            self.log(f"steady: {p.rate:g} changes/s for {p.steady:g} s")
            a = self.procs.reading()
            t_steady0 = time.monotonic_ns()
            sending = asyncio.create_task(self.send(p.steady, rng))
            series = await self.sample_while(sending)
            await sending
            t_steady1 = time.monotonic_ns()
            b = self.procs.reading()
            memory = self.procs.memory()
            stats_after = await self.nats_stats()
            await asyncio.sleep(p.drain)
            steady_sends = [s for s in self.sends if t_steady0 <= s[2] <= t_steady1]
            self.result["steady"] = {
                "cpu": self.procs.window(a, b), "memory": memory, "machine_series": series,
                "sends": len(steady_sends), "rate_achieved": round(len(steady_sends) / ((t_steady1 - t_steady0) / 1e9), 1),
                "unsendable": self.unsendable,
            }
            if stats_before is not None and stats_after is not None:
                self.result["nats"] = {"before_steady": stats_before, "after_steady": stats_after,
                                       "steady": nats_delta(stats_before, stats_after, len(steady_sends),
                                                            (t_steady1 - t_steady0) / 1e9)}
            self.log(f"steady: machine {self.result['steady']['cpu']['machine']}")

            # Latency: every send of the steady period against its receipt.
            received: dict[tuple[str, int], int] = {}
            live: dict[str, str] = {}
            for probe in self.probes:
                dump = await probe.call("dump", limit=120)
                for topic, payload, t in dump["samples"]:
                    if topic.endswith("/patients"):
                        room = topic.rsplit("/", 2)[1]
                        with contextlib.suppress(ValueError):
                            received.setdefault((room, int(payload)), t)
                values = await probe.call("last", prefix="cap/")
                live.update(values["values"])
            latencies, missing, superseded = [], [], 0
            next_send: dict[tuple[str, int], int] = {}
            for room, value, t in self.sends:
                next_send[(room, value - 1)] = t
            for room, value, t in steady_sends:
                got = received.get((room, value))
                if got is None:
                    missing.append((room, value))
                    nxt = next_send.get((room, value))
                    if nxt is not None and nxt - t < 50 * MS:
                        superseded += 1
                else:
                    latencies.append(got - t)
            lat = summary_ms(latencies)
            values_ms = sorted(x / MS for x in latencies)
            lat["p999"] = round(percentile(values_ms, 99.9), 3) if values_ms else None
            over = {f"over_{limit}_ms": sum(1 for x in values_ms if x > limit) for limit in (10, 50, 100, 1000)}
            self.result["latency"] = {**lat, **over, "sent": len(steady_sends), "never_received": len(missing),
                                      "never_received_superseded_within_50ms": superseded,
                                      "never_received_examples": missing[:5]}
            self.log(f"latency: {json.dumps(self.result['latency'])}")
            self.result["finals"] = await self.check_finals(live)
            self.log(f"finals: live wrong {self.result['finals']['live_wrong']}, retained wrong "
                     f"{self.result['finals']['retained_wrong_any_node']}, missing "
                     f"{self.result['finals']['retained_missing_any_node']}")
            self.result["daemon_logs"] = self.log_summary()
            self.result["complete"] = True
        except BaseException as exc:  # noqa: BLE001 - the partial results are still written
            self.result["complete"] = False
            self.result["error"] = f"{type(exc).__name__}: {exc}"
            self.log(f"failed: {self.result['error']}")
        finally:
            await self.teardown()
        return self.result

    def log_summary(self) -> dict[str, Any]:
        """Warnings, errors and tracebacks in the daemons' logs (counted, a few quoted)."""
        counts = {"warning": 0, "error": 0, "traceback": 0}
        examples: list[str] = []
        for d in self.daemons:
            for line in d.log_text().splitlines():
                low = line.lower()
                for key in counts:
                    if key in low:
                        counts[key] += 1
                        if len(examples) < 5:
                            examples.append(f"{d.name}: {line[:200]}")
        return {**counts, "examples": examples, "alive_at_end": sum(d.alive() for d in self.daemons)}

    async def teardown(self) -> None:
        for d in self.daemons:  # every SIGTERM first, then the waits: they stop together
            d.signal(signal.SIGTERM)
        for d in self.daemons:
            if d.proc is not None:
                try:
                    await asyncio.to_thread(d.proc.wait, 10)
                except Exception:  # noqa: BLE001
                    d.kill()
        for probe in [*self.probes, getattr(self, "discovery", None)]:
            if probe is not None:
                with contextlib.suppress(Exception):
                    await probe.stop()
        if self.up is not None:
            with contextlib.suppress(Exception):
                await self.up.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.broker is not None:
            self.broker.stop()


def nats_delta(a: dict[str, Any], b: dict[str, Any], changes: int, seconds: float) -> dict[str, Any]:
    """What the steady period cost inside the cluster: NATS messages in and out of every node
    (client, route and JetStream traffic together) and the writes to the retained stream
    (each retained MQTT publish is a new message of ``$MQTT_rmsgs``, the room's previous one
    deleted), per change."""
    out: dict[str, Any] = {}
    in_msgs = out_msgs = 0
    for n in b:
        va, vb = a.get(n, {}).get("varz") or {}, b[n].get("varz") or {}
        if va and vb:
            in_msgs += vb["in_msgs"] - va["in_msgs"]
            out_msgs += vb["out_msgs"] - va["out_msgs"]
    out["nats_msgs_in_per_s"] = round(in_msgs / seconds)
    out["nats_msgs_out_per_s"] = round(out_msgs / seconds)
    out["nats_msgs_in_per_change"] = round(in_msgs / changes, 1) if changes else None

    def rmsgs(stats: dict[str, Any]) -> dict[str, Any] | None:
        for node in stats.values():
            for stream in node.get("streams") or []:
                if stream["name"] == "$MQTT_rmsgs":
                    return stream
        return None

    ra, rb = rmsgs(a), rmsgs(b)
    if ra and rb and ra.get("last_seq") is not None and rb.get("last_seq") is not None:
        writes = rb["last_seq"] - ra["last_seq"]
        out["retained_writes_per_s"] = round(writes / seconds)
        out["retained_writes_per_change"] = round(writes / changes, 2) if changes else None
        out["retained_messages_held"] = rb.get("messages")
        out["retained_stream_leader"] = rb.get("leader")
    return out


# -- the table ----------------------------------------------------------------------------------


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    r = result.get("ready", {})
    out.append(("fleet: every socket joined", f"{_f(r.get('all_sockets_joined_s'))} s"))
    out.append(("fleet: every site online + every value on the subscribers", f"{_f(r.get('all_online_with_values_s'))} s"))
    out.append(("fleet: every discovery entry on the broker",
                f"{_f(r.get('all_discovery_s'))} s ({_f(r.get('discovery_entries'))} entries)"))
    lat = result.get("latency", {})
    out.append(("latency p50 / p99 / max",
                f"{_f(lat.get('p50'), 3)} / {_f(lat.get('p99'), 3)} / {_f(lat.get('max'), 1)} ms"))
    out.append(("latency: samples, over 10 / 100 ms",
                f"{_f(lat.get('n'))}, {_f(lat.get('over_10_ms'))} / {_f(lat.get('over_100_ms'))}"))
    out.append(("changes never received (superseded within 50 ms)",
                f"{_f(lat.get('never_received'))} ({_f(lat.get('never_received_superseded_within_50ms'))})"))
    fin = result.get("finals", {})
    out.append(("final values wrong: live / retained (missing)",
                f"{_f(fin.get('live_wrong'))} / {_f(fin.get('retained_wrong_any_node'))} "
                f"({_f(fin.get('retained_missing_any_node'))}; first try {_f(fin.get('retained_first_try_misses'))})"))
    for phase in ("rest", "steady"):
        ph = result.get(phase, {})
        cpu, mem = ph.get("cpu", {}), ph.get("memory", {})
        d = cpu.get("daemons", {})
        out.append((f"{phase}: daemon CPU % min / median / max (sum)",
                    f"{_f(d.get('min'))} / {_f(d.get('median'))} / {_f(d.get('max'))} ({_f(d.get('sum'), 1)})"))
        b = cpu.get("broker", {})
        out.append((f"{phase}: broker CPU % per node", ", ".join(f"{_f(v, 1)}" for v in b.get("per_process", {}).values())
                    + f" (sum {_f(b.get('sum'), 1)})"))
        m = cpu.get("machine", {})
        out.append((f"{phase}: machine CPU % (all cores = 100 %): ours + others",
                    f"{_f(m.get('busy'), 1)}: {_f(m.get('ours'), 1)} + {_f(m.get('others'), 1)}"
                    f" (steal {_f(m.get('steal'), 1)})"))
        if phase == "steady":
            s, sub = cpu.get("sender", {}), cpu.get("subscribers", {})
            out.append(("steady: sender / subscribers CPU %", f"{_f(s.get('sum'), 1)} / {_f(sub.get('sum'), 1)}"))
            series = ph.get("machine_series", [])
            if series:
                out.append(("steady: machine CPU %, busiest 5 s", _f(max(x["busy"] for x in series), 1)))
            dm, bm = mem.get("daemons", {}), mem.get("broker", {})
            out.append(("daemon RSS MB min / median / max",
                        f"{_f(dm.get('rss_min'), 1)} / {_f(dm.get('rss_median'), 1)} / {_f(dm.get('rss_max'), 1)}"))
            out.append(("broker RSS MB per node", ", ".join(_f(v, 1) for v in bm.get("rss_mb", {}).values())))
            nd = result.get("nats", {}).get("steady")
            if nd:
                out.append(("NATS: retained-stream writes/s (per change); NATS msgs in/s",
                            f"{_f(nd.get('retained_writes_per_s'))} ({_f(nd.get('retained_writes_per_change'))}); "
                            f"{_f(nd.get('nats_msgs_in_per_s'))}"))
            out.append(("changes sent in the steady period (rate)",
                        f"{_f(ph.get('sends'))} ({_f(ph.get('rate_achieved'), 1)}/s)"))
    return out


def table(results: list[dict[str, Any]]) -> str:
    columns = [dict(rows(r)) for r in results]
    names: list[str] = []
    for c in columns:
        names += [n for n in c if n not in names]
    heads = ["metric"] + [r["broker"] + ("" if r.get("complete") else " (INCOMPLETE)") for r in results]
    body = [[name] + [c.get(name, "-") for c in columns] for name in names]
    widths = [max(len(x[k]) for x in [heads, *body]) for k in range(len(heads))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    plan = Plan.smoke_plan() if args.smoke else Plan()
    for key in ("sites", "rooms", "rate", "rest", "warmup", "steady", "seed"):
        value = getattr(args, key)
        if value is not None:
            setattr(plan, key, type(getattr(plan, key))(value))
    brokers = ["nats", "mosquitto"] if args.broker == "both" else [args.broker]
    if "nats" in brokers and not (shutil.which("nats-server") or os.path.exists("/usr/sbin/nats-server")):
        print("nats-server is not installed (scripts/setup installs it): the cluster run is skipped", file=sys.stderr)
        brokers.remove("nats")
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-smoke" if plan.smoke else "")
    doc: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT), "-m", "bench.capacity",
                                                      *sys.argv[1:]]),
        "machine": machine(Broker(Path(tempfile.gettempdir())).version()),
        "daemon_source": source_fingerprint(ROOT),
        "plan": asdict(plan),
        "runs": [],
    }
    started = time.monotonic()
    for kind in brokers:
        workdir = Path(tempfile.mkdtemp(prefix=f"capacity-{stamp}-{kind}-", dir=out_dir))
        doc["runs"].append(await Run(kind, plan, workdir).run())
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["machine"]["loadavg_at_end"] = machine_load()
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["complete"] = all(r.get("complete") for r in doc["runs"])
    path = out_dir / f"capacity-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    m = doc["machine"]
    print(f"\nwaiting-room capacity: {plan.sites} sites x {plan.rooms} rooms, {plan.rate:g} changes/s, "
          f"{plan.steady:g} s steady; {m['cpu_model']}, {m['cores']} cores, {m['date']}; {doc['duration_s']} s")
    if doc["runs"]:
        print(table(doc["runs"]))
    print(f"\nJSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if doc["complete"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", choices=("both", "nats", "mosquitto"), default="both")
    parser.add_argument("--sites", type=int)
    parser.add_argument("--rooms", type=int, help="rooms per site")
    parser.add_argument("--rate", type=float, help="changes/s, all rooms together (default 300)")
    parser.add_argument("--rest", type=float, help="seconds of the fleet at rest, measured (default 15)")
    parser.add_argument("--warmup", type=float, help="seconds of traffic before the measured period (default 15)")
    parser.add_argument("--steady", type=float, help="seconds measured (default 60)")
    parser.add_argument("--seed", type=int, help="the sender's random seed (default 14)")
    parser.add_argument("--smoke", action="store_true", help="3 sites x 4 rooms, seconds: for CI")
    parser.add_argument("--keep", action="store_true", help="keep the work directories (logs, configs, stores)")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
