"""Shared fixtures: a private mosquitto on a free loopback port, the simulator, a daemon.

Nothing here touches the machine's own broker on 1883: every test run starts its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

import aiomqtt
import pytest
import yaml

from waiting_room.config import Config, parse_config
from waiting_room.simulator import Simulator

if TYPE_CHECKING:
    from waiting_room.app import App

from testsupport import ROOT, free_port  # noqa: F401 (re-exported to the tests)
from testsupport import Broker as SharedBroker
from testsupport import CertAuthority, Issued


class Broker(SharedBroker):
    """The shared private mosquitto (testsupport); a start-up problem fails the test."""

    def start(self) -> None:
        try:
            super().start()
        except RuntimeError as exc:
            pytest.fail(f"{exc} (./scripts/test installs mosquitto)")


class Pki:
    """The test's own certificates (testsupport.CertAuthority, made once per session): a CA the
    daemon trusts, a server certificate from it for localhost/127.0.0.1/::1 (``server``, and
    ``server_chain`` with the CA after it), one for another name (``wrong_host``), client
    certificates, and a rogue CA the daemon does not trust (``rogue_server``, ``rogue_client``,
    and ``self_signed``: the rogue CA's own certificate served as a server's)."""

    def __init__(self, workdir: Path) -> None:
        try:
            self.ca = CertAuthority(workdir / "ca")
            self.rogue = CertAuthority(workdir / "rogue", "rogue CA")
        except RuntimeError as exc:
            if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
                pytest.fail(f"TLS tests cannot run under CI: {exc}", pytrace=False)
            pytest.skip(str(exc))
        self.server = self.ca.issue("server")
        self.server_chain = self.ca.issue("server-chain", chain=True)
        self.wrong_host = self.ca.issue("wrong-host", dns=("elsewhere.example",), ips=())
        self.client = self.ca.issue("daemon", client=True)
        self.rogue_server = self.rogue.issue("rogue-server")
        self.rogue_client = self.rogue.issue("rogue-daemon", client=True)
        self.self_signed = Issued(self.rogue.cert, self.rogue.key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "", interval: float = 0.05) -> Any:
    """For what only an outside process shows (a file a sign program writes, a daemon
    process's /healthz, Home Assistant's REST answers), where there is no event to await:
    asks ``check`` (plain or async) until its answer is truthy and returns that; an
    assertion or lookup error from it means "not yet". Fails the test after ``timeout``,
    naming ``what`` and the last answer."""
    last: Any = None
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await last
        except (AssertionError, LookupError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}; last: {last!r}")
        await asyncio.sleep(interval)


class LogWatch(logging.Handler):
    """Every record of a logger (DEBUG and up) while in use; a test awaits a condition on them
    with a deadline, woken by each new record."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None

    async def __aenter__(self) -> "LogWatch":
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        assert self._loop is not None and self._changed is not None
        self._loop.call_soon_threadsafe(self._changed.set)

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        assert self._changed is not None
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            seen = [r.getMessage() for r in self.records][-10:]
            raise AssertionError(f"timed out waiting for {what or predicate}; last records: {seen}") from None


class Watcher:
    """An MQTT subscriber that remembers the last payload of every topic and lets a test
    await a condition with a deadline, instead of sleeping and hoping."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.last: dict[str, str] = {}
        self.history: list[tuple[str, str]] = []
        self._changed = asyncio.Condition()

    async def _pump(self) -> None:
        async for msg in self.client.messages:
            payload = msg.payload.decode() if isinstance(msg.payload, (bytes, bytearray)) else str(msg.payload)
            topic = msg.topic.value
            self.last[topic] = payload
            self.history.append((topic, payload))
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what or predicate}; last={self.last}") from None

    async def wait_topic(self, topic: str, payload: str | None = None, timeout: float = 10.0) -> str:
        if payload is None:
            await self.wait_for(lambda: topic in self.last, timeout, f"{topic}")
        else:
            await self.wait_for(lambda: self.last.get(topic) == payload, timeout, f"{topic} == {payload!r}")
        return self.last[topic]


@contextlib.asynccontextmanager
async def watching(port: int, *topics: str, qos: int = 0, tls_context: ssl.SSLContext | None = None
                   ) -> AsyncIterator[Watcher]:
    """A subscriber to ``topics`` (everything by default) on a private broker's ``port``."""
    client = aiomqtt.Client("127.0.0.1", port, identifier=f"test-watcher-{os.getpid()}-{time.monotonic_ns()}",
                            tls_context=tls_context)
    await client.__aenter__()
    for topic in topics or ("#",):
        await client.subscribe(topic, qos=qos)
    w = Watcher(client)
    task = asyncio.create_task(w._pump())
    try:
        yield w
    finally:
        task.cancel()
        # A test may have restarted the broker under the watcher: its loss is not a failure.
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)


@pytest.fixture
async def watcher(broker: Broker) -> AsyncIterator[Watcher]:
    async with watching(broker.port) as w:
        yield w


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator(rooms=("opd-1", "lab"), token="test-token", heartbeat=15, tick=0, seed=1,
                  initial_patients={"opd-1": 5, "lab": 2})
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def make_config(sim_url: str, broker_port: int, **overrides: object) -> Config:
    """A small, fast config: backoff shrunk so reconnect tests take fractions of a second."""
    data: dict[str, object] = {
        "upstream": {
            "url": sim_url,
            "token": "test-token",
            "backoff": {"initial": 0.05, "max": 0.3},
            "stable_after": 0.5,
            "connect_timeout": 2,
        },
        "rooms": [{"id": "opd-1", "name": "OPD 1"}, {"id": "lab", "name": "Laboratory"}],
        "mqtt": {"port": broker_port, "client_id": "wr-test", "backoff": {"initial": 0.05, "max": 0.3}},
        "display": {"enabled": False},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value  # type: ignore[index]
        else:
            data[section] = value
    return parse_config(data, "test-config")


def write_config(path: Path, config: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def daemon_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "waiting_room", *args]


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator["App"]:
    """The daemon in this test's event loop; stopped the way SIGTERM stops it."""
    from waiting_room.app import App

    app = App(config)
    task = asyncio.create_task(app.run())
    try:
        yield app
    finally:
        app.request_stop()
        async with asyncio.timeout(5):
            await task


async def wait_store(app: "App", predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Awaits a condition on the daemon's store, woken by each change it publishes."""
    with app.store.subscribe() as changes:
        async with asyncio.timeout(timeout):
            async for _ in changes:
                if predicate():
                    return
