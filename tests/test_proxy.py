"""Through a real forward proxy (Debian's tinyproxy on a free loopback port): the socket goes
through it with CONNECT, the snapshot with plain GETs, whether configured (``upstream.proxy``)
or from the environment (``http_proxy`` / ``no_proxy``); and when the proxy breaks the
upgrade, the values still arrive, polled through it (issue 9). The proxy's own log shows that
the daemon's requests went through it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import eventually, make_config, running

from testsupport import Tinyproxy
from waiting_room.simulator import SNAPSHOT_PATH

INTERVAL = 1.0


def _require_tinyproxy() -> None:
    if os.path.exists("/usr/bin/tinyproxy"):
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail("tinyproxy is not installed (scripts/setup installs it)", pytrace=False)
    pytest.skip("tinyproxy is not installed (scripts/setup installs it)")


def _proxy(tmp_path: Path, **kwargs: object) -> Iterator[Tinyproxy]:
    _require_tinyproxy()
    workdir = tmp_path / "proxy"
    workdir.mkdir()
    proxy = Tinyproxy(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        proxy.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    """Carries upgrades: CONNECT to any port."""
    yield from _proxy(tmp_path)


@pytest.fixture
def strict_proxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    """CONNECT to port 443 only, as many site proxies: the socket cannot be had through it."""
    yield from _proxy(tmp_path, connect_ports=(443,))


async def wait_log(proxy: Tinyproxy, predicate: Callable[[list[str]], bool], timeout: float = 5.0) -> list[str]:
    """The proxy's log once ``predicate`` holds for it (a file: looked at every 20 ms)."""

    def logged() -> list[str] | None:
        requests = proxy.requests()
        return requests if predicate(requests) else None

    return await eventually(logged, timeout, "the proxy's log to show what was expected", interval=0.02)


def state(watcher, room: str) -> dict:
    return json.loads(watcher.last.get(f"waiting-room/{room}/state") or "{}")


def config_for(sim, broker_port: int, proxy: str | None):
    upstream = {
        "url": sim.url, "token": "test-token", "backoff": {"initial": 0.05, "max": 0.3},
        "stable_after": 0.5, "connect_timeout": 2,
        "fallback": {"url": sim.snapshot_url, "interval": INTERVAL, "after": 0.3},
    }
    if proxy is not None:
        upstream["proxy"] = proxy
    return make_config(sim.url, broker_port, upstream=upstream)


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


async def test_a_proxy_that_carries_the_upgrade(sim, broker, watcher, proxy, clean_proxy_env):
    sim.set_snapshot_poll(INTERVAL)
    connect = f"CONNECT 127.0.0.1:{sim.port}"
    poll = f"GET http://127.0.0.1:{sim.port}{SNAPSHOT_PATH}?room=opd-1&room=lab"
    async with running(config_for(sim, broker.port, proxy.url)):
        await watcher.wait_topic("waiting-room/upstream", "connected")
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        await wait_log(proxy, lambda r: connect in r)
        assert sim.connections == 1
        # The server side breaks upgrades now: polled through the same proxy.
        sim.break_upgrades("426")
        await sim.close_all(1011)
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=5)
        sim.set_queue("opd-1", 6)
        await watcher.wait_topic("waiting-room/opd-1/patients", "6", timeout=3)
        await wait_log(proxy, lambda r: poll in r)
        # Back on the socket, through the proxy again.
        connects = proxy.requests().count(connect)
        sim.break_upgrades(None)
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=3)
        await wait_log(proxy, lambda r: r.count(connect) > connects)
        assert sim.connections == 2


async def test_a_proxy_that_breaks_the_upgrade(sim, broker, watcher, strict_proxy, clean_proxy_env):
    """CONNECT refused (403) by the proxy: the socket never reaches the server, the values
    come through the proxy's plain GETs, fresh within the polling interval."""
    sim.set_snapshot_poll(INTERVAL)
    async with running(config_for(sim, broker.port, strict_proxy.url)) as app:
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=5)
        await watcher.wait_for(lambda: state(watcher, "lab").get("patients") == 2
                               and state(watcher, "lab").get("stale") is False)
        assert "proxy rejected connection: HTTP 403" in app.store.link.detail
        sim.set_queue("lab", 3)
        await watcher.wait_topic("waiting-room/lab/patients", "3", timeout=INTERVAL + 2)
        requests = await wait_log(strict_proxy, lambda r: any(x.startswith("GET ") for x in r))
        assert f"CONNECT 127.0.0.1:{sim.port}" in requests
        assert sim.connections == 0 and sim.handshakes == 0  # refused by the proxy itself
        assert sim.snapshot_requests["served"] >= 1


async def test_the_proxy_environment_applies_without_upstream_proxy(sim, broker, watcher, proxy, clean_proxy_env):
    clean_proxy_env.setenv("http_proxy", proxy.url)
    clean_proxy_env.setenv("https_proxy", proxy.url)
    sim.set_snapshot_poll(INTERVAL)
    async with running(config_for(sim, broker.port, None)):
        await watcher.wait_topic("waiting-room/upstream", "connected")
        await wait_log(proxy, lambda r: f"CONNECT 127.0.0.1:{sim.port}" in r)
        sim.break_upgrades("426")
        await sim.close_all(1011)
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=5)
        await wait_log(proxy, lambda r: any(x.startswith(f"GET http://127.0.0.1:{sim.port}/") for x in r))


async def test_no_proxy_bypasses_the_proxy_environment(sim, broker, watcher, proxy, clean_proxy_env):
    clean_proxy_env.setenv("http_proxy", proxy.url)
    clean_proxy_env.setenv("https_proxy", proxy.url)
    clean_proxy_env.setenv("no_proxy", "127.0.0.1,localhost")
    sim.set_snapshot_poll(INTERVAL)
    sim.break_upgrades("426")
    async with running(config_for(sim, broker.port, None)):
        await watcher.wait_topic("waiting-room/upstream", "degraded", timeout=5)
        sim.break_upgrades(None)
        await watcher.wait_topic("waiting-room/upstream", "connected", timeout=3)
    assert proxy.requests() == []
