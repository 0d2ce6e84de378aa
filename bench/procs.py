"""The processes a benchmark run starts: a private mosquitto, the daemon, the probes.

Nothing here touches the machine's broker on 1883: mosquitto gets a free loopback port and a
config of its own. The daemon is ``python -m waiting_room run --config ...`` in its own process,
so its RSS and CPU (``/proc/<pid>/status`` VmRSS, ``/proc/<pid>/stat`` utime+stime) are its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from testsupport import CLK_TCK, ROOT, cpu_seconds, free_port, memory_kb  # noqa: F401 (re-exported)
from testsupport import Broker as SharedBroker
from testsupport import Daemon as SharedDaemon


def machine_load() -> list[float]:
    return list(os.getloadavg())


# -- mosquitto ------------------------------------------------------------------------------


class Broker(SharedBroker):
    """The shared mosquitto, tuned for measuring (no Nagle, unlimited queues)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, tuned=True)


# -- the daemon -----------------------------------------------------------------------------


def daemon_config(
    upstream_url: str,
    rooms: list[str],
    broker_port: int,
    base_topic: str,
    *,
    display_port: int | None = None,
    backoff: dict[str, Any] | None = None,
    stable_after: float | None = None,
) -> dict[str, Any]:
    """Defaults wherever a user would keep them (discovery on, backoff 1..10 s, QoS as shipped)."""
    upstream: dict[str, Any] = {"url": upstream_url, "token": "daemon"}
    if backoff is not None:
        upstream["backoff"] = backoff
    if stable_after is not None:
        upstream["stable_after"] = stable_after
    return {
        "upstream": upstream,
        "rooms": [{"id": r} for r in rooms],
        "mqtt": {"port": broker_port, "base_topic": base_topic, "client_id": f"bench-{base_topic}"},
        "display": (
            {"enabled": True, "listen": f"127.0.0.1:{display_port}",
             # the fan-out scenario's clients all come from one address
             "max_clients": 5000, "max_clients_per_address": 5000} if display_port else {"enabled": False}
        ),
        "log_level": "info",
    }


class Daemon(SharedDaemon):
    """The shared daemon process, plus the wait for it to go quiet that the scenarios need."""

    async def quiet(self, window: float = 0.5, ticks: int = 1, limit: float = 30.0) -> float:
        """Waits until the daemon burns at most ``ticks`` clock ticks in two windows in a row;
        returns how long that took (bounded by ``limit``)."""
        started = time.monotonic()
        calm = 0
        last = self.cpu()
        while time.monotonic() - started < limit:
            await asyncio.sleep(window)
            now = self.cpu()
            calm = calm + 1 if (now - last) * CLK_TCK <= ticks else 0
            last = now
            if calm >= 2:
                break
        return time.monotonic() - started


# -- the seed stack (bench/seed: rxjs webSocket + retryBackoff + shareReplay, mqtt.js) ---------

SEED_DIR = ROOT / "bench" / "seed"


def install_seed() -> str | None:
    """``npm ci`` into bench/seed/node_modules (gitignored) when the lockfile is newer than the
    last install; returns why the seed stack cannot run, or None."""
    import shutil
    import subprocess

    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node/npm not found"
    stamp = SEED_DIR / "node_modules" / ".package-lock.json"
    lock = SEED_DIR / "package-lock.json"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return None
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=SEED_DIR,
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        return f"npm ci failed: {(done.stderr or done.stdout)[-300:]}"
    return None


class SeedBridge(Daemon):
    """``node bench/seed/bridge.mjs CONFIG.json``: the seed tutorial's stack as a process
    with the daemon's interface (pid, cpu, memory, stop, log), on the daemon's config shape."""

    def write_config(self, config: dict[str, Any] | str) -> None:
        self.config_path = self.config_path.with_suffix(".json")
        self.config_path.write_text(config if isinstance(config, str) else json.dumps(config))

    def start(self) -> None:
        import shutil
        import subprocess

        with open(self.log_path, "ab") as log:
            self.started_ns = time.monotonic_ns()
            self.proc = subprocess.Popen(
                [shutil.which("node") or "node", str(SEED_DIR / "bridge.mjs"), str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=SEED_DIR,
            )


# -- probes ---------------------------------------------------------------------------------


class Probe:
    """A ``python -m bench.probe KIND`` (or ``bench.fanout``) child, driven by JSON lines."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "daemon"), str(ROOT)])}
        # Display clients are many: they get the lean epoll probe (bench.fanout).
        argv = ["-m", "bench.fanout"] if self.kind == "display" else ["-m", "bench.probe", self.kind]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=env, limit=2**28,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def call(self, cmd: str, *, limit: float = 120.0, **args: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        limit = max(limit, float(args.get("timeout", 0)) + 15)
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(limit):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"probe {self.kind} exited")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"probe {self.kind}: {cmd}: {answer['error']}")
        return answer

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            await self.call("exit", limit=5)
            async with asyncio.timeout(5):
                await self.proc.wait()
        except (TimeoutError, RuntimeError, BrokenPipeError, ConnectionResetError):
            self.proc.kill()
            await self.proc.wait()
