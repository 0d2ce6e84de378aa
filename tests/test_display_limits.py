"""No client of the display port can hurt the rest of the daemon: connection and screen
limits, the descriptor reserve, refusals counted in /healthz, no log storm.

The last test is the reported incident end to end: the daemon as its own process under a
512-descriptor limit, ~1,500 connections opened to its display port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from browser import serving
from conftest import ROOT, daemon_command, eventually, free_port, write_config
from testsupport import http_get
from waiting_room.config import DisplayConfig, RoomConfig
from waiting_room.display import limits
from waiting_room.display.limits import Budget, ConnectionLimits, address_key
from waiting_room.logutil import LoopExceptionLog
from waiting_room.store import RoomStore

ROOMS = [RoomConfig(id="opd-1", name="OPD 1"), RoomConfig(id="lab", name="Laboratory")]


def store() -> RoomStore:
    return RoomStore((r.id, r.title) for r in ROOMS)


def display(**kw: object) -> DisplayConfig:
    return DisplayConfig(listen="127.0.0.1:0", **kw)  # type: ignore[arg-type]


# -- the bookkeeping, without sockets ----------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        (("192.0.2.7", 51000), "192.0.2.7"),
        (("::ffff:192.0.2.7", 51000, 0, 0), "192.0.2.7"),
        (("2001:db8:1:2:aaaa::1", 51000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 51000, 0, 0), "2001:db8:1:2::/64"),  # same /64, same budget
        (("fe80::1%eth0", 51000, 0, 2), "fe80::/64"),
        (None, "?"),
    ],
)
def test_address_key(peer, key):
    assert address_key(peer) == key


def test_budget_from_the_descriptor_limit():
    # The incident's limit: 512 - 64 reserved - 64 (one accept batch) for connections.
    b = Budget.plan(500, 20, 512)
    # The last HEALTH_ROOM below the ceiling are for /healthz alone.
    assert (b.accept_batch, b.fd_ceiling, b.health_open) == (64, 384, 384)
    assert b.max_open == 384 - limits.HEALTH_ROOM
    assert b.max_clients == 384 - limits.HEALTH_ROOM - limits.HTTP_ROOM and b.clamped
    assert (b.per_address_clients, b.per_address_open) == (20, 20 + limits.HTTP_PER_ADDRESS)
    # systemd's LimitNOFILE=8192: the configured numbers fit as they are.
    b = Budget.plan(500, 20, 8192)
    assert not b.clamped and b.max_clients == 500 and b.max_open == 500 + limits.HTTP_ROOM
    assert b.fd_ceiling == 8192 - limits.RESERVE_FDS - limits.MAX_ACCEPT_BATCH
    b = Budget.plan(500, 20, None)  # unlimited
    assert not b.clamped and b.fd_ceiling is None and b.max_clients == 500
    b = Budget.plan(500, 20, 64)  # absurdly low: something still works
    assert b.clamped and b.max_clients >= 1


def test_connections_per_address_and_in_all():
    c = ConnectionLimits(Budget.plan(max_clients=2, max_per_address=1, soft_limit=None))
    per_address = 1 + limits.HTTP_PER_ADDRESS
    assert [c.opened("a") for _ in range(per_address)] == [None] * per_address
    assert c.opened("a") == limits.TOO_MANY_FROM_ADDRESS  # counted until closed all the same
    assert c.opened("b") is None
    assert c.open == per_address + 2
    c.closed("a", client=False)
    c.closed("a", client=False)
    assert c.opened("a") is None
    # In all: max_clients + HTTP_ROOM connections, whichever address; then HEALTH_ROOM more
    # that may ask for /healthz alone; then refusals.
    c = ConnectionLimits(Budget.plan(max_clients=2, max_per_address=1, soft_limit=None))
    full, health = 2 + limits.HTTP_ROOM, limits.HEALTH_ROOM
    reasons = [c.opened(f"10.0.{i // 200}.{i % 200}") for i in range(full + health + 1)]
    assert reasons[:full] == [None] * full
    assert reasons[full:-1] == [limits.HEALTH_ONLY] * health
    assert reasons[-1] == limits.TOO_MANY_CONNECTIONS
    assert c.refuse_beyond_health() == limits.TOO_MANY_CONNECTIONS
    assert c.stats()["refused_by_reason"] == {limits.TOO_MANY_CONNECTIONS: 2}


def test_a_high_descriptor_number_is_refused_whatever_the_count():
    c = ConnectionLimits(Budget.plan(500, 20, 512))
    assert c.opened("a", fd=383) is None
    assert c.opened("b", fd=384) == limits.TOO_MANY_CONNECTIONS


def test_screens_per_address_and_in_all():
    c = ConnectionLimits(Budget.plan(max_clients=3, max_per_address=2, soft_limit=None))
    assert [c.take_client("a"), c.take_client("a"), c.take_client("a")] == [
        None, None, limits.TOO_MANY_CLIENTS_FROM_ADDRESS]
    assert c.take_client("b") is None
    assert c.take_client("c") == limits.TOO_MANY_CLIENTS
    c.closed("a", client=True)
    c.open = 10  # (not opened here; only the screens matter)
    assert c.take_client("c") is None
    stats = c.stats()
    assert stats["refused_clients"] == 2
    assert stats["refused_by_reason"] == {"address_clients": 1, "clients": 1}
    assert stats["limits"] == {"max_clients": 3, "max_clients_per_address": 2, "max_connections": 3 + limits.HTTP_ROOM}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_loop_errors_are_logged_once_per_kind_and_interval(caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    clock = Clock()
    handler = LoopExceptionLog(interval=60.0, clock=clock)
    loop = asyncio.new_event_loop()
    try:
        emfile = OSError(24, "Too many open files")
        for _ in range(1000):
            handler(loop, {"message": "socket.accept() out of system resource", "exception": emfile})
        handler(loop, {"message": "Task exception was never retrieved", "exception": ValueError("x")})
        assert [r.getMessage() for r in caplog.records] == [
            "socket.accept() out of system resource", "Task exception was never retrieved"]
        assert caplog.records[0].exc_info is not None  # the first one keeps its traceback
        clock.now += 61
        handler(loop, {"message": "socket.accept() out of system resource", "exception": emfile})
        assert caplog.records[-1].getMessage() == (
            "socket.accept() out of system resource (and 999 more in the last 60 s)")
        assert handler.count == 1002
    finally:
        loop.close()


# -- the display service over real sockets -----------------------------------------------


UPGRADE = (
    "GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Screen:
    """A raw WebSocket handshake from a chosen source address; a screen that got 101 is
    held open (and never reads: it only has to hold its slot)."""

    def __init__(self) -> None:
        self.status: int | str = "?"
        self.headers: dict[str, str] = {}
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, port: int, source: str, query: str = "", timeout: float = 15.0) -> "Screen":
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
                writer.write(UPGRADE.format(port=port, query=query).encode())
                head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.status = "reset"  # a refusal at accept may reach the client as a reset
            return self
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if self.status == 101:
            self.writer = writer
        else:
            writer.close()
        return self

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
            self.writer = None


@contextlib.asynccontextmanager
async def screens() -> AsyncIterator[list[Screen]]:
    held: list[Screen] = []
    try:
        yield held
    finally:
        for s in held:
            s.close()


async def test_screens_beyond_the_limits_get_503_with_retry_after():
    async with serving(display(max_clients=4, max_clients_per_address=2), ROOMS, store()) as svc, \
            screens() as held:
        port = svc.port
        for _ in range(2):
            held.append(await Screen().open(port, "127.0.0.2"))
        third = await Screen().open(port, "127.0.0.2")
        assert [s.status for s in held] == [101, 101]
        assert third.status == 503 and third.headers["retry-after"] == str(limits.RETRY_AFTER)
        # Another address still gets in, up to max_clients in all.
        for source in ("127.0.0.3", "127.0.0.3"):
            held.append(await Screen().open(port, source))
        fifth = await Screen().open(port, "127.0.0.4")
        assert [s.status for s in held] == [101] * 4 and fifth.status == 503
        status, _, body = await http_get(port, "/healthz")
        doc = json.loads(body)
        assert doc["refused_clients"] == 2
        assert doc["refused_by_reason"] == {"address_clients": 1, "clients": 1}
        assert doc["limits"]["max_clients"] == 4 and doc["limits"]["max_clients_per_address"] == 2
        # A screen that leaves gives its slot back.
        held.pop(0).close()
        await eventually(lambda: svc.limits.clients == 3, what="the closed screen's slot to be given back")
        again = await Screen().open(port, "127.0.0.2")
        held.append(again)
        assert again.status == 101


async def test_idle_connections_from_one_address_are_refused_at_once_and_healthz_elsewhere_answers():
    async with serving(display(max_clients_per_address=2), ROOMS, store()) as svc:
        port = svc.port
        allowed = 2 + limits.HTTP_PER_ADDRESS
        idle = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)) for _ in range(allowed + 20)]
        try:
            # The ones beyond the address's allowance are answered before they send anything.
            for reader, _ in idle[allowed:]:
                async with asyncio.timeout(5):
                    raw = await reader.read()
                assert raw.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 5\r\n" in raw
                assert b"\r\nX-Content-Type-Options: nosniff\r\n" in raw
            assert svc.limits.open == allowed
            # A monitor on another address is answered truthfully, with the refusals counted.
            status, headers, body = await http_get(port, "/healthz", source="127.0.0.9")
            doc = json.loads(body)
            assert headers["content-type"] == "application/json"
            assert doc["refused_by_reason"] == {"address_connections": 20}
            assert doc["open_connections"] == allowed + 1
            # The flooding address's own /healthz is refused while it holds its allowance...
            status, headers, body = await http_get(port, "/healthz", source="127.0.0.2")
            assert status == 503 and headers["x-refused"] == "address_connections"
        finally:
            for _, writer in idle:
                writer.transport.abort()
        # ... and answered again once it lets go.
        await eventually(lambda: svc.limits.open == 0, what="the idle connections to be closed")
        status, headers, body = await http_get(port, "/healthz", source="127.0.0.2")
        assert headers["content-type"] == "application/json"


async def test_when_every_slot_is_held_healthz_still_answers_and_nothing_else_does():
    # A flood from many addresses (each within its allowance) holds every connection the
    # budget has: a monitor's /healthz still gets the truth, a page gets the 503.
    async with serving(display(max_clients=1), ROOMS, store()) as svc:
        port = svc.port
        full = svc.limits.budget.max_open
        idle = [await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.{i // 8 + 1}.{i % 8 + 1}", 0))
                for i in range(full)]
        try:
            await eventually(lambda: svc.limits.open == full, what="the flood to be counted")
            status, headers, body = await http_get(port, "/healthz", source="127.0.0.9")
            assert status == 503 and headers["content-type"] == "application/json"  # 503: no upstream here
            assert json.loads(body)["open_connections"] == full + 1
            status, headers, _ = await http_get(port, "/", source="127.0.0.9")
            assert status == 503 and headers["retry-after"] == str(limits.RETRY_AFTER)
        finally:
            for _, writer in idle:
                writer.transport.abort()


async def test_the_event_loop_handler_is_installed_while_the_daemon_runs(sim, broker):
    from conftest import make_config, running

    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    async with running(make_config(sim.url, broker.port)):
        await eventually(lambda: isinstance(loop.get_exception_handler(), LoopExceptionLog), what="App.run to install it")
    assert loop.get_exception_handler() is before


# -- the incident, end to end --------------------------------------------------------------

FD_LIMIT = 512


def _limit_descriptors() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@contextlib.contextmanager
def descriptors_for_the_test(needed: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) is below the {needed} descriptors this test opens")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def gather_limited(jobs: list[Callable[[], Awaitable[Screen]]], at_once: int) -> list[Screen]:
    gate = asyncio.Semaphore(at_once)

    async def one(job: Callable[[], Awaitable[Screen]]) -> Screen:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def test_a_connection_flood_under_512_descriptors_leaves_the_daemon_working(sim, broker, watcher, tmp_path: Path):
    port = free_port()
    config = write_config(tmp_path / "config.yaml", {
        "upstream": {"url": sim.url, "token": "test-token", "backoff": {"initial": 0.05, "max": 0.3}},
        "rooms": [{"id": "opd-1", "name": "OPD 1"}, {"id": "lab", "name": "Laboratory"}],
        "mqtt": {"port": broker.port, "client_id": "wr-flood"},
        "display": {"listen": f"127.0.0.1:{port}"},  # max_clients 500 and 20 per address: the defaults
    })
    log_path = tmp_path / "daemon.log"
    with descriptors_for_the_test(2500), open(log_path, "wb") as log_file, contextlib.ExitStack() as stack:
        proc = await asyncio.create_subprocess_exec(
            *daemon_command("run", "--config", str(config)),
            stdout=subprocess.DEVNULL, stderr=log_file, preexec_fn=_limit_descriptors,
            env={**os.environ, "PYTHONPATH": str(ROOT / "daemon")},
        )
        stack.callback(lambda: proc.returncode is None and proc.kill())
        held: list[Screen] = []
        stack.callback(lambda: [s.close() for s in held])
        await watcher.wait_topic("waiting-room/upstream", "connected")  # the display listens by then
        await watcher.wait_topic("waiting-room/opd-1/patients", "5")
        started_history = len(watcher.history)

        # 300 screens from one address, then 1,200 from 80 others (15 each: under the
        # per-address limit, so only the total and the descriptor reserve stop them).
        one = await gather_limited([lambda: Screen().open(port, "127.0.0.2") for _ in range(300)], 100)
        many = await gather_limited(
            [lambda i=i: Screen().open(port, f"127.0.1.{i % 80 + 1}") for i in range(1200)], 200)
        held.extend(s for s in one + many if s.writer is not None)
        statuses = [s.status for s in one + many]
        assert statuses.count(101) + statuses.count(503) + statuses.count("reset") == 1500, set(statuses)
        assert [s.status for s in one].count(101) == 20  # max_clients_per_address
        budget = Budget.plan(500, 20, FD_LIMIT)
        assert len(held) == budget.max_clients  # max_clients, clamped to fit the 512 descriptors
        assert all(s.headers.get("retry-after") == "5" for s in one + many if s.status == 503)

        # /healthz answers a monitor on another address, and the flooding one too (it holds
        # its 20 screens, below its allowance of open connections).
        for source in ("127.0.0.1", "127.0.0.2"):
            status, _, body = await http_get(port, "/healthz", source=source)
            doc = json.loads(body)
            assert status == 200, doc
            assert doc["refused_clients"] >= 1500 - len(held), doc
            assert doc["display_clients"] == len(held)
        # One more screen from a fresh address is told to come back later.
        late = await Screen().open(port, "127.0.2.1")
        assert late.status == 503 and late.headers["retry-after"] == "5"

        # The upstream and the broker never noticed; a change still goes through.
        assert ("waiting-room/upstream", "disconnected") not in watcher.history[started_history:]
        sim.set_queue("opd-1", 77)
        await watcher.wait_topic("waiting-room/opd-1/patients", "77")
        # With every screen slot taken, the upstream can still connect again: the reserve.
        await sim.close_all(1012)
        await watcher.wait_for(
            lambda: ("waiting-room/upstream", "disconnected") in watcher.history[started_history:]
            and watcher.last.get("waiting-room/upstream") == "connected",
            what="the upstream to reconnect during the flood")
        sim.set_queue("opd-1", 78)
        await watcher.wait_topic("waiting-room/opd-1/patients", "78")

        for s in held:
            s.close()
        held.clear()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0

    text = log_path.read_text()
    lines = text.splitlines()
    assert "Traceback" not in text and "out of system resource" not in text, text[-3000:]
    assert len(lines) < 50, text[-3000:]
    assert sum("display.max_clients 500 does not fit" in line for line in lines) == 1, text
    assert sum("display: refused a client" in line for line in lines) == 1, text
